"""How many slices per second the training loader delivers, per loader worker.

Iterates the training pipeline exactly as :func:`mriadv.fit.fit` builds it: a
``DataLoader(SliceDataset(..., UnetTransform(train=True, ...)), batch_size=8, collate_fn=collate)``
whose batches are model-ready :class:`~mriadv.data.transforms.Batch` es (a fresh random mask per
slice, zero-filled magnitude, crop, instance normalisation). By default the data are fastMRI-sized
synthetic knees (k-space 640x368, 320x320 crops) written into a temporary folder; ``--data`` takes a
real fastMRI root instead (``singlecoil_train/`` is used).

Each worker setting (run --repeats times, median reported) keeps one loader iterator over several shuffled passes (the batches of
epochs 0, 1, ... concatenated, as ``fit`` would draw them), discards the first batches (worker start,
first file opens) and times the rest, so the number is the steady-state rate, not the start-up.
Per slice a worker reads ~1.9 MB of k-space with h5py and runs a 640x368 complex inverse FFT; those two
dominate (the breakdown printed first measures them in this process, with one thread, as a worker
runs).

The per-worker rate (the 1-worker setting) sets how many workers keep a GPU fed: a seed-sized
adversarial epoch on one modern GPU consumes about 60 slices/s.

Usage::

    python benchmarks/data_throughput.py                       # 0, 1, 2 workers on synthetic data
    python benchmarks/data_throughput.py --workers 0,1,2,4 --slices 256
    python benchmarks/data_throughput.py --keep-kspace         # batches also carry k-space (k-space attacks)
    python benchmarks/data_throughput.py --data /path/to/fastmri/knee

The last line is ``slices_per_s_per_worker: <float>``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mriadv.config import TrainConfig  # noqa: E402
from mriadv.data.files import ShapeBucketSampler, SliceDataset  # noqa: E402
from mriadv.data.masks import make_mask_func  # noqa: E402
from mriadv.data.synthetic import SyntheticSpec, generate  # noqa: E402
from mriadv.data.transforms import UnetTransform, apply_mask, collate  # noqa: E402
from mriadv.fft import ifft2c  # noqa: E402
from _machine import cpu_seconds, others_share  # noqa: E402

GPU_SLICES_PER_S = 60.0  # a seed-size (320x320, U-Net 64/5) adversarial epoch on one modern GPU
SYNTHETIC = SyntheticSpec(volumes=4, val_volumes=1, slices=16, size=320)  # fastMRI knee geometry


def epoch_batches(dataset: SliceDataset, batch_size: int, bucketed: bool, seed: int, epoch: int) -> list[list[int]]:
    """The index batches of one training epoch, drawn as :meth:`mriadv.data.loading.Data.loader` draws them."""
    if bucketed:  # batches that carry k-space must share its shape
        sampler = ShapeBucketSampler(dataset.kspace_shapes(), batch_size, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def measure(
    dataset: SliceDataset,
    workers: int,
    batch_size: int,
    bucketed: bool,
    warmup_batches: int,
    timed_slices: int,
    seed: int,
) -> dict[str, float]:
    """Iterate one loader: time to the first batch, then the steady-state slices/s after ``warmup_batches``."""
    batches: list[list[int]] = []
    epoch = 0
    while sum(len(b) for b in batches[warmup_batches:]) < timed_slices:
        batches += epoch_batches(dataset, batch_size, bucketed, seed, epoch)
        epoch += 1
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
    t0 = time.perf_counter()
    first = start = None
    slices = 0
    for i, batch in enumerate(loader):
        now = time.perf_counter()
        if i == 0:
            first = now - t0
        if i == warmup_batches - 1:
            start = now
        elif i >= warmup_batches:
            slices += len(batch)
            if slices >= timed_slices:
                break
    elapsed = time.perf_counter() - start
    del loader  # shuts the workers down
    return {"first_batch_s": first, "slices": slices, "seconds": elapsed, "rate": slices / elapsed}


def breakdown(dataset: SliceDataset, n: int) -> dict[str, float]:
    """Milliseconds per slice of the file read, the inverse FFT alone, and the whole transform, in this
    process with one thread (as in a loader worker), over the first ``n`` slices (median)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        read, fft, transform = [], [], []
        for i in range(min(n, len(dataset))):
            t0 = time.perf_counter()
            raw = dataset.read(i)
            t1 = time.perf_counter()
            sample = dataset.transform(raw, 0)
            t2 = time.perf_counter()
            k = apply_mask(torch.from_numpy(raw.kspace), torch.ones(raw.kspace.shape[-1], dtype=torch.bool))
            t3 = time.perf_counter()
            ifft2c(k)
            t4 = time.perf_counter()
            del sample
            read.append(t1 - t0)
            transform.append(t2 - t1)
            fft.append(t4 - t3)
    finally:
        torch.set_num_threads(threads)
    return {k: 1e3 * statistics.median(v) for k, v in (("read", read), ("ifft2c", fft), ("transform", transform))}


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a fastMRI root (singlecoil_train/ is read); default: synthetic 640x368 k-space in a temp dir",
    )
    parser.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts (default: 0,1,2)")
    parser.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices timed per repeat (default: 2 passes over the data, at least 512 slices)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=None, help="batches discarded before timing (default: 2 per worker, at least 2)"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--crop", type=int, default=defaults.crop_size)
    parser.add_argument(
        "--keep-kspace",
        action="store_true",
        help="batches also carry the masked k-space and mask (as for k-space attacks)",
    )
    parser.add_argument("--max-volumes", type=int, default=None, help="use only this many training volumes of --data")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if any(w < 0 for w in workers):
        parser.error("--workers must be >= 0")
    if (
        args.repeats < 1
        or (args.slices is not None and args.slices < 1)
        or (args.warmup is not None and args.warmup < 1)
    ):
        parser.error("--repeats, --slices and --warmup must be >= 1")

    tmp = None
    try:
        if args.data is None:
            tmp = Path(tempfile.mkdtemp(prefix="mriadv-throughput-"))
            t0 = time.perf_counter()
            root = generate(tmp / "data", SYNTHETIC)
            print(f"synthetic data: {SYNTHETIC} -> {root} ({time.perf_counter() - t0:.1f}s to write)")
            cache_note = (
                "the files were written seconds ago and sit in the OS page cache: these rates exclude "
                "disk reads (a cold read from disk or network storage adds to the read time)"
            )
        else:
            root = args.data
            cache_note = (
                "files read before (by this or an earlier run) may sit in the OS page cache; a cold "
                "read from disk or network storage is slower than what the first setting sees"
            )
        mask_func = make_mask_func(defaults.mask_type, defaults.center_fraction, defaults.acceleration)
        transform = UnetTransform(
            mask_func, args.crop, train=True, seed=defaults.seed, clamp=defaults.clamp, keep_kspace=args.keep_kspace
        )
        dataset = SliceDataset(
            root, "train", transform, target_key=defaults.target_key, crop_size=args.crop, max_volumes=args.max_volumes
        )
        shapes = sorted(set(dataset.kspace_shapes()))
        timed = args.slices if args.slices is not None else max(2 * len(dataset), 512)
        print(
            f"dataset: {len(dataset.volumes)} volumes, {len(dataset)} slices, k-space {shapes}, "
            f"crop {args.crop}, batch {args.batch_size}, keep_kspace={args.keep_kspace}"
        )
        print(
            f"cpu cores available: {len(os.sched_getaffinity(0))}; torch threads in-process: "
            f"{torch.get_num_threads()} (1 in each worker); note: {cache_note}"
        )

        parts = breakdown(dataset, 32)
        print(
            f"per slice, one thread: h5py read {parts['read']:.1f} ms, whole transform {parts['transform']:.1f} ms "
            f"(of which the 2-D inverse FFT {parts['ifft2c']:.1f} ms)"
        )

        rates: dict[int, float] = {}
        usage, t_start = cpu_seconds(), time.perf_counter()
        for w in workers:
            warm = args.warmup if args.warmup is not None else max(2, 2 * w)
            runs = [
                measure(dataset, w, args.batch_size, args.keep_kspace, warm, timed, defaults.seed + i)
                for i in range(args.repeats)
            ]
            r = sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]  # the median run
            rates[w] = r["rate"]
            spread = f"{min(x['rate'] for x in runs):.0f}-{max(x['rate'] for x in runs):.0f}"
            label = "in-process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
            per = f"{r['rate'] / w:7.1f} per worker" if w else " " * 18
            print(
                f"workers={w:<2d} ({label:>10s}): {r['rate']:7.1f} slices/s  {per}  "
                f"[median of {len(runs)} ({spread}); {r['slices']} slices in {r['seconds']:.2f}s after {warm} "
                f"warm-up batches; "
                f"first batch after {r['first_batch_s']:.2f}s]"
            )
        share = others_share(usage, time.perf_counter() - t_start)
        if share is not None and share > 0.1:
            print(
                f"WARNING: other processes used {100 * share:.0f}% of the machine's CPU during the timing; "
                f"rerun on a quiet machine"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    # One worker is one process on one core: its rate is the unit that scales with cores. With more
    # workers than free cores (the main process also needs one) the rate per worker drops.
    if 1 in rates:
        per_worker, source = rates[1], "the 1-worker setting"
    elif any(w > 0 for w in rates):
        w_best = max((w for w in rates if w > 0), key=lambda w: rates[w] / w)
        per_worker, source = rates[w_best] / w_best, f"the {w_best}-worker setting / {w_best}"
    else:
        per_worker, source = rates[0], "the in-process setting"
    need = math.ceil(GPU_SLICES_PER_S / per_worker)
    print(f"per-worker rate ({source}): {per_worker:.1f} slices/s")
    print(
        f"a GPU consuming {GPU_SLICES_PER_S:.0f} slices/s (seed-size adversarial epoch) needs "
        f"ceil({GPU_SLICES_PER_S:.0f} / {per_worker:.1f}) = {need} loader worker(s) (one free core each, "
        f"plus one for the training process)"
    )
    print(f"slices_per_s_per_worker: {per_worker:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
