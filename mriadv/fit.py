"""The training loop: :func:`fit` runs a :class:`~mriadv.trainer.Trainer` over epochs, validates,
evaluates robustness, stops early, checkpoints every epoch (:mod:`mriadv.checkpoint`) and resumes
from a checkpoint, reporting each epoch through a callback of plain numbers (an
:class:`~mriadv.records.EpochRecord`). At the last epoch the best epoch's networks are evaluated on
the held-out report split (:func:`report_evaluation`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mriadv.atomic import atomic_write
from mriadv.attacks import PGDAttack
from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, make_checkpoint, save_checkpoint
from mriadv.checkpoint import RESUMABLE_CHANGES, check_resume_config, init_weights
from mriadv.config import TrainConfig
from mriadv.data.files import SliceDataset
from mriadv.data.loading import Data, build_data, preview_batch
from mriadv.evaluate import RobustRow, evaluate, preview, robustness
from mriadv.instabilities import (
    SWEEP_ACCELERATIONS,
    FeatureSearch,
    FeatureSpec,
    NoTissue,
    feature_recovery,
    sampling_sweep,
)
from mriadv.protocols import get_protocol
from mriadv.records import EpochRecord, FitResult, clean_row, robust_rows
from mriadv.runtime import Runtime, seed_everything
from mriadv.trainer import NonFiniteLoss, Trainer, eval_mode
from mriadv.verdict import compare

PREVIEW_NAME = "preview.npz"


@dataclass
class EarlyStopping:
    """Early stopping on the selection split's loss: the best loss so far, its epoch (1-based; 0:
    none yet) and the epochs since it last improved. Saved in the checkpoint (``asdict``)."""

    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> bool:
        """Count ``epoch``'s validation loss; True when it is a new best (strictly lower)."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether ``patience`` epochs in a row brought no improvement."""
        return self.bad_epochs >= patience


def fit(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    on_epoch: Callable[[EpochRecord, Path | None], None] | None = None,
    resume_from: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> FitResult:
    """Train one model with Algorithm 1/2 and return its history.

    Each epoch: train; evaluate the selection split (early stopping and ``best.pt`` choose by its
    loss); attack a fixed subset of selection slices (every ``robust_every`` epochs, at every new
    best and at the last epoch). At the last epoch the best epoch's networks are evaluated on the
    held-out report split (:func:`report_evaluation`). A non-finite training or validation loss ends
    the run with status ``nan``, written to the checkpoint and reported as a last record.

    Args:
        cfg: the run's config (``cfg.data`` must point at a data root).
        out_dir: where ``checkpoint.pt`` (every epoch, everything needed to resume) and ``best.pt``
            (networks of the best selection epoch) are written; None: no files.
        on_epoch: called after each epoch with its record and the checkpoint path.
        resume_from: a checkpoint file or folder; training continues after its last epoch, and on
            CPU reproduces the uninterrupted run exactly. Without it, ``cfg.init_from`` (fine-tuning)
            loads a trained reconstructor before the first step; a resumed run has its own weights.
        log: progress lines (None: silent).
    """
    cfg = cfg.validate()
    # fine-tuning: a missing file or another reconstructor is refused before any data is read
    init = init_weights(cfg.init_from, cfg.to_dict()) if cfg.init_from is not None and resume_from is None else None
    runtime = Runtime.resolve(cfg.device, cfg.precision, cfg.threads, cfg.deterministic)
    say = log or (lambda _msg: None)
    seed_everything(cfg.seed)
    data = build_data(cfg, runtime)
    trainer = Trainer(cfg, runtime, kspace_shape=data.kspace_shape())
    clock = data.clock(cfg)
    trainer.total_steps = clock.total_steps  # the cosine schedule follows the updates
    say(clock.describe())
    say(data.split_description())
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME if out else None
    best_path = out / BEST_NAME if out else None

    history: list[EpochRecord] = []
    early, start = EarlyStopping(), 0
    best_nets: dict[str, Any] | None = None
    init_source = ""  # the file the reconstructor started from (fine-tuning), in every record
    if init is not None:
        source, weights, from_epoch = init
        trainer.recon.load_state_dict(weights)
        init_source = str(source)
        say(f"fine-tuning: the reconstructor starts from {source} (epoch {from_epoch} of its run)")
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_resume_config(state["config"], cfg)
        trainer.load_networks(state["networks"])
        trainer.load_state_dict(state["trainer"])
        history = [EpochRecord.from_dict(r) for r in state["history"]]
        early = EarlyStopping(**state["early_stopping"])
        best_nets = state["best"]
        start = state["epoch"]
        init_source = history[-1].init_from if history else ""  # its weights, not init_from's, go on
        torch.set_rng_state(state["torch_rng"])
        if state["status"] in ("early_stopped", "nan"):
            say(f"checkpoint is final ({state['status']}); nothing to resume")
            return FitResult(state["status"], "resumed a finished run", history, early.best_epoch, ckpt_path, best_path)
        say(f"resuming after epoch {start}")

    def save(record: EpochRecord, epoch: int) -> None:
        if out is None:
            return
        stopping = asdict(early)
        if record.is_best:
            save_checkpoint(best_path, make_checkpoint(cfg.to_dict(), epoch, record.status, best_nets, stopping))
        save_checkpoint(
            ckpt_path,
            make_checkpoint(
                cfg.to_dict(),
                epoch,
                record.status,
                trainer.networks(copy=False),
                stopping,
                trainer=trainer.state_dict(),
                torch_rng=torch.get_rng_state(),
                best=best_nets,
                history=[asdict(r) for r in history],
            ),
        )

    def stop_on_nan(epoch: int, message: str, **known: Any) -> FitResult:
        say(f"stopped: {message}")
        record = EpochRecord.stopped(epoch, cfg, message, early.best_epoch, early.best_loss, **known)
        record.init_from = init_source
        history.append(record)
        save(record, epoch)
        if on_epoch is not None:
            on_epoch(record, ckpt_path)
        return FitResult("nan", message, history, early.best_epoch, ckpt_path, best_path)

    status, message = "completed", f"ran {cfg.max_epochs} epochs"
    for epoch in range(start, cfg.max_epochs):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = slices = 0
        try:
            for batch in data.train_loader(epoch, clock.steps_per_epoch):
                for k, v in trainer.train_step(batch.to(runtime.device, non_blocking=True)).items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
                slices += len(batch)
        except NonFiniteLoss as exc:
            return stop_on_nan(epoch + 1, f"epoch {epoch + 1}, step {steps + 1}: {exc}; training stopped", steps=steps)
        t_train = time.perf_counter() - t0

        t1 = time.perf_counter()
        val = evaluate(trainer.recon, data.loader(data.val, shuffle=False), trainer.loss_fn, runtime, clamp=cfg.clamp)
        if not math.isfinite(val.loss):
            return stop_on_nan(
                epoch + 1,
                f"epoch {epoch + 1}: validation loss is {val.loss}; training stopped",
                steps=steps,
                train_loss=_mean(sums, "recon_loss", steps),
                val_loss=val.loss,
                val_nmse=val.nmse,
                val_psnr=val.psnr,
                val_ssim=val.ssim,
            )
        tr = (
            evaluate(
                trainer.recon, data.loader(data.train_eval, shuffle=False), trainer.loss_fn, runtime, clamp=cfg.clamp
            )
            if data.train_eval is not None
            else None
        )
        t_eval = time.perf_counter() - t1

        improved = early.update(val.loss, epoch + 1)
        if improved:
            best_nets = trainer.networks()
        stop = early.exhausted(cfg.patience)
        last = stop or epoch + 1 == cfg.max_epochs

        t2 = time.perf_counter()
        rows: list[RobustRow] = []
        feats = None
        if (epoch + 1) % cfg.robust_every == 0 or improved or last:
            robust_loader = data.loader(data.robust_val or data.val, shuffle=False)
            robust_clean = evaluate(trainer.recon, robust_loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
            rows = robustness(
                trainer.recon, robust_loader, trainer.loss_fn, runtime, trainer.attacks(), robust_clean, cfg.clamp
            )
            feats = _features(trainer, data.robust_val or data.val, runtime) if cfg.instabilities else None
        t_rob = time.perf_counter() - t2

        t3 = time.perf_counter()
        report = None
        if last and best_nets is not None:
            with trainer.using(best_nets):
                report = {**report_evaluation(trainer, data, runtime), "epoch": early.best_epoch}
        t_report = time.perf_counter() - t3

        record = EpochRecord(
            epoch=epoch + 1,
            status="early_stopped" if stop else ("completed" if last else "running"),
            epsilon=cfg.epsilon,
            epsilon_rms=cfg.epsilon_rms,
            epsilon_ref=cfg.epsilon_ref,
            train_loss=_mean(sums, "recon_loss", steps),
            train_clean_loss=_mean(sums, "clean_loss", steps),
            train_pert_loss=_mean(sums, "pert_loss", steps),
            gen_objective=_mean(sums, "gen_objective", steps),
            hinge=_mean(sums, "hinge", steps),
            delta_sq=_mean(sums, "delta_sq", steps),
            steps=steps,
            val_loss=val.loss,
            val_nmse=val.nmse,
            val_psnr=val.psnr,
            val_ssim=val.ssim,
            val_seed_nmse=val.seed_nmse,
            val_seed_psnr=val.seed_psnr,
            val_seed_ssim=val.seed_ssim,
            train_nmse=tr.nmse if tr else float("nan"),
            train_psnr=tr.psnr if tr else float("nan"),
            train_ssim=tr.ssim if tr else float("nan"),
            train_seed_nmse=tr.seed_nmse if tr else float("nan"),
            train_seed_psnr=tr.seed_psnr if tr else float("nan"),
            train_seed_ssim=tr.seed_ssim if tr else float("nan"),
            best_epoch=early.best_epoch,
            best_val_loss=early.best_loss,
            is_best=improved,
            train_time_s=t_train,
            eval_time_s=t_eval,
            robust_time_s=t_rob,
            epoch_time_s=time.perf_counter() - t0,
            slices_per_s=slices / t_train if t_train > 0 else float("nan"),
            robustness=robust_rows(rows, cfg.crop_size),
            over_budget=_mean(sums, "over_budget", steps) if cfg.adversarial else float("nan"),
            lr_factor=trainer.lr_factor(),
            val_nmse_se=val.nmse_se,
            val_psnr_se=val.psnr_se,
            val_ssim_se=val.ssim_se,
            report_time_s=t_report,
            report=report,
            feature_fnr=feats["random"]["fnr"] if feats else float("nan"),
            feature_error=feats["random"]["error"] if feats else float("nan"),
            init_from=init_source,
        )
        history.append(record)
        if out is not None:
            write_preview(out / PREVIEW_NAME, trainer, data, runtime)
        save(record, epoch + 1)
        say(_progress_line(record))
        if record.versus_input is not None:  # the run's held-out verdict, in words: never silently worse
            say(record.versus_input.line(sum(r.steps for r in history)))
        if on_epoch is not None:
            on_epoch(record, ckpt_path)
        if stop:
            status = "early_stopped"
            message = f"no validation improvement for {cfg.patience} epochs (best epoch {early.best_epoch})"
            break
    return FitResult(status, message, history, early.best_epoch, ckpt_path, best_path)


def report_evaluation(trainer: Trainer, data: Data, runtime: Runtime) -> dict[str, Any]:
    """The held-out evaluation of the networks the trainer holds (``fit`` passes the best epoch's):
    clean and every configured attack on every slice of the report split, and the same for the
    zero-filled input itself (an identity "reconstructor"), so that a report shows what the network
    adds and what an attack takes away. Per-volume NMSE and SSIM are kept for paired comparisons, and
    ``vs_input`` compares the model with its input (:mod:`mriadv.verdict`)."""
    cfg = trainer.cfg
    dataset = data.report if data.report is not None else data.val
    loader = data.loader(dataset, shuffle=False)
    clean = evaluate(trainer.recon, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
    identity = nn.Identity()
    zf = evaluate(identity, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
    groups = [("", trainer.attacks())]
    if cfg.report_protocol is not None:  # a published protocol beside the study's own attacks
        protocol = get_protocol(cfg.report_protocol)
        groups.append(
            (
                protocol.name,
                protocol.build(
                    cfg.crop_size,
                    cfg.clamp,
                    cfg.kspace_sampled_only,
                    trainer.generator_perturb if trainer.generator else None,
                    cfg.perturbation,
                    trace=False,
                ),
            )
        )
    rows: list[dict[str, Any]] = []
    zf_rows: list[dict[str, Any]] = []
    for name, attacks in groups:
        found = robustness(trainer.recon, loader, trainer.loss_fn, runtime, attacks, clean, cfg.clamp)
        rows += [{**r, "protocol": name} for r in robust_rows(found, cfg.crop_size, True)]
        zf_attacks = [a for a in attacks if a.name != "generator"]
        found = robustness(identity, loader, trainer.loss_fn, runtime, zf_attacks, zf, cfg.clamp)
        zf_rows += [{**r, "protocol": name} for r in robust_rows(found, cfg.crop_size, True)]
    out = {
        "split": data.report_split,
        "split_holds": data.split_description(),
        "clean": clean_row(clean),
        "robustness": rows,
        "zero_filled": clean_row(zf),
        "zero_filled_robustness": zf_rows,
        "vs_input": compare(clean, zf).as_dict(),
    }
    if cfg.instabilities:  # the seed's types 2 and 3, on the same held-out slices
        out["features"] = _features(trainer, dataset, runtime)
        sweep = sampling_sweep(
            trainer.recon,
            dataset,
            runtime,
            SWEEP_ACCELERATIONS,
            cfg.center_fraction,
            batch_size=cfg.batch_size,
            loss_fn=trainer.loss_fn,
        )
        out["sampling"] = [{k: v for k, v in row.as_dict().items() if k != "volume_nmse"} for row in sweep]
    return out


def _features(trainer: Trainer, dataset: SliceDataset, runtime: Runtime) -> dict[str, Any] | None:
    """Small-feature recovery (:func:`mriadv.instabilities.feature_recovery`, default feature and
    search) as a plain dict, or None where no slice has tissue to put a feature in."""
    try:
        result = feature_recovery(trainer.recon, dataset, runtime, FeatureSpec(), FeatureSearch())
    except NoTissue:
        return None
    return result.as_dict()  # with each part's FNR per volume (volume_fnr), for paired comparisons


def write_preview(path: Path, trainer: Trainer, data: Data, runtime: Runtime) -> None:
    """``preview.npz``: clean input/target/reconstruction of two validation slices, and the same under
    PGD at the largest attack budget (in k-space for ``arch='unrolled'``) and under the trained generator
    (see :func:`evaluate.preview`). Both networks run in eval mode: a training-mode forward would update
    batch-norm statistics with validation slices and the saved model would differ from the evaluated one."""
    cfg = trainer.cfg
    batch = preview_batch(data.val).to(runtime.device)
    perturbed = {}
    with eval_mode(trainer.recon, trainer.generator), runtime.evaluating():
        if cfg.attack_budgets:
            domain = "kspace" if cfg.arch == "unrolled" else "image"
            budget, sampled = max(cfg.attack_budgets), cfg.kspace_sampled_only
            pgd = PGDAttack(budget, cfg.pgd_steps, cfg.pgd_step_scale, domain, sampled, cfg.clamp)
            perturbed["pgd"] = pgd(trainer.recon, batch, runtime).batch
        if trainer.generator is not None:
            perturbed["generator"] = trainer.perturbed_batch(batch, trainer.generator_perturb(batch))
        arrays = preview(trainer.recon, batch, runtime, perturbed)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez_compressed(f, **{k: v.astype(np.float16) for k, v in arrays.items()})


def _mean(sums: dict[str, float], key: str, n: int) -> float:
    return sums.get(key, 0.0) / n if n else float("nan")


def _progress_line(r: EpochRecord) -> str:
    pgd = [row for row in r.robustness if row["attack"] == "pgd"]
    rob = " ".join(f"pgd@{row['budget']:g}: nmse {row['nmse']:.4f}" for row in pgd)
    return (
        f"epoch {r.epoch}: loss {r.train_loss:.4f} |delta|^2 {r.delta_sq:.1f} | val nmse {r.val_nmse:.4f} "
        f"psnr {r.val_psnr:.2f} ssim {r.val_ssim:.4f} {rob} | {r.epoch_time_s:.0f}s" + (" *" if r.is_best else "")
    )


__all__ = ["PREVIEW_NAME", "RESUMABLE_CHANGES", "EarlyStopping", "fit", "report_evaluation", "write_preview"]
