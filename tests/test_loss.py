"""The chunked loss (peftune/train/loss.py) equals the full-logits loss: the loss and every
trainable gradient, fp32, rel 1e-5, for a tied head, a LoRA-adapted head, full fine-tuning,
virtual tokens, a 4-bit base and the sharded-engine route; per-row NLL for evaluation; and
the inputs that skip the attention mask are exact. DDP and FSDP runs compare against the
plain loss in test_distributed.py / test_fsdp.py."""

from __future__ import annotations

import logging

import pytest
import torch

from peftune.train import loss as loss_module
from peftune.train.loss import model_inputs, target_nll_per_row, token_loss_sum


def _tiny(*, tied: bool, vocab: int = 300, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tied, **extra)
    return LlamaForCausalLM(config).float()


def _batch(seed: int = 1, *, rows: int = 3, width: int = 24, vocab: int = 300) -> dict:
    """Rows with masked prompts and right padding (labels -100 on both)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for j in range(rows):
        real = width - 5 * j
        labels[j, :4 + j] = -100  # the prompt
        labels[j, real:] = -100
        mask[j, real:] = 0
        ids[j, real:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch, *, chunked: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    value = token_loss_sum(model, batch, chunked=chunked)
    (value / 7.0).backward()  # a scale, as the loop divides by the step's target count
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(value), grads


def _assert_same(model, batch) -> None:
    loss_plain, grads_plain = _loss_and_grads(model, batch, chunked=False)
    loss_chunked, grads_chunked = _loss_and_grads(model, batch, chunked=True)
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-5)
    assert grads_plain and grads_chunked.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        scale = float(grad.abs().max()) or 1.0
        assert float((grads_chunked[name] - grad).abs().max()) <= 1e-5 * scale, name


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of 8 rows: a batch's ~50 targets take several."""
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 300 * 8)
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ROWS", 8)


def _lora(model, **kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=kwargs.pop("targets", "all-linear"),
                        lora_dropout=0.0, init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


def test_lora_over_a_tied_head_gives_the_full_loss_and_gradients():
    model = _lora(_tiny(tied=True))
    _assert_same(model, _batch())


def test_a_lora_adapted_head_gives_the_full_loss_and_gradients():
    model = _lora(_tiny(tied=False), targets=["q_proj", "v_proj", "lm_head"])
    assert any("lm_head.lora_A" in n for n, _ in model.named_parameters())
    _assert_same(model, _batch())


def test_full_fine_tuning_of_a_tied_model_gives_the_full_gradients():
    model = _tiny(tied=True)
    _assert_same(model, _batch())


def test_virtual_tokens_are_scored_on_the_rows_own_positions():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(_tiny(tied=True), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                 num_virtual_tokens=5))
    _assert_same(model, _batch())


def test_the_sharded_route_checkpoints_chunks_and_gives_the_full_gradients():
    """Under FSDP a trainable head's gradients must flow through autograd (the engine's hooks):
    the checkpointed chunks give the same numbers."""
    model = _lora(_tiny(tied=False), targets=["q_proj", "lm_head"])
    batch = _batch()
    loss_plain, grads_plain = _loss_and_grads(model, batch, chunked=False)
    targets = loss_module.shifted_targets(batch["labels"])
    model.zero_grad(set_to_none=True)
    with loss_module._loss_head(model, targets, per_row=False) as head:
        head.sharded = True
        value = head.returned(model(**model_inputs(model, batch), use_cache=False).logits)
    (value / 7.0).backward()
    assert float(value) == pytest.approx(loss_plain, rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = float(grads_plain[name].abs().max()) or 1.0
            assert float((param.grad - grads_plain[name]).abs().max()) <= 1e-5 * scale, name


def test_a_4bit_base_gives_the_full_loss_and_gradients(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny(tied=True).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    from peftune.quant import prepare_quantized_model
    from peftune.recipe.schema import QuantSection

    base = prepare_quantized_model(base, QuantSection(method="nf4"), device=torch.device("cpu"))
    _assert_same(_lora(base), _batch())


def test_the_head_is_restored_and_the_chunks_really_split():
    model = _lora(_tiny(tied=True))
    head = model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        token_loss_sum(model, _batch(), chunked=True).backward()
    finally:
        hook.remove()
    assert model.get_output_embeddings() is head
    n_targets = int((_batch()["labels"][:, 1:] != -100).sum())
    assert sum(calls) == n_targets  # only target positions reach the head
    assert len(calls) > 1


def test_per_row_nll_equals_the_full_computation():
    model = _lora(_tiny(tied=True))
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        chunked = target_nll_per_row(model, inputs, batch["labels"], chunked=True)
        plain = target_nll_per_row(model, inputs, batch["labels"], chunked=False)
    assert chunked.dtype == torch.float64 and chunked.shape == (3,)
    assert chunked.tolist() == pytest.approx(plain.tolist(), rel=1e-6)


def test_a_model_that_changes_its_logits_after_the_head_takes_the_plain_path(caplog):
    model = _tiny(tied=True)
    model.config.final_logit_softcapping = 30.0
    loss_module._said.clear()
    with caplog.at_level(logging.WARNING, logger="peftune.train.loss"):
        token_loss_sum(model, _batch(), chunked=True)
        token_loss_sum(model, _batch(), chunked=True)
    said = [r.message for r in caplog.records if "full logits" in r.message]
    assert said == ["the loss is computed from the full logits: its forward changes the "
                    "logits after the head (final_logit_softcapping)"]


# ---- attention: no mask where causal attention alone is exact ------------------------------

def _packed(lengths_per_row: list[list[int]], width: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (len(lengths_per_row), width), generator=gen)
    labels, positions = ids.clone(), torch.zeros_like(ids)
    for j, lengths in enumerate(lengths_per_row):
        runs = [*lengths, width - sum(lengths)] if sum(lengths) < width else lengths
        positions[j] = torch.cat([torch.arange(n) for n in runs])
        labels[j, sum(lengths):] = -100
        ids[j, sum(lengths):] = 0
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def test_rows_of_one_example_take_the_causal_path_and_give_the_masked_loss():
    model = _tiny(tied=True).eval()
    single = _packed([[20], [13], [24]], 24)
    assert set(model_inputs(model, single)) == {"input_ids"}
    padded = _batch()
    assert set(model_inputs(model, padded)) == {"input_ids"}  # right padding: no mask either
    left = dict(padded, attention_mask=padded["attention_mask"].flip(1))
    assert "attention_mask" in model_inputs(model, left)
    with torch.no_grad():
        for batch in (single, padded):
            fast = float(token_loss_sum(model, batch))
            if "position_ids" in batch:
                from peftune.data import block_causal_mask

                full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=block_causal_mask(batch["position_ids"]),
                             use_cache=False).logits
            else:
                full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
            targets = loss_module.shifted_targets(batch["labels"])
            assert fast == pytest.approx(float(loss_module._plain_loss(full, targets, per_row=False)),
                                         rel=1e-5)


def test_rows_with_several_examples_keep_their_block_mask():
    model = _tiny(tied=True)
    batch = _packed([[10, 14], [24]], 24)
    assert model_inputs(model, batch)["attention_mask"].shape == (2, 1, 24, 24)
    # a second example without any target does not need isolating (nothing after it is scored)
    batch["labels"][0, 10:] = -100
    assert set(model_inputs(model, batch)) == {"input_ids"}


def test_a_model_that_rescales_the_head_result_is_refused_with_one_line():
    """A wrapper that changes the logits after the head (unknown to the config check) would
    scale the chunked loss silently: the result is checked and refused instead."""
    from peftune.errors import TrainingError

    class Doubling(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = out.logits * 2
            return out

    with pytest.raises(TrainingError, match="set train.chunked_loss: false"):
        token_loss_sum(Doubling(_tiny(tied=True)), _batch())
    assert float(token_loss_sum(Doubling(_tiny(tied=True)), _batch(), chunked=False)) > 0
