"""A quantized base on CPU keeps no view of its checkpoint's memory map (peftune/quant/memory.py):
the tensors left unquantized (embeddings, head, norms) get memory of their own, with the same
values, the same Parameter objects and their ties intact, so the map and its pages go. The
real model's figures are scripts/bench_qlora_memory.py's, not a test's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peftune.recipe.schema import ModelSection, QuantSection

CPU = torch.device("cpu")
QUANTS = {"nf4": {"method": "nf4", "compute_dtype": "float32"},
          "int4": {"method": "int4", "group_size": 32, "compute_dtype": "float32"}}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the memory maps from /proc/self/maps")


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process's memory maps of `path`."""
    target = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def tensors_in_map(model, path: Path) -> list[str]:
    """The names of `model`'s parameters and buffers whose memory is in a map of `path`."""
    ranges = mapped_ranges(path)
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if any(start <= tensor.untyped_storage().data_ptr() < end for start, end in ranges)]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with tied embeddings (the real model's layout), built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("models") / "tied"
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def load(model_dir: Path, quant: dict):
    from peftune.models import load_model

    return load_model(ModelSection(path=str(model_dir), dtype="float32"), QuantSection(**quant),
                      device=CPU)


@pytest.mark.parametrize("method", sorted(QUANTS))
def test_quantized_base_keeps_no_view_of_the_checkpoint(tied_model_dir, method, monkeypatch):
    checkpoint = tied_model_dir / "model.safetensors"
    model = load(tied_model_dir, QUANTS[method])
    assert tensors_in_map(model, checkpoint) == []
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight

    # What it guards against: without the copies the unquantized tensors view the map.
    import peftune.quant.memory

    monkeypatch.setattr(peftune.quant.memory, "own_unquantized_tensors", lambda model: 0)
    kept = load(tied_model_dir, QUANTS[method])
    assert "model.embed_tokens.weight" in tensors_in_map(kept, checkpoint)


def test_owning_keeps_values_parameters_and_ties(tied_model_dir):
    from transformers import AutoModelForCausalLM

    from peftune.quant.memory import own_unquantized_tensors

    model = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = dict(model.named_parameters())
    copied = own_unquantized_tensors(model)

    assert tensors_in_map(model, tied_model_dir / "model.safetensors") == []
    assert copied == sum(p.numel() * p.element_size() for p in params.values()) + sum(
        b.numel() * b.element_size() for b in model.buffers())  # the tied weight once
    assert all(model.get_parameter(name) is param for name, param in params.items())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
