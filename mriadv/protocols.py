"""Named attack protocols: the attack settings of a published robustness evaluation, kept in one
place so that a number can be reported as "NMSE under protocol X" and reproduced.

A :class:`Protocol` names its attacks, its budget grid (absolute ``||delta||^2`` at 320x320, the
seed's units, or relative ``||delta|| / ||y||``), PGD's steps, step, start, restarts, iterate and
objective, the source it follows and where it departs from that source. :data:`PROTOCOLS` holds the
presets; :meth:`Protocol.build` turns one into :mod:`mriadv.attacks` objects for a model's crop;
``python -m mriadv.assess CHECKPOINT --protocol NAME`` evaluates a model with it
(``--list-protocols`` prints them with their sources).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from mriadv.attacks import GeneratorAttack, NoiseAttack, PGDAttack, check_pgd_options
from mriadv.choices import IMAGE_PROTOCOLS, PROTOCOL_NAMES
from mriadv.config import ConfigError, TrainConfig
from mriadv.units import scale_epsilon
from mriadv.data.transforms import Batch

PROTOCOL_ATTACKS = ("pgd", "pgd_kspace", "noise", "noise_kspace", "generator")
KSPACE_ATTACKS = ("pgd_kspace", "noise_kspace")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    ``attacks``: names from :data:`PROTOCOL_ATTACKS` (``noise_kspace``: Gaussian noise on the acquired
    k-space columns; ``generator``: the model's own generator, skipped for a model without one).
    ``budgets_ref``: absolute budgets ``||delta||^2`` at 320x320, scaled to the model's crop at equal
    per-pixel RMS (for a k-space attack the relative energy ``||delta||^2 / ||y||^2 = budget_ref /
    320^2`` per slice, the same at every crop, :func:`mriadv.perturbations.budget_per_slice`);
    ``rel_budgets``: relative budgets ``||delta|| / ||ref||`` per slice, against the sampled k-space
    for k-space attacks and the input image for image attacks
    (:func:`mriadv.perturbations.relative_radius`). The PGD fields are those of
    :class:`mriadv.attacks.PGDAttack` (``random_start``: ``None``, ``'uniform'`` or ``'gaussian'``).
    ``source``: what the protocol follows, with the facts taken from it; ``differences``: where it
    departs from that source.
    """

    name: str
    attacks: tuple[str, ...]
    budgets_ref: tuple[float, ...] = ()
    rel_budgets: tuple[float, ...] = ()
    steps: int = TrainConfig.pgd_steps
    step_scale: float = TrainConfig.pgd_step_scale
    random_start: str | None = None
    restarts: int = 1
    keep_best: bool = False
    objective: str = "target"
    source: str = ""
    differences: str = ""

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r}"
        if not self.attacks:
            raise ConfigError(f"{where}: names no attacks")
        for a in self.attacks:
            if a not in PROTOCOL_ATTACKS:
                raise ConfigError(f"{where}: attack {a!r} is not one of {PROTOCOL_ATTACKS}")
        for key in ("budgets_ref", "rel_budgets"):
            for b in getattr(self, key):
                if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
                    raise ConfigError(f"{where}: {key} value {b!r} is not a finite number > 0")
        try:
            check_pgd_options(self.steps, self.step_scale, self.random_start, self.restarts, self.objective)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @property
    def needs_kspace(self) -> bool:
        """Whether the batches must carry k-space (a k-space attack, or a relative budget of one)."""
        return any(a in KSPACE_ATTACKS for a in self.attacks)

    def budgets_at(self, crop_size: int) -> tuple[float, ...]:
        """The absolute budgets at ``crop_size`` (:func:`mriadv.units.scale_epsilon`); the attacks turn
        them into per-slice k-space budgets themselves (:func:`mriadv.perturbations.budget_per_slice`)."""
        return tuple(scale_epsilon(b, crop_size) for b in self.budgets_ref)

    def build(
        self,
        crop_size: int,
        clamp: float | None = TrainConfig.clamp,
        sampled_only: bool = True,
        generator: Callable[[Batch], torch.Tensor] | None = None,
        generator_domain: str = "image",
        budgets: Sequence[float] | None = None,
        rel_budgets: Sequence[float] | None = None,
        trace: bool = True,
    ) -> list[Any]:
        """The attacks, absolute budgets first (each budget: every attack, in the protocol's order),
        then relative ones. ``budgets`` (at the crop) and ``rel_budgets`` replace the protocol's own
        grid when given; ``generator``: the model's perturbation function (the ``generator`` attack is
        skipped without one) and ``generator_domain`` its domain; ``trace``: PGD records its objective
        per step on the first batch (``PGDAttack.trace``)."""
        budgets = self.budgets_at(crop_size) if budgets is None else tuple(budgets)
        rels = self.rel_budgets if rel_budgets is None else tuple(rel_budgets)
        if not budgets and not rels:
            raise ConfigError(f"protocol {self.name!r}: no budgets to evaluate at")
        grid = [(float(b), None) for b in budgets] + [(float("nan"), float(r)) for r in rels]
        out: list[Any] = []
        for budget, rel in grid:
            for name in self.attacks:
                if name in ("pgd", "pgd_kspace"):
                    out.append(
                        PGDAttack(
                            budget,
                            self.steps,
                            self.step_scale,
                            "image" if name == "pgd" else "kspace",
                            sampled_only,
                            clamp,
                            rel=rel,
                            random_start=self.random_start,
                            restarts=self.restarts,
                            keep_best=self.keep_best,
                            objective=self.objective,
                            trace_first=trace,
                        )
                    )
                elif name in ("noise", "noise_kspace"):
                    out.append(
                        NoiseAttack(
                            budget,
                            name,
                            rel=rel,
                            domain="image" if name == "noise" else "kspace",
                            sampled_only=sampled_only,
                            clamp=clamp,
                        )
                    )
                elif generator is not None:
                    out.append(GeneratorAttack(budget, generator, generator_domain, clamp, rel=rel))
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Relative energy grid of Krainovic et al.'s MRI evaluation: zeta = eps^2 / E||y||^2 in
# np.linspace(0, 0.03, 11) without 0; the relative norm is sqrt(zeta).
_KRAINOVIC_ZETAS = tuple(round(0.003 * i, 6) for i in range(1, 11))

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "seed",
            ("pgd", "noise", "generator"),
            budgets_ref=(1e3, 5e3),
            steps=10,
            step_scale=2.5,
            source="Huang & Liang's report (the seed): image-domain L2 PGD, 10 normalised-gradient steps of "
            "2.5 sqrt(eps)/10 from delta = 0, last iterate, error to the target; random noise and the "
            "model's own generator at the same norm; eps = 1e3 and 5e3 at 320x320 (normalised units)",
            differences="none: this is what every study evaluates with by default",
        ),
        Protocol(
            "l2-kspace-100",
            ("pgd_kspace",),
            rel_budgets=tuple(round(math.sqrt(z), 6) for z in _KRAINOVIC_ZETAS),
            steps=100,
            step_scale=2.5,
            source="Krainovic, Soltanolkotabi & Heckel, NeurIPS 2023 (code: MLI-lab/robust_reconstructors_via_"
            "jittering, MRI evaluation): L2 PGD on the k-space measurements, 100 normalised-gradient steps "
            "of 2.5 eps/100 from delta = 0, no restarts, last iterate, squared error to the target; "
            "relative energy zeta = eps^2/E||y||^2 on the grid 0.003, 0.006, ..., 0.03; fastMRI "
            "single-coil knee, 4x random mask with 8% centre, U-Net",
            differences="eps = sqrt(zeta) ||y|| per slice, with y the sampled k-space (the source scales by one "
            "data-set constant E||y||^2); the perturbed input keeps the clean slice's normalisation "
            "(the source re-normalises it with its own mean and std)",
        ),
        Protocol(
            "l2-kspace-curve",
            ("pgd_kspace",),
            rel_budgets=tuple(round(math.sqrt(z), 6) for z in _KRAINOVIC_ZETAS[1::2]),
            steps=20,
            step_scale=2.5,
            source="l2-kspace-100 made cheap enough to run once per trial of a study (the defences space's "
            "robustness curves): Krainovic, Soltanolkotabi & Heckel, NeurIPS 2023, L2 PGD on the k-space "
            "measurements, from delta = 0, last iterate, squared error to the target",
            differences="20 steps of 2.5 eps/20 instead of 100 (`python -m mriadv.assess --protocol "
            "l2-kspace-curve` records the attack's loss per step, to see whether more would find more), "
            "every other point of the source's relative energy grid "
            "(zeta = 0.006, 0.012, ..., 0.03), and the differences of l2-kspace-100",
        ),
        Protocol(
            "l2-kspace-restarts",
            ("pgd_kspace", "noise_kspace"),
            rel_budgets=(0.0025, 0.005, 0.01, 0.015, 0.02, 0.025),
            steps=100,
            step_scale=2.5,
            random_start="gaussian",
            restarts=6,
            source="Genzel, Macdonald & Maerz, TPAMI 2022 (code: jmaces/robust-nets, fastmri-radial): adversarial "
            "perturbations e of the measurements with relative noise level ||e|| = eta ||y|| per sample, "
            "eta in 0.25%, 0.5%, 1%, 1.5%, 2%, 2.5%; 6 runs per sample from Gaussian starts, the one with "
            "the largest error kept; error to the target; Gaussian noise at the same relative level as "
            "the statistical reference",
            differences="normalised-gradient PGD, 100 steps of 2.5 r/100 (the source: projected Adam, 250 "
            "iterations, step size 5, and 3 of the 6 runs warm-started from the next larger level); "
            "the data's Cartesian mask (the source: radial sampling)",
        ),
        Protocol(
            "deviation-kspace",
            ("pgd_kspace",),
            rel_budgets=(0.04, 0.08),
            steps=100,
            step_scale=2.5,
            random_start="gaussian",
            objective="deviation",
            source="Darestani, Chaudhari & Heckel, ICML 2021 (code: MLI-lab/Robustness-CS): maximise the change "
            "of the reconstruction ||f(y + e) - f(y)||^2 over ||e|| <= eps ||y|| (k-space), eps = 0.04 "
            "(their attack's default) and 0.08 (their trained-network example); fastMRI knee, 4x",
            differences="normalised-gradient PGD, 100 steps of 2.5 r/100 from a Gaussian start scaled into the "
            "ball (the source: Adam, lr 0.01, up to 5000 iterations with stopping rules, from "
            "Gaussian noise of norm ||y||/1e4); ||y|| of the sampled k-space (the source: of the full "
            "k-space before masking)",
        ),
    )
}
if tuple(PROTOCOLS) != PROTOCOL_NAMES:  # the config validates names against mriadv.choices (torch-free)
    raise RuntimeError(f"mriadv.choices.PROTOCOL_NAMES {PROTOCOL_NAMES} != the presets {tuple(PROTOCOLS)}")
_IMAGE = tuple(n for n, p in PROTOCOLS.items() if {"pgd", "noise"} & set(p.attacks))
if _IMAGE != IMAGE_PROTOCOLS:  # the config refuses these for arch='unrolled' (torch-free)
    raise RuntimeError(f"mriadv.choices.IMAGE_PROTOCOLS {IMAGE_PROTOCOLS} != the image-domain presets {_IMAGE}")


def get_protocol(name: str) -> Protocol:
    """The preset ``name``; :class:`mriadv.config.ConfigError` naming the valid ones otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown attack protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def describe(protocol: Protocol) -> list[str]:
    """Human-readable lines: the settings, the source and the differences from it."""
    p = protocol
    grid = ", ".join([f"{b:g} (320²)" for b in p.budgets_ref] + [f"rel {r:g}" for r in p.rel_budgets])
    pgd = (
        f"PGD {p.steps} steps of {p.step_scale:g}·r/{p.steps}, start {p.random_start or 'zero'}, "
        f"{p.restarts} restart(s), {'best' if p.keep_best else 'last'} iterate, objective {p.objective}"
    )
    return [
        f"{p.name}: {', '.join(p.attacks)} at {grid}",
        f"  {pgd}",
        f"  source: {p.source}",
        f"  differences: {p.differences}",
    ]


__all__ = ["KSPACE_ATTACKS", "PROTOCOLS", "PROTOCOL_ATTACKS", "Protocol", "describe", "get_protocol"]
