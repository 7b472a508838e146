"""The reconstructor f_theta: a U-Net (Ronneberger et al. 2015) as the seed describes it (Sec. 2.4).

Blocks of two 3x3 convolutions, each followed by a normalisation layer and an activation; pooling
by 2 between blocks; on the way up, bilinear 2x upsampling followed by a 1x1 convolution that halves
the channels (Ronneberger et al.'s "up-convolution" that halves the feature channels, with a 1x1
instead of a 2x2 kernel), concatenation with the skip connection and a block; at the end 1x1
convolutions down to one channel. The seed's report uses 64 channels,
5 pool levels, PReLU, average pooling and instance norm (its published code used batch norm and
transposed-convolution upsampling; ``norm='batch'`` offers the former).

With ``residual=True`` the network predicts a correction to its own input, ``x + f(x)`` (the same
layers and state-dict keys; only the forward adds the input back), so it starts from the zero-filled
image instead of from near zero and its first updates refine rather than rebuild it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mriadv.choices import ACTIVATIONS, NORMS, POOLINGS


class _PReLUFunction(torch.autograd.Function):
    """Single-slope PReLU whose backward uses vectorised kernels (see :class:`PReLU`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # grad where x > 0, weight * grad elsewhere: PReLU's own rule
            grad_x = torch.ops.aten.leaky_relu_backward(grad, x, weight.item(), False)
        if ctx.needs_input_grad[1]:  # the same products and the same full reduction as PReLU's own backward
            grad_w = (grad * x.clamp(max=0)).sum().reshape(weight.shape)
        return grad_x, grad_w


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameter, state-dict key and outputs) with a faster backward on CPU.

    PyTorch's CPU kernel of PReLU's backward is not vectorised: at the demo's U-Net 16/3 on 96x96 it
    took ~0.1 s of a ~0.85 s single-thread training step, against ~0.02 s for fastMRI's LeakyReLU.
    With a single slope the input gradient is exactly LeakyReLU's backward at slope ``a`` and the
    slope's gradient the sum of ``grad * min(x, 0)``; computed so (same values, the same reduction),
    the activation's forward + backward is ~3x faster. Used on CPU with gradients; elsewhere (CUDA,
    no_grad, one slope per channel) the module is plain ``nn.PReLU``. First-order only: a double
    backward through it raises.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and self.weight.numel() == 1
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
        ):
            return _PReLUFunction.apply(x, self.weight)
        return super().forward(x)


def make_activation(name: str) -> nn.Module:
    if name == "prelu":
        return PReLU()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leakyrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def make_norm(name: str, channels: int) -> nn.Module:
    if name == "instance":
        return nn.InstanceNorm2d(channels)
    if name == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {name!r}; expected one of {NORMS}")


_BILINEAR_2X = (0.25, 0.75, 0.75, 0.25)  # 1-D weights of 2x bilinear upsampling (align_corners=False)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for ``x`` ``(B, C, h, w)``.

    On CPU an exact 2x upsampling (always the case inside :class:`UNet`, whose input is padded to a
    multiple of ``2**num_pools``) is computed as what it is: a depthwise transposed convolution,
    stride 2, with the fixed 4x4 kernel ``outer((1, 3, 3, 1) / 4)``, after replicating the edge
    pixels (PyTorch's edge clamping). Same weights, same result up to rounding (a few ulp), and
    forward + backward ~2x faster than PyTorch's CPU bilinear kernels at the demo's sizes. On CUDA
    the same form is taken under ``torch.use_deterministic_algorithms`` (``deterministic=True``):
    CUDA's bilinear backward adds with atomics, in no fixed order, and has no deterministic variant,
    while a transposed convolution and replicate padding do. Elsewhere (CUDA, other dtypes, other
    sizes) it is ``F.interpolate`` itself.
    """
    h, w = x.shape[-2:]
    exact = tuple(size) == (2 * h, 2 * w)
    conv = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if not exact or not (conv or (x.is_floating_point() and torch.are_deterministic_algorithms_enabled())):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    k = torch.tensor(_BILINEAR_2X, dtype=x.dtype, device=x.device)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 4, 4).contiguous()
    return F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, stride=2, padding=3, groups=x.shape[1])


def reflected(n: int, before: int, after: int, device: torch.device | None = None) -> torch.Tensor:
    """The source index of each position of a side of length ``n`` reflect-padded by ``before`` and
    ``after`` (each < n), as ``F.pad(mode='reflect')`` picks them: ``(before + n + after,)`` int64."""
    i = torch.arange(-before, n + after, device=device).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def reflect_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pad, mode='reflect')`` for ``x`` ``(B, C, H, W)``, ``pad`` ``(left, right, top,
    bottom)``. On CUDA under ``torch.use_deterministic_algorithms`` it is two ``index_select`` s
    instead, whose backward is deterministic there (CUDA's reflection-pad backward adds with atomics)."""
    if not (x.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return F.pad(x, pad, mode="reflect")
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x.index_select(-2, reflected(h, top, bottom, x.device)).index_select(-1, reflected(w, left, right, x.device))


class ConvBlock(nn.Sequential):
    """``(conv3x3 -> norm -> activation) x 2``: ``(B, c_in, H, W) -> (B, c_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int, norm: str, activation: str) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            make_norm(norm, c_out),
            make_activation(activation),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            make_norm(norm, c_out),
            make_activation(activation),
        )


class UpConv(nn.Module):
    """Bilinear 2x upsampling followed by a 1x1 convolution: ``(B, c_in, h, w) -> (B, c_out, 2h, 2w)``.

    Both are linear, one acts on channels only and the other on pixels only (with weights summing to
    one, so the bias passes through unchanged): they commute exactly. The convolution therefore runs
    first, on the coarse map, and only ``c_out`` channels are upsampled: at ``c_out = c_in / 2`` a
    quarter of the multiply-adds of convolving after the upsampling, and the block after the
    concatenation sees ``2 c_out`` channels instead of ``c_in + c_out``.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return upsample_bilinear(self.conv(x), size)


class UNet(nn.Module):
    """U-Net reconstructor: ``(B, in_chans, H, W) -> (B, out_chans, H, W)`` for any H, W.

    Inputs whose sides are not multiples of ``2**num_pools`` are reflect-padded up to one and the
    output cropped back, so every level's skip connection matches exactly.

    Args:
        chans: channels of the first block; doubled at each pool level.
        num_pools: number of 2x poolings (the bottleneck has ``chans * 2**num_pools`` channels).
        activation: ``'prelu'`` (seed), ``'relu'`` or ``'leakyrelu'``.
        pooling: ``'avg'`` (seed) or ``'max'``.
        norm: ``'instance'`` (seed's report) or ``'batch'`` (seed's code).
        residual: return ``x + f(x)``, a correction added to the input (needs ``in_chans == out_chans``);
            the parameters are those of the plain network, so a state dict loads into either.
    """

    takes_measurements = False  # called on the zero-filled image (mriadv.perturbations.reconstruct)

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        chans: int = 64,
        num_pools: int = 5,
        activation: str = "prelu",
        pooling: str = "avg",
        norm: str = "instance",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if chans < 1 or num_pools < 0:
            raise ValueError(f"chans must be >= 1 and num_pools >= 0, got chans={chans}, num_pools={num_pools}")
        if residual and in_chans != out_chans:
            raise ValueError(f"residual needs in_chans == out_chans, got {in_chans} and {out_chans}")
        self.residual = residual
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.num_pools = num_pools
        self.pool = F.avg_pool2d if pooling == "avg" else F.max_pool2d
        widths = [chans * 2**i for i in range(num_pools + 1)]
        self.down = nn.ModuleList(
            [ConvBlock(in_chans, widths[0], norm, activation)]
            + [ConvBlock(widths[i - 1], widths[i], norm, activation) for i in range(1, num_pools + 1)]
        )
        # level i+1 is upsampled and halved to level i's width, then concatenated with level i's skip
        self.upconv = nn.ModuleList([UpConv(widths[i + 1], widths[i]) for i in reversed(range(num_pools))])
        self.up = nn.ModuleList(
            [ConvBlock(2 * widths[i], widths[i], norm, activation) for i in reversed(range(num_pools))]
        )
        half = max(1, chans // 2)
        self.head = nn.Sequential(
            nn.Conv2d(widths[0], half, 1), make_activation(activation), nn.Conv2d(half, out_chans, 1)
        )

    def extra_repr(self) -> str:
        return "residual=True" if self.residual else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"UNet expects (B, C, H, W), got shape {tuple(x.shape)}")
        inputs = x
        H, W = x.shape[-2:]
        m = 2**self.num_pools
        pad_h, pad_w = (-H) % m, (-W) % m
        if pad_h or pad_w:
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            x = reflect_pad(x, pad) if pad_h < H and pad_w < W else F.pad(x, pad, mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x, 2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for upconv, block in zip(self.upconv, self.up):
            skip = skips.pop()
            x = block(torch.cat([upconv(x, skip.shape[-2:]), skip], dim=1))
        x = self.head(x)
        if pad_h or pad_w:
            x = x[..., pad_h // 2 : pad_h // 2 + H, pad_w // 2 : pad_w // 2 + W]
        return inputs + x if self.residual else x
