"""Perturbation generators G_phi.

* :class:`ImageGenerator` — the seed's DCGAN-style generator (Radford et al. 2016; Huang & Liang,
  Sec. 2.4): a latent vector ``z`` (dim 100) is projected to a small ``base`` grid by a transposed
  convolution, then doubled ``k`` times by fractionally-strided convolutions, each followed by batch
  norm and PReLU, the last by ``tanh``. For 320x320 the projection gives 5x5 and six 2x steps give
  320 (seven transposed convolutions in all, as in the seed). Other sizes pick ``k`` so that the
  base side is at least 2, and centre-crop when the size is not ``base * 2**k``.
* :class:`MeasurementGenerator` — for k-space perturbations (the seed's Algorithm 2, its future
  work): a fully convolutional net that maps the measured k-space (real, imaginary, mask) to a
  two-channel (real, imaginary) perturbation of the same shape, so it works for any k-space size.
  With latent conditioning, an :class:`ImageGenerator` with two output channels is used instead.

Outputs are bounded by ``tanh``: at most 1 per pixel (per real/imaginary part) in normalised units.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mriadv.models.unet import UNet


def upsampling_plan(size: tuple[int, int], max_upsamplings: int = 6) -> tuple[int, tuple[int, int]]:
    """``(k, (base_h, base_w))`` with ``base * 2**k >= size`` and the smaller base side >= 2."""
    h, w = size
    if min(h, w) < 4:
        raise ValueError(f"generator output size must be at least 4x4, got {size}")
    k = min(max_upsamplings, int(math.floor(math.log2(min(h, w) / 2))))
    return k, (math.ceil(h / 2**k), math.ceil(w / 2**k))


class ImageGenerator(nn.Module):
    """DCGAN generator: latent ``(B, latent_dim)`` -> perturbation ``(B, out_chans, H, W)`` in [-1, 1].

    Args:
        size: output ``(H, W)``.
        latent_dim: length of z (seed: 100).
        channels: feature maps of the last hidden layer (DCGAN's ``ngf``; seed: 64); the projection
            has ``channels * 2**(k-1)``.
        out_chans: 1 for an image perturbation, 2 for a (real, imaginary) k-space one.
    """

    def __init__(
        self,
        size: tuple[int, int],
        latent_dim: int = 100,
        channels: int = 64,
        out_chans: int = 1,
        max_upsamplings: int = 6,
    ) -> None:
        super().__init__()
        self.size, self.latent_dim = tuple(size), latent_dim
        k, base = upsampling_plan(self.size, max_upsamplings)
        widths = [channels * 2 ** (k - 1 - i) for i in range(k)]  # e.g. 2048, 1024, ..., 64 for k=6
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], kernel_size=base, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.PReLU(),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.PReLU(),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], out_chans, 4, stride=2, padding=1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ImageGenerator expects z of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        out = self.net(z[:, :, None, None])
        H, W = self.size
        top, left = (out.shape[-2] - H) // 2, (out.shape[-1] - W) // 2
        return out[..., top : top + H, left : left + W]


class MeasurementGenerator(nn.Module):
    """k-space perturbation conditioned on the measurements (the seed's ``G(y_T)``).

    ``kspace``: complex ``(B, H, W)`` (normalised, masked); ``mask``: ``(B, W)``. Returns real
    ``(B, 2, H, W)`` in [-1, 1]. k-space spans decades of magnitude, so the input is compressed with
    ``asinh`` per real/imaginary part before the convolutions.
    """

    def __init__(self, channels: int = 32, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.PReLU()]
        for i in range(depth - 2):
            d = 2 ** (i + 1)  # growing dilation: a wide receptive field at full resolution
            layers += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.BatchNorm2d(channels), nn.PReLU()]
        layers += [nn.Conv2d(channels, 2, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if kspace.ndim != 3 or not torch.is_complex(kspace):
            raise ValueError(
                f"MeasurementGenerator expects complex k-space (B, H, W), got {tuple(kspace.shape)} {kspace.dtype}"
            )
        return self.net(kspace_features(kspace, mask))


def as_complex(two_channel: torch.Tensor) -> torch.Tensor:
    """Real ``(B, 2, H, W)`` (real, imaginary) -> complex ``(B, H, W)``."""
    if two_channel.ndim != 4 or two_channel.shape[1] != 2:
        raise ValueError(f"expected (B, 2, H, W), got {tuple(two_channel.shape)}")
    return torch.complex(two_channel[:, 0].float(), two_channel[:, 1].float())


class ConditionalGenerator(nn.Module):
    """An amortised attacker ``G(x, z)`` that sees its input: a U-Net on the input concatenated with
    a few constant feature maps computed from the latent ``z`` *and* a coarse summary of the whole
    input (an 8x8 average-pooled grid through a small MLP), so every output pixel depends on every
    input pixel whatever the U-Net's own receptive field (the seed's G(z) cannot shape an
    image-specific perturbation; its k-space G(y) saw only 17x17 samples).

    ``x``: real ``(B, in_chans, H, W)`` (the normalised zero-filled image, or k-space as (real,
    imaginary, mask) after ``asinh``); ``z``: ``(B, latent_dim)`` or None. Returns ``(B, out_chans,
    H, W)`` in [-1, 1] (tanh), scaled to the budget by the trainer.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        latent_dim: int = 100,
        chans: int = 16,
        num_pools: int = 3,
        context: int = 8,
        grid: int = 8,
    ) -> None:
        super().__init__()
        self.latent_dim, self.grid = latent_dim, grid
        self.summary = nn.Sequential(
            nn.Linear(in_chans * grid * grid + latent_dim, 64), nn.PReLU(), nn.Linear(64, context)
        )
        self.unet = UNet(in_chans + context, out_chans, chans, num_pools)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"ConditionalGenerator expects (B, C, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if z is None:
            z = x.new_zeros(b, self.latent_dim)
        coarse = nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(1)  # (B, C * grid^2)
        maps = self.summary(torch.cat([coarse, z], dim=1))[:, :, None, None].expand(-1, -1, h, w)
        return torch.tanh(self.unet(torch.cat([x, maps], dim=1)))


def kspace_features(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Complex k-space ``(B, H, W)`` and mask ``(B, W)`` -> real ``(B, 3, H, W)``: ``asinh`` of the
    real and imaginary parts (k-space spans decades of magnitude) and the mask."""
    m = mask.to(kspace.real.dtype)[:, None, :].expand(-1, kspace.shape[-2], -1)
    return torch.stack([torch.asinh(kspace.real), torch.asinh(kspace.imag), m], dim=1)
