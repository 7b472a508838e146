"""Slices per second of a seed-size adversarial training epoch, fed by the loader workers.

Runs the training loop exactly as :func:`mriadv.fit.fit` does (``build_data``'s loader with its
workers and pinned memory, ``batch.to(device, non_blocking=True)``, ``Trainer.train_step``: the
generator step and the reconstructor step, bf16 autocast and channels_last on CUDA) on the
``paper`` profile (320x320 crops, U-Net 64/5, batch 8), over several shuffled passes of a small
fastMRI-sized synthetic set (k-space 640x368) so that the loader is in its steady state: the first
``--warmup`` batches (worker start, cuDNN autotuning) are not timed. Prints the rate and the peak
GPU memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``: what one such trial needs).

Usage::

    python benchmarks/gpu_epoch.py                          # synthetic data in a temporary folder
    python benchmarks/gpu_epoch.py --data /data/knee --batches 100 --workers 4

The last line is ``slices_per_s: <float>``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mriadv.config import PROFILES, get_profile  # noqa: E402
from mriadv.data.synthetic import SyntheticSpec, generate  # noqa: E402
from mriadv.runtime import Runtime, seed_everything  # noqa: E402
from mriadv.data.loading import build_data  # noqa: E402
from mriadv.trainer import Trainer  # noqa: E402

TRAIN_VOLUMES, VAL_VOLUMES, SLICES = 4, 2, 16  # 64 training slices, looped over; the profile's geometry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a fastMRI root (default: synthetic, temporary)")
    parser.add_argument("--profile", default="paper", choices=sorted(PROFILES))
    parser.add_argument("--batches", type=int, default=40, help="timed training steps (default: 40)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (default: 4)")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: the config's, build_data's rule)"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or (args.workers is not None and args.workers < 0):
        parser.error("--batches must be >= 1, --warmup and --workers >= 0")

    tmp = None
    try:
        profile = get_profile(args.profile)
        root = args.data
        if root is None:
            tmp = Path(tempfile.mkdtemp(prefix="mriadv-gpu-epoch-"))
            spec = SyntheticSpec(
                volumes=TRAIN_VOLUMES, val_volumes=VAL_VOLUMES, slices=SLICES, size=profile.synthetic["size"]
            )
            t0 = time.perf_counter()
            root = generate(tmp / "data", spec)
            print(f"synthetic data: {spec} ({time.perf_counter() - t0:.0f}s to write; in the page cache)")
        cfg = profile.config(
            data=str(root), device=args.device, num_workers=args.workers, cache_dir=str(tmp / "cache") if tmp else None
        )
        rt = Runtime.resolve(cfg.device, cfg.precision, cfg.threads)
        seed_everything(cfg.seed)
        data = build_data(cfg, rt)
        trainer = Trainer(cfg, rt, data.kspace_shape())
        where = f"{rt.device}" + (f" ({torch.cuda.get_device_name(rt.device)})" if rt.is_cuda else "")
        print(
            f"profile {args.profile}: batch {cfg.batch_size}, crop {cfg.crop_size}, U-Net {cfg.unet_chans}/"
            f"{cfg.unet_pools}, epsilon {cfg.epsilon:g}; {len(data.train)} training slices; device {where}, "
            f"precision {rt.dtype or 'fp32'}, {data.num_workers} loader workers, pinned {data.pin_memory}"
        )

        def sync() -> None:
            if rt.is_cuda:
                torch.cuda.synchronize(rt.device)

        if rt.is_cuda:
            torch.cuda.reset_peak_memory_stats(rt.device)
        steps, slices, epoch, t_start, first_batch_s = 0, 0, 0, None, None
        t_loader = time.perf_counter()
        while steps < args.warmup + args.batches:
            for batch in data.loader(data.train, shuffle=True, epoch=epoch):
                if first_batch_s is None:
                    first_batch_s = time.perf_counter() - t_loader
                trainer.train_step(batch.to(rt.device, non_blocking=True))  # returns floats: one sync per step
                steps += 1
                if steps == args.warmup:
                    sync()
                    t_start = time.perf_counter()
                elif steps > args.warmup:
                    slices += len(batch)
                if steps == args.warmup + args.batches:
                    break
            epoch += 1
        sync()
        if t_start is None:  # --warmup 0
            raise SystemExit("error: --warmup must be >= 1 to time the steady state")
        seconds = time.perf_counter() - t_start
        rate = slices / seconds
        print(
            f"{slices} slices in {seconds:.2f}s after {args.warmup} warm-up steps ({epoch} passes; first batch "
            f"after {first_batch_s:.2f}s): {rate:.1f} slices/s, {1e3 * seconds / args.batches:.1f} ms per "
            f"adversarial step"
        )
        if rt.is_cuda:
            gib = 2**30
            print(
                f"peak GPU memory of one {args.profile} trial: {torch.cuda.max_memory_allocated(rt.device) / gib:.2f} "
                f"GiB allocated, {torch.cuda.max_memory_reserved(rt.device) / gib:.2f} GiB reserved by PyTorch "
                f"(+ the CUDA context, ~0.5 GiB)"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"slices_per_s: {rate:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
