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

Budgets (``epsilon`` values and ``attack_budgets``) are squared L2 norms for 320x320 crops, the
seed's units; a run on a smaller crop scales them by ``(crop / 320)^2`` (equal per-pixel RMS), so
one space file means the same perturbation strength under every profile.

Every parameter and fixed key must be a :class:`mriadv.config.TrainConfig` field, and every grid
value and range end must make a valid config, so a searched key provably reaches the trainer. Any
problem raises :class:`SpaceError` naming the file and the key.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mriadv.config import ATTACKS, ConfigError, TrainConfig
from mriadv.units import ROBUST_METRICS, budgets_at_crop, robust_key

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = {
    "description",
    "parameters",
    "points",
    "fixed",
    "num_samples",
    "seeds",
    "objectives",
    "attack_budgets",
    "scheduler",
}
# keys that a space may not set: they belong to the run, not to the study
RUN_KEYS = {"data", "device", "threads", "cache_dir", "num_workers", "attack_budgets"}
EPSILON_KEYS = ("epsilon",)
# metrics a trial reports that can be objectives, beside the rob_<attack>_e<budget>_<metric> family
OBJECTIVE_METRICS = (
    "val_loss",
    "val_nmse",
    "val_psnr",
    "val_ssim",
    "train_loss",
    "val_seed_nmse",
    "val_seed_psnr",
    "val_seed_ssim",
    "feature_fnr",
    "feature_error",
)


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
class Param:
    name: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...] = ()  # grid / choice
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # 'min' | 'max'


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
    names it, and it becomes the space's ``path``."""
    path = Path(source)

    def fail(key: str, why: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {why}")

    if not isinstance(raw, dict):
        raise fail("(top level)", "expected a mapping of keys such as 'parameters' and 'objectives'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; valid keys: {sorted(TOP_KEYS)}")

    config_fields = set(TrainConfig.__dataclass_fields__)

    def check_value(key: str, where: str, value: Any) -> None:
        """A value must make a valid TrainConfig (at the reference crop, so scaling cannot hide errors)."""
        try:
            TrainConfig.from_dict({key: value})
        except (ConfigError, TypeError) as exc:
            raise fail(where, str(exc)) from None
        if key == "init_from" and value is not None and not Path(value).is_absolute():
            raise fail(where, f"{value!r}: give an absolute path (each trial runs in its own folder)")

    if "points" in raw:
        if "parameters" in raw or "num_samples" in raw:
            raise fail(
                "points",
                "a space lists its trials as points, or searches parameters: not both "
                "(and a list of points runs each once: no num_samples)",
            )
        raw = {**raw, "parameters": _points_as_choices(raw["points"], fail, check_value, config_fields)}
    params_raw = raw.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise fail("parameters", "expected a mapping of TrainConfig fields to distributions")
    params = []
    for name, spec in params_raw.items():
        where = f"parameters.{name}"
        if name not in config_fields:
            raise fail(where, f"unknown parameter: not a TrainConfig field (valid: {sorted(config_fields)})")
        if name in RUN_KEYS:
            raise fail(where, "belongs to the run, not to a search space")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise fail(where, f"expected one distribution, e.g. {{grid: [...]}}; one of {DISTRIBUTIONS}")
        ((kind, arg),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise fail(f"{where}.{kind}", f"unknown distribution; expected one of {DISTRIBUTIONS}")
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise fail(f"{where}.{kind}", "expected a non-empty list of values")
            if len(set(map(repr, arg))) != len(arg):
                raise fail(f"{where}.{kind}", "values repeat")
            for v in arg:
                check_value(name, f"{where}.{kind}", v)
            params.append(Param(name, kind, values=tuple(arg)))
            continue
        if not (
            isinstance(arg, list)
            and len(arg) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)
        ):
            raise fail(f"{where}.{kind}", "expected [low, high] numbers")
        low, high = float(arg[0]), float(arg[1])
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise fail(f"{where}.{kind}", f"low must be < high, got [{arg[0]}, {arg[1]}]")
        if kind == "loguniform" and low <= 0:
            raise fail(f"{where}.{kind}", f"a log range must be > 0 at both ends, got [{arg[0]}, {arg[1]}]")
        if kind == "randint" and not all(isinstance(v, int) for v in arg):
            raise fail(f"{where}.{kind}", "randint needs integer bounds")
        for v in (arg[0], arg[1]):
            check_value(name, f"{where}.{kind}", v)
        params.append(Param(name, kind, low=low, high=high))
    if not params:
        raise fail("parameters", "a space needs at least one searched parameter")
    kinds = {p.kind == "grid" for p in params}
    if len(kinds) > 1:
        raise fail("parameters", "mixes grid and sampled distributions; use choice instead of grid for a sampled space")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "expected a mapping of TrainConfig fields to values")
    for key, value in fixed.items():
        if key not in config_fields:
            raise fail(f"fixed.{key}", "unknown key: not a TrainConfig field")
        if key in RUN_KEYS:
            raise fail(f"fixed.{key}", "belongs to the run, not to a search space")
        if key in params_raw:
            raise fail(f"fixed.{key}", "is also a searched parameter")
        check_value(key, f"fixed.{key}", value)

    points = tuple(dict(p) for p in raw.get("points") or ())
    grid = all(p.kind == "grid" for p in params)
    num_samples = len(points) if points else raw.get("num_samples")
    if grid and num_samples is not None:
        raise fail("num_samples", "a grid space runs each grid point once; add 'seeds: N' for repeats")
    if num_samples is None:
        num_samples = 1 if grid else 8
    if not isinstance(num_samples, int) or num_samples < 1:
        raise fail("num_samples", f"must be a positive integer, got {num_samples!r}")

    budgets = raw.get("attack_budgets", [1000, 5000])
    if (
        not isinstance(budgets, list)
        or not budgets
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in budgets)
    ):
        raise fail("attack_budgets", "expected a non-empty list of numbers > 0")

    objectives_raw = raw.get("objectives") or [{"metric": "val_nmse", "mode": "min"}]
    if not isinstance(objectives_raw, list):
        raise fail("objectives", "expected a list of {metric: ..., mode: min|max}")
    objectives = []
    allowed = set(OBJECTIVE_METRICS) | {robust_key(a, b, m) for a in ATTACKS for b in budgets for m in ROBUST_METRICS}
    for i, obj in enumerate(objectives_raw):
        where = f"objectives[{i}]"
        if not isinstance(obj, dict) or set(obj) != {"metric", "mode"}:
            raise fail(where, "expected {metric: ..., mode: min|max}")
        if obj["mode"] not in ("min", "max"):
            raise fail(f"{where}.mode", f"must be 'min' or 'max', got {obj['mode']!r}")
        if obj["metric"] not in allowed:
            raise fail(
                f"{where}.metric",
                f"unknown metric {obj['metric']!r}; e.g. {sorted(OBJECTIVE_METRICS)} or "
                "rob_<attack>_e<budget>_<metric> for a budget in attack_budgets",
            )
        objectives.append(Objective(obj["metric"], obj["mode"]))

    sched = raw.get("scheduler", "none" if grid or points else "asha")
    if isinstance(sched, str):
        sched = {"type": sched}
    if not isinstance(sched, dict) or sched.get("type") not in ("none", "asha"):
        raise fail("scheduler", "expected 'none', 'asha' or {type: asha, grace_period: N, reduction_factor: R}")
    extra = sorted(set(sched) - {"type", "grace_period", "reduction_factor"})
    if extra:
        raise fail(f"scheduler.{extra[0]}", "unknown scheduler option")
    for key in ("grace_period", "reduction_factor"):
        if key in sched and (not isinstance(sched[key], (int, float)) or sched[key] < 1):
            raise fail(f"scheduler.{key}", "must be a number >= 1")

    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise fail("seeds", f"must be a positive integer (training seeds per configuration), got {seeds!r}")
    if seeds > 1:
        params, points = _with_seeds(params, points, seeds, grid, fixed, fail)
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
    )


def _with_seeds(
    params: list[Param], points: tuple[dict[str, Any], ...], seeds: int, grid: bool, fixed: dict[str, Any], fail
) -> tuple[list[Param], tuple[dict[str, Any], ...]]:
    """Replicates: every configuration of a grid or a list of points once per training seed
    ``0 .. seeds - 1`` (``seed``, the last parameter: model initialisation, data order and masks).
    A sampled space cannot repeat what its searcher draws: refused."""
    if "seed" in fixed or any(p.name == "seed" for p in params) and not points:
        raise fail("seeds", "the space sets 'seed' itself; give either 'seeds: N' or a seed parameter")
    if points and "seed" in points[0]:
        raise fail("seeds", "the points set 'seed' themselves; give either 'seeds: N' or seeds in the points")
    if not grid and not points:
        raise fail(
            "seeds",
            "replicates need the configurations listed (a grid or points); a sampled space's searcher "
            "draws each configuration once",
        )
    values = tuple(range(seeds))
    if points:
        points = tuple({**p, "seed": s} for p in points for s in values)
        return [*params, Param("seed", "choice", values=values)], points
    return [*params, Param("seed", "grid", values=values)], points


def _points_as_choices(points: Any, fail, check_value, config_fields: set[str]) -> dict[str, Any]:
    """Validate a ``points`` list (each a mapping of the same TrainConfig fields to values, one trial
    each) and return the equivalent ``parameters`` (a choice over each key's values), through which
    the searcher is given the points to evaluate in order."""
    if not isinstance(points, list) or not points:
        raise fail("points", "expected a non-empty list of mappings, one trial each")
    keys: list[str] | None = None
    for i, point in enumerate(points):
        where = f"points[{i}]"
        if not isinstance(point, dict) or not point:
            raise fail(where, "expected a mapping of TrainConfig fields to values")
        if keys is None:
            keys = list(point)
        if set(point) != set(keys):
            raise fail(where, f"every point must set the same keys {sorted(keys)}, got {sorted(point)}")
        for key, value in point.items():
            if key not in config_fields:
                raise fail(f"{where}.{key}", "unknown key: not a TrainConfig field")
            if key in RUN_KEYS:
                raise fail(f"{where}.{key}", "belongs to the run, not to a search space")
            check_value(key, f"{where}.{key}", value)
        try:
            TrainConfig.from_dict(point)
        except (ConfigError, TypeError) as exc:
            raise fail(where, str(exc)) from None
    if len({repr(sorted(p.items())) for p in points}) != len(points):
        raise fail("points", "two points are the same trial")
    return {k: {"choice": list(dict.fromkeys(p[k] for p in points))} for k in keys or []}
