"""Verification of every merge: the merged model's logits against base + adapter on a few
built-in probe inputs, with a tolerance set by the output dtype.

The reference is the fp32 base with the adapter applied by peft (unmerged) or, for streamed
plain LoRA, the base files with the adapter's own forward added (`LazyWeights`,
`lora_forward`); the merged model is read back from what was written, upcast to fp32, so the
check covers the files themselves (names, shards, dtype). A streamed plain-LoRA merge also
checks every adapted weight while it is in memory (`ModuleCheck`), so its probes are short. The error is measured relative to the largest reference
logit; in bf16/fp16 the merged model must also have moved at least half-way from the base
towards the reference (a merge that dropped the adapter could hide inside a loose tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from peftune.errors import TrainingError
from peftune.merge.stio import read_tensor
from peftune.merge.writer import base_shards, tensor_locations, threads_for

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 times 7? Answer:",
    "1, 2, 3, 5, 8, 13, 21, 34,",
)
PROBE_TOKENS = 32
# a streamed plain-LoRA merge checks every module exactly (`ModuleCheck`), so its end-to-end
# logits check only has to catch what happens to the files: a few tokens per probe suffice
SHORT_PROBE_TOKENS = 8
# max |merged − reference| / max |reference|, by output dtype (rounding of the stored weights)
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def probe_inputs(tokenizer, *, max_tokens: int = PROBE_TOKENS) -> list[torch.Tensor]:
    """The probes as token ids, each at most `max_tokens` long (one row each: no padding)."""
    rows = []
    texts = list(PROBES)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True))
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
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
    modules: dict | None = None  # the per-module check during the merge, when one ran

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
                "probes": self.probes, "how": self.how,
                **({"module_check": self.modules} if self.modules is not None else {})}


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


# ‖W'X − (WX + B'(A'X))‖ / ‖WX + B'(A'X)‖ allowed per module: the merge is fp32 arithmetic
# (measured ~1e-7; a wrong scale, a transposed or misplaced delta is >= ‖ΔW‖/‖W‖ off)
MODULE_TOLERANCE = 1e-5
# and the error must also be under a quarter of the adapter's own ‖B'(A'X)‖ (so a small
# adapter's ΔW halved or dropped fails too), unless it is within fp32 rounding of ‖ref‖
MODULE_EFFECT_SHARE, FP32_ROUNDING = 0.25, 1e-6
MODULE_PROBES = 4  # random input vectors per module


class ModuleCheck:
    """Every adapted tensor checked while the streaming merge holds it: the merged W' (fp32,
    before the cast to the output dtype) applied to random inputs X must equal the base W
    and the adapter's own low-rank path, W·X + B'·(A'·X), with ΔW = B'·A' from the factors
    (`LoraAdapter.units`, not the ΔW the merge added). Any error matrix E = W' − W − B'A' is
    seen almost surely (E·X = 0 for Gaussian X only if E = 0). Checks the merge arithmetic
    of every module exactly; the files it writes are checked by the end-to-end probe logits."""

    def __init__(self, lora, *, tolerance: float = MODULE_TOLERANCE):
        self.units = {lora.weight_name(m): m for m in lora.factors}
        self.lora, self.tolerance = lora, tolerance
        self.probes: dict[int, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.done: set[str] = set()
        self.max_error, self.worst = 0.0, ""

    def __contains__(self, name: object) -> bool:
        return name in self.units

    def _x(self, columns: int) -> torch.Tensor:
        """Xᵀ: MODULE_PROBES Gaussian rows, one fixed draw per input size."""
        if columns not in self.probes:
            generator = torch.Generator().manual_seed(columns)
            self.probes[columns] = torch.randn(MODULE_PROBES, columns, generator=generator)
        return self.probes[columns]

    def before(self, name: str, weight: torch.Tensor) -> None:
        """The reference (W·X + B'·(A'·X))ᵀ, taken from the base tensor before the merge."""
        b_mat, a_mat = self.lora.units(self.units[name])
        x = self._x(weight.shape[-1])  # F.linear(x, W) = x·Wᵀ: W read once, row-major
        path = F.linear(F.linear(x, a_mat), b_mat)
        self.pending[name] = (F.linear(x, weight.float()) + path,
                              float(torch.linalg.vector_norm(path)))

    def after(self, name: str, merged: torch.Tensor) -> None:
        reference, effect = self.pending.pop(name)
        error = float(torch.linalg.vector_norm(F.linear(self._x(merged.shape[-1]),
                                                        merged.float()) - reference))
        relative = error / (float(torch.linalg.vector_norm(reference)) or 1.0)
        self.done.add(name)
        if relative > self.max_error:
            self.max_error, self.worst = relative, name
        moved = error <= MODULE_EFFECT_SHARE * effect or relative <= FP32_ROUNDING
        if not (relative <= self.tolerance and moved):
            raise TrainingError(
                f"merge verification failed: {name}: the merged weight differs from base + "
                f"adapter (W·x + scale·B(A·x)) by {relative:.3g} relative (tolerance "
                f"{self.tolerance:g}); nothing was written. Set PEFTUNE_DEBUG=1 and report it")

    def finish(self) -> None:
        missed = sorted(set(self.units) - self.done)
        if missed:
            raise TrainingError(f"merge verification failed: {missed[0]}, which the adapter "
                                "changes, was not among the merged tensors; nothing was written")

    def as_dict(self) -> dict:
        return {"modules_checked": len(self.done), "max_module_error": self.max_error,
                "worst_module": self.worst, "module_tolerance": self.tolerance}


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
    batch, mask = padded_batch(rows)
    lazy.from_row = len(inputs) if paired else 0
    with threads_for(0):  # a probe batch: one thread, but for modules with much work (hooks)
        logits = lazy.model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
    out = [logits[row : row + 1, :n] for row, n in enumerate(lengths)]
    return (out[: len(inputs)], out[len(inputs):]) if paired else out


def lora_forward(lora) -> object | None:
    """A LazyWeights `extra` adding each module's LoRA path, scale·B(A x), to its output (the
    adapter's own forward, not ΔW); None when the adapter has a layer this does not cover."""
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
        # transformers: heavy, and imported in a thread while a streaming merge runs
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        config = AutoConfig.from_pretrained(directory)
        config.__dict__.pop("quantization_config", None)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.tie_weights()
        self.location = tensor_locations(base_shards(directory))
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        self.extra = extra
        self.overrides = overrides or {}
        self.from_row = 0  # `extra` changes the outputs of the batch rows from this one on
        self._threads: list = []  # `writer.threads_for` of the modules running now
        for module_name, module in self.model.named_modules():
            own = {p: names[id(t)] for p, t in module._parameters.items() if t is not None}
            if not own:
                continue
            module.register_forward_pre_hook(self._loader(own))
            module.register_forward_hook(self._dropper(module_name, dict(module._parameters)))

    def _read(self, candidates: list[str]) -> torch.Tensor:
        for name in candidates:
            if name in self.overrides:
                return self.overrides[name].float()
            found = self.location.get(name)
            if found is not None:
                shard, start, info = found
                with open(shard, "rb") as fh:
                    return read_tensor(fh, start, info).float()
        raise MissingTensor(f"no tensor {candidates[0]} in the written files")

    def _loader(self, own: dict[str, list[str]]):
        def hook(module, args):
            for pname, candidates in own.items():
                module._parameters[pname] = torch.nn.Parameter(self._read(candidates),
                                                               requires_grad=False)
            # the module's work: its weights times the batch's tokens (a small probe batch)
            tokens = args[0].shape[:-1].numel() if args and torch.is_tensor(args[0]) else 1
            work = tokens * sum(p.numel() for p in module._parameters.values() if p is not None)
            self._threads.append(threads_for(work))  # a stack: modules may nest
            self._threads[-1].__enter__()
        return hook

    def _dropper(self, name: str, empty: dict):
        def hook(module, args, output):
            try:
                if self.extra is not None:
                    output = self.extra(name, module, args, output, self.from_row)
            finally:
                self._threads.pop().__exit__(None, None, None)
            for pname, param in empty.items():
                module._parameters[pname] = param  # back to meta: the weight is freed
            return output
        return hook


def padded_batch(rows: list) -> tuple:
    """Probe inputs (each 1 x length ids) as one right-padded batch and its attention mask."""
    import torch

    batch = torch.zeros(len(rows), max(ids.shape[1] for ids in rows), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(rows):
        batch[row, : ids.shape[1]] = ids[0]
        mask[row, : ids.shape[1]] = 1
    return batch, mask
