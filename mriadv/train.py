"""Single training run from the command line.

    python -m mriadv.train --out runs/eps1k [--data DIR] [--profile smoke|demo|paper]
                           [--epsilon E | --epsilon-ref E320] [--loss dssim] [--max-epochs N]
                           [--set key=value ...] [--resume]

Runs one :func:`mriadv.training.fit`, printing a line per epoch, and writes ``records.jsonl`` (one
JSON record per epoch), ``config.json``, ``checkpoint.pt`` (resumable) and ``best.pt`` to ``--out``.
Without ``--data`` the profile's synthetic dataset is generated once under
``results/.data/`` and reused. Exit status: 0 trained, 2 bad input, 3 stopped on a NaN/inf loss.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mriadv.config import PROFILES, ConfigError, Profile, TrainConfig, get_profile, scale_epsilon
from mriadv.data.check import check_folder
from mriadv.data.synthetic import SyntheticSpec, ensure

DEFAULT_RESULTS = Path("results")


def default_profile() -> str:
    """``paper`` where CUDA is present, else ``demo``."""
    import torch

    return "paper" if torch.cuda.is_available() else "demo"


def synthetic_data(profile: Profile, results_dir: Path = DEFAULT_RESULTS, seed: int = 0) -> Path:
    """The profile's synthetic dataset under ``results_dir/.data``, generated on first use."""
    spec = SyntheticSpec(**profile.synthetic, seed=seed)
    name = f"synthetic_{spec.size}px_{spec.volumes}+{spec.val_volumes}x{spec.slices}_seed{spec.seed}"
    return ensure(results_dir / ".data" / name, spec)


def validate_data(folder: str | Path, crop_size: int, cache_dir: str | Path | None = None) -> str | None:
    """None if ``folder`` is usable for training, else a message listing what is wrong (every slice
    is read once: non-finite or all-zero slices fail here, not at the first step; verdicts are
    cached per file in ``cache_dir`` when given)."""
    reports = check_folder(folder, crop_size, cache_dir=cache_dir)
    errors = [e for r in reports.values() for e in r.errors]
    if "train" not in reports or "val" not in reports:
        errors.append(f"{folder}: needs sub-folders singlecoil_train/ and singlecoil_val/")
    return "; ".join(errors) if errors else None


def parse_value(text: str, key: str = "") -> Any:
    """A ``--set`` value: Python literals (``1e-4``, ``[1, 2]``), ``true``/``false``/``null``, else a string.

    ``none`` is ``None`` too, except for keys whose allowed values include the word ``'none'``
    (``adversary=none`` is the standard model, not a missing value).
    """
    words = {"true": True, "false": False, "null": None, "none": None}
    if text.strip().lower() == "none" and key in ("adversary",):
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
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where synthetic data is kept")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Profile]:
    profile = get_profile(args.profile or default_profile())
    overrides: dict[str, Any] = dict(profile.overrides)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value, key.strip())
    crop = int(overrides.get("crop_size", TrainConfig.crop_size))
    if args.epsilon is not None and args.epsilon_ref is not None:
        raise ConfigError("give --epsilon or --epsilon-ref, not both")
    if args.epsilon is not None:
        overrides["epsilon"] = args.epsilon
    if args.epsilon_ref is not None:
        overrides["epsilon"] = scale_epsilon(args.epsilon_ref, crop)
    if args.loss is not None:
        overrides["loss"] = args.loss
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    if args.data is not None:
        overrides["data"] = str(args.data)
    overrides.setdefault("cache_dir", str(args.results / ".cache"))
    return TrainConfig.from_dict(overrides), profile


def main(argv: list[str] | None = None) -> int:
    from mriadv.training import fit  # heavy imports after argument parsing

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
    resume = args.out / "checkpoint.pt" if args.resume else None
    if resume is not None and not resume.is_file():
        print(f"error: --resume given but {resume} does not exist", file=sys.stderr)
        return 2
    (args.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    print(f"epsilon {cfg.epsilon:g} (per-pixel RMS {cfg.epsilon_rms:.4f}), loss {cfg.loss}, "
          f"crop {cfg.crop_size}, out {args.out}")

    history: list[dict[str, Any]] = []

    def on_epoch(record, _checkpoint) -> None:
        history.append(asdict(record))
        lines = "".join(json.dumps(r) + "\n" for r in history)
        tmp = args.out / f"records.jsonl.tmp{os.getpid()}"
        tmp.write_text(lines)
        os.replace(tmp, args.out / "records.jsonl")

    try:
        if resume is not None:
            from mriadv.training import load_checkpoint

            history.extend(load_checkpoint(resume)["history"])
        result = fit(cfg, out_dir=args.out, on_epoch=on_epoch, resume_from=resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.status}: {result.message}; best epoch {result.best_epoch}; checkpoint {result.checkpoint}")
    return 3 if result.status == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
