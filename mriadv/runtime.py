"""Where and how tensors run: device choice, mixed precision, memory format, threads, determinism, seeding."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# cuBLAS needs a fixed workspace to give the same result twice (torch.use_deterministic_algorithms)
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Runtime:
    """Device and precision of a run.

    ``dtype``: the autocast dtype of the *training* steps (bf16 on a CUDA GPU that supports it), or
    None for plain fp32. Evaluation always runs in fp32 with TF32 off (:meth:`evaluating`), whatever
    the training precision: a small attack's effect is below bf16's resolution.
    ``channels_last``: the memory format of network inputs and weights; None: on CUDA only.
    """

    device: torch.device
    dtype: torch.dtype | None  # training autocast dtype, or None for plain fp32
    channels_last: bool | None = None

    @classmethod
    def resolve(
        cls, device: str = "auto", precision: str = "auto", threads: int | None = None, deterministic: bool = False
    ) -> "Runtime":
        """The runtime of a config's ``device``, ``precision``, ``threads`` and ``deterministic``; sets
        the process's thread count (CPU) and its cuDNN and determinism flags (both ways, so a run's
        behaviour follows its config, not what ran before it in the process).

        ``precision='auto'``: bf16 on a CUDA device that supports it, else fp32; ``'bf16'`` raises
        ``RuntimeError`` on a CPU or on a GPU without bf16. ``deterministic``: cuDNN's deterministic
        algorithms, no cuDNN benchmarking, ``torch.use_deterministic_algorithms(True, warn_only=True)``
        and, on CUDA, ``CUBLAS_WORKSPACE_CONFIG`` (unless set); the U-Net then also takes deterministic
        forms of its bilinear upsampling and reflection padding (:mod:`mriadv.models.unet`).
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        bf16_ok = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        if precision == "auto":
            precision = "bf16" if bf16_ok else "fp32"
        if precision == "bf16" and dev.type != "cuda":
            raise RuntimeError("precision 'bf16' (autocast) is only supported on CUDA; use 'fp32' or 'auto' on CPU")
        if precision == "bf16" and not bf16_ok:
            raise RuntimeError(
                f"precision 'bf16': {torch.cuda.get_device_name(dev)} does not support bf16; use 'fp32' or 'auto'"
            )
        if dev.type == "cpu":
            keep_freed_memory()
            if threads is not None:
                torch.set_num_threads(threads)
        if deterministic and dev.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = deterministic
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cuda.matmul.allow_tf32 = True  # training; evaluation turns it off
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, torch.bfloat16 if precision == "bf16" else None)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def uses_channels_last(self) -> bool:
        return self.is_cuda if self.channels_last is None else self.channels_last

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training steps' mixed precision (a no-op in fp32). Evaluation does not use it: see
        :meth:`evaluating`."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Inside the block everything runs in fp32: autocast off (also an enclosing one) and TF32 off
        for matmuls and cuDNN convolutions (TF32 keeps 10 mantissa bits, so its "fp32" would blur the
        same small effects bf16 does); the previous settings come back after. Every evaluation
        (validation, attacks, the held-out report, ``assess``, the instabilities) runs inside it."""
        matmul = torch.get_float32_matmul_precision()
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(device_type=self.device.type, enabled=False):
                yield
        finally:
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.uses_channels_last else model

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """A ``(B, C, H, W)`` network input in the run's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.uses_channels_last else x


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
