"""Centred, orthonormal 2-D Fourier transforms on native complex tensors.

``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two dimensions, as in
fastMRI's ``fftc.py``. Being orthonormal, ``||fft2c(x)||_2 = ||x||_2`` (Parseval) and ``ifft2c``
is the exact inverse and adjoint.
"""

from __future__ import annotations

import torch

_DIMS = (-2, -1)


def _check_complex(x: torch.Tensor, name: str) -> None:
    if not torch.is_complex(x):
        raise ValueError(f"{name} expects a complex tensor (..., H, W), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} expects at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT. ``image``: complex ``(..., H, W)`` -> k-space ``(..., H, W)``."""
    _check_complex(image, "fft2c")
    x = torch.fft.ifftshift(image, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT. ``kspace``: complex ``(..., H, W)`` -> image ``(..., H, W)``."""
    _check_complex(kspace, "ifft2c")
    x = torch.fft.ifftshift(kspace, dim=_DIMS)
    x = torch.fft.ifft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)
