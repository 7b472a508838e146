"""Figures for the documentation.

:func:`synthetic_examples` writes ``docs/synthetic_examples.png``: for a few synthetic volumes
(:mod:`mriadv.data.synthetic`, fastMRI single-coil geometry) the reference image
(``reconstruction_esc``) above the network's zero-filled input ``|C(F^-1 P(y))|`` at 4x (random mask,
8% fully sampled centre, the fixed per-volume validation mask of
:class:`~mriadv.data.transforms.UnetTransform` with ``train=False``, de-normalised), and for the first
volume the log-magnitude of the fully sampled and of the masked k-space, the mask, and the
zero-filled error.

Usage (with the project installed, ``pip install -e .``)::

    python docs/make_figures.py                      # docs/synthetic_examples.png, 320x320 crops
    python docs/make_figures.py --size 128 --out /tmp/examples.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mriadv.config import TrainConfig  # noqa: E402
from mriadv.data.files import SliceDataset  # noqa: E402
from mriadv.data.masks import make_mask_func  # noqa: E402
from mriadv.data.synthetic import SyntheticSpec, generate  # noqa: E402
from mriadv.data.transforms import NORM_EPS, UnetTransform, denormalize  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "synthetic_examples.png"


def _log_magnitude(kspace: np.ndarray) -> np.ndarray:
    """``log10 |k|`` with exact zeros (padding, unsampled columns) shown at the floor of the data."""
    mag = np.abs(kspace)
    floor = np.percentile(mag[mag > 0], 1) if (mag > 0).any() else 1.0
    return np.log10(np.maximum(mag, floor))


def synthetic_examples(
    out: str | Path = DEFAULT_OUT, volumes: int = 4, size: int = 320, slices: int = 5, dpi: int = 80, seed: int = 0
) -> Path:
    """Write the synthetic-examples grid to ``out`` (PNG) and return its path.

    Args:
        volumes: how many training volumes to show (columns), >= 2.
        size: crop size of the synthetic data (320: fastMRI knee geometry, k-space 640x368).
        slices: slices per generated volume; the middle one is shown.
        dpi: resolution of the PNG.
        seed: the synthetic dataset's seed.
    """
    if volumes < 2:
        raise ValueError(f"volumes must be >= 2, got {volumes}")
    defaults = TrainConfig()  # the seed's 4x random mask with 8% centre
    mask_func = make_mask_func(defaults.mask_type, defaults.center_fraction, defaults.acceleration)
    # clamp=None so that de-normalising the input gives |C(F^-1 P(y))| exactly
    transform = UnetTransform(mask_func, size, train=False, seed=defaults.seed, clamp=None, keep_kspace=True)
    with tempfile.TemporaryDirectory(prefix="mriadv-figures-") as tmp:
        root = generate(
            Path(tmp) / "data", SyntheticSpec(volumes=volumes, val_volumes=1, slices=slices, size=size, seed=seed)
        )
        dataset = SliceDataset(root, "train", transform, crop_size=size)
        shown = []
        for vol in dataset.volumes:
            s = vol.num_slices // 2
            raw = dataset.read(dataset.slices.index((vol, s)))
            sample = transform(raw)
            zero_filled = denormalize(sample.image[0], sample.mean, sample.std).numpy()
            masked = (sample.kspace * (sample.std + NORM_EPS)).numpy()  # P(y) in raw units
            shown.append((vol, s, raw, zero_filled, masked, sample.mask.numpy()))

    fig, axes = plt.subplots(3, volumes, figsize=(2.4 * volumes, 7.8), constrained_layout=True)
    for col, (vol, s, raw, zero_filled, _, mask) in enumerate(shown):
        target = raw.target
        vmax = float(np.percentile(target, 99.5))
        kept = int(mask[raw.padding[0] : raw.padding[1]].sum())
        acquired = raw.padding[1] - raw.padding[0]
        axes[0, col].imshow(target, cmap="gray", vmin=0, vmax=vmax)
        axes[0, col].set_title(f"{vol.name} slice {s}\n{vol.acquisition}\ntarget (reconstruction_esc)", fontsize=8)
        axes[1, col].imshow(zero_filled, cmap="gray", vmin=0, vmax=vmax)
        axes[1, col].set_title(
            f"zero-filled |C(F^-1 P(y))|, 4x\n({kept} of {acquired} acquired columns kept)", fontsize=8
        )

    vol, s, raw, zero_filled, masked, mask = shown[0]
    full = _log_magnitude(raw.kspace)
    lo, hi = float(full.min()), float(full.max())
    aspect = raw.kspace.shape[1] / raw.kspace.shape[0]
    panels = [
        (
            full,
            f"log10 |y|, fully sampled\n{raw.kspace.shape[0]}x{raw.kspace.shape[1]} ({vol.name})",
            "viridis",
            lo,
            hi,
        ),
        (
            _log_magnitude(np.where(mask[None, :], masked, 0)),
            "log10 |P(y)|, 4x random mask\n(8% centre)",
            "viridis",
            lo,
            hi,
        ),
        (
            np.repeat(mask[None, :].astype(float), raw.kspace.shape[0], 0),
            f"mask P (white: kept columns)\nacquired columns [{raw.padding[0]}, {raw.padding[1]})",
            "gray",
            0,
            1,
        ),
        (
            np.abs(zero_filled - raw.target),
            f"|zero-filled - target|\n({vol.name} slice {s})",
            "magma",
            0,
            float(np.percentile(raw.target, 99.5)) / 4,
        ),
    ]
    for col in range(volumes):
        ax = axes[2, col]
        if col < len(panels):
            image, title, cmap, vmin, vmax = panels[col]
            ax.imshow(
                image,
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                aspect=1.0 if image.shape[0] == image.shape[1] else aspect * image.shape[0] / image.shape[1],
            )
            ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle(
        f"Synthetic fastMRI-format knees ({size}x{size} crops), reference vs 4x zero-filled input", fontsize=10
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the documentation figures.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG path (default: {DEFAULT_OUT})")
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--size", type=int, default=320, help="synthetic crop size (320 or e.g. 128)")
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)
    out = synthetic_examples(args.out, args.volumes, args.size, args.slices, args.dpi)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
