"""Writing a merged model directory, one base shard at a time (streaming).

Each tensor of each base shard is read alone (plain file reads, `stio`), its delta (if any)
is added in fp32, and it is cast to the output dtype and written straight into an output
shard planned from the base's headers (`--shard-size`). Peak memory: about one tensor plus
the adapter, whatever the model's size (`ShardWriter`, which buffers one output shard, is
for the in-memory merges of other methods). The output is a Hugging Face
model directory: `model.safetensors` or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, config.json (its dtype updated), generation config and the
tokenizer with its chat template.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peftune.errors import InputError
from peftune.merge.stio import (
    SAFETENSORS_DTYPES,
    PlannedFile,
    iter_tensors,
    read_header,
    tensor_bytes,
)

INDEX = "model.safetensors.index.json"
REPORT = "merge_report.json"
_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5)$|.*\.index\.json$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                    "merges.txt", "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '200KB', '1000' (bytes) -> bytes (decimal units, like transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise InputError(f"--shard-size {text}: expected a size such as 5GB, 500MB or 200KB")
    unit = (match[2] or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(float(match[1]) * factor)
    if size <= 0:
        raise InputError(f"--shard-size {text}: must be more than 0 bytes")
    return size


def base_shards(base: Path) -> list[Path]:
    """The base's safetensors files in order; one InputError line when it has none."""
    index = base / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [base / name for name in dict.fromkeys(sorted(weight_map.values()))]
    if (base / "model.safetensors").is_file():
        return [base / "model.safetensors"]
    raise InputError(f"--base {base}: no model.safetensors or {INDEX}; merging reads "
                     "safetensors weights (re-save the base with safe_serialization=True)")


def tensor_locations(shards: list[Path]) -> dict[str, tuple[Path, int, dict]]:
    """name -> (shard, offset of its data section, header entry), from the safetensors
    headers alone (no tensor is read): the map every streaming reader works from."""
    found = {}
    for shard in shards:
        header, start = read_header(shard)
        found.update({name: (shard, start, info) for name, info in header.items()})
    return found


def base_tensor_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Every base tensor's shape, read from the file headers (no tensor is loaded)."""
    return {name: tuple(info["shape"])
            for name, (_, _, info) in tensor_locations(base_shards(base)).items()}


def first_mismatch(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]
                   ) -> tuple[str, tuple[int, ...], tuple[int, ...] | None] | None:
    """(name, expected shape, actual shape or None when missing) for the first tensor of
    `expected` that `actual` lacks or holds with another shape; None when all agree."""
    for name, shape in expected.items():
        if actual.get(name) != shape:
            return name, shape, actual.get(name)
    return None


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@dataclass
class MergeStats:
    """What the deltas changed: modules, and ‖ΔW‖ against ‖W‖ over the changed tensors."""

    modules_changed: int = 0
    tensors_replaced: int = 0
    delta_sq: float = 0.0
    weight_sq: float = 0.0
    max_relative: float = 0.0
    largest: list[tuple[str, float]] = field(default_factory=list)
    module_check: dict | None = None  # `verify.ModuleCheck.as_dict()` when one ran

    def add(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        # fp32 norms (a report figure, not the merge): double copies of every weight were slow
        d = float(torch.linalg.vector_norm(delta.float())) ** 2
        w = float(torch.linalg.vector_norm(weight.float())) ** 2
        if d > 0:
            self.modules_changed += 1
        self.delta_sq += d
        self.weight_sq += w
        relative = (d / w) ** 0.5 if w > 0 else float("inf")
        self.max_relative = max(self.max_relative, relative)
        self.largest = sorted([*self.largest, (name, relative)], key=lambda x: -x[1])[:5]

    @property
    def relative_delta_norm(self) -> float:
        return (self.delta_sq / self.weight_sq) ** 0.5 if self.weight_sq > 0 else 0.0

    def as_dict(self) -> dict:
        return {"modules_changed": self.modules_changed, "tensors_replaced": self.tensors_replaced,
                "relative_delta_norm": self.relative_delta_norm,
                "max_module_relative_delta_norm": self.max_relative,
                "largest_relative_deltas": dict(self.largest)}


class ShardWriter:
    """Buffers tensors and writes a safetensors shard whenever `max_bytes` is reached."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0
        release_freed_memory()

    def close(self) -> list[str]:
        """Name the shards as transformers does; write the index when there are several."""
        self.flush()
        count = len(self.files)
        if count == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.files, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.out / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


# multiply-adds below which an op runs on one thread: the streamed merge and its verification
# are many small, memory-bound ops (a rank-r product, an add, a few-row product, a tiny-batch
# forward), where torch's fork/join across cores costs more than it gains, and on a busy
# machine the waiting threads take the cores the work needs (measured: 2x the CPU time)
PARALLEL_WORK = 2**30


@contextlib.contextmanager
def threads_for(work: int) -> Iterator[None]:
    """One intra-op thread while doing `work` multiply-adds, if fewer than PARALLEL_WORK;
    torch's own thread count (e.g. a large model's tensors) otherwise."""
    default = _default_threads()  # first read by the outermost call, before any change
    wanted = 1 if work < PARALLEL_WORK else default
    before = torch.get_num_threads()
    if before == wanted:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _default_threads() -> int:
    return torch.get_num_threads()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so a process that
    frees one shard and allocates the next would grow as if it held every shard)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:  # find_library runs ldconfig in a subprocess: once per process, not once per shard
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def iter_base_tensors(base: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base tensor, one at a time, shard after shard (one open shard)."""
    for shard in base_shards(base):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        release_freed_memory()


def write_merged(*, base: Path, out: Path, delta_of: Callable[[str], torch.Tensor | None],
                 replaced: dict[str, torch.Tensor], dtype: str, shard_bytes: int,
                 tokenizer_from: Path | None, check: Any = None,
                 untie: dict[str, str] | None = None) -> tuple[MergeStats, list[str]]:
    """Stream the base into `out` with every delta added; returns the stats and the shards.
    The output shards are planned from the base's headers (names, shapes, output dtypes), so
    each tensor is read, merged and written alone (`stio`): memory is about one tensor.
    `check` (a `verify.ModuleCheck`) sees each tensor it covers before and after its delta.
    `untie` {new name: base name}: tensors the base shares (a tied output head is the input
    embedding) written as their own tensor, the base's copy plus the new name's delta, after
    all the others; config.json then says the embeddings are no longer tied."""
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    largest = 0
    for shard in base_shards(base):
        header, _ = read_header(shard)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            largest = max(largest, info["data_offsets"][1] - info["data_offsets"][0])
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            target = DTYPES.get(dtype, stored) if stored.is_floating_point else stored
            plan.append((name, target, tuple(info["shape"])))
            untie_dtypes = {src: target for src in (untie or {}).values() if src == name}
            plan += [(new, untie_dtypes[src], tuple(info["shape"]))
                     for new, src in (untie or {}).items() if src in untie_dtypes]
    plan.sort(key=lambda entry: entry[0] in (untie or {}))  # untied copies last, stable
    groups: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = tensor_bytes(entry[1], entry[2])
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    count = len(groups)
    names = (["model.safetensors"] if count == 1 else
             [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
    stats = MergeStats()
    files = iter(zip(names, groups, strict=True))
    current, left = None, 0
    untie = untie or {}
    kept: dict[str, torch.Tensor] = {}  # base tensors an untied copy starts from

    def emit(name: str, tensor: torch.Tensor) -> None:
        nonlocal current, left
        if left == 0:
            if current is not None:
                current.close()
            file_name, group = next(files)
            current, left = PlannedFile(out / file_name, group), len(group)
        target = current.plan[current.index][1]
        with threads_for(tensor.numel() * 64):  # ΔW of rank <= 64 and its add, roughly
            delta = delta_of(name)
            checked = check is not None and name in check
            if name in replaced:
                stats.tensors_replaced += 1
                tensor = replaced[name]
            else:
                if checked:
                    check.before(name, tensor)
                if delta is not None:
                    stats.add(name, tensor, delta)
                    tensor = tensor.float().add_(delta)  # fp32: in place, in the read buffer
                if checked:
                    check.after(name, tensor)
            tensor = tensor.to(target)
        current.write(name, tensor)
        left -= 1

    scratch = bytearray(largest)  # every base tensor is read into this one buffer in turn
    for shard in base_shards(base):
        for name, tensor in iter_tensors(shard, scratch=scratch):
            if name in untie.values():  # before its own delta, out of the reused buffer
                kept[name] = tensor.clone()
            emit(name, tensor)
            del tensor
        release_freed_memory()
    for new, src in untie.items():
        emit(new, kept.pop(src))
    if current is not None:
        current.close()
    if check is not None:
        check.finish()
    if count > 1:
        weight_map = {entry[0]: file_name for file_name, group in zip(names, groups, strict=True)
                      for entry in group}
        total = sum(tensor_bytes(e[1], e[2]) for e in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    copy_model_files(base, out, dtype=dtype if dtype in DTYPES else None,
                     tokenizer_from=tokenizer_from, untied=bool(untie))
    return stats, names


def copy_model_files(base: Path, out: Path, *, dtype: str | None,
                     tokenizer_from: Path | None, untied: bool = False) -> None:
    """config.json (with the output dtype), generation config, tokenizer and chat template:
    every non-weight file of the base, then the adapter's tokenizer files where it has them
    (a run saves its tokenizer, chat template included, beside the adapter)."""
    for item in base.iterdir():
        if item.is_file() and not _WEIGHT_FILES.fullmatch(item.name) and item.name != REPORT:
            shutil.copy2(item, out / item.name)
    if tokenizer_from is not None and (tokenizer_from / "tokenizer_config.json").is_file():
        for name in _TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, out / name)
    config_path = out / "config.json"
    if (dtype is not None or untied) and config_path.is_file():
        config = json.loads(config_path.read_text())
        if dtype is not None:
            config.pop("torch_dtype", None)
            config["dtype"] = dtype
            config.pop("quantization_config", None)
        if untied:  # the merged head has its own weight now
            config["tie_word_embeddings"] = False
            if isinstance(config.get("text_config"), dict):
                config["text_config"]["tie_word_embeddings"] = False
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """A new or empty directory, or (with --overwrite) an earlier merge's output."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out}: is not empty; pass --overwrite to replace an "
                             "earlier merge, or choose another --out")
        if not (out / REPORT).is_file():
            raise InputError(f"--out {out}: not a merge output (no {REPORT}); --overwrite "
                             "only replaces earlier merges, choose another --out")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished, verified merge from its temp dir to `out` (replacing a previous merge)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
