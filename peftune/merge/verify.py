"""Verification of every merge: the merged model's logits against base + adapter on a few
built-in probe inputs, with a tolerance set by the output dtype.

The reference is the fp32 base with the adapter applied by peft (unmerged); the merged
model is loaded back from what was written, upcast to fp32, so the check covers the files
themselves (names, shards, dtype). The error is measured relative to the largest reference
logit; in bf16/fp16 the merged model must also have moved at least half-way from the base
towards the reference (a merge that dropped the adapter could hide inside a loose tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 times 7? Answer:",
    "1, 2, 3, 5, 8, 13, 21, 34,",
)
PROBE_TOKENS = 32
# max |merged − reference| / max |reference|, by output dtype (rounding of the stored weights)
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def probe_inputs(tokenizer) -> list[torch.Tensor]:
    """The probes as token ids, each at most PROBE_TOKENS long (one row each: no padding)."""
    rows = []
    texts = list(PROBES)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True))
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :PROBE_TOKENS]
        if ids.shape[1]:
            rows.append(ids)
    return rows


@torch.no_grad()
def probe_logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu() for ids in inputs]


@dataclass
class Check:
    dtype: str
    max_abs_error: float
    relative_error: float
    adapter_effect: float  # max |reference − base|
    tolerance: float
    probes: int = 0
    how: str = ""

    @property
    def ok(self) -> bool:
        if not self.relative_error <= self.tolerance:
            return False
        if self.dtype != "float32" and self.adapter_effect > 0:
            return self.max_abs_error <= 0.5 * self.adapter_effect
        return True

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "max_abs_logit_error": self.max_abs_error,
                "relative_logit_error": self.relative_error, "tolerance": self.tolerance,
                "adapter_effect_max_abs_logit": self.adapter_effect, "ok": self.ok,
                "probes": self.probes, "how": self.how}


def compare(*, merged: list[torch.Tensor], reference: list[torch.Tensor],
            base: list[torch.Tensor] | None, dtype: str) -> Check:
    error = max(float((m - r).abs().max()) for m, r in zip(merged, reference, strict=True))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    effect = (max(float((r - b).abs().max()) for r, b in zip(reference, base, strict=True))
              if base is not None else 0.0)
    return Check(dtype=dtype, max_abs_error=error, relative_error=error / scale,
                 adapter_effect=effect, tolerance=TOLERANCE[dtype], probes=len(reference))


class MissingTensor(Exception):
    pass


@torch.no_grad()
def lazy_logits(directory, inputs: list[torch.Tensor], *, extra=None,
                overrides: dict[str, torch.Tensor] | None = None, paired: bool = False):
    """Probe logits of a `LazyWeights` model: the probes in one right-padded batch (one pass
    over the weights), each row cut back to its own tokens. `paired`: the batch twice, `extra`
    applied to the second copy only, so one pass gives (without extra, with extra)."""
    lazy = LazyWeights(directory, extra=extra, overrides=overrides)
    lazy.model.eval()
    rows = list(inputs) * (2 if paired else 1)
    lengths = [ids.shape[1] for ids in rows]
    batch = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(rows):
        batch[row, : ids.shape[1]] = ids[0]
        mask[row, : ids.shape[1]] = 1
    lazy.from_row = len(inputs) if paired else 0
    logits = lazy.model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
    out = [logits[row : row + 1, :n] for row, n in enumerate(lengths)]
    return (out[: len(inputs)], out[len(inputs):]) if paired else out


def lora_forward(lora) -> object | None:
    """A LazyWeights `extra` adding each module's LoRA path, scale·B(A x), to its output (the
    adapter's own forward, not ΔW); None when the adapter has a layer this does not cover."""
    import torch.nn.functional as F

    if lora.config.get("fan_in_fan_out"):
        return None
    factors = {m: (lora.scale(m), {k: v.float() for k, v in f.items()})
               for m, f in lora.factors.items()}

    def extra(name, module, args, output, start):
        found = factors.get(name)
        if found is None:
            return output
        scale, f = found
        x = args[0][start:]
        if isinstance(module, torch.nn.Embedding):
            path = scale * F.embedding(x, f["lora_embedding_A"].T) @ f["lora_embedding_B"].T
        elif isinstance(module, torch.nn.Linear) and "lora_A" in f:
            path = scale * (x.float() @ f["lora_A"].T) @ f["lora_B"].T
        else:
            raise MissingTensor(f"{name}: a {type(module).__name__} layer")
        output = output.clone()
        output[start:] += path
        return output

    return extra


class LazyWeights:
    """A model whose parameters live on the meta device and are read from safetensors files
    one module at a time, only while that module runs (forward pre-hook loads them, the
    forward hook drops them): probe logits of a model of any size in about one layer's memory.
    Buffers (rotary tables) are built normally; tied parameters are read under any of their
    names. `extra(name, module, inputs, output, from_row)` may change a module's output (a
LoRA path) for the batch rows from `from_row` on."""

    def __init__(self, directory, extra=None, overrides: dict[str, torch.Tensor] | None = None):
        from pathlib import Path

        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from peftune.merge.stio import read_header
        from peftune.merge.writer import base_shards

        directory = Path(directory)
        config = AutoConfig.from_pretrained(directory)
        config.__dict__.pop("quantization_config", None)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.tie_weights()
        self.location: dict[str, tuple] = {}
        for shard in base_shards(directory):
            header, start = read_header(shard)
            self.location.update({name: (shard, start, info) for name, info in header.items()})
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        self.extra = extra
        self.overrides = overrides or {}
        self.from_row = 0  # `extra` changes the outputs of the batch rows from this one on
        for module_name, module in self.model.named_modules():
            own = {p: names[id(t)] for p, t in module._parameters.items() if t is not None}
            if not own:
                continue
            module.register_forward_pre_hook(self._loader(own))
            module.register_forward_hook(self._dropper(module_name, dict(module._parameters)))

    def _read(self, candidates: list[str]) -> torch.Tensor:
        from peftune.merge.stio import _DTYPES

        for name in candidates:
            if name in self.overrides:
                return self.overrides[name].float()
            found = self.location.get(name)
            if found is not None:
                shard, start, info = found
                begin, end = info["data_offsets"]
                buffer = bytearray(end - begin)
                with open(shard, "rb") as fh:
                    fh.seek(start + begin)
                    fh.readinto(buffer)
                return torch.frombuffer(buffer, dtype=_DTYPES[info["dtype"]]) \
                    .view(info["shape"]).float()
        raise MissingTensor(f"no tensor {candidates[0]} in the written files")

    def _loader(self, own: dict[str, list[str]]):
        def hook(module, args):
            for pname, candidates in own.items():
                module._parameters[pname] = torch.nn.Parameter(self._read(candidates),
                                                               requires_grad=False)
        return hook

    def _dropper(self, name: str, empty: dict):
        def hook(module, args, output):
            if self.extra is not None:
                output = self.extra(name, module, args, output, self.from_row)
            for pname, param in empty.items():
                module._parameters[pname] = param  # back to meta: the weight is freed
            return output
        return hook
