"""Synthetic knee-like volumes written in fastMRI's single-coil HDF5 format.

A reader for real fastMRI folders reads the output unchanged: ``OUT/singlecoil_train/*.h5`` and
``OUT/singlecoil_val/*.h5``, each file one volume of ``S`` slices with

* ``kspace``: complex64 ``(S, 2C, W)``. Rows (H = 2C) are the readout, oversampled two-fold, so the
  anatomy fills about the central half of the rows; ``W = 2 * round(0.575 C)`` phase-encode columns
  (368 for C = 320), of which only the central ``A ~ 0.93 W`` are acquired and the rest are exactly
  zero, as in fastMRI's zero-padded phase encodes.
* ``reconstruction_esc``: float32 ``(S, C, C)``, the centre crop of ``|ifft2c(kspace)|``.
* ``reconstruction_rss``: float32 ``(S, C, C)``, the centre crop of the noise-free, un-truncated
  magnitude (a second reference, close to but not equal to ``esc``).
* ``ismrmrd_header``: ISMRMRD XML whose ``encodingLimits/kspace_encoding_step_1`` reproduce the zero
  columns through fastMRI's ``padding_left = W // 2 - center``, ``padding_right = padding_left +
  maximum + 1``.
* attributes ``max``, ``norm`` (of the esc volume), ``acquisition`` (``CORPD_FBK`` /
  ``CORPDFS_FBK``) and ``patient_id``.

Each volume is a coronal knee-like phantom: leg outline with subcutaneous fat, textured muscle with
fat septa and vessels, femur and tibia (dark cortex, trabecular marrow, growth-plate scar, optional
fibula head and marrow lesions), cartilage, joint fluid, menisci and ligaments. Sizes and positions
are smooth functions of the slice position and textures are interpolated between two fields, so
neighbouring slices are alike. A smooth bias field (about +-15..30 %), a smooth phase and complex
Gaussian measurement noise on the acquired columns make it look acquired, at fastMRI's absolute scale
(image intensities ~1e-5..1e-4). Everything is drawn from
``numpy.random.default_rng(SeedSequence([seed, split, index]))``, so a spec gives identical k-space.

Usage: ``python -m mriadv.data.synthetic OUT --volumes 24 --val-volumes 6 --slices 12 --size 128``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Sequence

import h5py
import numpy as np

SPLITS = ("singlecoil_train", "singlecoil_val")
ACQUISITIONS = ("CORPD_FBK", "CORPDFS_FBK")
MANIFEST = "synthetic.json"
FORMAT = "mriadv-synthetic-fastmri-singlecoil"
# Bump when the generated content changes, so ensure() refuses a stale cached dataset.
GENERATOR_VERSION = 1

_FFT_AXES = (-2, -1)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Args:
        volumes: training volumes (files in ``singlecoil_train``).
        val_volumes: validation volumes (files in ``singlecoil_val``).
        slices: slices per volume.
        size: crop size C (even, >= 32); k-space is ``(slices, 2C, W)``, targets ``(slices, C, C)``.
        seed: non-negative base seed; volume ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``.
    """

    volumes: int = 24
    val_volumes: int = 6
    slices: int = 12
    size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        for name in ("volumes", "val_volumes", "slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be an even integer >= 32, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


class KspaceGeometry(NamedTuple):
    """Matrix sizes for crop size C: k-space ``(height, width)``, ``acquired`` central columns."""

    crop: int
    height: int
    width: int
    acquired: int
    padding_left: int

    @property
    def padding_right(self) -> int:
        """First zero column after the acquired band (fastMRI's ``padding_right``)."""
        return self.padding_left + self.acquired


def geometry(size: int) -> KspaceGeometry:
    """fastMRI knee proportions: ``H = 2C``, ``W = 2 round(0.575 C)``, ``A = 2 round(0.465 W)``.

    Rounding is half-up in integer arithmetic (C = 320 gives the real 640 x 368 with 342 acquired).
    """
    width = 2 * ((23 * size + 20) // 40)
    acquired = 2 * ((93 * width + 100) // 200)
    return KspaceGeometry(size, 2 * size, width, acquired, (width - acquired) // 2)


def volume_file_name(seed: int, split: int, index: int) -> str:
    """fastMRI-style name ``file{seed:03d}{split}{index:04d}.h5``, e.g. ``file00010003.h5``."""
    return f"file{seed:03d}{split}{index:04d}.h5"


def split_file_names(spec: SyntheticSpec) -> dict[str, list[str]]:
    """The file names of each split, in generation order."""
    counts = (spec.volumes, spec.val_volumes)
    return {
        split: [volume_file_name(spec.seed, s, i) for i in range(n)]
        for s, (split, n) in enumerate(zip(SPLITS, counts))
    }


# --------------------------------------------------------------------------------------------------
# Pure numpy math


def fft2c_np(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (numpy twin of :func:`mriadv.fft.fft2c`)."""
    x = np.fft.ifftshift(image, axes=_FFT_AXES)
    return np.fft.fftshift(np.fft.fft2(x, norm="ortho", axes=_FFT_AXES), axes=_FFT_AXES)


def ifft2c_np(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse 2-D FFT (numpy twin of :func:`mriadv.fft.ifft2c`)."""
    x = np.fft.ifftshift(kspace, axes=_FFT_AXES)
    return np.fft.fftshift(np.fft.ifft2(x, norm="ortho", axes=_FFT_AXES), axes=_FFT_AXES)


def center_crop_np(x: np.ndarray, size: int) -> np.ndarray:
    """``(..., H, W) -> (..., size, size)``, window starting at ``(dim - size) // 2`` (fastMRI)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------------
# Phantom drawing. Anatomical coordinates are in crop half-widths: the C x C crop is [-1, 1)^2.

# Relative signal of each tissue in (proton density, fat-suppressed proton density).
_TISSUE_SIGNAL = {
    "fat": (0.90, 0.16),
    "muscle": (0.36, 0.30),
    "marrow": (0.78, 0.20),
    "cortex": (0.04, 0.03),
    "cartilage": (0.55, 0.62),
    "fluid": (0.62, 0.95),
    "fibrous": (0.07, 0.06),  # menisci, ligaments
    "vessel": (0.75, 0.85),
}


class _Canvas:
    """Pixel grid of one volume mapped to anatomical coordinates, with painter's-algorithm helpers.

    The anatomy is rotated, mirrored, shifted and scaled per volume, so ``ya, xa`` are ``(1, H, W)``
    and the same for all slices; per-slice motion lives in the shape parameters ``(S, 1, 1)``.
    """

    def __init__(self, geom: KspaceGeometry, rng: np.random.Generator) -> None:
        self.geom = geom
        self.px = 2.0 / geom.crop  # pixel size in crop half-widths
        self.angle = rng.uniform(-0.15, 0.15)
        self.mirror = -1.0 if rng.random() < 0.5 else 1.0  # left or right knee
        self.gain = rng.uniform(0.88, 1.04)  # anatomy size
        self.offset = rng.uniform(-0.04, 0.04, size=2)
        y = (np.arange(geom.height) - geom.height // 2) * self.px - self.offset[0]
        x = (np.arange(geom.width) - geom.width // 2) * self.px - self.offset[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        self.ya = ((c * y[:, None] + s * x[None, :]) / self.gain).astype(np.float32)[None]
        self.xa = (self.mirror * (-s * y[:, None] + c * x[None, :]) / self.gain).astype(np.float32)[None]
        self.px_anat = np.float32(self.px / self.gain)  # pixel size in anatomical units

    def window(self, *discs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[slice, slice]:
        """Pixel window holding the discs ``(cy, cx, radius)`` (anatomical, per slice) of all slices."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        rows, cols = [], []
        for cy, cx, r in discs:
            yy, xx = self.gain * np.asarray(cy), self.gain * self.mirror * np.asarray(cx)
            y = c * yy - s * xx + self.offset[0]
            x = s * yy + c * xx + self.offset[1]
            rad = self.gain * np.asarray(r) / self.px + 2
            rows += [np.min(y / self.px - rad), np.max(y / self.px + rad)]
            cols += [np.min(x / self.px - rad), np.max(x / self.px + rad)]
        h, w = self.geom.height, self.geom.width
        r0 = int(np.clip(np.floor(min(rows)) + h // 2, 0, h))
        r1 = int(np.clip(np.ceil(max(rows)) + h // 2 + 1, r0, h))
        c0 = int(np.clip(np.floor(min(cols)) + w // 2, 0, w))
        c1 = int(np.clip(np.ceil(max(cols)) + w // 2 + 1, c0, w))
        return (slice(r0, r1), slice(c0, c1))

    def shape(
        self,
        win: tuple[slice, slice],
        cy: np.ndarray,
        cx: np.ndarray,
        ry: np.ndarray,
        rx: np.ndarray,
        power: float = 2.0,
        angle: float = 0.0,
        wobble: Sequence[tuple[int, float, float]] = (),
    ) -> np.ndarray:
        """Anti-aliased occupancy in [0, 1], ``(S, h, w)`` on ``win``, of a rotated superellipse.

        ``|u/rx|^p + |v/ry|^p = 1`` with outline radius scaled by ``1 + sum a cos(k theta + phi)``
        for ``(k, a, phi)`` in ``wobble``. The signed distance to the outline is approximated to first
        order, ``(1 - rho) / |grad rho|``, and turned into a one-pixel linear ramp (area coverage).
        """
        dy = self.ya[:, win[0], win[1]] - cy
        dx = self.xa[:, win[0], win[1]] - cx
        if angle:
            ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            dx, dy = ca * dx + sa * dy, ca * dy - sa * dx
        ry = np.maximum(ry, 1e-3)
        rx = np.maximum(rx, 1e-3)
        a, b = np.abs(dx) / rx, np.abs(dy) / ry
        if power == 2.0:
            rho = np.sqrt(a * a + b * b)
            grad = np.sqrt((a / rx) ** 2 + (b / ry) ** 2) / np.maximum(rho, 1e-9)
        else:
            p = np.float32(power)
            rho = (a**p + b**p) ** (1 / p)
            grad = np.sqrt((a ** (p - 1) / rx) ** 2 + (b ** (p - 1) / ry) ** 2)
            grad *= np.maximum(rho, 1e-9) ** (1 - p)
        if wobble:
            theta = np.arctan2(dy, dx)
            w = 1.0 + sum(np.float32(amp) * np.cos(k * theta + np.float32(ph)) for k, amp, ph in wobble)
            rho, grad = rho / w, grad / w
        dist = (1.0 - rho) / np.maximum(grad, 1e-6)
        return np.clip(0.5 + dist / self.px_anat, 0.0, 1.0).astype(np.float32, copy=False)

    def band(self, win: tuple[slice, slice], y0: np.ndarray, curve: float, half_width: float) -> np.ndarray:
        """Thin anti-aliased line ``ya = y0 + curve * xa^2``, ``(S, h, w)`` on ``win``."""
        d = np.abs(self.ya[:, win[0], win[1]] - y0 - curve * self.xa[:, win[0], win[1]] ** 2)
        return np.clip(0.5 + (half_width - d) / self.px_anat, 0.0, 1.0)

    @staticmethod
    def paint(img: np.ndarray, win: tuple[slice, slice], mask: np.ndarray, value: float | np.ndarray) -> None:
        """Over-paint ``img`` (S, H, W) on ``win``; ``value`` is a number or a full ``(S, H, W)`` field."""
        region = img[:, win[0], win[1]]
        if isinstance(value, np.ndarray):
            value = value[:, win[0], win[1]]
        region += mask * (value - region)


def _slice_positions(slices: int) -> np.ndarray:
    """Position of each slice across the stack, -1 .. 1 (0 for a single slice), float32 ``(S, 1, 1)``."""
    t = np.linspace(-1.0, 1.0, slices) if slices > 1 else np.zeros(1)
    return t.astype(np.float32)[:, None, None]


def _texture_fields(rng: np.random.Generator, geom: KspaceGeometry, t: np.ndarray) -> dict[str, np.ndarray]:
    """Band-limited unit-variance textures ``(S, H, W)`` that turn slowly across slices.

    Each is ``cos(a) F1 + sin(a) F2`` with ``a`` going from 0 to pi/2 over the stack, so the variance
    is constant and adjacent slices correlate strongly. Frequencies are in cycles per crop half-width.
    """
    per_unit = geom.crop / 2
    fy = (np.fft.fftfreq(geom.height) * per_unit)[:, None]
    fx = (np.fft.fftfreq(geom.width) * per_unit)[None, :]
    f0 = min(16.0, 0.15 * per_unit)  # trabecular spacing, kept under a third of Nyquist
    filters = {
        "fat": np.exp(-(fy**2 + fx**2) / (2 * 3.0**2)),
        "muscle": np.exp(-((fy / 2.5) ** 2) / 2 - (fx / min(12.0, 0.25 * per_unit)) ** 2 / 2),  # fibres
        "marrow": np.exp(-(((np.hypot(fy, fx) - f0) / (0.35 * f0)) ** 2) / 2),
        "smooth": np.exp(-(fy**2 + fx**2) / (2 * 1.5**2)),
    }
    alpha = ((t + 1) * (np.pi / 4)).astype(np.float32)  # (S, 1, 1)
    out = {}
    for name, filt in filters.items():
        pair = []
        for _ in range(2):
            field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((geom.height, geom.width))) * filt).real
            pair.append(((field - field.mean()) / field.std()).astype(np.float32))
        out[name] = np.cos(alpha) * pair[0] + np.sin(alpha) * pair[1]
    return out


def _knee_magnitude(
    rng: np.random.Generator, geom: KspaceGeometry, slices: int, fat_suppressed: bool
) -> np.ndarray:
    """Noise-free, bias-free magnitude ``(S, H, W)`` float32 of a coronal knee-like phantom (~0..1)."""
    S = slices
    f32 = np.float32
    t = _slice_positions(S)  # (S, 1, 1)
    canvas = _Canvas(geom, rng)
    level = {k: f32(v[int(fat_suppressed)] * rng.uniform(0.88, 1.12)) for k, v in _TISSUE_SIGNAL.items()}
    tex = _texture_fields(rng, geom, t)
    img = np.zeros((S, geom.height, geom.width), f32)

    def smooth(c0: float, c1: float = 0.0) -> np.ndarray:
        """A per-slice parameter ``c0 + c1 t``, ``(S, 1, 1)``."""
        return (c0 + c1 * t).astype(f32)

    def presence(centre: float, half_width: float) -> np.ndarray:
        """Cross-section factor of a sphere-like structure centred at slice position ``centre``."""
        return np.sqrt(np.clip(1.0 - ((t - centre) / half_width) ** 2, 0.0, 1.0)).astype(f32)

    taper = np.sqrt(1.0 - (rng.uniform(0.35, 0.6) * t) ** 2).astype(f32)  # narrower at the stack ends
    u = rng.uniform

    # Leg outline: subcutaneous fat, then muscle inset by the fat thickness.
    by, bx = smooth(u(-0.04, 0.04), u(-0.03, 0.03)), smooth(u(-0.04, 0.04), u(-0.03, 0.03))
    bry, brx = smooth(u(0.84, 0.95)), u(0.74, 0.9) * (0.9 + 0.1 * taper)
    wobble = [(2, u(0, 0.04), u(0, 2 * np.pi)), (3, u(0, 0.03), u(0, 2 * np.pi))]
    power = u(2.0, 2.8)
    win = canvas.window((by, bx, 1.1 * np.maximum(bry, brx)))
    body = canvas.shape(win, by, bx, bry, brx, power, wobble=wobble)
    canvas.paint(img, win, body, level["fat"] * (1 + 0.07 * tex["fat"]))
    fat = u(0.05, 0.11)
    muscle = np.zeros_like(img)
    muscle[:, win[0], win[1]] = canvas.shape(win, by, bx, bry - fat, brx - fat * u(0.8, 1.3), power, wobble=wobble)
    canvas.paint(img, win, muscle[:, win[0], win[1]], level["muscle"] * (1 + 0.16 * tex["muscle"]))

    # Fat septa between muscles: thin rings clipped to the muscle.
    for _ in range(rng.integers(2, 4)):
        cy = smooth(u(-0.5, 0.5), u(-0.05, 0.05))
        side = 1 if rng.random() < 0.5 else -1
        cx = smooth(side * u(0.15, 0.5), u(-0.05, 0.05))
        ry, rx, width = u(0.25, 0.6), u(0.12, 0.35), max(1.3 * canvas.px_anat, 0.012)
        win = canvas.window((cy, cx, max(ry, rx)))
        ring = canvas.shape(win, cy, cx, ry, rx) - canvas.shape(win, cy, cx, ry - width, rx - width)
        arcs = np.clip(tex["smooth"][:, win[0], win[1]] + 0.4, 0, 1)  # broken, not closed rings
        canvas.paint(img, win, ring * arcs * muscle[:, win[0], win[1]], 0.85 * level["fat"])

    # Vessels: elongated tubes in the soft tissue, bright (slow flow) or dark (flow void).
    for _ in range(rng.integers(3, 6)):
        side = 1 if rng.random() < 0.5 else -1
        cy, cx = smooth(u(-0.55, 0.55)), smooth(side * u(0.55, 0.78) * float(brx.mean()), u(-0.08, 0.08))
        ry, rx = u(0.06, 0.3), u(0.014, 0.032)
        win = canvas.window((cy, cx, ry))
        value = level["vessel"] if rng.random() < 0.6 else level["cortex"]
        tube = canvas.shape(win, cy, cx, ry, rx, angle=u(-0.3, 0.3))
        canvas.paint(img, win, tube * muscle[:, win[0], win[1]], value)

    # Joint line yj and gap between femur and tibia. A bone is a union of parts
    # (cy, cx, ry, rx, power, cortex thickness): femur = two condyles + flaring metaphysis + shaft,
    # tibia = plateau + metaphysis + shaft; the shafts have the thicker cortex.
    yj = smooth(u(-0.02, 0.12), u(-0.04, 0.04))
    gap = u(0.035, 0.06)
    cortex, cart = u(0.018, 0.03), u(0.018, 0.03)
    sep, rcx, rcy = u(0.17, 0.23), u(0.2, 0.25) * taper, u(0.17, 0.22) * taper
    condyle_y = yj - gap / 2 - rcy
    shaft = (u(0.17, 0.23), u(0.34, 0.42))  # half-width, half-length
    femur = [
        (condyle_y, smooth(-sep), rcy, rcx, 2.0, cortex),
        (condyle_y, smooth(sep), rcy, rcx, 2.0, cortex),
        (condyle_y - u(0.1, 0.16), smooth(0.0), u(0.16, 0.22), (sep + 0.8 * rcx), 2.4, cortex),
        (yj - u(0.45, 0.52), smooth(0.0, u(-0.03, 0.03)), smooth(shaft[1]), shaft[0] * taper, 2.6, 2.5 * cortex),
    ]
    rty = u(0.11, 0.15)
    plateau_y = yj + gap / 2 + rty
    tibia = [
        (plateau_y, smooth(0.0), smooth(rty), u(0.42, 0.5) * taper, u(2.6, 3.2), cortex),
        (plateau_y + u(0.1, 0.15), smooth(0.0), u(0.14, 0.2), u(0.28, 0.34) * taper, 2.4, cortex),
        (yj + u(0.5, 0.58), smooth(0.0, u(-0.03, 0.03)), smooth(shaft[1]), shaft[0] * u(0.9, 1.1) * taper, 2.6,
         2.5 * cortex),
    ]
    fibula_on = presence(u(0.2, 0.8), 0.7)
    fr = u(0.07, 0.09) * fibula_on
    fibula = [(plateau_y + u(0.12, 0.2), smooth(u(0.42, 0.5)), fr, fr * u(0.8, 1.1), 2.0, cortex)]

    def union(win: tuple[slice, slice], parts: list, grow: float = 0.0, inner: bool = False) -> np.ndarray:
        """Occupancy of a bone grown by ``grow`` or, with ``inner``, shrunk by each part's cortex."""
        masks = [
            canvas.shape(win, cy, cx, ry + grow - inner * ct, rx + grow - inner * ct, p)
            for cy, cx, ry, rx, p, ct in parts
        ]
        return np.maximum.reduce(masks) if len(masks) > 1 else masks[0]

    def discs(parts: list) -> list:
        return [(cy, cx, np.maximum(ry, rx) * 1.3 + 0.05) for cy, cx, ry, rx, _, _ in parts]

    # Joint fluid and soft tissue around the joint, later covered by cartilage and bone.
    fy_, fx_ = yj, smooth(0.0)
    fry, frx = u(0.08, 0.14), u(0.45, 0.58) * taper
    win = canvas.window((fy_, fx_, frx))
    fluid = canvas.shape(win, fy_, fx_, fry, frx, 2.4)
    canvas.paint(img, win, fluid, level["fluid"] * (1 + 0.05 * tex["smooth"]))

    # Cartilage: bones grown by the cartilage thickness, kept only near the joint line.
    win = canvas.window(*discs(femur[:2] + tibia[:1]))
    ya = canvas.ya[:, win[0], win[1]]
    near_femur = np.clip((ya - (yj - 0.16)) / 0.06, 0, 1)
    near_tibia = np.clip(((yj + 0.12) - ya) / 0.05, 0, 1)
    canvas.paint(img, win, union(win, femur[:2], grow=cart) * near_femur, level["cartilage"])
    canvas.paint(img, win, union(win, tibia[:1], grow=cart) * near_tibia, level["cartilage"])

    # Menisci: dark wedges at both ends of the joint gap (bone painted later trims them).
    for side in (-1, 1):
        cy, cx = yj + u(-0.01, 0.01), side * (sep + 0.8 * rcx) + u(-0.02, 0.02)
        ry, rx = gap / 2 + u(0.02, 0.035), u(0.07, 0.11) * taper
        win = canvas.window((cy, cx, rx))
        canvas.paint(img, win, canvas.shape(win, cy, cx, ry, rx, 1.5), level["fibrous"])  # wedge-like

    # Cruciate ligaments in the notch and collateral ligaments on both sides of the joint.
    for cx0, ang in ((u(-0.04, 0.0), u(0.3, 0.6)), (u(0.0, 0.04), -u(0.3, 0.6))):
        cy, cx = yj - u(0.07, 0.12), smooth(cx0)
        win = canvas.window((cy, cx, 0.15))
        ligament = canvas.shape(win, cy, cx, smooth(u(0.09, 0.13)), u(0.018, 0.028), angle=ang)
        canvas.paint(img, win, ligament, level["fibrous"])
    for side in (-1, 1):
        cy, cx = yj + u(-0.03, 0.03), side * (u(0.5, 0.56) * taper)
        win = canvas.window((cy, cx, 0.25))
        canvas.paint(img, win, canvas.shape(win, cy, cx, u(0.14, 0.22), u(0.012, 0.02)), level["fibrous"])

    # Bones: cortex (outer shape) then trabecular marrow (inner shape) and the growth-plate scar,
    # all kept inside the muscle outline.
    trabeculae = 1 - 0.25 * np.exp(-((tex["marrow"] / 0.35) ** 2))  # dark network on zero crossings
    marrow = level["marrow"] * (1 + 0.08 * tex["smooth"]) * trabeculae
    physes = (yj - u(0.3, 0.38), -u(0.1, 0.3)), (plateau_y + u(0.06, 0.12), u(0.05, 0.2)), None
    for parts, physis in zip((femur, tibia, fibula), physes):
        win = canvas.window(*discs(parts))
        inside = muscle[:, win[0], win[1]]
        canvas.paint(img, win, union(win, parts) * inside, level["cortex"])
        inner = union(win, parts, inner=True) * inside
        canvas.paint(img, win, inner, marrow)
        if physis is not None:
            line = canvas.band(win, physis[0], physis[1], half_width=0.8 * canvas.px_anat)
            canvas.paint(img, win, line * inner, 0.35 * level["marrow"])

    # Marrow lesions (oedema-like bright or sclerotic dark), present in a range of slices.
    for _ in range(rng.integers(0, 3)):
        side = 1 if rng.random() < 0.5 else -1
        on_femur = rng.random() < 0.6
        cy = yj - gap / 2 - rcy * u(0.4, 0.9) if on_femur else yj + gap / 2 + rty * u(0.8, 1.5)
        cx = smooth(side * sep * u(0.6, 1.2))
        r = u(0.03, 0.07) * presence(u(-0.7, 0.7), u(0.3, 0.6))
        win = canvas.window((cy, cx, r + 0.02))
        value = level["fluid"] if rng.random() < 0.6 else level["cortex"] * 3
        canvas.paint(img, win, canvas.shape(win, cy, cx, r, r * u(0.7, 1.3)), value)

    return img


def _smooth_poly(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, t: np.ndarray, amplitude: float
) -> np.ndarray:
    """Quadratic in ``(y, x)`` with a slice-linear tilt, scaled so its peak over the crop is ``amplitude``."""

    def poly(c: np.ndarray, yy: np.ndarray, xx: np.ndarray, tt: np.ndarray) -> np.ndarray:
        quadratic = c[2] * xx * xx + c[3] * xx * yy + c[4] * yy * yy
        return c[0] * xx + c[1] * yy + quadratic + tt * (c[5] * xx + c[6] * yy)

    c = rng.standard_normal(7) * np.array([1, 1, 0.5, 0.5, 0.5, 0.2, 0.2])
    g = np.linspace(-1, 1, 9)
    peak = np.abs(poly(c, g[:, None, None], g[None, :, None], np.array([-1.0, 1.0])[None, None])).max()
    return (poly(c * (amplitude / peak), y, x, t)).astype(np.float32)


@dataclass(frozen=True)
class SyntheticVolume:
    """One generated volume: the arrays and attributes of a fastMRI single-coil file."""

    kspace: np.ndarray  # complex64 (S, 2C, W)
    reconstruction_esc: np.ndarray  # float32 (S, C, C)
    reconstruction_rss: np.ndarray  # float32 (S, C, C)
    header: str
    acquisition: str
    patient_id: str


def synthesize_volume(spec: SyntheticSpec, split: int, index: int) -> SyntheticVolume:
    """Draw volume ``index`` of split ``split`` (0 train, 1 val); deterministic for its arguments."""
    geom = geometry(spec.size)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split, index]))
    acquisition = ACQUISITIONS[index % 2]
    fat_suppressed = acquisition == "CORPDFS_FBK"
    magnitude = _knee_magnitude(rng, geom, spec.slices, fat_suppressed)  # (S, H, W)

    # Scanner effects in pixel coordinates (they do not move with the anatomy).
    px = 2.0 / geom.crop
    y = ((np.arange(geom.height) - geom.height // 2) * px)[None, :, None]
    x = ((np.arange(geom.width) - geom.width // 2) * px)[None, None, :]
    t = _slice_positions(spec.slices)
    bias = np.clip(1.0 + _smooth_poly(rng, y, x, t, rng.uniform(0.15, 0.3)), 0.3, None)
    phase = rng.uniform(-np.pi, np.pi) + _smooth_poly(rng, y, x, t, rng.uniform(1.5, 3.5))
    scale = 10.0 ** rng.uniform(-4.6, -4.1)  # fastMRI-like absolute intensities
    clean = (scale * bias * magnitude).astype(np.float32)
    image = clean * np.exp(1j * phase.astype(np.float32)).astype(np.complex64)

    kspace = fft2c_np(image).astype(np.complex64)
    band = slice(geom.padding_left, geom.padding_right)
    kspace[..., : geom.padding_left] = 0
    kspace[..., geom.padding_right :] = 0
    noise_fraction = rng.uniform(0.015, 0.03) * (1.5 if fat_suppressed else 1.0)
    sigma = noise_fraction * float(clean[magnitude > 0.05].mean()) / np.sqrt(2.0)
    shape = kspace[..., band].shape
    noise = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    kspace[..., band] += (sigma * noise).astype(np.complex64)

    esc = np.abs(center_crop_np(ifft2c_np(kspace), geom.crop)).astype(np.float32)
    rss = np.ascontiguousarray(center_crop_np(clean, geom.crop))
    patient_id = hashlib.sha256(f"mriadv-synthetic/{spec.seed}/{split}/{index}".encode()).hexdigest()
    header = _ismrmrd_header(geom, spec.slices, acquisition, rng)
    return SyntheticVolume(kspace, esc, rss, header, acquisition, patient_id)


def _ismrmrd_header(geom: KspaceGeometry, slices: int, acquisition: str, rng: np.random.Generator) -> str:
    """ISMRMRD XML with the fields fastMRI reads (matrix sizes, FOV, encoding limits)."""
    fov = round(float(rng.uniform(120.0, 160.0)), 1)  # reconstructed FOV in mm, square
    thickness = 3.0
    field = float(rng.choice([1.5, 3.0]))
    te, tr = (round(float(rng.uniform(27, 34)), 2), round(float(rng.uniform(2700, 3100)), 1))
    centre = geom.acquired // 2

    def limits(name: str, maximum: int, center: int) -> str:
        return f"<{name}><minimum>0</minimum><maximum>{maximum}</maximum><center>{center}</center></{name}>"

    return (
        '<?xml version="1.0"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<measurementInformation><patientPosition>FFS</patientPosition>"
        f"<protocolName>{acquisition}</protocolName></measurementInformation>"
        "<acquisitionSystemInformation><systemVendor>mriadv</systemVendor>"
        "<systemModel>synthetic</systemModel>"
        f"<systemFieldStrength_T>{field}</systemFieldStrength_T>"
        "<receiverChannels>1</receiverChannels></acquisitionSystemInformation>"
        f"<experimentalConditions><H1resonanceFrequency_Hz>{int(round(42.577478e6 * field))}"
        "</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding>"
        f"<encodedSpace><matrixSize><x>{geom.height}</x><y>{geom.width}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{2 * fov}</x><y>{round(fov * geom.width / geom.crop, 2)}</y>"
        f"<z>{thickness}</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{geom.crop}</x><y>{geom.crop}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov}</x><y>{fov}</y><z>{thickness}</z></fieldOfView_mm></reconSpace>"
        "<trajectory>cartesian</trajectory>"
        "<encodingLimits>"
        + limits("kspace_encoding_step_1", geom.acquired - 1, centre)
        + limits("kspace_encoding_step_2", 0, 0)
        + limits("average", 0, 0)
        + limits("slice", slices - 1, slices // 2)
        + limits("contrast", 0, 0)
        + limits("phase", 0, 0)
        + limits("repetition", 0, 0)
        + limits("set", 0, 0)
        + limits("segment", 0, 0)
        + "</encodingLimits></encoding>"
        f"<sequenceParameters><TR>{tr}</TR><TE>{te}</TE><flipAngle_deg>90.0</flipAngle_deg>"
        "<sequence_type>TurboSpinEcho</sequence_type></sequenceParameters>"
        "</ismrmrdHeader>"
    )


def write_volume(path: Path, volume: SyntheticVolume) -> None:
    """Write one volume as a fastMRI single-coil HDF5 file."""
    esc = volume.reconstruction_esc
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=volume.kspace)
        hf.create_dataset("reconstruction_esc", data=esc)
        hf.create_dataset("reconstruction_rss", data=volume.reconstruction_rss)
        hf.create_dataset("ismrmrd_header", data=np.bytes_(volume.header.encode("utf-8")))
        hf.attrs["acquisition"] = volume.acquisition
        hf.attrs["max"] = float(esc.max())
        hf.attrs["norm"] = float(np.linalg.norm(esc.astype(np.float64)))
        hf.attrs["patient_id"] = volume.patient_id


# --------------------------------------------------------------------------------------------------
# Dataset folders


def _manifest(spec: SyntheticSpec) -> dict:
    return {
        "format": FORMAT,
        "version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": split_file_names(spec),
    }


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def generate(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset of ``spec`` to ``out_dir`` and return its path.

    The files are written into a temporary sibling folder that is renamed to ``out_dir`` at the end,
    so an interrupted run leaves no partial dataset. Raises ``FileExistsError`` if ``out_dir``
    already exists and is not empty (use :func:`ensure` to reuse an existing dataset).
    """
    out = Path(out_dir)
    if out.exists() and not _is_empty_dir(out):
        raise FileExistsError(f"{out} already exists; use ensure() to reuse it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for split_index, (split, names) in enumerate(split_file_names(spec).items()):
            (tmp / split).mkdir()
            for index, name in enumerate(names):
                write_volume(tmp / split / name, synthesize_volume(spec, split_index, index))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(spec), indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{out} was created by someone else while generating") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_existing(out: Path, spec: SyntheticSpec) -> None:
    """Raise ``FileExistsError`` unless ``out`` is a complete synthetic dataset of ``spec``."""
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FileExistsError(f"{out} exists but is not a synthetic dataset (no readable {MANIFEST})") from exc
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise FileExistsError(f"{out} exists but {MANIFEST} is not an {FORMAT} manifest")
    if found.get("version") != GENERATOR_VERSION:
        raise FileExistsError(
            f"{out} was made by generator version {found.get('version')}, this is version "
            f"{GENERATOR_VERSION}; delete it or choose another folder"
        )
    if found.get("spec") != asdict(spec):
        raise FileExistsError(
            f"{out} holds a synthetic dataset with spec {found.get('spec')}, not {asdict(spec)}; "
            "delete it or choose another folder"
        )
    expected = [f"{split}/{name}" for split, names in split_file_names(spec).items() for name in names]
    missing = [rel for rel in expected if not (out / rel).is_file()]
    if missing:
        raise FileExistsError(f"{out} is incomplete: {len(missing)} files missing, e.g. {missing[0]}")


def ensure(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Return ``out_dir`` holding the dataset of ``spec``: reuse it if complete, generate it if absent.

    Raises ``FileExistsError`` if ``out_dir`` exists with a different spec or is not a synthetic
    dataset. Safe when several processes call it at once: one rename wins, the others reuse it.
    """
    out = Path(out_dir)
    if not out.exists() or _is_empty_dir(out):
        try:
            return generate(out, spec)
        except FileExistsError:
            pass  # another process published it first; check what it wrote
    _check_existing(out, spec)
    return out


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Argument parser; defaults are read from :class:`SyntheticSpec`."""
    defaults = {f.name: f.default for f in fields(SyntheticSpec)}
    parser = argparse.ArgumentParser(
        prog="python -m mriadv.data.synthetic",
        description="Write (or reuse) a synthetic knee dataset in fastMRI single-coil format.",
    )
    parser.add_argument("out", type=Path, help="output folder (gets singlecoil_train/ and singlecoil_val/)")
    for name in defaults:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=int, default=defaults[name], help=f"default: {defaults[name]}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 on success, 2 on invalid arguments, 1 if the folder holds something else."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in fields(SyntheticSpec)})
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    existed = args.out.exists() and not _is_empty_dir(args.out)
    try:
        out = ensure(args.out, spec)
    except FileExistsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    geom = geometry(spec.size)
    print(f"{'reused' if existed else 'wrote'} {out} ({asdict(spec)})")
    for split, names in split_file_names(spec).items():
        print(
            f"  {split}: {len(names)} files {names[0]} .. {names[-1]}; kspace ({spec.slices}, {geom.height}, "
            f"{geom.width}) complex64 with columns [{geom.padding_left}, {geom.padding_right}) acquired; "
            f"reconstruction_esc/rss ({spec.slices}, {geom.crop}, {geom.crop}) float32"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
