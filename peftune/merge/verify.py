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
                "probes": self.probes}


def compare(*, merged: list[torch.Tensor], reference: list[torch.Tensor],
            base: list[torch.Tensor] | None, dtype: str) -> Check:
    error = max(float((m - r).abs().max()) for m, r in zip(merged, reference, strict=True))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    effect = (max(float((r - b).abs().max()) for r, b in zip(reference, base, strict=True))
              if base is not None else 0.0)
    return Check(dtype=dtype, max_abs_error=error, relative_error=error / scale,
                 adapter_effect=effect, tolerance=TOLERANCE[dtype], probes=len(reference))
