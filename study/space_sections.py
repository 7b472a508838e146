"""The sections of a search-space file, each read and checked by one function, in the order
:func:`study.spaces.space_from_dict` calls them (the format is at the top of :mod:`study.spaces`).

Every function raises through the ``fail`` it is given (``fail(key, why)`` makes the
:class:`study.spaces.SpaceError` that names the file and the key) and checks each value it keeps with
``check_value(field, key, value)``, which refuses a value that makes no valid
:class:`mriadv.config.TrainConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mriadv.config import ATTACKS, ConfigError, TrainConfig
from mriadv.units import ROBUST_METRICS, robust_key
from study.layout import REFERENCE_INIT

Fail = Callable[[str, str], Exception]  # (key, why) -> the error to raise
CheckValue = Callable[[str, str, Any], None]  # (TrainConfig field, key, value); raises through fail

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
    "reference",
}
# keys that a space may not set: they belong to the run, not to the study
RUN_KEYS = {"data", "device", "threads", "cache_dir", "num_workers", "attack_budgets"}
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


def check_top_level(raw: Any, fail: Fail) -> None:
    """``raw`` must be a mapping of the :data:`TOP_KEYS` only."""
    if not isinstance(raw, dict):
        raise fail("(top level)", "expected a mapping of keys such as 'parameters' and 'objectives'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; valid keys: {sorted(TOP_KEYS)}")


def points_as_choices(
    raw: dict[str, Any], fail: Fail, check_value: CheckValue, config_fields: set[str], fixed: dict[str, Any]
) -> dict[str, Any]:
    """Validate the ``points`` list of ``raw`` (each a mapping of the same TrainConfig fields to values,
    one trial each, valid beside the space's ``fixed`` values; no ``parameters`` or ``num_samples``
    beside it) and return the equivalent ``parameters`` (a choice over each key's values), through
    which the searcher is given the points to evaluate in order."""
    if "parameters" in raw or "num_samples" in raw:
        raise fail(
            "points",
            "a space lists its trials as points, or searches parameters: not both "
            "(and a list of points runs each once: no num_samples)",
        )
    points = raw["points"]
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
        try:
            TrainConfig.from_dict({**fixed, **point})  # beside the space's fixed values
            joint = None
        except (ConfigError, TypeError) as exc:
            joint = exc
        for key, value in point.items():
            if key not in config_fields:
                raise fail(f"{where}.{key}", "unknown key: not a TrainConfig field")
            if key in RUN_KEYS:
                raise fail(f"{where}.{key}", "belongs to the run, not to a search space")
            if joint is not None or key == "init_from":  # a key alone names the culprit; keys set together
                check_value(key, f"{where}.{key}", value)  # (unroll_smooth_*) are valid only together
        if joint is not None:
            raise fail(where, str(joint))
    if len({repr(sorted(p.items())) for p in points}) != len(points):
        raise fail("points", "two points are the same trial")
    return {k: {"choice": list(dict.fromkeys(p[k] for p in points))} for k in keys or []}


def read_parameters(params_raw: Any, fail: Fail, check_value: CheckValue, config_fields: set[str]) -> list[Param]:
    """The searched parameters (``parameters:``): at least one, all grids or all sampled."""
    if not isinstance(params_raw, dict):
        raise fail("parameters", "expected a mapping of TrainConfig fields to distributions")
    params = [_parameter(name, spec, fail, check_value, config_fields) for name, spec in params_raw.items()]
    if not params:
        raise fail("parameters", "a space needs at least one searched parameter")
    kinds = {p.kind == "grid" for p in params}
    if len(kinds) > 1:
        raise fail("parameters", "mixes grid and sampled distributions; use choice instead of grid for a sampled space")
    return params


def _parameter(name: str, spec: Any, fail: Fail, check_value: CheckValue, config_fields: set[str]) -> Param:
    """One searched TrainConfig field and its distribution: a list of values (``grid``, ``choice``)
    or a ``[low, high]`` range whose ends both make a valid config."""
    where = f"parameters.{name}"
    if name not in config_fields:
        raise fail(where, f"unknown parameter: not a TrainConfig field (valid: {sorted(config_fields)})")
    if name in RUN_KEYS:
        raise fail(where, "belongs to the run, not to a search space")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(where, f"expected one distribution, e.g. {{grid: [...]}}; one of {DISTRIBUTIONS}")
    ((kind, arg),) = spec.items()
    where = f"{where}.{kind}"
    if kind not in DISTRIBUTIONS:
        raise fail(where, f"unknown distribution; expected one of {DISTRIBUTIONS}")
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise fail(where, "expected a non-empty list of values")
        if len(set(map(repr, arg))) != len(arg):
            raise fail(where, "values repeat")
        for v in arg:
            check_value(name, where, v)
        return Param(name, kind, values=tuple(arg))
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)
    ):
        raise fail(where, "expected [low, high] numbers")
    low, high = float(arg[0]), float(arg[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise fail(where, f"low must be < high, got [{arg[0]}, {arg[1]}]")
    if kind == "loguniform" and low <= 0:
        raise fail(where, f"a log range must be > 0 at both ends, got [{arg[0]}, {arg[1]}]")
    if kind == "randint" and not all(isinstance(v, int) for v in arg):
        raise fail(where, "randint needs integer bounds")
    for v in (arg[0], arg[1]):
        check_value(name, where, v)
    return Param(name, kind, low=low, high=high)


def read_fixed(
    fixed: Any, params_raw: dict[str, Any], fail: Fail, check_value: CheckValue, config_fields: set[str]
) -> dict[str, Any]:
    """The TrainConfig overrides of every trial (``fixed:``), none of them also searched."""
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
    return fixed


def read_num_samples(raw: dict[str, Any], points: tuple[dict[str, Any], ...], grid: bool, fail: Fail) -> int:
    """Trials before replicates: one per point, one run of a grid, else ``num_samples`` (default 8)."""
    num_samples = len(points) if points else raw.get("num_samples")
    if grid and num_samples is not None:
        raise fail("num_samples", "a grid space runs each grid point once; add 'seeds: N' for repeats")
    if num_samples is None:
        num_samples = 1 if grid else 8
    if not isinstance(num_samples, int) or num_samples < 1:
        raise fail("num_samples", f"must be a positive integer, got {num_samples!r}")
    return num_samples


def read_attack_budgets(raw: dict[str, Any], fail: Fail) -> list[float]:
    """The robustness evaluation budgets (320x320 units), ``[1000, 5000]`` unless given."""
    budgets = raw.get("attack_budgets", [1000, 5000])
    if (
        not isinstance(budgets, list)
        or not budgets
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in budgets)
    ):
        raise fail("attack_budgets", "expected a non-empty list of numbers > 0")
    return budgets


def read_objectives(raw: dict[str, Any], budgets: list[float], fail: Fail) -> list[Objective]:
    """The objectives (``val_nmse``, min, unless given): a reported metric, or a robust metric at one
    of the ``budgets``."""
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
    return objectives


def read_scheduler(raw: dict[str, Any], listed: bool, fail: Fail) -> dict[str, Any]:
    """The trial scheduler as a mapping with a ``type``: ``none`` by default for a space that lists
    its trials (``listed``: a grid or points), else ASHA."""
    sched = raw.get("scheduler", "none" if listed else "asha")
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
    return sched


def read_seeds(raw: dict[str, Any], fail: Fail) -> int:
    """Training seeds per configuration (``seeds:``, 1 unless given)."""
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise fail("seeds", f"must be a positive integer (training seeds per configuration), got {seeds!r}")
    return seeds


def with_seeds(
    params: list[Param], points: tuple[dict[str, Any], ...], seeds: int, grid: bool, fixed: dict[str, Any], fail: Fail
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


def fine_tunes_reference(params: Sequence[Param]) -> bool:
    """Whether trials may start from the reference trial's best.pt (a searched ``init_from: reference``)."""
    return any(p.name == "init_from" and REFERENCE_INIT in p.values for p in params)


def read_reference(
    raw: dict[str, Any], params: list[Param], listed: bool, fixed: dict[str, Any], fail: Fail, check_value: CheckValue
) -> dict[str, Any] | None:
    """A sampled space's ``reference:`` (a mapping of TrainConfig fields, e.g. the standard model
    ``{adversary: none, epsilon: 0}``): a configuration outside the sampled ranges that the searcher
    runs first, as one of ``num_samples``, against which the report compares every trial, and whose
    ``best.pt`` trials with ``init_from: reference`` fine-tune (:mod:`study.reference`)."""
    ref = raw.get("reference")
    if ref is None:
        if fine_tunes_reference(params):
            raise fail("parameters.init_from", f"{REFERENCE_INIT!r} fine-tunes the space's reference: add 'reference:'")
        return None
    if listed:
        raise fail("reference", "is for a sampled space; a grid or points space lists its reference as a point")
    if not isinstance(ref, dict) or not ref:
        raise fail(
            "reference", "expected a mapping of TrainConfig fields to values, e.g. {adversary: none, epsilon: 0}"
        )
    missing = [p.name for p in params if p.name not in ref]
    if missing:
        raise fail("reference", f"must set every searched parameter (its values may lie outside the ranges): {missing}")
    for key, value in ref.items():
        if key not in TrainConfig.__dataclass_fields__ or key in RUN_KEYS:
            raise fail(f"reference.{key}", "not a TrainConfig field a space may set")
        if key == "init_from" and value == REFERENCE_INIT:
            raise fail(f"reference.{key}", "the reference cannot start from itself")
        check_value(key, f"reference.{key}", value)
    try:
        TrainConfig.from_dict({**fixed, **ref})
    except (ConfigError, TypeError) as exc:
        raise fail("reference", str(exc)) from None
    return dict(ref)
