"""A Hugging Face model directory (safetensors) written as one GGUF file with the `gguf`
package's `GGUFWriter`, streamed one tensor at a time.

Format: GGUF version 3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): a header,
key/value metadata, tensor infos, then the tensor data, each tensor aligned to 32 bytes.

- Metadata: `general.*` (architecture, name, file type, quantization version); the
  hyper-parameters under the architecture's prefix (`llama.block_count`, ...: gguf's
  `Keys.LLM`, `Keys.Attention`, `Keys.Rope`), which llama.cpp and transformers' GGUF reader
  both read; the vocabulary (`gguf_vocab`).
- Tensor names: the gguf package's own map from Hugging Face module names
  (`gguf.get_tensor_name_map`: `model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`), with the
  `.weight` / `.bias` suffix kept. A tied output head is not written (llama.cpp then uses
  `token_embd` for the output, and transformers reads the missing `output.weight` as tied).
- Llama's Q and K rows are reordered per head (`interleave_rope_halves`): Hugging Face's
  rotary embedding rotates dimension i with i + d/2 of each head, llama.cpp's llama graph
  rotates 2i with 2i + 1, so the rows are interleaved to put each rotated pair side by side.
  Qwen2 uses llama.cpp's NEOX rope (the Hugging Face pairing): no reordering.
- Types (`--outtype`): 1-D tensors (norms, biases) stay F32, as in llama.cpp; matrices are
  F16, BF16, Q8_0 or Q4_0 (blocks of 32 values with one scale, `gguf.quants`). Under q4_0 the
  output projection (`output.weight`, or `token_embd.weight` when it serves as the output) is
  Q8_0, the most sensitive tensor kept finer, as llama.cpp's quantizer does too. A matrix
  whose rows are not a multiple of 32 cannot be blocked: it is written F16 (and reported).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import Keys

from peftune.errors import InputError
from peftune.export.gguf_vocab import GgufVocab
from peftune.merge.stio import read_tensor
from peftune.merge.writer import base_shards, tensor_locations


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    gguf_arch: gguf.MODEL_ARCH
    family: str  # what the refusal names
    permute_qk: bool  # llama.cpp's rope pairs differ from Hugging Face's: reorder Q, K rows

    @property
    def name(self) -> str:  # general.architecture
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", gguf.MODEL_ARCH.LLAMA, "Llama family, SmolLM2 included", True),
    Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, "Qwen2", False),
)}
SUPPORTED_TEXT = ", ".join(f"{a.model_type} ({a.family})" for a in ARCHITECTURES.values())

# --outtype -> (GGML type of the matrices, general.file_type)
OUTTYPES = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_BLOCKED = {Q.Q8_0, Q.Q4_0}


def check_config(config: dict, *, where: str) -> Architecture:
    """The architecture of a config.json this writer can write (and transformers' GGUF reader
    reads back the same); one InputError line for anything else."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise InputError(f"{where}: model_type {model_type!r} cannot be exported to GGUF; "
                         f"supported architectures: {SUPPORTED_TEXT}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r}")
    if arch.model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        problems.append("attention/MLP biases")
    if arch.model_type == "qwen2":
        if config.get("use_sliding_window"):
            problems.append("sliding-window attention")
        if config.get("head_dim") not in (None, _head_dim(config)):
            problems.append(f"head_dim {config['head_dim']} != hidden_size / heads")
    if problems:
        raise InputError(f"{where}: a {model_type} model with {', '.join(problems)}, which this "
                         "GGUF export does not write (transformers could not read it back to "
                         f"verify it); supported: {SUPPORTED_TEXT} without them")
    return arch


def _head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


def hyperparameters(config: dict, arch: Architecture) -> dict[str, tuple[Any, V]]:
    """{key: (value, GGUF type)} of the architecture's hyper-parameters."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or _head_dim(config)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    fields = {
        Keys.LLM.CONTEXT_LENGTH: (config["max_position_embeddings"], V.UINT32),
        Keys.LLM.EMBEDDING_LENGTH: (config["hidden_size"], V.UINT32),
        Keys.LLM.BLOCK_COUNT: (config["num_hidden_layers"], V.UINT32),
        Keys.LLM.FEED_FORWARD_LENGTH: (config["intermediate_size"], V.UINT32),
        Keys.Attention.HEAD_COUNT: (heads, V.UINT32),
        Keys.Attention.HEAD_COUNT_KV: (config.get("num_key_value_heads") or heads, V.UINT32),
        Keys.Attention.LAYERNORM_RMS_EPS: (config.get("rms_norm_eps", 1e-6), V.FLOAT32),
        Keys.Rope.FREQ_BASE: (theta, V.FLOAT32),
        Keys.Rope.DIMENSION_COUNT: (head_dim, V.UINT32),
        Keys.LLM.VOCAB_SIZE: (config["vocab_size"], V.UINT32),
    }
    if head_dim != _head_dim(config):
        fields[Keys.Attention.KEY_LENGTH] = (head_dim, V.UINT32)
        fields[Keys.Attention.VALUE_LENGTH] = (head_dim, V.UINT32)
    return {key.format(arch=arch.name): value for key, value in fields.items()}


@dataclass(frozen=True)
class PlannedTensor:
    source: str  # the safetensors name
    name: str  # the GGUF name
    shape: tuple[int, ...]  # Hugging Face order (rows, columns)
    qtype: Q
    permute_heads: int | None = None  # llama Q/K: heads whose rows are interleaved

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


@dataclass
class TensorPlan:
    tensors: list[PlannedTensor]
    fallbacks: list[str] = field(default_factory=list)  # matrices written F16 (rows not blockable)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for t in self.tensors:
            found[t.qtype.name] = found.get(t.qtype.name, 0) + 1
        return found


def plan_tensors(model_dir: Path, config: dict, arch: Architecture, outtype: str) -> TensorPlan:
    """Every tensor of `model_dir` with its GGUF name and type, in llama.cpp's order
    (token_embd, the blocks in order, output_norm, output): from the safetensors headers."""
    shapes = {name: tuple(info["shape"])
              for name, (_, _, info) in tensor_locations(base_shards(model_dir)).items()}
    names = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings"))
    matrix_type = OUTTYPES[outtype][0]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    plan = TensorPlan([])
    for source, shape in shapes.items():
        stem, dot, suffix = source.rpartition(".")
        if tied and stem == "lm_head":
            continue  # the embedding serves as the output head
        target = names.get_name(stem) if suffix in ("weight", "bias") else None
        if target is None:
            raise InputError(f"{model_dir}: tensor {source} has no GGUF name in the {arch.name} "
                             "layout; this model is not a plain "
                             f"{arch.model_type} (supported: {SUPPORTED_TEXT})")
        name = f"{target}.{suffix}"
        qtype = Q.F32 if len(shape) == 1 else matrix_type
        is_output = name == "output.weight" or (tied and name == "token_embd.weight")
        if outtype == "q4_0" and is_output:
            qtype = Q.Q8_0
        if qtype in _BLOCKED and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            plan.fallbacks.append(name)
            qtype = Q.F16
        permute = None
        if arch.permute_qk and suffix == "weight" and target.endswith((".attn_q", ".attn_k")):
            permute = heads if target.endswith(".attn_q") else kv_heads
        plan.tensors.append(PlannedTensor(source, name, shape, qtype, permute))
    plan.tensors.sort(key=_llama_cpp_order)
    return plan


def _llama_cpp_order(tensor: PlannedTensor) -> tuple[int, int]:
    """token_embd first (transformers' reader converts it while little else is loaded),
    then block by block, then output_norm and output; stable within a block."""
    if tensor.name.startswith("token_embd."):
        return (0, 0)
    block = re.match(r"blk\.(\d+)\.", tensor.name)
    if block:
        return (1, int(block[1]))
    return (2, 0 if tensor.name.startswith("output_norm.") else 1)


def interleave_rope_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows of every head reordered from [x0 .. x(d/2-1), y0 .. y(d/2-1)] (Hugging
    Face's rotate_half pairs xi with yi, d/2 apart) to [x0, y0, x1, y1, ...] (llama.cpp's
    llama rope pairs neighbours): the same rotation then acts on the same pairs of values."""
    rows = weight.shape[0]
    per_head = rows // heads
    return (weight.reshape(heads, 2, per_head // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """A tensor as the bytes (or float array) GGUF stores for `qtype`."""
    if qtype == Q.F32:
        return tensor.float().contiguous().numpy()
    if qtype == Q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:  # numpy has no bfloat16: its raw 2-byte words
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.float().contiguous().numpy(), qtype)


@dataclass
class GgufContent:
    """Everything one GGUF file holds but the tensor data: what `write_gguf` writes and the
    read-back checks against."""

    arch: Architecture
    outtype: str
    fields: dict[str, tuple[Any, V]]  # general.* and hyper-parameters
    vocab: GgufVocab
    plan: TensorPlan

    def expected_fields(self) -> dict[str, Any]:
        return {**{k: v for k, (v, _) in self.fields.items()}, **self.vocab.fields()}


def content_for(model_dir: Path, *, config: dict, arch: Architecture, outtype: str,
                vocab: GgufVocab, name: str) -> GgufContent:
    fields = {
        Keys.General.TYPE: ("model", V.STRING),
        Keys.General.NAME: (name, V.STRING),
        Keys.General.FILE_TYPE: (int(OUTTYPES[outtype][1]), V.UINT32),
        Keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, V.UINT32),
        **hyperparameters(config, arch),
    }
    return GgufContent(arch=arch, outtype=outtype, fields=fields, vocab=vocab,
                       plan=plan_tensors(model_dir, config, arch, outtype))


def write_gguf(path: Path, *, model_dir: Path, content: GgufContent) -> None:
    """Write `content` with the tensors of `model_dir` to `path`, one tensor in memory at a
    time: the header, metadata and tensor infos first (from the plan), then each tensor read,
    reordered, encoded and appended."""
    writer = gguf.GGUFWriter(path, content.arch.name)
    try:
        for key, (value, kind) in content.fields.items():
            writer.add_key_value(key, value, kind)
        content.vocab.write(writer)
        for t in content.plan.tensors:
            float_type = {Q.F32: np.float32, Q.F16: np.float16}.get(t.qtype)
            writer.add_tensor_info(t.name, t.shape, np.dtype(float_type or np.float32), t.nbytes,
                                   raw_dtype=None if float_type else t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        locations = tensor_locations(base_shards(model_dir))
        handles: dict[Path, Any] = {}
        try:
            for t in content.plan.tensors:
                shard, start, info = locations[t.source]
                if shard not in handles:
                    handles[shard] = open(shard, "rb")  # noqa: SIM115 - closed below
                tensor = read_tensor(handles[shard], start, info)
                if t.permute_heads:
                    tensor = interleave_rope_halves(tensor, t.permute_heads)
                writer.write_tensor_data(encode(tensor, t.qtype))
        finally:
            for handle in handles.values():
                handle.close()
    finally:
        writer.close()


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())
