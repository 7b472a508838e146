"""A coronal knee-like phantom: noise-free magnitude images of one slice stack, drawn with numpy.

The anatomy, painted back to front (each structure over-paints what lies beneath it):

* **leg outline**: a wobbly superellipse of subcutaneous fat with muscle inset by a random fat
  thickness; the muscle carries a fibre-like texture, broken fat septa and 3-5 elongated vessels
  (bright slow flow or dark flow void);
* **joint**: a joint line with a gap between femur and tibia; joint fluid around it; cartilage caps
  on the femoral condyles and the tibial plateau (the bones grown by the cartilage thickness, kept
  only near the joint line); dark wedge-shaped menisci at both ends of the gap; two cruciate
  ligaments in the intercondylar notch and a collateral ligament on each side;
* **bones**: femur (two condyles, a flaring metaphysis, the shaft), tibia (plateau, metaphysis,
  shaft) and, in part of the stack, the fibula head; each a union of superellipses with a dark
  cortex (thicker on the shafts), trabecular marrow and a growth-plate scar line, kept inside the
  muscle outline;
* **marrow lesions**: 0-2 oedema-like bright or sclerotic dark spots, present in a range of slices.

Tissue levels (``_TISSUE_SIGNAL``) follow proton-density weighting, or fat-suppressed proton density
where fat and marrow are dark and fluid is brightest, each jittered by up to 12 % per volume.

Coordinates: the image grid is ``H x W`` pixels with its origin at pixel ``(H // 2, W // 2)``;
``crop`` pixels span two anatomical units, so the centre ``crop x crop`` window is the anatomical
square ``[-1, 1)^2`` and a larger grid (an oversampled readout) shows background around the leg.
Per volume the anatomy is rotated (up to 0.15 rad), mirrored (left or right knee), shifted and
scaled; per slice, sizes and positions are smooth functions of the slice position ``t`` in
``[-1, 1]`` (:func:`slice_positions`), narrowing towards the ends of the stack, and textures turn
slowly between two random fields, so neighbouring slices are alike. Edges are anti-aliased over
about one pixel.

Randomness comes only from the ``numpy.random.Generator`` passed in, drawn in a fixed order, so the
same generator state gives the same phantom bit for bit. Changing any draw (its order, count or
range) changes every dataset written by :mod:`mriadv.data.synthetic`, whose ``GENERATOR_VERSION``
must then be bumped.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence

import numpy as np

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


def slice_positions(slices: int) -> np.ndarray:
    """Position ``t`` of each slice across the stack, -1 .. 1 (0 for a single slice), float32 ``(S, 1, 1)``."""
    if slices < 1:
        raise ValueError(f"slices must be positive, got {slices}")
    t = np.linspace(-1.0, 1.0, slices) if slices > 1 else np.zeros(1)
    return t.astype(np.float32)[:, None, None]


def knee_magnitude(
    rng: np.random.Generator, crop: int, shape: tuple[int, int], slices: int, fat_suppressed: bool
) -> np.ndarray:
    """Noise-free, bias-free magnitude of a coronal knee-like phantom, float32 ``(S, H, W)`` in ~0..1.

    Args:
        rng: source of every random choice; it is advanced by the draw.
        crop: pixels per two anatomical units (the ``crop x crop`` centre window is ``[-1, 1)^2``).
        shape: grid ``(H, W)``, each at least ``crop``.
        slices: number of slices ``S``.
        fat_suppressed: fat-suppressed proton density (``CORPDFS``) instead of plain (``CORPD``).
    """
    if crop < 2:
        raise ValueError(f"crop must be at least 2 pixels, got {crop}")
    if len(shape) != 2 or min(shape) < crop:
        raise ValueError(f"shape must be (H, W) with H, W >= crop = {crop}, got {tuple(shape)}")
    knee = _Knee(rng, crop, shape, slices, fat_suppressed)  # pose, tissue levels, textures, taper
    muscle, brx = _paint_leg(knee)
    _paint_septa(knee, muscle)
    _paint_vessels(knee, muscle, brx)
    joint = _joint_layout(knee)
    _paint_joint_fluid(knee, joint)
    _paint_cartilage(knee, joint)
    _paint_fibrous(knee, joint)  # menisci and ligaments
    _paint_bones(knee, joint, muscle)
    _paint_lesions(knee, joint)
    return knee.img


class _Knee:
    """One volume being drawn: its canvas (pose), tissue levels, textures, taper, image; per-slice helpers."""

    def __init__(self, rng: np.random.Generator, crop: int, shape: tuple, slices: int, fat_suppressed: bool) -> None:
        f32 = np.float32
        self.rng, self.u = rng, rng.uniform
        self.t = slice_positions(slices)  # (S, 1, 1)
        self.canvas = _Canvas(crop, shape, rng)
        self.level = {k: f32(v[int(fat_suppressed)] * rng.uniform(0.88, 1.12)) for k, v in _TISSUE_SIGNAL.items()}
        self.tex = _texture_fields(rng, crop, shape, self.t)
        self.img = np.zeros((slices, *shape), f32)
        self.taper = np.sqrt(1.0 - (rng.uniform(0.35, 0.6) * self.t) ** 2).astype(f32)  # narrower at stack ends

    def smooth(self, c0: float, c1: float = 0.0) -> np.ndarray:
        """A per-slice parameter ``c0 + c1 t``, ``(S, 1, 1)``."""
        return (c0 + c1 * self.t).astype(np.float32)

    def presence(self, centre: float, half_width: float) -> np.ndarray:
        """Cross-section factor of a sphere-like structure centred at slice position ``centre``."""
        return np.sqrt(np.clip(1.0 - ((self.t - centre) / half_width) ** 2, 0.0, 1.0)).astype(np.float32)


# Where the joint lies; a bone (femur, tibia, fibula) is a list of parts (cy, cx, ry, rx, power, cortex thickness).
_Joint = namedtuple("_Joint", "yj gap cart sep rcx rcy rty plateau_y femur tibia fibula")


def _paint_leg(knee: _Knee) -> tuple[np.ndarray, np.ndarray]:
    """Leg outline: fat, then muscle inset by the fat thickness; returns the muscle (S, H, W) and half-width brx."""
    canvas, img, level, tex, smooth, u = knee.canvas, knee.img, knee.level, knee.tex, knee.smooth, knee.u
    by, bx = smooth(u(-0.04, 0.04), u(-0.03, 0.03)), smooth(u(-0.04, 0.04), u(-0.03, 0.03))
    bry, brx = smooth(u(0.84, 0.95)), u(0.74, 0.9) * (0.9 + 0.1 * knee.taper)
    wobble = [(2, u(0, 0.04), u(0, 2 * np.pi)), (3, u(0, 0.03), u(0, 2 * np.pi))]
    power = u(2.0, 2.8)
    win = canvas.window((by, bx, 1.1 * np.maximum(bry, brx)))
    body = canvas.shape(win, by, bx, bry, brx, power, wobble=wobble)
    canvas.paint(img, win, body, level["fat"] * (1 + 0.07 * tex["fat"]))
    fat = u(0.05, 0.11)
    muscle = np.zeros_like(img)
    muscle[:, win[0], win[1]] = canvas.shape(win, by, bx, bry - fat, brx - fat * u(0.8, 1.3), power, wobble=wobble)
    canvas.paint(img, win, muscle[:, win[0], win[1]], level["muscle"] * (1 + 0.16 * tex["muscle"]))
    return muscle, brx


def _paint_septa(knee: _Knee, muscle: np.ndarray) -> None:
    """Fat septa between muscles: thin rings clipped to the muscle."""
    canvas, rng, smooth, u = knee.canvas, knee.rng, knee.smooth, knee.u
    for _ in range(rng.integers(2, 4)):
        cy = smooth(u(-0.5, 0.5), u(-0.05, 0.05))
        side = 1 if rng.random() < 0.5 else -1
        cx = smooth(side * u(0.15, 0.5), u(-0.05, 0.05))
        ry, rx, width = u(0.25, 0.6), u(0.12, 0.35), max(1.3 * canvas.px_anat, 0.012)
        win = canvas.window((cy, cx, max(ry, rx)))
        ring = canvas.shape(win, cy, cx, ry, rx) - canvas.shape(win, cy, cx, ry - width, rx - width)
        arcs = np.clip(knee.tex["smooth"][:, win[0], win[1]] + 0.4, 0, 1)  # broken, not closed rings
        canvas.paint(knee.img, win, ring * arcs * muscle[:, win[0], win[1]], 0.85 * knee.level["fat"])


def _paint_vessels(knee: _Knee, muscle: np.ndarray, brx: np.ndarray) -> None:
    """Vessels: elongated tubes in the soft tissue, bright (slow flow) or dark (flow void)."""
    canvas, rng, smooth, u = knee.canvas, knee.rng, knee.smooth, knee.u
    for _ in range(rng.integers(3, 6)):
        side = 1 if rng.random() < 0.5 else -1
        cy, cx = smooth(u(-0.55, 0.55)), smooth(side * u(0.55, 0.78) * float(brx.mean()), u(-0.08, 0.08))
        ry, rx = u(0.06, 0.3), u(0.014, 0.032)
        win = canvas.window((cy, cx, ry))
        value = knee.level["vessel"] if rng.random() < 0.6 else knee.level["cortex"]
        tube = canvas.shape(win, cy, cx, ry, rx, angle=u(-0.3, 0.3))
        canvas.paint(knee.img, win, tube * muscle[:, win[0], win[1]], value)


def _joint_layout(knee: _Knee) -> _Joint:
    """Joint line, gap and bones: femur = condyles + metaphysis + shaft, tibia = plateau + metaphysis + shaft."""
    smooth, u, taper = knee.smooth, knee.u, knee.taper
    yj = smooth(u(-0.02, 0.12), u(-0.04, 0.04))
    gap = u(0.035, 0.06)
    cortex, cart = u(0.018, 0.03), u(0.018, 0.03)
    sep, rcx, rcy = u(0.17, 0.23), u(0.2, 0.25) * taper, u(0.17, 0.22) * taper
    condyle_y = yj - gap / 2 - rcy
    shaft_w, shaft_l = u(0.17, 0.23), u(0.34, 0.42)  # half-width, half-length
    shaft_ct = 2.5 * cortex  # the shafts' thicker cortex
    femur = [
        (condyle_y, smooth(-sep), rcy, rcx, 2.0, cortex),
        (condyle_y, smooth(sep), rcy, rcx, 2.0, cortex),
        (condyle_y - u(0.1, 0.16), smooth(0.0), u(0.16, 0.22), (sep + 0.8 * rcx), 2.4, cortex),
        (yj - u(0.45, 0.52), smooth(0.0, u(-0.03, 0.03)), smooth(shaft_l), shaft_w * taper, 2.6, shaft_ct),
    ]
    rty = u(0.11, 0.15)
    plateau_y = yj + gap / 2 + rty
    tibia = [
        (plateau_y, smooth(0.0), smooth(rty), u(0.42, 0.5) * taper, u(2.6, 3.2), cortex),
        (plateau_y + u(0.1, 0.15), smooth(0.0), u(0.14, 0.2), u(0.28, 0.34) * taper, 2.4, cortex),
        (yj + u(0.5, 0.58), smooth(0.0, u(-0.03, 0.03)), smooth(shaft_l), shaft_w * u(0.9, 1.1) * taper, 2.6, shaft_ct),
    ]
    fibula_on = knee.presence(u(0.2, 0.8), 0.7)
    fr = u(0.07, 0.09) * fibula_on
    fibula = [(plateau_y + u(0.12, 0.2), smooth(u(0.42, 0.5)), fr, fr * u(0.8, 1.1), 2.0, cortex)]
    return _Joint(yj, gap, cart, sep, rcx, rcy, rty, plateau_y, femur, tibia, fibula)


def _union(canvas: _Canvas, win: tuple, parts: list, grow: float = 0.0, inner: bool = False) -> np.ndarray:
    """Occupancy of a bone grown by ``grow`` or, with ``inner``, shrunk by each part's cortex."""
    masks = [
        canvas.shape(win, cy, cx, ry + grow - inner * ct, rx + grow - inner * ct, p) for cy, cx, ry, rx, p, ct in parts
    ]
    return np.maximum.reduce(masks) if len(masks) > 1 else masks[0]


def _discs(parts: list) -> list:
    """Discs ``(cy, cx, radius)`` holding each part of a bone (for :meth:`_Canvas.window`)."""
    return [(cy, cx, np.maximum(ry, rx) * 1.3 + 0.05) for cy, cx, ry, rx, _, _ in parts]


def _paint_joint_fluid(knee: _Knee, joint: _Joint) -> None:
    """Joint fluid and soft tissue around the joint, later covered by cartilage and bone."""
    fy_, fx_ = joint.yj, knee.smooth(0.0)
    fry, frx = knee.u(0.08, 0.14), knee.u(0.45, 0.58) * knee.taper
    win = knee.canvas.window((fy_, fx_, frx))
    fluid = knee.canvas.shape(win, fy_, fx_, fry, frx, 2.4)
    knee.canvas.paint(knee.img, win, fluid, knee.level["fluid"] * (1 + 0.05 * knee.tex["smooth"]))


def _paint_cartilage(knee: _Knee, joint: _Joint) -> None:
    """Cartilage: bones grown by the cartilage thickness, kept only near the joint line."""
    canvas, yj, femur, tibia = knee.canvas, joint.yj, joint.femur, joint.tibia
    win = canvas.window(*_discs(femur[:2] + tibia[:1]))
    ya = canvas.ya[:, win[0], win[1]]
    near_femur = np.clip((ya - (yj - 0.16)) / 0.06, 0, 1)
    near_tibia = np.clip(((yj + 0.12) - ya) / 0.05, 0, 1)
    canvas.paint(knee.img, win, _union(canvas, win, femur[:2], grow=joint.cart) * near_femur, knee.level["cartilage"])
    canvas.paint(knee.img, win, _union(canvas, win, tibia[:1], grow=joint.cart) * near_tibia, knee.level["cartilage"])


def _paint_fibrous(knee: _Knee, joint: _Joint) -> None:
    """Fibrous tissue: the menisci, the cruciate ligaments in the notch and a collateral ligament on each side."""
    canvas, img, fibrous, u = knee.canvas, knee.img, knee.level["fibrous"], knee.u
    # menisci: dark wedges at both ends of the joint gap (bone painted later trims them)
    for side in (-1, 1):
        cy, cx = joint.yj + u(-0.01, 0.01), side * (joint.sep + 0.8 * joint.rcx) + u(-0.02, 0.02)
        ry, rx = joint.gap / 2 + u(0.02, 0.035), u(0.07, 0.11) * knee.taper
        win = canvas.window((cy, cx, rx))
        canvas.paint(img, win, canvas.shape(win, cy, cx, ry, rx, 1.5), fibrous)  # wedge-like
    for cx0, ang in ((u(-0.04, 0.0), u(0.3, 0.6)), (u(0.0, 0.04), -u(0.3, 0.6))):
        cy, cx = joint.yj - u(0.07, 0.12), knee.smooth(cx0)
        win = canvas.window((cy, cx, 0.15))
        ligament = canvas.shape(win, cy, cx, knee.smooth(u(0.09, 0.13)), u(0.018, 0.028), angle=ang)
        canvas.paint(img, win, ligament, fibrous)
    for side in (-1, 1):
        cy, cx = joint.yj + u(-0.03, 0.03), side * (u(0.5, 0.56) * knee.taper)
        win = canvas.window((cy, cx, 0.25))
        canvas.paint(img, win, canvas.shape(win, cy, cx, u(0.14, 0.22), u(0.012, 0.02)), fibrous)


def _paint_bones(knee: _Knee, joint: _Joint, muscle: np.ndarray) -> None:
    """Bones: cortex, then trabecular marrow (shrunk by the cortex) and growth-plate scar, inside the muscle."""
    canvas, img, level, u = knee.canvas, knee.img, knee.level, knee.u
    trabeculae = 1 - 0.25 * np.exp(-((knee.tex["marrow"] / 0.35) ** 2))  # dark network on zero crossings
    marrow = level["marrow"] * (1 + 0.08 * knee.tex["smooth"]) * trabeculae
    physes = (joint.yj - u(0.3, 0.38), -u(0.1, 0.3)), (joint.plateau_y + u(0.06, 0.12), u(0.05, 0.2)), None
    for parts, physis in zip((joint.femur, joint.tibia, joint.fibula), physes):
        win = canvas.window(*_discs(parts))
        inside = muscle[:, win[0], win[1]]
        canvas.paint(img, win, _union(canvas, win, parts) * inside, level["cortex"])
        inner = _union(canvas, win, parts, inner=True) * inside
        canvas.paint(img, win, inner, marrow)
        if physis is not None:
            line = canvas.band(win, physis[0], physis[1], half_width=0.8 * canvas.px_anat)
            canvas.paint(img, win, line * inner, 0.35 * level["marrow"])


def _paint_lesions(knee: _Knee, joint: _Joint) -> None:
    """Marrow lesions (oedema-like bright or sclerotic dark), present in a range of slices."""
    canvas, rng, u, j = knee.canvas, knee.rng, knee.u, joint
    for _ in range(rng.integers(0, 3)):
        side = 1 if rng.random() < 0.5 else -1
        on_femur = rng.random() < 0.6
        cy = j.yj - j.gap / 2 - j.rcy * u(0.4, 0.9) if on_femur else j.yj + j.gap / 2 + j.rty * u(0.8, 1.5)
        cx = knee.smooth(side * j.sep * u(0.6, 1.2))
        r = u(0.03, 0.07) * knee.presence(u(-0.7, 0.7), u(0.3, 0.6))
        win = canvas.window((cy, cx, r + 0.02))
        value = knee.level["fluid"] if rng.random() < 0.6 else knee.level["cortex"] * 3
        canvas.paint(knee.img, win, canvas.shape(win, cy, cx, r, r * u(0.7, 1.3)), value)


def smooth_polynomial(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, t: np.ndarray, amplitude: float
) -> np.ndarray:
    """A smooth random field: quadratic in ``(y, x)`` with a tilt linear in the slice position ``t``.

    Coordinates are in crop half-widths; ``y``, ``x`` and ``t`` broadcast to the output shape (for
    example ``(1, H, 1)``, ``(1, 1, W)`` and ``(S, 1, 1)`` give ``(S, H, W)``). The seven random
    coefficients are scaled so that the peak of ``|field|`` over ``[-1, 1]^2`` at ``t = +-1`` is
    ``amplitude``. Used for the scanner's bias field and phase. Returns float32.
    """

    def poly(c: np.ndarray, yy: np.ndarray, xx: np.ndarray, tt: np.ndarray) -> np.ndarray:
        quadratic = c[2] * xx * xx + c[3] * xx * yy + c[4] * yy * yy
        return c[0] * xx + c[1] * yy + quadratic + tt * (c[5] * xx + c[6] * yy)

    c = rng.standard_normal(7) * np.array([1, 1, 0.5, 0.5, 0.5, 0.2, 0.2])
    g = np.linspace(-1, 1, 9)
    peak = np.abs(poly(c, g[:, None, None], g[None, :, None], np.array([-1.0, 1.0])[None, None])).max()
    return (poly(c * (amplitude / peak), y, x, t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Drawing helpers


class _Canvas:
    """Pixel grid of one volume mapped to anatomical coordinates, with painter's-algorithm helpers.

    The anatomy is rotated, mirrored, shifted and scaled per volume, so ``ya, xa`` are ``(1, H, W)``
    and the same for all slices; per-slice motion lives in the shape parameters ``(S, 1, 1)``.
    """

    def __init__(self, crop: int, shape: tuple[int, int], rng: np.random.Generator) -> None:
        self.height, self.width = shape
        self.px = 2.0 / crop  # pixel size in crop half-widths
        self.angle = rng.uniform(-0.15, 0.15)
        self.mirror = -1.0 if rng.random() < 0.5 else 1.0  # left or right knee
        self.gain = rng.uniform(0.88, 1.04)  # anatomy size
        self.offset = rng.uniform(-0.04, 0.04, size=2)
        y = (np.arange(self.height) - self.height // 2) * self.px - self.offset[0]
        x = (np.arange(self.width) - self.width // 2) * self.px - self.offset[1]
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
        h, w = self.height, self.width
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


def _texture_fields(
    rng: np.random.Generator, crop: int, shape: tuple[int, int], t: np.ndarray
) -> dict[str, np.ndarray]:
    """Band-limited unit-variance textures ``(S, H, W)`` that turn slowly across slices.

    Each is ``cos(a) F1 + sin(a) F2`` with ``a`` going from 0 to pi/2 over the stack, so the variance
    is constant and adjacent slices correlate strongly. Frequencies are in cycles per crop half-width.
    """
    per_unit = crop / 2
    fy = (np.fft.fftfreq(shape[0]) * per_unit)[:, None]
    fx = (np.fft.fftfreq(shape[1]) * per_unit)[None, :]
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
            field = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * filt).real
            pair.append(((field - field.mean()) / field.std()).astype(np.float32))
        out[name] = np.cos(alpha) * pair[0] + np.sin(alpha) * pair[1]
    return out
