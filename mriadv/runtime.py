"""Where and how tensors run: device choice, mixed precision, memory format, threads, seeding."""

from __future__ import annotations

import contextlib
import ctypes
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Runtime:
    """Device and precision of a run. On CUDA: bf16 autocast (when asked) and channels_last."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, or None for plain fp32

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", threads: int | None = None) -> "Runtime":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" else "fp32"
        if precision == "bf16" and dev.type != "cuda":
            raise RuntimeError("precision 'bf16' (autocast) is only supported on CUDA; use 'fp32' or 'auto' on CPU")
        if dev.type == "cpu":
            keep_freed_memory()
            if threads is not None:
                torch.set_num_threads(threads)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, torch.bfloat16 if precision == "bf16" else None)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.is_cuda else model

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """A ``(B, C, H, W)`` network input in the run's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.is_cuda else x


def keep_freed_memory() -> None:
    """Stop glibc from handing freed activation buffers back to the kernel after every step.

    On CPU the reconstructor step's 2B batch allocates buffers above glibc's trim and mmap
    thresholds; returned to the kernel when freed, they are faulted back in page by page on the next
    step (~20k page faults, ~15% of an adversarial step measured by ``benchmarks/step_cost.py``).
    Raising the thresholds keeps them in the heap. A no-op where glibc is not the C library.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 2**20)
    libc.mallopt(m_trim_threshold, 2**30)


def default_profile() -> str:
    """The run profile (:data:`mriadv.config.PROFILES`) when none is named: ``paper`` where CUDA is
    present, else ``demo``."""
    return "paper" if torch.cuda.is_available() else "demo"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model initialisation). Data masks and order are seeded apart."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
