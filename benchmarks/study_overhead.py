"""What Ray Tune costs: N smoke trials through ``study/run.py`` versus the same trials run directly.

Both sides are timed as whole processes (interpreter start, imports, data index, all trials), on the
same pre-generated synthetic data:

* **ray**: ``study/run.py`` with a grid of N epsilon values (Ray start, OptunaSearch, one trial per
  CPU at a time, Parquet and TensorBoard writing, checkpoints through Tune, shutdown);
* **direct**: one Python process calling :func:`mriadv.fit.fit` for the same N configs one
  after another (each with all CPUs as torch threads), writing checkpoints to a folder.

The last line is ``ratio: <ray/direct>`` (target <= 1.15 on 2 cores). Ray costs a fixed ~8 s here
(``ray.init`` ~4 s, the first trial actor, shutdown), which dominates trials of a few seconds; the
default (6 trials of 20 smoke epochs, ~12 s each) measures what grows with the study. Measured here:
6 x 6 epochs 32.3 s vs 22.6 s (1.43); 6 x 20 epochs 68.6 s vs 72.6 s (0.94).

    python benchmarks/study_overhead.py [--trials 6] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mriadv.config import get_profile  # noqa: E402
from mriadv.data.loading import synthetic_data  # noqa: E402
from mriadv.units import scale_epsilon  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(
            f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        )
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    epsilons = [0] + [250 * 2**i for i in range(args.trials - 1)]  # 320x320 units, as in a space file

    with tempfile.TemporaryDirectory(prefix="mriadv-overhead-") as tmp:
        tmp = Path(tmp)
        results = tmp / "results"
        profile = get_profile("smoke")
        data = synthetic_data(profile, results)  # shared by both sides, generated before timing
        space = tmp / "overhead.yaml"
        space.write_text(
            textwrap.dedent(f"""\
            description: overhead benchmark
            parameters:
              epsilon: {{grid: {epsilons}}}
            objectives: [{{metric: val_nmse, mode: min}}]
            attack_budgets: [1000, 5000]
        """)
        )
        crop = profile.overrides["crop_size"]
        configs = [
            {
                **profile.overrides,
                "epsilon": scale_epsilon(e, crop),
                "max_epochs": args.epochs,
                "data": str(data),
                "cache_dir": str(results / ".cache"),
            }
            for e in epsilons
        ]
        direct_script = textwrap.dedent(f"""\
            import json, sys
            sys.path.insert(0, {str(REPO)!r})
            from mriadv.config import TrainConfig
            from mriadv.fit import fit
            for i, values in enumerate(json.loads({json.dumps(json.dumps(configs))})):
                fit(TrainConfig.from_dict(values), out_dir={str(tmp / "direct")!r} + f"/{{i}}", log=None)
        """)
        direct = timed([sys.executable, "-c", direct_script], REPO)
        ray = timed(
            [
                sys.executable,
                str(REPO / "study" / "run.py"),
                "--space",
                str(space),
                "--profile",
                "smoke",
                "--results",
                str(results),
                "--max-epochs",
                str(args.epochs),
                "--no-report",
            ],
            REPO,
        )

    print(f"{args.trials} smoke trials x {args.epochs} epochs on {len(__import__('os').sched_getaffinity(0))} CPUs")
    print(f"direct (one process, sequential): {direct:7.1f} s")
    print(f"ray    (study/run.py):            {ray:7.1f} s")
    print(f"ratio: {ray / direct:.3f}")


if __name__ == "__main__":
    main()
