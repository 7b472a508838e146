"""An unrolled reconstructor: K cascades of a learned denoiser, each followed by single-coil data
consistency with the measurements (MoDL's step, Aggarwal, Mani & Jacob 2019; Schlemper et al.'s soft
data consistency with ``v = 1/λ``).

With the orthonormal centred FFT ``F`` (:mod:`mriadv.fft`), the sampled-column mask ``M`` and the
measurements ``y = M ⊙ y_full``, the data-consistency step of cascade ``k`` is the closed form of
``argmin_x ‖M(Fx) − y‖² + λ_k ‖x − z‖²``:

    x ← Fᴴ[(M ⊙ y + λ_k · F z) / (M + λ_k)],

i.e. on a sampled column the k-space becomes ``(y + λ F z) / (1 + λ)`` and on an unsampled one ``F z``
(written per case, so ``λ = 0``, hard data consistency, needs no division by zero). As ``λ → 0`` the
sampled columns of the output equal the measurements exactly, so a perturbation ``δ`` of the
measurements moves the output by at least ``‖M δ‖`` (the structural floor of hard data consistency).
``λ_k = softplus(ρ_k) ≥ 0`` is learnt per cascade.

**Smoothing inside the unroll** (SMUG, Li, Jia, Liang, Yao, Ravishankar & Liu, ICASSP 2023): with
``smooth_samples = N > 0`` each cascade's denoiser step is randomised smoothing of the denoiser,
``z = x + (1/N) Σ_i D_k(x + σ n_i)`` with complex standard normal ``n_i`` on the whole grid, the Monte-Carlo
form of ``E_n[(x + σn) + D_k(x + σn)]``. In training each pass draws fresh noise from torch's global
generator (saved in every checkpoint, so a resumed run draws what the uninterrupted one would); in
evaluation the draws come from a generator seeded with ``SMOOTHING_SEED + k`` at every call (common
random numbers, as :class:`mriadv.models.smoothing.Smoothed`): the predictor is one deterministic
function, and an attack's gradient is its exact gradient, through the mean of the ``N`` passes of
every cascade (expectation over transformation). This is not RS-E2E (``adversary='smoothing'``, which
adds noise once, to the measurements).

The network works on the complex image of the whole k-space grid ``(H, W)`` as two real channels and
crops to the target at the end; its output is normalised as the U-Net's input (the magnitude minus
``mean / std``, k-space already divided by ``std`` in :class:`mriadv.data.transforms.UnetTransform`), so
it is scored, attacked and saved exactly as the U-Net is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mriadv.data.transforms import NORM_EPS, center_crop
from mriadv.fft import fft2c, ifft2c
from mriadv.models.smoothing import SMOOTHING_SEED
from mriadv.models.unet import UNet


def data_consistency(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``Fᴴ[(M ⊙ y + λ F z) / (M + λ)]``.

    Args:
        z: complex ``(B, H, W)`` image, the denoiser's output.
        y: complex ``(B, H, W)`` measured k-space (zero where not sampled).
        mask: ``(B, W)`` bool or 0/1, the sampled columns.
        lam: scalar tensor ``λ ≥ 0``.
    Returns: complex ``(B, H, W)``.
    """
    k = fft2c(z)
    sampled = mask.to(torch.bool)[:, None, :]
    return ifft2c(torch.where(sampled, (y + lam * k) / (1.0 + lam), k))


class UnrolledNet(nn.Module):
    """K cascades of ``x ← DC(x + D_k(x))`` from the zero-filled image ``x_0 = Fᴴ y``.

    Args:
        cascades: K.
        chans, num_pools: of each cascade's denoiser, a residual-free U-Net on ``(re, im)``
            (:class:`~mriadv.models.unet.UNet` with 2 input and output channels).
        share: one denoiser for every cascade (``unroll_share``) or one each.
        crop: side of the square output (the target's crop).
        lam_init: initial ``λ`` of every cascade.
        activation, pooling, norm: the denoiser's, as the U-Net's.
        smooth_samples, smooth_sigma: SMUG's smoothing of every denoiser step (``N`` passes, noise of
            ``σ`` per real component in the normalised units of the input; 0 passes: none).

    ``takes_measurements``: it is called as ``model(kspace, mask, mean, std)``, not on the zero-filled
    image (:func:`mriadv.perturbations.reconstruct`).
    """

    takes_measurements = True

    def __init__(
        self,
        cascades: int = 4,
        chans: int = 8,
        num_pools: int = 2,
        share: bool = False,
        crop: int = 320,
        lam_init: float = 0.05,
        activation: str = "prelu",
        pooling: str = "avg",
        norm: str = "instance",
        smooth_samples: int = 0,
        smooth_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if cascades < 1:
            raise ValueError(f"cascades must be >= 1, got {cascades}")
        if smooth_samples < 0 or smooth_sigma < 0 or (smooth_samples > 0) != (smooth_sigma > 0):
            raise ValueError(
                f"smoothing needs samples >= 1 and sigma > 0 (or neither), got {smooth_samples}, {smooth_sigma}"
            )
        self.cascades, self.crop, self.share = cascades, crop, share
        self.smooth_samples, self.smooth_sigma = int(smooth_samples), float(smooth_sigma)

        def denoiser() -> UNet:
            return UNet(2, 2, chans, num_pools, activation=activation, pooling=pooling, norm=norm)

        self.denoisers = nn.ModuleList([denoiser()] if share else [denoiser() for _ in range(cascades)])
        rho = math.log(math.expm1(lam_init)) if lam_init > 0 else -20.0  # softplus^-1
        self.rho = nn.Parameter(torch.full((cascades,), float(rho)))

    @property
    def lambdas(self) -> torch.Tensor:
        """``(K,)`` the data-consistency weights ``λ_k = softplus(ρ_k)``."""
        return F.softplus(self.rho)

    def forward(
        self, kspace: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, full: bool = False
    ) -> torch.Tensor:
        """``kspace``: complex ``(B, H, W)`` measured k-space divided by ``std``; ``mask``: ``(B, W)``;
        ``mean``, ``std``: ``(B,)`` of the zero-filled magnitude. Returns ``(B, 1, crop, crop)``, normalised
        as the U-Net's input and output; ``full``: the last cascade's complex ``(B, H, W)`` image of the
        whole grid instead (before cropping, magnitude and normalisation)."""
        x = ifft2c(kspace)
        lambdas = self.lambdas
        for k in range(self.cascades):
            net = self.denoisers[0 if self.share else k]
            z = x + self.denoise(net, x, k)
            x = data_consistency(z, kspace, mask, lambdas[k])
        if full:
            return x
        image = center_crop(x, (self.crop, self.crop)).abs()
        return (image - (mean / (std + NORM_EPS))[:, None, None]).unsqueeze(1)

    def denoise(self, net: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
        """Cascade ``k``'s correction of the complex ``(B, H, W)`` image ``x``: ``D_k(x)``, or with smoothing
        the mean of ``D_k(x + σ n_i)`` over ``smooth_samples`` draws (see the module docstring)."""
        if self.smooth_samples == 0:
            return _apply(net, x)
        rng = None if self.training else torch.Generator().manual_seed(SMOOTHING_SEED + k)
        total = None
        for _ in range(self.smooth_samples):
            shape = tuple(x.shape)
            n = torch.complex(torch.randn(shape, generator=rng), torch.randn(shape, generator=rng)).to(x.device)
            out = _apply(net, x + self.smooth_sigma * n)
            total = out if total is None else total + out
        return total / self.smooth_samples  # type: ignore[operator]


def _apply(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The denoiser on a complex ``(B, H, W)`` image as two real channels; complex ``(B, H, W)``."""
    two = torch.view_as_real(x).permute(0, 3, 1, 2)  # (B, 2, H, W)
    return torch.view_as_complex(net(two).permute(0, 2, 3, 1).float().contiguous())


__all__ = ["UnrolledNet", "data_consistency"]
