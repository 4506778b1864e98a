"""Every written GGUF file is read back before it is kept:

1. its metadata and tensor table with the `gguf` package's `GGUFReader`, compared key by key
   with what was meant to be written (hyper-parameters, the whole vocabulary and merges,
   token types, special ids, chat template; every tensor's name, type and shape);
2. its weights with transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`), which
   reads the hyper-parameters from the metadata on its own and undoes the llama Q/K
   reordering; its logits on the merge's probe inputs are compared with the merged model's.

Errors are max |GGUF − reference| over the probes' logits, relative to the largest reference
logit (as `peftune merge` measures them), against two references:

- exact: the merged model with every matrix rounded as the file stores it (to f16 / bf16, or
  quantized and dequantized by `gguf.quants`: `RoundedWeights`). The file must reproduce it
  to fp32 arithmetic, EXACT = 1e-4 whatever the outtype: a wrong name, layout, block or
  reordering fails here, however small its effect on a small model.
- rounding: the merged model itself, when the file's type is coarser than the merge's (a run
  exported to f16 / bf16 is merged in that dtype, so there the two references are one). The
  rounding's cost must stay within ROUNDING_BOUND: for f16 / bf16 the merge's own tolerances
  (5e-3, 3e-2); q8_0 0.1 and q4_0 0.6 (SmolLM2-135M, a LoRA merged: q8_0 4%, q4_0 45%, and
  top-1 agreement of the next token 95% and 52%: plain Q4_0 costs a model this small much
  of its accuracy). Beyond its bound an export is refused as too lossy (a finer --outtype
  is the fix). Mean KL divergence and top-1 agreement are reported beside it.

The model is loaded in the file's precision (f16 or bf16; fp32 for blocks) and computed in
fp32 one module at a time (`_fp32_forward`), so the check holds about half the fp32 model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from peftune.export.gguf_writer import GgufContent, TensorPlan
from peftune.merge.stio import read_tensor
from peftune.merge.verify import padded_batch
from peftune.merge.writer import base_shards, release_freed_memory, tensor_locations, threads_for

EXACT = 1e-4
ROUNDING_BOUND = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 0.1, "q4_0": 0.6}
LOAD_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16}  # blocks: fp32
_STORED = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def rounded(tensor: torch.Tensor, qtype: Q) -> torch.Tensor:
    """`tensor` (fp32) as a reader of `qtype` gets it back."""
    if qtype in _STORED:
        return tensor.to(_STORED[qtype]).float()
    if qtype == Q.F32:
        return tensor.float()
    array = tensor.float().contiguous().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype))


class RoundedWeights(Mapping):
    """The model directory's weights rounded as the plan writes them, read one tensor at a
    time when asked for (the `overrides` of `verify.LazyWeights`). Rounding commutes with
    llama's Q/K row reordering (blocks lie within rows), so it is done in Hugging Face order."""

    def __init__(self, model_dir: Path, plan: TensorPlan):
        self.types = {t.source: t.qtype for t in plan.tensors if t.qtype != Q.F32}
        self.location = tensor_locations(base_shards(model_dir))

    def needed(self, source_dtype: torch.dtype) -> bool:
        """Whether rounding changes anything: blocks, or a float type coarser than stored."""
        return any(q not in _STORED or _STORED[q] != source_dtype for q in self.types.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        shard, start, info = self.location[name]
        with open(shard, "rb") as handle:
            return rounded(read_tensor(handle, start, info).float(), self.types[name])

    def __contains__(self, name: object) -> bool:
        return name in self.types

    def __iter__(self) -> Iterator[str]:
        return iter(self.types)

    def __len__(self) -> int:
        return len(self.types)


def read_gguf(path: Path) -> gguf.GGUFReader:
    """gguf's `GGUFReader` of `path`, parsed over a plain ndarray view of the file's map.
    The reader slices its `np.memmap` for every part of every key and value (four per token
    string: ~400k for 49k tokens and merges), and numpy's memmap runs each slice and view
    through Python; over a plain view of the same map the parse takes less than half the time
    and memory. The reader is gguf's own, unchanged otherwise (only its `data` is a view)."""
    from gguf import gguf_reader

    numpy = gguf_reader.np
    gguf_reader.np = _PlainMaps()
    try:
        return gguf.GGUFReader(path)
    finally:
        gguf_reader.np = numpy


class _PlainMaps:
    """numpy, but `memmap` returns a plain ndarray view of the map it makes."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def memmap(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.memmap(*args, **kwargs).view(np.ndarray)


def metadata_problems(reader: gguf.GGUFReader, content: GgufContent) -> list[str]:
    """What the file holds that differs from `content` (empty: all of it as meant)."""
    problems = []
    for key, expected in content.expected_fields().items():
        field = reader.get_field(key)
        if field is None:
            problems.append(f"{key} missing")
            continue
        value = field.contents()
        if isinstance(expected, float):
            same = np.float32(value) == np.float32(expected)
        else:
            same = value == (int(expected) if isinstance(expected, bool) else expected)
        if not same:
            shown = f"{len(value)} items" if isinstance(value, list) else repr(value)[:60]
            problems.append(f"{key} reads back as {shown}")
    written = {t.name: (t.tensor_type, tuple(int(n) for n in reversed(t.shape)))
               for t in reader.tensors}
    for t in content.plan.tensors:
        if written.get(t.name) != (t.qtype, t.shape):
            problems.append(f"tensor {t.name} reads back as {written.get(t.name)}")
    extra = set(written) - {t.name for t in content.plan.tensors}
    if extra:
        problems.append(f"unexpected tensors {sorted(extra)[:3]}")
    return problems


@dataclass
class LogitCheck:
    outtype: str
    max_abs_error: float  # against the exact reference
    relative_error: float
    probes: int
    rounding_error: float  # relative, against the unrounded merged model (0: nothing rounded)
    kl_divergence: float  # mean KL(merged || file) of the next-token distributions
    top1_agreement: float  # share of positions whose most likely next token is the same

    @property
    def exact_ok(self) -> bool:
        return self.relative_error <= EXACT

    @property
    def rounding_ok(self) -> bool:
        return self.rounding_error <= ROUNDING_BOUND[self.outtype]

    @property
    def ok(self) -> bool:
        return self.exact_ok and self.rounding_ok

    def as_dict(self) -> dict:
        return {"outtype": self.outtype, "max_abs_logit_error": self.max_abs_error,
                "relative_logit_error": self.relative_error, "bound": EXACT,
                "rounding_relative_logit_error": self.rounding_error,
                "rounding_bound": ROUNDING_BOUND[self.outtype],
                "kl_divergence_mean": self.kl_divergence, "top1_agreement": self.top1_agreement,
                "probes": self.probes, "ok": self.ok,
                "how": "transformers' GGUF loader vs the merged model rounded as the file stores "
                       "it (exact), and vs the merged model itself (rounding), fp32 logits"}


def _relative(got: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    error = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    return error, error / scale


def compare(got: list[torch.Tensor], exact: list[torch.Tensor],
            unrounded: list[torch.Tensor] | None, *, outtype: str) -> LogitCheck:
    """The file's logits against the exact reference and (when given) the unrounded one."""
    error, relative = _relative(got, exact)
    versus = unrounded if unrounded is not None else exact
    rounding = _relative(got, versus)[1] if unrounded is not None else 0.0
    flat_got = torch.cat([g[0] for g in got]).log_softmax(-1)
    flat_ref = torch.cat([r[0] for r in versus]).log_softmax(-1)
    kl = F.kl_div(flat_got, flat_ref, log_target=True, reduction="none").sum(-1)
    agree = (flat_got.argmax(-1) == flat_ref.argmax(-1)).float().mean()
    return LogitCheck(outtype=outtype, max_abs_error=error, relative_error=relative,
                      probes=len(got), rounding_error=rounding, kl_divergence=float(kl.mean()),
                      top1_agreement=float(agree))


def gguf_logits(path: Path, reader: gguf.GGUFReader, inputs: list[torch.Tensor], *,
                outtype: str) -> list[torch.Tensor]:
    """Probe logits of the GGUF file as transformers' GGUF loader loads it: the probes in one
    right-padded batch, each row cut back to its own tokens (as `verify.lazy_logits`).
    `reader` (parsed for the metadata check) is handed to the loader (`_parsed_once`) after
    its vocabulary arrays are dropped from it."""
    from transformers import AutoModelForCausalLM

    dtype = LOAD_DTYPE.get(outtype, torch.float32)
    for key in _VOCABULARY_ARRAYS & set(reader.fields):  # checked already; most of its memory
        del reader.fields[key]
    with _parsed_once(path, reader), contextlib.redirect_stderr(io.StringIO()):
        # an absolute gguf_file: a bare name is looked for in the working directory first;
        # the weights are the GGUF file's own tensors: no pickle is involved
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path.resolve()),
                                                     dtype=dtype, use_safetensors=False)
    model.eval()
    lengths = [ids.shape[1] for ids in inputs]
    batch, mask = padded_batch(list(inputs))
    # a probe batch is small work: one thread (on a busy machine more only wait for cores)
    with torch.no_grad(), _fp32_forward(model), threads_for(0):
        logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
    del model
    _collect()  # the model's weights, now: they are most of this process's memory
    return [logits[row : row + 1, :n] for row, n in enumerate(lengths)]


def _collect() -> None:
    """Free what is garbage now (transformers' models hold reference cycles) and hand the
    freed heap back to the OS."""
    gc.collect()
    release_freed_memory()


_VOCABULARY_ARRAYS = {gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE,
                      gguf.Keys.Tokenizer.MERGES, gguf.Keys.Tokenizer.SCORES}


@contextlib.contextmanager
def _parsed_once(path: Path, reader: gguf.GGUFReader) -> Iterator[None]:
    """Three costs of transformers' loader that do not change what it loads, avoided while it
    runs (it imports these names from gguf when called, so they are swapped on the module):

    - it parses the file's metadata twice with `gguf.GGUFReader` (config, then weights), and
      converts every value of every key each time: with 49k tokens and merges that takes
      seconds. `gguf.GGUFReader` of this file returns the reader the metadata check parsed
      (read-only), which `gguf_logits` has stripped of the vocabulary arrays: a model load
      does not use them (no tokenizer is loaded here; the metadata check compared them);
    - it builds gguf's tensor-name table once per module (~400 times for 30 layers): built
      once per (architecture, blocks);
    - it reads each tensor through the file's memory map and keeps the pages mapped, so the
      file's size counts twice in memory (the mapped file and the tensors made from it): the
      pages of a tensor are dropped from the map once it is converted (`_released`; they are
      read again from the page cache if touched)."""
    make_reader, name_map, dequantize = gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize
    target = path.resolve()
    _collect()  # the read-back's garbage, before the model's tensors arrive

    def shared_reader(file: Any, mode: str = "r") -> gguf.GGUFReader:
        return reader if Path(file).resolve() == target and mode == "r" else make_reader(file, mode)

    def dequantize_released(data: np.ndarray, qtype: Any) -> np.ndarray:
        values = dequantize(data, qtype)
        if not np.shares_memory(values, data):
            _released(reader.data, data)
        return values

    gguf.GGUFReader, gguf.dequantize = shared_reader, dequantize_released
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf.dequantize = make_reader, name_map, dequantize


def _released(mapped: np.ndarray, part: np.ndarray) -> None:
    """Drop the pages under `part` (a view of the read-only file map `mapped`) from this
    process (MADV_DONTNEED: the file's pages stay in the page cache, a later read maps them
    again). Without an mmap to advise (another platform), nothing happens."""
    owner = mapped
    while owner is not None and getattr(owner, "_mmap", None) is None:
        owner = owner.base  # `read_gguf`'s reader holds a plain view of the np.memmap
    handle = getattr(owner, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = part.ctypes.data - mapped.ctypes.data
    begin = start - start % mmap.PAGESIZE
    end = min(start + part.nbytes, mapped.nbytes)
    if 0 <= begin < end:
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_DONTNEED, begin, end - begin)


ROWS_AT_ONCE = 8192  # output-head rows upcast at a time (4.7M values for a hidden size of 576)


@contextlib.contextmanager
def _fp32_forward(model: torch.nn.Module) -> Iterator[None]:
    """fp32 arithmetic over the file's exact values, one module upcast at a time: each
    module's own parameters in fp32 while it runs, back to the loaded ones after. The two
    vocabulary-sized matrices are never upcast whole: an embedding's output is upcast (the
    rows it looked up, the same values), and the output head is computed ROWS_AT_ONCE rows
    of its weight at a time."""
    handles = []
    kept: dict[int, torch.Tensor] = {}  # id(parameter) -> its loaded data while upcast

    def up(module: torch.nn.Module, args: Any) -> None:
        for p in module.parameters(recurse=False):
            if p.dtype != torch.float32:
                kept[id(p)] = p.data
                p.data = p.data.float()

    def down(module: torch.nn.Module, args: Any, output: Any) -> None:
        for p in module.parameters(recurse=False):
            if id(p) in kept:
                p.data = kept.pop(id(p))

    def upcast_output(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    head = model.get_output_embeddings()
    sliced = head is not None and head.bias is None and head.weight.dtype != torch.float32
    if sliced:
        weight = head.weight

        def sliced_head(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
            for i in range(0, weight.shape[0], ROWS_AT_ONCE):
                out[..., i : i + ROWS_AT_ONCE] = F.linear(x.float(),
                                                          weight[i : i + ROWS_AT_ONCE].float())
            return out

        head.forward = sliced_head  # an instance attribute: shadows Linear.forward
    for module in model.modules():
        if (sliced and module is head) or not any(
                p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_hook(upcast_output))
        else:
            handles += [module.register_forward_pre_hook(up), module.register_forward_hook(down)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if sliced:
            del head.forward
