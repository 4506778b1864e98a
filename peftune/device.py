"""What the machine's processors can do, for the choices `auto` makes (precision, the dtype
quantized layers compute in). Torch-free to import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, Arm BF16


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return flags


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU does bf16 arithmetic natively (AVX512-BF16, AMX, or Arm's BF16).
    Without it torch emulates bf16 matmuls, an order of magnitude slower than fp32."""
    return bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))


def native_bf16(device: Any, *, flags: set[str] | None = None) -> bool:
    """Whether `device` computes in bf16 natively (a CUDA GPU that supports it, or a CPU)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_bf16(flags)


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (imports torch)."""
    import torch

    return torch.cuda.is_available()
