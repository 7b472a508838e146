"""Search spaces: YAML files in ``search_spaces/``, one study each, loaded and validated here.

A space file::

    description: one line shown by --list-spaces
    parameters:                      # searched TrainConfig fields
      epsilon: {grid: [0, 1000, 5000]}
      lr_recon: {loguniform: [1.0e-5, 1.0e-3]}
      loss: {choice: [mse, dssim]}
      lambda1: {uniform: [0.5, 3]}
    fixed: {loss: dssim}             # TrainConfig overrides for every trial
    num_samples: 8                   # sampled spaces only (a grid runs each point once)
    seeds: 3                         # grid and points spaces: each configuration with training seeds 0, 1, 2
    objectives: [{metric: val_nmse, mode: min}, {metric: rob_pgd_e5000_nmse, mode: min}]
    attack_budgets: [1000, 5000]     # robustness evaluation budgets, same for every trial
    scheduler: none | asha | {type: asha, grace_period: 1, reduction_factor: 2}
    reference: {adversary: none, epsilon: 0}   # sampled spaces: run first, the report's reference;
                                     # a searched init_from: [null, reference] fine-tunes its best.pt

Budgets (``epsilon`` values and ``attack_budgets``) are squared L2 norms for 320x320 crops, the
seed's units; a run on a smaller crop scales them by ``(crop / 320)^2`` (equal per-pixel RMS), so
one space file means the same perturbation strength under every profile.

Every parameter and fixed key must be a :class:`mriadv.config.TrainConfig` field, and every grid
value and range end must make a valid config, so a searched key provably reaches the trainer. Any
problem raises :class:`SpaceError` naming the file and the key.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mriadv.config import ConfigError, TrainConfig
from mriadv.units import budgets_at_crop
from study.layout import REFERENCE_INIT
from study.space_sections import (
    Objective,
    Param,
    check_top_level,
    fine_tunes_reference,
    points_as_choices,
    read_attack_budgets,
    read_fixed,
    read_num_samples,
    read_objectives,
    read_parameters,
    read_reference,
    read_scheduler,
    read_seeds,
    with_seeds,
)

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
EPSILON_KEYS = ("epsilon",)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read it as the float a user means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
        r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class StudySpace:
    name: str
    path: Path
    description: str
    params: tuple[Param, ...]
    fixed: dict[str, Any]
    num_samples: int
    objectives: tuple[Objective, ...]
    attack_budgets: tuple[float, ...]
    scheduler: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    points: tuple[dict[str, Any], ...] = ()  # a list of explicit trials (then params are their keys)
    seeds: int = 1  # training seeds per configuration (replicates: the last parameter, ``seed``)
    reference: dict[str, Any] | None = None  # a sampled space's first trial, outside its ranges

    @property
    def is_grid(self) -> bool:
        return bool(self.params) and all(p.kind == "grid" for p in self.params)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every trial of a space that lists them: each combination of a grid space in file order,
        or the explicit ``points``; empty for a sampled space."""
        if self.points:
            return [dict(p) for p in self.points]
        if not self.is_grid:
            return []
        names = [p.name for p in self.params]
        return [dict(zip(names, combo)) for combo in itertools.product(*(p.values for p in self.params))]

    @property
    def fine_tunes_reference(self) -> bool:
        """Whether trials may start from the reference trial's best.pt (``init_from: reference``)."""
        return fine_tunes_reference(self.params)

    def trial_count(self) -> int:
        return len(self.grid_points()) if self.is_grid or self.points else self.num_samples

    def budgets_at(self, crop_size: int) -> tuple[float, ...]:
        """The attack budgets at ``crop_size`` (a trial's config scales its own, with
        :func:`mriadv.units.budgets_at_crop`)."""
        return budgets_at_crop({"crop_size": crop_size, "attack_budgets": self.attack_budgets})["attack_budgets"]

    def summary_line(self) -> str:
        kind = "grid" if self.is_grid else ("points" if self.points else f"{self.num_samples} samples")
        kind += f", each configuration with {self.seeds} training seeds" if self.seeds > 1 else ""
        params = ", ".join(p.name for p in self.params)
        return f"{self.name:<14} {self.trial_count():>3} trials ({kind}; {params}): {self.description}"


def resolve_space_path(name_or_path: str) -> Path:
    """A space name in ``search_spaces/`` or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpaceError(f"{path}: no such search-space file")
        return path
    candidate = SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise SpaceError(f"unknown search space {name_or_path!r}; available: {', '.join(available_spaces())}")
    return candidate


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str) -> StudySpace:
    """The space of a name in ``search_spaces/`` or of a YAML file, validated (:func:`space_from_dict`)."""
    path = resolve_space_path(name_or_path)
    return space_from_dict(parse_space_yaml(path.read_text(), path), path.stem, path)


def _valid(values: dict[str, Any]) -> bool:
    """Whether ``values`` make a valid TrainConfig."""
    try:
        TrainConfig.from_dict(values)
    except (ConfigError, TypeError):
        return False
    return True


def parse_space_yaml(text: str, source: str | Path) -> Any:
    """The YAML ``text`` of a space as plain data (``1e-3`` read as a float); :class:`SpaceError`
    naming ``source`` if it is not YAML."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None


def space_from_dict(raw: Any, space_name: str, source: str | Path) -> StudySpace:
    """The space ``space_name`` from its already-parsed YAML ``raw`` (a mapping), validated. ``source`` is
    where it came from (its file, or the ``study.json`` that saved its text): every error message
    names it, and it becomes the space's ``path``. Each section is read and checked by its step in
    :mod:`study.space_sections`, in this order; the first problem raises :class:`SpaceError`."""
    path = Path(source)
    config_fields = set(TrainConfig.__dataclass_fields__)

    def fail(key: str, why: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {why}")

    fixed_raw = raw.get("fixed") if isinstance(raw, dict) and isinstance(raw.get("fixed"), dict) else {}
    beside = {k: v for k, v in fixed_raw.items() if k in config_fields}

    def check_value(key: str, where: str, value: Any) -> None:
        """A value must make a valid TrainConfig (at the reference crop, so scaling cannot hide errors)
        beside the space's fixed values: ``arch: unrolled`` is valid only beside a k-space training
        perturbation and k-space attacks. A fixed value alone, or else beside the other fixed values."""
        own = where.startswith("fixed.")
        try:
            TrainConfig.from_dict({key: value} if own else {**beside, key: value})
        except (ConfigError, TypeError) as exc:
            if not (own and _valid(beside)):
                raise fail(where, str(exc)) from None
        if key == "init_from" and value == REFERENCE_INIT and where.startswith("parameters."):
            return  # the reference trial's best.pt, resolved when the trial starts (study.reference)
        if key == "init_from" and value is not None and not Path(value).is_absolute():
            raise fail(where, f"{value!r}: give an absolute path (each trial runs in its own folder)")

    check_top_level(raw, fail)
    points_raw = raw.get("points")
    searched = raw.get("parameters") or (points_raw[0] if isinstance(points_raw, list) and points_raw else {})
    # fixed first: every searched value is checked beside it
    fixed = read_fixed(
        raw.get("fixed") or {}, searched if isinstance(searched, dict) else {}, fail, check_value, config_fields
    )
    if "points" in raw:  # a list of trials: searched as a choice over each key's values
        raw = {**raw, "parameters": points_as_choices(raw, fail, check_value, config_fields, beside)}
    params_raw = raw.get("parameters") or {}
    # a list of points was checked point by point above (keys valid only together, unroll_smooth_*, pass there)
    params = read_parameters(params_raw, fail, (lambda *_: None) if "points" in raw else check_value, config_fields)
    points = tuple(dict(p) for p in raw.get("points") or ())
    grid = all(p.kind == "grid" for p in params)
    num_samples = read_num_samples(raw, points, grid, fail)
    budgets = read_attack_budgets(raw, fail)
    objectives = read_objectives(raw, budgets, fail)
    sched = read_scheduler(raw, grid or bool(points), fail)
    seeds = read_seeds(raw, fail)
    reference = read_reference(raw, params, grid or bool(points), fixed, fail, check_value)
    if seeds > 1:
        params, points = with_seeds(params, points, seeds, grid, fixed, fail)
        num_samples = len(points) if points else num_samples

    return StudySpace(
        name=space_name,
        path=path,
        description=str(raw.get("description", "")),
        params=tuple(params),
        fixed=dict(fixed),
        num_samples=num_samples,
        objectives=tuple(objectives),
        attack_budgets=tuple(float(b) for b in budgets),
        scheduler=sched,
        raw=raw,
        points=points,
        seeds=seeds,
        reference=reference,
    )
