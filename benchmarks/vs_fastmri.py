"""Parity with fastMRI's own U-Net: accuracy at equal steps, step time at equal size.

Trains two reconstructors side by side on the same folder (default: the profile's synthetic data under
``results/.data``, generated on first use; ``--data`` takes a fastMRI-format root):

* **fastMRI**: ``fastmri.models.Unet`` (LeakyReLU 0.2, instance norm, transposed-convolution
  upsampling) trained with fastMRI's default single-coil U-Net recipe, ``UnetModule`` /
  ``fastmri_examples/unet/train_unet_demo.py``: L1 loss, RMSprop lr 1e-3, weight decay 0, StepLR
  (step 40 epochs, gamma 0.1; never reached in a few epochs), dropout 0, written here as a plain
  loop (no pytorch_lightning);
* **mriadv**: the project's standard model (``epsilon = 0``) with the profile's recipe through
  ``Trainer.train_step`` exactly as ``fit`` runs it (demo: MSE, AdamW 1e-3 with cosine decay over the
  run's steps, U-Net PReLU / average pooling / instance norm / bilinear upsampling).

Both have the profile's width and depth (demo: 16 channels, 3 pools, 0.48 M parameters for fastMRI's, 0.45 M for the project's) and
are fed the *same* batches: every batch is drawn once from the project's data pipeline (masks new per
sample and epoch, instance normalisation, input clamped to +-6) and given to both, so masks, inputs,
targets, batch size (the profile's, 4 on demo; fastMRI's demo script uses 1 per GPU) and order are
identical. fastMRI's ``UnetDataTransform`` normalises the same way: the benchmark checks it on one
validation slice with the same mask and prints the largest input difference. The one difference is
that fastMRI's transform also clamps the *target* to +-6; both models here train on the unclamped
target (the share of target pixels beyond 6 is printed).

Evaluation: the final weights of both on every validation volume (fixed per-volume masks), with
fastMRI's ``fastmri.evaluate`` functions as its evaluate script applies them (``Metrics.push(target,
recons)`` per volume of de-normalised slices, ``maxval`` = the target volume's maximum; NMSE, PSNR,
SSIM averaged over volumes), and the zero-filled input the same way (the de-normalised network input,
as the project's identity-model row). The project's own ``evaluate()`` of its model is printed beside
as a cross-check.

Step time: each model's optimiser step (forward, loss, backward, update; for mriadv the whole
``Trainer.train_step`` with its learning-rate setting and one ``.tolist()`` per step), timed on the
same batch one right after the other, alternating which goes first, so that contention from other
processes affects both alike, on one intra-op thread by default (``--threads``): on cores shared with
other work, threads that wait on each other at every barrier made a step several times slower (16x
for the smoke profile's tiny U-Net) and the timings erratic; with one thread the default run took
7 minutes while other work kept 1.5 of 2 cores busy, 3.4 minutes with 0.9. Data loading is not timed. Reported: the median seconds per step of
each, and the median of the per-step ratios mriadv / fastMRI (the paired ratio, robust to bursts of
load). The share of the machine other processes used meanwhile is printed (``_machine.py``).

Measured (demo, 720 steps of batch 4, 2-core CPU, one thread, quiet machine): NMSE 0.0431 (mriadv)
vs 0.0518 (fastMRI), zero-filled 0.1098: ratio 0.83; step time 0.99x fastMRI's (ratio of medians and
paired). History: 1.18-1.19x with PyTorch's PReLU backward and bilinear kernels on CPU, 1.10-1.12x once
those were made faster (``mriadv/models/unet.py``), 0.99x since the up path convolves (1x1, halving the
channels) before it upsamples, so each up block's first convolution sees 2c channels instead of 3c
(the old layout: 18.0 against fastMRI's 15.5 GFLOP per forward + backward of a batch of 8 at 96x96).
``Trainer.train_step`` itself adds ~1.5% over a bare loop; the loss and optimiser (MSE/AdamW vs
L1/RMSprop) nothing measurable.

Installing fastMRI (optional; not a project dependency). ``fastmri`` 0.3.0 pins an old torchvision
and pytorch_lightning that this benchmark does not need; install it without them::

    pip install --no-deps fastmri==0.3.0
    pip install runstats scikit-image pandas pyyaml requests tqdm h5py

Only ``fastmri.models.unet``, ``fastmri.evaluate`` and ``fastmri.data.transforms`` are imported (none
of them imports torchvision; ``fastmri.pl_modules`` would). Nothing is downloaded.

Usage::

    python benchmarks/vs_fastmri.py                     # demo profile: 6 epochs x 120 steps
    python benchmarks/vs_fastmri.py --steps 120 --threads 0     # torch's default threads (a quiet machine)
    python benchmarks/vs_fastmri.py --profile smoke     # seconds: a check that it runs
    python benchmarks/vs_fastmri.py --data FOLDER --set residual=true   # the project's model, changed
    python benchmarks/vs_fastmri.py --data FOLDER --seed 0 1 2          # three seeds, one interval

Steps: by default the profile's updates on the folder as ``fit`` counts them (``steps_per_epoch`` x
``max_epochs``; demo: 720 whatever the folder's size), both models fed ``fit``'s own training batches
(``Data.train_loader``: a smaller training set cycled, a larger one sampled).

``--seed 0 1 2`` trains both models once per seed: the NMSE ratio is then the ratio of the means over
seeds and volumes, with a 95 % interval over both (:mod:`mriadv.intervals`, paired by seed and volume),
so one seed's draw is not read as a difference of recipes (on ``small128`` the seeds gave 1.074, 0.862
and 0.894: 0.937 +- 0.223 over the three).

The last line is ``ratios: nmse <mriadv / fastMRI> step_time <mriadv / fastMRI>``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mriadv.config import PROFILES, TrainConfig, get_profile  # noqa: E402
from mriadv.data.transforms import Batch, center_crop, denormalize  # noqa: E402
from mriadv.evaluate import evaluate as mriadv_evaluate  # noqa: E402
from mriadv.intervals import ratio_interval  # noqa: E402
from mriadv.perturbations import reconstruct  # noqa: E402
from mriadv.runtime import Runtime, seed_everything  # noqa: E402
from mriadv.data.loading import Data, build_data, synthetic_data  # noqa: E402
from mriadv.config import ConfigError  # noqa: E402
from mriadv.train import DEFAULT_RESULTS, parse_sets  # noqa: E402
from mriadv.trainer import Trainer  # noqa: E402
from _machine import cpu_seconds, others_share  # noqa: E402

INSTALL = "pip install --no-deps fastmri==0.3.0 && pip install runstats scikit-image pandas pyyaml requests tqdm h5py"
# fastMRI's default single-coil U-Net recipe (UnetModule and train_unet_demo.py defaults)
FASTMRI_LR, FASTMRI_WEIGHT_DECAY, FASTMRI_LR_STEP_EPOCHS, FASTMRI_LR_GAMMA = 1e-3, 0.0, 40, 0.1
TARGET_NMSE_RATIO, TARGET_TIME_RATIO = 1.0, 1.0  # issue 9: at least as accurate, no slower
NAMES = ("zero-filled", "fastMRI", "mriadv")  # the rows of the evaluation


def import_fastmri():
    """fastMRI's U-Net, evaluation and data transform, imported by submodule (no torchvision)."""
    try:
        from fastmri.data.transforms import UnetDataTransform
        from fastmri.evaluate import METRIC_FUNCS, Metrics
        from fastmri.models.unet import Unet
    except ImportError as exc:
        raise SystemExit(f"fastMRI is not importable ({exc}); install it with:\n    {INSTALL}") from None
    return Unet, Metrics, METRIC_FUNCS, UnetDataTransform


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FastMRIRecipe:
    """fastMRI's ``UnetModule.training_step`` / ``configure_optimizers`` as a plain loop."""

    def __init__(self, unet: torch.nn.Module, runtime: Runtime) -> None:
        self.unet, self.runtime = unet, runtime
        self.opt = torch.optim.RMSprop(unet.parameters(), lr=FASTMRI_LR, weight_decay=FASTMRI_WEIGHT_DECAY)
        # Lightning steps an epoch-interval scheduler once per epoch
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, FASTMRI_LR_STEP_EPOCHS, FASTMRI_LR_GAMMA)

    def train_step(self, batch: Batch) -> torch.Tensor:
        self.unet.train()
        with self.runtime.autocast():
            output = self.unet(self.runtime.image(batch.image))
        loss = F.l1_loss(output.float(), batch.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def end_epoch(self) -> None:
        self.sched.step()


def transform_parity(data: Data, cfg: TrainConfig, UnetDataTransform) -> tuple[float, float, float]:
    """fastMRI's ``UnetDataTransform`` on the first validation slice with the project's mask for it:
    ``(max |input difference|, max |target difference| after clamping ours to 6, share of target
    pixels that fastMRI's transform clamps)``, in normalised units."""
    ds = data.val
    raw = ds.read(0)
    ours = ds.transform(raw, ds.epoch)
    tf = ds.transform
    mask = tf.mask_func(raw.kspace.shape[-1], tf.mask_rng(raw.fname, raw.slice_num, ds.epoch))
    left, right = raw.padding
    mask[:left], mask[right:] = False, False
    num_low = tf.mask_func.num_low_freqs(raw.kspace.shape[-1])

    def same_mask(shape, offset=None, seed=None):  # fastMRI's MaskFunc interface: (mask, num_low_frequencies)
        m = torch.from_numpy(mask.astype(np.float32)).reshape(*([1] * (len(shape) - 2)), len(mask), 1)
        return m, num_low

    crop = (cfg.crop_size, cfg.crop_size)
    target = center_crop(torch.from_numpy(raw.target), crop).numpy() if raw.target is not None else None
    theirs = UnetDataTransform("singlecoil", mask_func=same_mask)(
        raw.kspace, None, target, {"max": raw.max_value}, raw.fname, raw.slice_num
    )
    d_input = float((theirs.image - ours.image[0]).abs().max())
    d_target = float((theirs.target - ours.target[0].clamp(-6, 6)).abs().max()) if target is not None else math.nan
    clipped = float((ours.target.abs() > 6).float().mean())
    return d_input, d_target, clipped


def fastmri_metrics(
    models: dict[str, torch.nn.Module | None], data: Data, runtime: Runtime, Metrics, METRIC_FUNCS
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """fastMRI's evaluation of each model (None: the zero-filled input) on every validation volume:
    de-normalised slices stacked per volume, ``Metrics.push(target, recons)`` per volume, means; and each
    model's per-volume NMSE (``{model: {file: NMSE}}``, fastMRI's ``nmse`` of the same stacks) for paired
    comparisons."""
    per_volume: dict[str, dict[str, list]] = {}
    for m in models.values():
        if m is not None:
            m.eval()
    with torch.no_grad():
        for batch in data.loader(data.val, shuffle=False):
            batch = batch.to(runtime.device)
            mean, std = batch.mean.view(-1, 1, 1, 1), batch.std.view(-1, 1, 1, 1)
            outs = {"target": denormalize(batch.target, mean, std)}
            for name, m in models.items():
                if m is None:
                    pred = batch.image
                else:
                    with runtime.evaluating():  # fp32, as mriadv's own evaluation
                        pred = reconstruct(m, runtime, batch).float()
                outs[name] = denormalize(pred, mean, std)
            for i, (fname, s) in enumerate(zip(batch.fnames, batch.slice_nums.tolist())):
                vol = per_volume.setdefault(fname, {k: [] for k in outs} | {"slice": []})
                vol["slice"].append(s)
                for k, v in outs.items():
                    vol[k].append(v[i, 0].cpu().numpy().astype(np.float32))
    results, volume_nmse = {}, {}
    for name in models:
        metrics = Metrics(METRIC_FUNCS)
        volume_nmse[name] = {}
        for fname in sorted(per_volume):
            vol = per_volume[fname]
            order = np.argsort(vol["slice"])
            target = np.stack([vol["target"][j] for j in order])
            recons = np.stack([vol[name][j] for j in order])
            metrics.push(target, recons)
            volume_nmse[name][fname] = float(METRIC_FUNCS["NMSE"](target, recons))
        results[name] = {k: float(np.asarray(v).item()) for k, v in metrics.means().items()}
    return results, volume_nmse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES), help="recipe and data (default: demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of each model (default: the profile's epochs x steps per epoch)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="fastMRI-format root (default: the profile's synthetic)"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where synthetic data is kept")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (default: 1; 0: torch's default)"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (default: 3)")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="training seed(s); with several, both models are trained once per seed and the ratio's interval "
        "covers seeds and volumes (default: 0)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field of the project's model (e.g. residual=true); fastMRI's recipe is fixed",
    )
    args = parser.parse_args(argv)
    try:
        args.sets = parse_sets(args.set)
    except ConfigError as exc:
        parser.error(str(exc))
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fastmri = import_fastmri()
    profile = get_profile(args.profile)
    folder = args.data if args.data is not None else synthetic_data(profile, args.results)
    runs = [one_seed(args, profile, folder, seed, fastmri) for seed in args.seed]
    tables = {k: np.array([[r["volume_nmse"][k][v] for v in sorted(r["volume_nmse"][k])] for r in runs]) for k in NAMES}
    iv = ratio_interval(tables["mriadv"], tables["fastMRI"])
    nmse_ratio = iv.mean
    paired = statistics.median(r["time_ratio"] for r in runs)
    over = f"{len(runs)} seeds x {iv.volumes} volumes" if len(runs) > 1 else f"{iv.volumes} volumes"
    if len(runs) > 1:
        print(f"over the seeds {args.seed}: mean NMSE " + ", ".join(f"{k} {tables[k].mean():.4f}" for k in NAMES))
        print("  per seed, mriadv / fastMRI: " + ", ".join(f"{r['nmse_ratio']:.3f}" for r in runs))
    print(
        f"NMSE ratio mriadv / fastMRI {nmse_ratio:.3f} ± {iv.half:.3f} (95 % interval over {over}, paired, "
        f"{iv.df:.1f} degrees of freedom)"
    )
    print(
        f"target: mriadv NMSE <= {TARGET_NMSE_RATIO:g}x fastMRI's at equal steps: "
        f"{'met' if nmse_ratio <= TARGET_NMSE_RATIO else 'NOT met'}"
        + (" (within the interval)" if abs(nmse_ratio - TARGET_NMSE_RATIO) <= iv.half else "")
        + f"; step time <= {TARGET_TIME_RATIO:g}x at equal size: {'met' if paired <= TARGET_TIME_RATIO else 'NOT met'}"
        f" (paired {paired:.3f})"
    )
    print(f"ratios: nmse {nmse_ratio:.3f} step_time {paired:.3f}")
    return 0


def one_seed(args: argparse.Namespace, profile, folder: Path, seed: int, fastmri) -> dict:
    """Both models trained on the same batches under ``seed`` and evaluated with fastMRI's functions;
    prints the set-up, the losses per epoch and the scores; returns the per-volume NMSE and the ratios."""
    Unet, Metrics, METRIC_FUNCS, UnetDataTransform = fastmri
    # standard training; every validation volume evaluated (no selection happens here); no per-epoch extras
    cfg = profile.config(
        **{
            "epsilon": 0.0,
            "data": str(folder),
            "device": args.device,
            "threads": args.threads or None,
            "seed": seed,
            "report_fraction": 0.0,
            "train_eval_volumes": 0,
            **args.sets,
        }
    )
    rt = Runtime.resolve(cfg.device, cfg.precision, cfg.threads)
    seed_everything(cfg.seed)
    data = build_data(cfg, rt)
    clock = data.clock(cfg)  # the profile's updates on this folder, as fit() makes them (demo: 6 x 120)
    steps = args.steps if args.steps is not None else clock.total_steps
    if args.warmup >= steps:
        raise SystemExit(f"--warmup {args.warmup} must be below the steps ({steps})")

    seed_everything(cfg.seed)
    ours = Trainer(cfg, rt)
    ours.total_steps = steps  # the cosine schedule spans this run, as fit() spans its epochs
    torch.manual_seed(cfg.seed)
    theirs = FastMRIRecipe(
        rt.prepare_model(Unet(1, 1, chans=cfg.unet_chans, num_pool_layers=cfg.unet_pools, drop_prob=0.0)), rt
    )
    describe(cfg, rt, data, folder, steps, clock.steps_per_epoch, ours, theirs, args.profile, UnetDataTransform)
    times, elapsed, share = train_both(ours, theirs, data, rt, cfg, steps, clock.steps_per_epoch, args.warmup)

    t_eval = time.perf_counter()
    models = {"zero-filled": None, "fastMRI": theirs.unet, "mriadv": ours.recon}
    scores, volume_nmse = fastmri_metrics(models, data, rt, Metrics, METRIC_FUNCS)
    check = mriadv_evaluate(ours.recon, data.loader(data.val, shuffle=False), ours.loss_fn, rt, clamp=cfg.clamp)
    t_eval = time.perf_counter() - t_eval

    step_s = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["mriadv"], times["fastMRI"]))
    print(
        f"seed {seed}: trained in {elapsed:.0f}s, evaluated in {t_eval:.0f}s; step times: median of "
        f"{len(times['mriadv'])} steps after {args.warmup} warm-up steps"
    )
    if share is not None:
        cpus = share * (torch.multiprocessing.cpu_count() or 1)
        print(
            f"machine: other processes kept {cpus:.2f} of {torch.multiprocessing.cpu_count()} CPUs busy "
            f"({100 * share:.0f}%) during training"
            + ("; timings are noisy (paired ratios compensate in part)" if share > 0.1 else "")
        )
    print(f"fastMRI evaluation ({len(data.val.volumes)} validation volumes, de-normalised, maxval = volume max):")
    print(f"  {'':14s} {'NMSE':>8s} {'PSNR':>7s} {'SSIM':>7s} {'s/step':>8s}")
    for name in NAMES:
        s = scores[name]
        t = f"{step_s[name]:8.3f}" if name in step_s else f"{'-':>8s}"
        print(f"  {name:14s} {s['NMSE']:8.4f} {s['PSNR']:7.2f} {s['SSIM']:7.4f} {t}")
    print(
        f"cross-check, the project's evaluate() of the mriadv model: NMSE {check.nmse:.4f} PSNR {check.psnr:.2f} "
        f"SSIM {check.ssim:.4f}"
    )
    a, b = (np.array([[volume_nmse[k][v] for v in sorted(volume_nmse[k])]]) for k in ("mriadv", "fastMRI"))
    iv = ratio_interval(a, b)
    ratio = iv.mean
    print(
        f"seed {seed}: NMSE ratio mriadv / fastMRI {ratio:.3f} ± {iv.half:.3f} (95 % interval over "
        f"{iv.volumes} volumes, paired); step time {step_s['mriadv'] / step_s['fastMRI']:.3f} (ratio of medians), "
        f"{paired:.3f} (paired)"
    )
    return {"volume_nmse": volume_nmse, "nmse_ratio": ratio, "time_ratio": paired}


def describe(cfg, rt, data, folder, steps, steps_per_epoch, ours, theirs, profile_name, UnetDataTransform) -> None:
    """The set-up in five lines: the data, the steps and device, both recipes, the transforms' parity."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    where = f"{rt.device}" + (
        f" ({torch.cuda.get_device_name(rt.device)})"
        if rt.is_cuda
        else f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    )
    print(
        f"data {folder}: {len(data.train)} training slices ({steps_per_epoch} steps of {cfg.batch_size} per "
        f"epoch), {len(data.val.volumes)} validation volumes ({len(data.val)} slices), crop {cfg.crop_size}, "
        f"{cfg.mask_type} mask {cfg.acceleration:g}x / centre {cfg.center_fraction:g}"
    )
    print(
        f"steps {steps} ({steps / steps_per_epoch:.2f} epochs) for each model, same batches; device {where}, "
        f"precision {rt.dtype or 'fp32'}, seed {cfg.seed}"
    )
    print(
        f"fastMRI: Unet {cfg.unet_chans}/{cfg.unet_pools} ({count(theirs.unet) / 1e6:.3f} M params), L1, RMSprop "
        f"lr {FASTMRI_LR:g}, weight decay {FASTMRI_WEIGHT_DECAY:g}, StepLR {FASTMRI_LR_STEP_EPOCHS} epochs x "
        f"{FASTMRI_LR_GAMMA:g}"
    )
    print(
        f"mriadv:  UNet {cfg.unet_chans}/{cfg.unet_pools} ({count(ours.recon) / 1e6:.3f} M params, "
        f"{cfg.unet_activation}, {cfg.unet_pooling} pool, {cfg.unet_norm} norm), profile {profile_name}: "
        f"{cfg.loss.upper()}, AdamW lr {cfg.lr_recon:g}, weight decay {cfg.weight_decay:g}, {cfg.lr_schedule} schedule"
        + (", residual (x + f(x))" if cfg.residual else "")
    )
    d_input, d_target, clipped = transform_parity(data, cfg, UnetDataTransform)
    print(
        f"fastMRI UnetDataTransform vs the project's transform, same slice and mask: max |input diff| "
        f"{d_input:.2e}, max |target diff| {d_target:.2e} after clamping ours to 6 (fastMRI clamps the target: "
        f"{100 * clipped:.3f}% of its pixels; both models here train on the unclamped target)"
    )


def train_both(ours, theirs, data, rt, cfg, steps, steps_per_epoch, warmup):
    """Both models on ``fit``'s own training batches, one step each per batch, alternating which goes
    first; returns the step times after ``warmup`` (seconds, per model), the wall time and the share of
    the machine other processes used meanwhile."""
    times: dict[str, list[float]] = {"mriadv": [], "fastMRI": []}
    losses: dict[str, list[float]] = {"mriadv": [], "fastMRI": []}

    def timed(name: str, batch: Batch, record: bool) -> None:
        sync(rt.device)
        t0 = time.perf_counter()
        if name == "mriadv":
            loss = ours.train_step(batch)["recon_loss"]
        else:
            loss = theirs.train_step(batch)
        sync(rt.device)
        if record:
            times[name].append(time.perf_counter() - t0)
        losses[name].append(float(loss))

    print(
        f"{'epoch':>5s} {'step':>5s}  {'mriadv loss (' + cfg.loss + ')':>18s}  {'fastMRI loss (l1)':>17s}  "
        f"{'s/step mriadv':>13s}  {'fastMRI':>8s}"
    )
    t_start, usage = time.perf_counter(), cpu_seconds()
    step, epoch = 0, 0
    while step < steps:
        for batch in data.train_loader(epoch, steps_per_epoch):  # fit()'s batches: cycled or sampled
            if step >= steps:
                break
            batch = batch.to(rt.device)
            order = ("mriadv", "fastMRI") if step % 2 == 0 else ("fastMRI", "mriadv")
            for name in order:
                timed(name, batch, record=step >= warmup)
            step += 1
        theirs.end_epoch()
        epoch += 1
        n = steps_per_epoch
        med = {k: f"{statistics.median(v[-n:]):.3f}" if v else "-" for k, v in times.items()}
        print(
            f"{epoch:5d} {step:5d}  {statistics.fmean(losses['mriadv'][-n:]):18.4f}  "
            f"{statistics.fmean(losses['fastMRI'][-n:]):17.4f}  {med['mriadv']:>13s}  {med['fastMRI']:>8s}",
            flush=True,
        )
    elapsed = time.perf_counter() - t_start
    return times, elapsed, others_share(usage, elapsed)


if __name__ == "__main__":
    raise SystemExit(main())
