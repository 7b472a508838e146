"""What an adversarial training step costs relative to a standard one.

Builds two :class:`mriadv.trainer.Trainer` s from a profile's config: a standard one (``epsilon=0``,
no generator) and an adversarial one (the profile's epsilon), feeds both the same random batch of the
profile's batch size and crop, and times, in rounds so that every operation is measured in the same
run under the same conditions (medians over the rounds):

* ``standard``: ``Trainer.train_step`` with epsilon 0 (f forward + full backward on B);
* ``adversarial``: ``Trainer.train_step`` with the profile's epsilon;
* ``generator_step``, ``reconstructor_step``: the two named steps of the adversarial trainer alone;
* ``generator_forward``: ``Trainer.perturbation(batch, z)`` under ``no_grad``;
* every other defence's ``train_step`` (``--adversaries``): PGD training (k steps: k input-gradient
  passes plus the 2B update, floor ~k + 2.2 standard steps), jittering (~2, the 2B update), the
  conditioned generator G(x, z) (target <= 3.5), and on request TRADES and randomised smoothing (~1: one
  noisy B update; its price is at evaluation, ``smooth_samples`` passes per prediction, not timed here);
* ``--arch unrolled``: the unrolled network (:mod:`mriadv.models.unrolled`, the config's cascades and
  denoiser pools, its width chosen for the parameter count nearest the U-Net's) beside the U-Net: its
  standard step and its k-space PGD training step (``--adv-steps``), and the U-Net's k-space PGD step;
  the batch then carries random measurements on the whole k-space grid of the crop (fastMRI knee
  proportions, :func:`mriadv.data.synthetic.geometry`) under the profile's mask;
* ``--channels-last both`` (the default for ``--profile paper``): the standard and adversarial steps
  once more in the other memory format, channels_last against NCHW in the same rounds. channels_last is
  the CUDA default (:class:`mriadv.runtime.Runtime`), but every InstanceNorm returns NCHW, so each
  following convolution may pay layout copies: this row is the measurement that decides it.

Counting one f forward on B as a unit: a full backward is ~2 units and an input-only backward ~1, so
standard training is ~3 units, the generator step ~2 (forward + input-only backward through the
frozen f), the reconstructor step ~6 (forward and full backward on the 2B batch): the ratio's floor
is 8/3 = 2.67 plus the generator's own forward/backward. ``--breakdown`` also times these units.

The ``page faults`` column counts this process's minor page faults per operation. On CPU with glibc,
the 2B batch of the reconstructor step has activations large enough that the allocator returns them
to the kernel after each step and the next step faults fresh, zeroed pages back in (tens of thousands
of faults, ~0.1 s of system time per demo step) while the B-sized passes reuse their memory; that
alone lifts the demo ratio from ~2.85 to ~3.05. ``MALLOC_MMAP_THRESHOLD_=67108864
MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment removes it. Timings are only comparable on an
otherwise idle machine: a warning is printed when other processes used the CPU meanwhile.

Usage::

    python benchmarks/step_cost.py                  # demo profile, CPU here, CUDA when present
    python benchmarks/step_cost.py --profile paper --steps 50
    python benchmarks/step_cost.py --threads 2 --breakdown
    python benchmarks/step_cost.py --channels-last both   # NCHW and channels_last, on CPU too
    python benchmarks/step_cost.py --arch unrolled         # the unrolled network beside the U-Net

The last line is ``ratio: <adversarial / standard>``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mriadv.config import PROFILES, TrainConfig, get_profile  # noqa: E402
from mriadv.data.masks import make_mask_func  # noqa: E402
from mriadv.data.synthetic import geometry  # noqa: E402
from mriadv.data.transforms import Batch  # noqa: E402
from mriadv.runtime import Runtime, seed_everything  # noqa: E402
from mriadv.models.utils import frozen  # noqa: E402
from mriadv.trainer import Trainer, build_reconstructor  # noqa: E402
from _machine import cpu_seconds, others_share  # noqa: E402

TARGET_RATIO = 2.9  # the target; the floor is ~2.67 plus the generator's own cost


def random_batch(cfg: TrainConfig, device: torch.device, seed: int = 0, kspace: bool = False) -> Batch:
    """A batch of the config's batch size and crop: normalised image and a target near it; ``kspace``:
    also random measurements ``(B, 2c, W)`` on the k-space grid of crop ``c`` (fastMRI knee proportions)
    under the config's mask."""
    g = torch.Generator().manual_seed(seed)
    b, c = cfg.batch_size, cfg.crop_size
    target = torch.randn(b, 1, c, c, generator=g)
    image = target + 0.3 * torch.randn(b, 1, c, c, generator=g)
    k = mask = None
    if kspace:
        geom = geometry(c)
        func = make_mask_func(cfg.mask_type, cfg.center_fraction, cfg.acceleration)
        mask = torch.stack([torch.from_numpy(func(geom.width, seed + i)) for i in range(b)])
        k = torch.randn(b, geom.height, geom.width, generator=g, dtype=torch.complex64) * mask[:, None, :]
    return Batch(
        image=image,
        target=target,
        mean=torch.zeros(b),
        std=torch.ones(b),
        max_value=torch.full((b,), 6.0),
        fnames=[f"random{i:03d}.h5" for i in range(b)],
        slice_nums=torch.arange(b),
        kspace=k,
        mask=mask,
    ).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    ops: dict[str, Callable[[], object]], device: torch.device, warmup: int, steps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each op, the ops run one after another in each of ``warmup + steps`` rounds,
    and the median number of minor page faults of this process during each op.

    Page faults are reported because on CPU they are a hidden cost: when glibc's allocator hands a
    large freed buffer back to the kernel, the next step touches fresh pages that the kernel must map
    and zero (system time that shows up in the step time but in no operator's profile).
    """
    times: dict[str, list[float]] = {name: [] for name in ops}
    faults: dict[str, list[int]] = {name: [] for name in ops}
    for r in range(warmup + steps):
        for name, op in ops.items():
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            op()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return (
        {name: statistics.median(ts) for name, ts in times.items()},
        {name: statistics.median(fs) for name, fs in faults.items()},
    )


def unit_ops(trainer: Trainer, batch: Batch) -> dict[str, Callable[[], object]]:
    """The reconstructor's forward/backward units on this batch, and the generator's (``--breakdown``)."""
    f, loss_fn, rt = trainer.recon, trainer.loss_fn, trainer.runtime
    n = len(batch)
    double = torch.cat([batch.image, batch.image])
    double_target = torch.cat([batch.target, batch.target])
    z = trainer.draw_latent(n)

    def fwd() -> None:
        with torch.no_grad(), rt.autocast():
            f(rt.image(batch.image))

    def fwd_bwd(x: torch.Tensor, t: torch.Tensor) -> None:
        with rt.autocast():
            out = f(rt.image(x)).float()
        loss_fn(out, t).backward()

    def fwd_input_bwd() -> None:
        x = batch.image.clone().requires_grad_(True)
        with frozen(f):
            with rt.autocast():
                out = f(rt.image(x)).float()
            loss_fn(out, batch.target).backward()

    def loss_only() -> None:
        x = batch.image.clone().requires_grad_(True)
        loss_fn(x, batch.target).backward()

    def gen_fwd_bwd() -> None:
        delta = trainer.perturbation(batch, z)
        delta.square().sum().backward()

    ops = {
        "f fwd (B, no_grad)": fwd,
        "f fwd + full bwd (B)": lambda: fwd_bwd(batch.image, batch.target),
        "f fwd + full bwd (2B)": lambda: fwd_bwd(double, double_target),
        "f fwd + input-only bwd (B)": fwd_input_bwd,
        "loss fwd + bwd (B)": loss_only,
    }
    if trainer.generator is not None:
        ops["G fwd + bwd"] = gen_fwd_bwd
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--precision", default="auto", help="'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', 'bf16'")
    parser.add_argument("--breakdown", action="store_true", help="also time the forward/backward units")
    parser.add_argument(
        "--adversaries",
        nargs="*",
        default=["pgd", "noise", "conditional"],
        choices=["pgd", "noise", "conditional", "trades", "smoothing"],
        help="other defences to time beside the seed's generator (default: all but trades and smoothing)",
    )
    parser.add_argument("--adv-steps", type=int, default=3, help="PGD steps of adversarial PGD training (default 3)")
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off", "both"),
        default=None,
        help="memory format: auto (the runtime's: channels_last on CUDA only), on, off, or both (the standard and "
        "adversarial steps also in the other format; default for --profile paper, else auto)",
    )
    parser.add_argument(
        "--arch",
        choices=("unet", "unrolled"),
        default="unet",
        help="unrolled: also time the unrolled network at about the U-Net's parameter count (default: unet only)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    profile = get_profile(args.profile)
    cfg_adv = profile.config(device=args.device, precision=args.precision, threads=args.threads)
    cfg_std = profile.config(device=args.device, precision=args.precision, threads=args.threads, epsilon=0.0)
    rt = Runtime.resolve(cfg_adv.device, cfg_adv.precision, cfg_adv.threads)
    layouts = args.channels_last or ("both" if args.profile == "paper" else "auto")
    if layouts in ("on", "off"):
        rt = replace(rt, channels_last=layouts == "on")
    seed_everything(0)
    standard, adversarial = Trainer(cfg_std, rt), Trainer(cfg_adv, rt)
    batch = random_batch(cfg_adv, rt.device, kspace=args.arch == "unrolled")
    n_recon = sum(p.numel() for p in adversarial.recon.parameters())
    n_gen = sum(p.numel() for p in adversarial.generator.parameters())
    where = f"{rt.device}" + (
        f" ({torch.cuda.get_device_name(rt.device)})" if rt.is_cuda else f", {torch.get_num_threads()} threads"
    )
    print(
        f"profile {args.profile}: batch {cfg_adv.batch_size}, crop {cfg_adv.crop_size}, U-Net "
        f"{cfg_adv.unet_chans}/{cfg_adv.unet_pools} ({n_recon / 1e6:.2f} M params), generator "
        f"{cfg_adv.gen_chans} ({n_gen / 1e6:.2f} M params), loss {cfg_adv.loss}, epsilon {cfg_adv.epsilon:g}; "
        f"device {where}, precision {rt.dtype or 'fp32'}, {layout_name(rt)}"
    )

    # The isolated steps get the inputs that train_step would give them (z, and delta = G(z) detached).
    adversarial.recon.train()
    adversarial.generator.train()
    z = adversarial.draw_latent(len(batch))
    with torch.no_grad():
        delta = adversarial.perturbation(batch, z)

    def gen_forward() -> None:
        with torch.no_grad():
            adversarial.perturbation(batch, z)

    ops: dict[str, Callable[[], object]] = {
        "standard step": lambda: standard.train_step(batch),
        "adversarial step": lambda: adversarial.train_step(batch),
        "generator_step": lambda: adversarial.generator_step(batch, z),
        "reconstructor_step (adversarial)": lambda: adversarial.reconstructor_step(batch, delta),
        "generator forward (no_grad)": gen_forward,
    }
    other_layout: dict[str, str] = {}  # the steps in the other memory format (--channels-last both)
    if layouts == "both":
        rt_other = replace(rt, channels_last=not rt.uses_channels_last)
        seed_everything(0)
        pair = Trainer(cfg_std, rt_other), Trainer(cfg_adv, rt_other)
        for step, trainer in zip(("standard step", "adversarial step"), pair):
            name = f"{step} [{layout_name(rt_other)}]"
            ops[name] = partial(trainer.train_step, batch)
            other_layout[step] = name
    others: dict[str, str] = {}  # op name -> adversary kind (issue 10: every defence's step cost)
    for kind in args.adversaries:
        trainer = Trainer(
            profile.config(
                device=args.device,
                precision=args.precision,
                threads=args.threads,
                adversary=kind,
                adv_steps=args.adv_steps,
            ),
            rt,
        )
        name = f"{kind} step" + (f" (k={args.adv_steps})" if kind in ("pgd", "trades") else "")
        ops[name] = (lambda tr: lambda: tr.train_step(batch))(trainer)
        others[name] = kind
    arch_ops: dict[str, str] = {}
    if args.arch == "unrolled":
        arch_ops, n_unrolled, line = unrolled_ops(ops, profile.config, args, rt, batch, n_recon)
        print(line)
    if args.breakdown:
        ops |= unit_ops(adversarial, batch)
    t0 = time.perf_counter()
    usage = cpu_seconds()
    seconds, faults = time_rounds(ops, rt.device, args.warmup, args.steps)
    ms = {name: 1e3 * s for name, s in seconds.items()}
    elapsed = time.perf_counter() - t0

    unit = ms["standard step"] / 3  # one f forward on B, if standard = forward + full backward = 3 units
    width = max(len(name) for name in ms)
    print(f"median of {args.steps} rounds after {args.warmup} warm-up rounds ({elapsed:.0f}s in all):")
    share = others_share(usage, elapsed)
    if share is not None and share > 0.1:
        # intra-op threads that share their cores with other processes wait on each other at every
        # barrier: steps get many times slower and the timings are not comparable between runs
        print(
            f"WARNING: other processes used {100 * share:.0f}% of the machine's CPU during the timing; "
            f"rerun on a quiet machine (or with --threads 1)"
        )
    print(f"{'':{width}s}  {'ms':>9s}  {'x standard':>10s}  {'page faults':>11s}")
    for name, value in ms.items():
        print(f"{name:{width}s}  {value:9.2f}  {value / ms['standard step']:10.3f}  {faults[name]:11.0f}")
    ratio = ms["adversarial step"] / ms["standard step"]
    parts = ms["generator_step"] + ms["generator forward (no_grad)"] + ms["reconstructor_step (adversarial)"]
    print(
        f"generator_step + generator forward + reconstructor_step = {parts:.2f} ms "
        f"(adversarial step {ms['adversarial step']:.2f} ms)"
    )
    if args.breakdown:
        fwd = ms["f fwd (B, no_grad)"]
        floor = (ms["f fwd + input-only bwd (B)"] + ms["f fwd + full bwd (2B)"]) / ms["f fwd + full bwd (B)"]
        print(
            f"units: f forward (B) {fwd:.2f} ms = {fwd / unit:.2f} of standard/3; measured floor "
            f"(f fwd+input bwd on B + f fwd+full bwd on 2B) / (f fwd+full bwd on B) = {floor:.3f}"
        )
    if other_layout:
        cells = []
        for step, other in other_layout.items():
            t_on, t_off = (ms[step], ms[other]) if rt.uses_channels_last else (ms[other], ms[step])
            cells.append(f"{step.split()[0]} {t_on:.2f} / {t_off:.2f} ms ({t_on / t_off:.3f}x)")
        print(f"channels_last on / off: {'; '.join(cells)}")
    for name, kind in others.items():
        r = ms[name] / ms["standard step"]
        target = {"conditional": 3.5, "pgd": args.adv_steps + 2.2}.get(kind)
        verdict = f" (target <= {target:g}: {'met' if r <= target else 'NOT met'})" if target else ""
        print(f"step ratio {kind}: {r:.3f}{verdict}")
    if arch_ops:
        std, pgd_u, pgd_unrolled = (ms[arch_ops[k]] for k in ("standard", "pgd unet", "pgd unrolled"))
        print(
            f"unrolled vs U-Net ({n_unrolled / 1e6:.3f} vs {n_recon / 1e6:.3f} M params): standard step "
            f"{std:.2f} vs {ms['standard step']:.2f} ms ({std / ms['standard step']:.2f}x); k-space PGD step "
            f"(k={args.adv_steps}) {pgd_unrolled:.2f} vs {pgd_u:.2f} ms ({pgd_unrolled / pgd_u:.2f}x)"
        )
    print(
        f"target: ratio <= {TARGET_RATIO} (floor ~2.67 + the generator's cost): "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}"
    )
    print(f"ratio: {ratio:.3f}")
    return 0


def unrolled_ops(
    ops: dict[str, Callable[[], object]],
    config: Callable[..., TrainConfig],
    args: argparse.Namespace,
    rt: Runtime,
    batch: Batch,
    n_unet: int,
) -> tuple[dict[str, str], int, str]:
    """Add the unrolled network's standard and k-space PGD training steps and the U-Net's k-space PGD
    step to ``ops``; the unrolled width is the one whose parameter count is nearest ``n_unet``. Returns
    the op names by role, the unrolled network's parameter count and a line describing it."""
    run = dict(device=args.device, precision=args.precision, threads=args.threads, adv_steps=args.adv_steps)
    base = config(**run, arch="unrolled", perturbation="kspace", attacks=("pgd_kspace",))

    def count(chans: int) -> int:
        return sum(p.numel() for p in build_reconstructor(replace(base, unroll_chans=chans)).parameters())

    chans = 1  # the count grows with the width: the first one at or above the U-Net's, or the one before
    while count(chans) < n_unet:
        chans += 1
    chans = chans - 1 if chans > 1 and n_unet - count(chans - 1) < count(chans) - n_unet else chans
    unrolled = replace(base, unroll_chans=chans)
    trainers = {
        "standard": Trainer(replace(unrolled, epsilon=0.0), rt),
        "pgd unrolled": Trainer(replace(unrolled, adversary="pgd"), rt),
        "pgd unet": Trainer(config(**run, perturbation="kspace", adversary="pgd"), rt),
    }
    names = {
        "standard": "unrolled standard step",
        "pgd unrolled": f"unrolled pgd_kspace step (k={args.adv_steps})",
        "pgd unet": f"U-Net pgd_kspace step (k={args.adv_steps})",
    }
    for role, trainer in trainers.items():
        ops[names[role]] = partial(trainer.train_step, batch)
    line = (
        f"unrolled: {unrolled.unroll_cascades} cascades of a {chans}/{unrolled.unroll_pools} U-Net denoiser "
        f"({'shared' if unrolled.unroll_share else 'one each'}, {count(chans) / 1e6:.3f} M params) on the "
        f"{tuple(batch.kspace.shape[-2:])} k-space grid"  # type: ignore[union-attr]
    )
    return names, count(chans), line


def layout_name(rt: Runtime) -> str:
    return "channels_last" if rt.uses_channels_last else "NCHW"


if __name__ == "__main__":
    raise SystemExit(main())
