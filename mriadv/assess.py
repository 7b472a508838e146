"""Assess a trained model from its checkpoint: clean metrics and robustness at any budgets and
attack strength, after training is over.

    python -m mriadv.assess CHECKPOINT [--data DIR] [--budgets-ref 1000 5000 20000]
                            [--attacks pgd noise generator pgd_kspace] [--pgd-steps 50]
                            [--pgd-step-scale 2.5] [--max-volumes N] [--device auto] [--out FILE.json]

``CHECKPOINT`` is a ``best.pt`` or ``checkpoint.pt`` written by :func:`mriadv.training.fit` (in a
``python -m mriadv.train`` output folder, or a study's trial folder), or a folder holding one
(``best.pt`` preferred: the networks of the best selection epoch, as in Table 1). The model is
evaluated on the held-out report split of its own data (``--split``; or ``--data``), with the fixed
per-volume validation masks, by the same :func:`mriadv.evaluate.evaluate` that training used, so
with the training's attack settings the numbers equal the run's final report-split record (and
``--split selection`` / ``robust`` an epoch's ``val_*`` / ``robustness``).

Why: a study judges every trial with a fixed, affordable attack (10 PGD steps by default). A
robustness claim should survive a stronger one: more steps, larger budgets, k-space PGD. Budgets
are given in the seed's units (squared L2 norm at 320x320, ``--budgets-ref``) and scaled to the
model's crop at equal per-pixel RMS, or at the crop itself (``--budgets``). Exit status: 0 done,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mriadv.config import ATTACKS, ConfigError, TrainConfig, scale_epsilon

CHECKPOINT_NAMES = ("best.pt", "checkpoint.pt")
SPLIT_CHOICES = ("report", "selection", "robust", "all")


@dataclass
class Assessment:
    """The outcome of :func:`assess`: ``clean`` and ``rows`` as :class:`mriadv.evaluate.EvalResult`
    / :class:`mriadv.evaluate.RobustRow` dicts, budgets also in 320x320 units (``budget_ref``)."""

    checkpoint: str
    epoch: int
    config: dict[str, Any]
    clean: dict[str, Any]
    rows: list[dict[str, Any]]
    split: str = "report"

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "split": self.split, "config": self.config,
                "clean": self.clean, "robustness": self.rows}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the ``best.pt`` (else ``checkpoint.pt``) of a folder."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"{path}: holds no {' or '.join(CHECKPOINT_NAMES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    return path


def assess(
    checkpoint: str | Path,
    data: str | Path | None = None,
    budgets: Sequence[float] | None = None,
    budgets_ref: Sequence[float] | None = None,
    attacks: Sequence[str] | None = None,
    pgd_steps: int | None = None,
    pgd_step_scale: float | None = None,
    max_volumes: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    split: str = "report",
) -> Assessment:
    """Evaluate the networks of ``checkpoint`` clean and under ``attacks`` at ``budgets``.

    Args:
        checkpoint: see :func:`resolve_checkpoint`.
        data: a fastMRI-format root or folder of .h5 files (default: the data the model trained on).
        budgets: squared-L2 attack budgets at the model's crop (default: the training's).
        budgets_ref: the same at 320x320 (the seed's units), scaled to the crop; not with ``budgets``.
        attacks: names from :data:`mriadv.config.ATTACKS` (default: the training's).
        pgd_steps, pgd_step_scale: PGD strength (default: the training's).
        max_volumes: evaluate a seeded subset of this many validation volumes.
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        precision: ``'auto'`` (bf16 autocast on CUDA, fp32 on CPU), ``'fp32'`` or ``'bf16'``.
        split: which validation slices (see :data:`SPLIT_CHOICES`): ``'report'`` the held-out split
            the study reports on (reproduces the last record's ``report``); ``'selection'`` the
            selection split (reproduces an epoch's ``val_*``); ``'robust'`` its per-epoch attack
            subset (reproduces an epoch's ``robustness``); ``'all'`` every validation volume.
    """
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split {split!r}: must be one of {SPLIT_CHOICES}")
    from mriadv.data.files import DataError
    from mriadv.evaluate import evaluate, robustness
    from mriadv.runtime import Runtime
    from mriadv.training import Trainer, build_data, load_checkpoint, to_reference

    path = resolve_checkpoint(checkpoint)
    try:
        payload = load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - not a checkpoint, a truncated file, a foreign pickle
        raise ConfigError(f"{path}: cannot load ({str(exc).splitlines()[0]})") from exc
    if budgets is not None and budgets_ref is not None:
        raise ConfigError("give attack budgets at the crop or at 320x320 (budgets_ref), not both")
    if budgets_ref is not None:
        budgets = [scale_epsilon(b, int(payload["config"]["crop_size"])) for b in budgets_ref]
    given = {"data": data and str(data), "max_val_volumes": max_volumes, "attack_budgets": budgets,
             "attacks": attacks, "pgd_steps": pgd_steps, "pgd_step_scale": pgd_step_scale}
    overrides = {"device": device, "precision": precision, "threads": None, "train_eval_volumes": 0,
                 **({"report_fraction": 0.0} if split == "all" else {}),
                 **{k: v for k, v in given.items() if v is not None}}
    cfg = TrainConfig.from_dict({**payload["config"], **overrides})  # lists become tuples there
    runtime = Runtime.resolve(cfg.device, cfg.precision, cfg.threads)
    try:
        data_ = build_data(cfg, runtime, training=False)  # a flat folder of validation volumes is fine here
    except DataError as exc:
        raise ConfigError(f"data folder {cfg.data}: {exc} (give --data)") from exc
    trainer = Trainer(cfg, runtime, kspace_shape=data_.kspace_shape())
    networks = payload.get("trainer", payload)  # checkpoint.pt nests them; best.pt holds them directly
    trainer.recon.load_state_dict(networks["recon"])
    if trainer.generator is not None and networks.get("generator") is not None:
        trainer.generator.load_state_dict(networks["generator"])
    dataset = {"report": data_.report or data_.val, "selection": data_.val, "all": data_.val,
               "robust": data_.robust_val or data_.val}[split]
    loader = data_.loader(dataset, shuffle=False)
    clean = evaluate(trainer.recon, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
    rows = robustness(trainer.recon, loader, trainer.loss_fn, runtime, trainer.attacks(), clean, cfg.clamp)
    return Assessment(
        checkpoint=str(path), epoch=int(payload["epoch"]), config=cfg.to_dict(), clean=clean.as_dict(),
        rows=[{**r.as_dict(), "budget_ref": to_reference(r.budget, cfg.crop_size)} for r in rows], split=split,
    )


def format_assessment(a: Assessment) -> list[str]:
    """Human-readable lines: the clean metrics, then one line per attack and budget."""
    c = a.clean
    lines = [f"{a.checkpoint} (epoch {a.epoch}, epsilon {a.config['epsilon']:g} at {a.config['crop_size']}^2): "
             f"{a.split} split: {c['num_volumes']} validation volumes, {c['num_slices']} slices",
             f"{'clean':<26} nmse {c['nmse']:.4f}  psnr {c['psnr']:6.2f}  ssim {c['ssim']:.4f}"]
    for r in a.rows:
        name = f"{r['attack']} @ {r['budget_ref']:g} (320²)"
        lines.append(f"{name:<26} nmse {r['nmse']:.4f}  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.4f}  "
                     f"(Δnmse {r['d_nmse']:+.4f}, Δpsnr {r['d_psnr']:+.2f}, Δssim {r['d_ssim']:+.4f}; "
                     f"‖δ‖² {r['delta_sq']:.4g})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mriadv.assess", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="best.pt / checkpoint.pt, or a folder holding one")
    p.add_argument("--data", type=Path, help="data root (default: the data the model trained on)")
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument("--budgets-ref", type=float, nargs="+", metavar="B",
                         help="attack budgets ||delta||^2 at 320x320 (the seed's units), scaled to the crop")
    budgets.add_argument("--budgets", type=float, nargs="+", metavar="B", help="attack budgets at the model's crop")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, help="default: the training's")
    p.add_argument("--pgd-steps", type=int, help="default: the training's")
    p.add_argument("--pgd-step-scale", type=float, help="step = scale * radius / steps (default: the training's)")
    p.add_argument("--max-volumes", type=int, help="only this many validation volumes")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="report",
                   help="report: the held-out split the study reports on (default); selection: the volumes "
                        "early stopping chose by; robust: the per-epoch attack subset; all: every volume")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--out", type=Path, help="also write the assessment as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = assess(args.checkpoint, args.data, args.budgets, args.budgets_ref, args.attacks, args.pgd_steps,
                        args.pgd_step_scale, args.max_volumes, args.device, args.precision, args.split)
    except (ConfigError, RuntimeError) as exc:  # RuntimeError: e.g. CUDA asked for but absent
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in format_assessment(result):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
