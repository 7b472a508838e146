"""What the per-epoch attack evaluation costs relative to the epoch's training.

Each epoch, a study attacks a fixed subset of the selection split (``robust_slices_per_volume``
slices of every selection volume) with every configured attack at every budget; the full
held-out evaluation runs once per trial. This benchmark measures, in one run, with the profile's
networks on random batches (the cost of a forward or backward pass does not depend on the pixel
values):

* the time of one adversarial training step per slice (``Trainer.train_step``), and
* the time of one pass of every per-epoch attack (clean forward, PGD at every budget, noise, the
  trial's generator) per slice, as :func:`mriadv.evaluate.robustness` runs them,

and multiplies each by the number of slices an epoch trains on and attacks: for the profile's own
synthetic data set, and for the real fastMRI single-coil knee set (34,742 training slices; 199
validation volumes, half of them selection). The last line is the ratio for the profile's data
set; the target (issue 9) is <= 0.5 at the demo and paper profiles.

Usage::

    python benchmarks/attack_cost.py                        # demo profile
    python benchmarks/attack_cost.py --profile paper --batch 2 --rounds 1   # 320x320 on a CPU: slow

``--batch`` sets the batch of the timed passes (default: the profile's); time per slice is what
is compared, so a smaller batch only makes a slow machine finish sooner.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mriadv.config import PROFILES, get_profile  # noqa: E402
from mriadv.data.synthetic import SyntheticSpec  # noqa: E402
from mriadv.evaluate import evaluate, robustness  # noqa: E402
from mriadv.runtime import Runtime, seed_everything  # noqa: E402
from mriadv.trainer import Trainer  # noqa: E402
from _machine import cpu_seconds, others_share  # noqa: E402
from step_cost import random_batch, sync  # noqa: E402

FASTMRI_TRAIN_SLICES = 34742  # fastMRI single-coil knee training split
FASTMRI_VAL_VOLUMES = 199
TARGET = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--batch", type=int, default=None, help="batch of the timed passes (default: the profile's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median; default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    profile = get_profile(args.profile)
    cfg = profile.config(device=args.device, threads=args.threads, **({"batch_size": args.batch} if args.batch else {}))
    rt = Runtime.resolve(cfg.device, cfg.precision, cfg.threads)
    seed_everything(0)
    trainer = Trainer(cfg, rt)
    batch = random_batch(cfg, rt.device)
    b = len(batch)
    attacks = trainer.attacks()
    print(
        f"profile {args.profile}: crop {cfg.crop_size}, U-Net {cfg.unet_chans}/{cfg.unet_pools}, adversary "
        f"{cfg.adversary_kind}; per-epoch attacks: {', '.join(f'{a.name}@{a.budget:g}' for a in attacks)}, "
        f"PGD {cfg.pgd_steps} steps; timed batch {b}; device {rt.device}"
    )

    def once(op) -> float:
        sync(rt.device)
        t0 = time.perf_counter()
        op()
        sync(rt.device)
        return time.perf_counter() - t0

    def attack_pass() -> None:  # what fit() runs per epoch on the robust subset: clean, then every attack
        clean = evaluate(trainer.recon, [batch], trainer.loss_fn, rt)
        robustness(trainer.recon, [batch], trainer.loss_fn, rt, attacks, clean)

    usage, t0 = cpu_seconds(), time.perf_counter()
    steps, passes = [], []
    for r in range(args.rounds + 1):  # alternately, so that contention affects both alike; round 0 warms up
        s, a = once(lambda: trainer.train_step(batch)), once(attack_pass)
        if r:
            steps.append(s)
            passes.append(a)
    step, attack = statistics.median(steps) / b, statistics.median(passes) / b
    share = others_share(usage, time.perf_counter() - t0)
    if share is not None and share > 0.1:
        print(
            f"WARNING: other processes used {100 * share:.0f}% of the machine's CPU; the two costs were timed "
            "alternately, so their ratio is less affected than each one"
        )
    print(
        f"per slice: training step {1e3 * step:.1f} ms; every per-epoch attack once {1e3 * attack:.1f} ms "
        f"({attack / step:.2f} training steps' worth)"
    )

    spec = SyntheticSpec(**profile.synthetic)
    selection = spec.val_volumes - math.floor(spec.val_volumes * cfg.report_fraction)
    per_volume = cfg.robust_slices_per_volume or spec.slices
    sets = {
        f"its synthetic set ({spec.volumes} x {spec.slices} training slices, {selection} selection volumes)": (
            spec.volumes * spec.slices,
            selection * min(per_volume, spec.slices),
        ),
        "fastMRI single-coil knee (34,742 training slices, ~100 selection volumes)": (
            FASTMRI_TRAIN_SLICES,
            math.ceil(FASTMRI_VAL_VOLUMES * (1 - cfg.report_fraction)) * per_volume,
        ),
    }
    ratios = []
    for name, (train_slices, attacked) in sets.items():
        train_s, attack_s = train_slices * step, attacked * attack
        ratios.append(attack_s / train_s)
        print(
            f"{name}: training {train_s:.0f} s, per-epoch attacks on {attacked} slices {attack_s:.0f} s: "
            f"ratio {ratios[-1]:.3f} (target <= {TARGET})"
        )
    print(f"ratio: {ratios[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
