"""Where and how the library computes: the device, the precision policy, process settings."""

from __future__ import annotations

import ctypes
import functools

import torch

from fashionnet.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda <GPU name>``: what a run states about where it ran."""
    return f"cuda {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``train.precision``. ``auto`` is bfloat16 where the hardware
    computes it natively (CUDA with bf16; CPUs with AVX512-BF16, such as those with AMX),
    which runs the convolutions about twice as fast, and float32 elsewhere, where bfloat16
    would be emulated and slower."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and _cpu_has_native_bfloat16()
    return torch.bfloat16 if native else torch.float32


@functools.cache
def _cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16). torch only says so through a
    private function, so it is called once, guarded, and a bfloat16 matmul is run on a tiny
    input: any error (gone, renamed, a changed signature) means float32."""
    try:
        if not bool(torch.cpu._is_avx512_bf16_supported()):
            return False
        a = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool(torch.equal((a @ a).float(), torch.full((2, 2), 2.0)))
    except Exception:  # a private function: however it fails, float32 is always right
        return False


def autocast(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.autocast:
    """Mixed precision when ``dtype`` is bfloat16: convolutions and the linear layer compute
    in bfloat16, the loss, BatchNorm statistics and optimizer state stay float32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory() -> None:
    """Keep freed heap memory in the process instead of returning it to the OS (glibc only).

    Each batch frees and reallocates its (B, C, H, W) activations, megabytes each; by default
    glibc hands them back to the kernel (blocks over 32 MiB are even mmap'ed afresh), and
    every batch page-faults them in again: about 2,000 faults a training step at batch 64,
    a tenth of its time. Idempotent; a no-op without glibc's ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed memory for reuse
    mallopt(_M_MMAP_THRESHOLD, 1 << 28)  # blocks under 256 MiB come from that heap
