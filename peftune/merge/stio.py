"""Reading and writing safetensors files one tensor at a time with plain file I/O, for the
streaming merge. `safe_open` memory-maps a whole shard (its touched pages stay resident
while it is open) and `save_file` needs a whole shard's tensors in memory; here a tensor is
read with one `readinto` and written straight after a header planned from the base's
headers, so the merge holds about one tensor. The format (safetensors' spec): an 8-byte
little-endian header length, a JSON header (name -> dtype, shape, data_offsets;
`__metadata__`), space-padded to 8 bytes, then the tensors' bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """The header (without __metadata__) and the offset where tensor data starts."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_tensors(path: Path, *, scratch: bytearray | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one file in storage order, each read alone into its own buffer, or,
    with `scratch` (at least the largest tensor's size), into that one reused buffer: each
    tensor is then valid only until the next is read (no fresh pages to fault in and zero
    for every tensor)."""
    header, start = read_header(path)
    with open(path, "rb") as fh:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if end == begin:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            fh.seek(start + begin)
            if scratch is None:
                buffer = bytearray(end - begin)
            else:
                buffer = memoryview(scratch)[: end - begin]
            if fh.readinto(buffer) != end - begin:
                raise OSError(f"{path}: truncated safetensors file (tensor {name})")
            yield name, torch.frombuffer(buffer, dtype=dtype).view(info["shape"])


def read_tensor(fh: BinaryIO, data_start: int, info: dict) -> torch.Tensor:
    """One tensor of an open file, read into its own buffer: `info` is its header entry,
    `data_start` where the file's tensor data starts (`read_header`)."""
    begin, end = info["data_offsets"]
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    buffer = bytearray(end - begin)
    fh.seek(data_start + begin)
    fh.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).view(info["shape"])


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


class PlannedFile:
    """One output file whose tensors (names, dtypes, shapes, order) are known in advance:
    the header is written first, then each tensor as it is given, checked against the plan."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, dtype, shape in plan:
            size = tensor_bytes(dtype, shape)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.plan, self.index = path, plan, 0
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.fh.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self.index]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise RuntimeError(f"streaming writer: got {got}, planned {expected}")
        if tensor.numel():
            data = tensor.contiguous().view(-1).view(torch.uint8)
            self.fh.write(memoryview(data.numpy()))
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.plan):
            raise RuntimeError(f"streaming writer: {self.path} got {self.index} of "
                               f"{len(self.plan)} tensors")
        self.fh.close()
