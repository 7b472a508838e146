"""Single training run from the command line.

    python -m mriadv.train --out runs/eps1k [--data DIR] [--profile smoke|demo|paper]
                           [--epsilon E | --epsilon-ref E320] [--loss dssim] [--max-epochs N]
                           [--set key=value ...] [--resume]

Runs one :func:`mriadv.fit.fit`, printing a line per epoch, and writes ``records.jsonl`` (one
JSON record per epoch), ``config.json``, ``checkpoint.pt`` (resumable) and ``best.pt`` to ``--out``.
Without ``--data`` the profile's synthetic dataset is generated once under
``results/.data/`` and reused. Exit status: 0 trained, 2 bad input, 3 stopped on a NaN/inf loss.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mriadv.atomic import atomic_write
from mriadv.checkpoint import CHECKPOINT_NAME, load_checkpoint
from mriadv.config import CHOICES, PROFILES, ConfigError, Profile, TrainConfig, get_profile
from mriadv.runtime import default_profile
from mriadv.units import crop_of, scale_epsilon

DEFAULT_RESULTS = Path("results")


def parse_value(text: str, key: str = "") -> Any:
    """A ``--set`` value: Python literals (``1e-4``, ``[1, 2]``), ``true``/``false``/``null``, else a string.

    ``none`` is ``None`` too, except for keys whose allowed values include the word ``'none'``
    (``adversary=none`` is the standard model, not a missing value).
    """
    words = {"true": True, "false": False, "null": None, "none": None}
    if text.strip().lower() == "none" and "none" in CHOICES.get(key, ()):
        return "none"
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mriadv.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder of the run")
    p.add_argument("--data", type=Path, default=None, help="fastMRI-format root (default: synthetic)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: paper on CUDA, else demo")
    p.add_argument("--epsilon", type=float, default=None, help="squared-L2 budget at the run's crop (0: standard)")
    p.add_argument("--epsilon-ref", type=float, default=None, help="budget at 320x320, scaled to the crop")
    p.add_argument("--loss", choices=("mse", "dssim"), default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--resume", action="store_true", help=f"continue from --out/{CHECKPOINT_NAME}")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where synthetic data is kept")
    return p


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as config values (:func:`parse_value`); a malformed one raises
    :class:`ConfigError` naming it."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value, key.strip())
    return out


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Profile]:
    profile = get_profile(args.profile or default_profile())
    overrides: dict[str, Any] = {**profile.overrides, **parse_sets(args.set)}
    if args.epsilon is not None and args.epsilon_ref is not None:
        raise ConfigError("give --epsilon or --epsilon-ref, not both")
    if args.epsilon is not None:
        overrides["epsilon"] = args.epsilon
    if args.epsilon_ref is not None:
        overrides["epsilon"] = scale_epsilon(args.epsilon_ref, crop_of(overrides))
    if args.loss is not None:
        overrides["loss"] = args.loss
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    if args.data is not None:
        overrides["data"] = str(args.data)
    overrides.setdefault("cache_dir", str(args.results / ".cache"))
    return TrainConfig.from_dict(overrides), profile


def main(argv: list[str] | None = None) -> int:
    from mriadv.data.loading import synthetic_data, validate_data  # heavy imports after argument parsing
    from mriadv.fit import fit

    args = build_parser().parse_args(argv)
    try:
        cfg, profile = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"profile: {profile.name} ({profile.description})")
    if cfg.data is None:
        root = synthetic_data(profile, args.results)
        print(f"data: synthetic, {root}")
        cfg = TrainConfig.from_dict({"data": str(root)}, base=cfg)
    problem = validate_data(cfg.data, cfg.crop_size, cfg.cache_dir)
    if problem:
        print(f"error: data folder {cfg.data}: {problem}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    resume = args.out / CHECKPOINT_NAME if args.resume else None
    if resume is not None and not resume.is_file():
        print(f"error: --resume given but {resume} does not exist", file=sys.stderr)
        return 2
    (args.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    print(
        f"epsilon {cfg.epsilon:g} (per-pixel RMS {cfg.epsilon_rms:.4f}), loss {cfg.loss}, "
        f"crop {cfg.crop_size}, out {args.out}"
    )

    history: list[dict[str, Any]] = []

    def on_epoch(record, _checkpoint) -> None:
        history.append(asdict(record))
        lines = "".join(json.dumps(r) + "\n" for r in history)
        with atomic_write(args.out / "records.jsonl") as tmp:
            tmp.write_text(lines)

    try:
        if resume is not None:
            history.extend(load_checkpoint(resume)["history"])
        result = fit(cfg, out_dir=args.out, on_epoch=on_epoch, resume_from=resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.status}: {result.message}; best epoch {result.best_epoch}; checkpoint {result.checkpoint}")
    last = result.history[-1] if result.history else None
    if last is not None and last.versus_input is not None:  # the last line: does the model beat its input?
        print(last.versus_input.line(sum(r.steps for r in result.history)))
    return 3 if result.status == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
