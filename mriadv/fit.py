"""The training loop: :func:`fit` runs a :class:`~mriadv.trainer.Trainer` over epochs, validates,
evaluates robustness, stops early, checkpoints every epoch (:mod:`mriadv.checkpoint`) and resumes
from a checkpoint, reporting each epoch through a callback of plain numbers (an
:class:`~mriadv.records.EpochRecord`). At the last epoch the best epoch's networks are evaluated on
the held-out report split (:func:`mriadv.reporting.report_evaluation`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, make_checkpoint, save_checkpoint
from mriadv.checkpoint import RESUMABLE_CHANGES, check_resume_config, init_weights
from mriadv.config import TrainConfig
from mriadv.data.loading import Data, build_data
from mriadv.data.stream import TrainingClock
from mriadv.evaluate import EvalResult, RobustRow, evaluate, robustness
from mriadv.records import EpochRecord, FitResult, robust_rows
from mriadv.reporting import PREVIEW_NAME, features, report_evaluation, write_preview
from mriadv.runtime import Runtime, seed_everything
from mriadv.trainer import NonFiniteLoss, Trainer


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


@dataclass
class _Run:
    """What :func:`fit` carries from epoch to epoch: the run's parts, its history so far, early
    stopping, the best epoch's networks, and where its files go (``out`` None: no files)."""

    cfg: TrainConfig
    runtime: Runtime
    data: Data
    trainer: Trainer
    clock: TrainingClock
    out: Path | None
    say: Callable[[str], None]
    on_epoch: Callable[[EpochRecord, Path | None], None] | None
    history: list[EpochRecord] = field(default_factory=list)
    early: EarlyStopping = field(default_factory=EarlyStopping)
    best_nets: dict[str, Any] | None = None
    init_source: str = ""  # the file the reconstructor started from (fine-tuning), in every record
    start: int = 0  # epochs done before this session (a resumed run)

    @property
    def ckpt_path(self) -> Path | None:
        return self.out / CHECKPOINT_NAME if self.out else None

    @property
    def best_path(self) -> Path | None:
        return self.out / BEST_NAME if self.out else None

    def result(self, status: str, message: str) -> FitResult:
        return FitResult(status, message, self.history, self.early.best_epoch, self.ckpt_path, self.best_path)

    def save(self, record: EpochRecord, epoch: int) -> None:
        """``best.pt`` at a new best, and ``checkpoint.pt`` (everything needed to resume) every epoch."""
        if self.out is None:
            return
        config, stopping = self.cfg.to_dict(), asdict(self.early)
        if record.is_best:
            self.save_best(epoch, record.status, stopping)
        save_checkpoint(
            self.ckpt_path,
            make_checkpoint(
                config,
                epoch,
                record.status,
                self.trainer.networks(copy=False),
                stopping,
                trainer=self.trainer.state_dict(),
                torch_rng=torch.get_rng_state(),
                best=self.best_nets,
                history=[asdict(r) for r in self.history],
            ),
        )

    def save_best(self, epoch: int, status: str, stopping: dict[str, Any]) -> None:
        """``best.pt``: the best epoch's networks, in the shape of :func:`make_checkpoint` without extras."""
        save_checkpoint(self.best_path, make_checkpoint(self.cfg.to_dict(), epoch, status, self.best_nets, stopping))

    def save_best_of_resumed(self) -> None:
        """``best.pt`` as the resumed checkpoint knows it: a kill between the two saves of an epoch
        (``best.pt`` first), or a resume from an earlier checkpoint (a study's retry), left one of a
        timeline that is not continued; it is written again from the checkpoint's best networks."""
        early = self.early
        at = [r for r in self.history if r.epoch == early.best_epoch]
        if self.out is None or self.best_nets is None or not at:
            return
        self.save_best(early.best_epoch, at[0].status, {**asdict(early), "bad_epochs": 0})  # as saved at that best

    def close_epoch(self, record: EpochRecord, epoch: int) -> None:
        """Keep ``record``, write the preview and the checkpoints, say the epoch, call ``on_epoch``."""
        self.history.append(record)
        if self.out is not None and record.status != "nan":
            write_preview(self.out / PREVIEW_NAME, self.trainer, self.data, self.runtime)
        self.save(record, epoch)
        if record.status != "nan":
            self.say(_progress_line(record))
        if record.versus_input is not None:  # the run's held-out verdict, in words: never silently worse
            self.say(record.versus_input.line(sum(r.steps for r in self.history)))
        if self.on_epoch is not None:
            self.on_epoch(record, self.ckpt_path)

    def stop_on_nan(self, epoch: int, message: str, **known: Any) -> FitResult:
        """End the run at a non-finite loss: a last record with status ``nan``, saved and reported."""
        self.say(f"stopped: {message}")
        early = self.early
        record = EpochRecord.stopped(epoch, self.cfg, message, early.best_epoch, early.best_loss, **known)
        record.init_from = self.init_source
        self.close_epoch(record, epoch)
        return self.result("nan", message)


def _start(cfg: TrainConfig, out_dir, resume_from, on_epoch, log) -> _Run | FitResult:
    """The run's data, trainer and clock; then the weights it starts from (fine-tuning) or the state
    it resumes (a :class:`FitResult` when the checkpoint is already final)."""
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
    run = _Run(cfg, runtime, data, trainer, clock, out, say, on_epoch)
    if init is not None:
        source, weights, from_epoch = init
        trainer.recon.load_state_dict(weights)
        run.init_source = str(source)
        say(f"fine-tuning: the reconstructor starts from {source} (epoch {from_epoch} of its run)")
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_resume_config(state["config"], cfg)
        trainer.load_networks(state["networks"])
        trainer.load_state_dict(state["trainer"])
        run.history = [EpochRecord.from_dict(r) for r in state["history"]]
        run.early = EarlyStopping(**state["early_stopping"])
        run.best_nets = state["best"]
        run.start = state["epoch"]
        run.init_source = run.history[-1].init_from if run.history else ""  # its weights, not init_from's, go on
        torch.set_rng_state(state["torch_rng"])
        run.save_best_of_resumed()
        if state["status"] in ("early_stopped", "nan"):
            say(f"checkpoint is final ({state['status']}); nothing to resume")
            return run.result(state["status"], "resumed a finished run")
        say(f"resuming after epoch {run.start}")
    return run


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
    run = _start(cfg, out_dir, resume_from, on_epoch, log)
    if isinstance(run, FitResult):
        return run
    for epoch in range(run.start, cfg.max_epochs):
        t0 = time.perf_counter()
        train = _train_epoch(run, epoch)
        if train.error is not None:
            message = f"epoch {epoch + 1}, step {train.steps + 1}: {train.error}; training stopped"
            return run.stop_on_nan(epoch + 1, message, steps=train.steps)
        val, tr, t_eval = _validate(run)
        if not math.isfinite(val.loss):
            message = f"epoch {epoch + 1}: validation loss is {val.loss}; training stopped"
            known = {"val_loss": val.loss, "val_nmse": val.nmse, "val_psnr": val.psnr, "val_ssim": val.ssim}
            return run.stop_on_nan(epoch + 1, message, steps=train.steps, train_loss=train.mean("recon_loss"), **known)
        improved = run.early.update(val.loss, epoch + 1)
        if improved:
            run.best_nets = run.trainer.networks()
        stop = run.early.exhausted(cfg.patience)
        last = stop or epoch + 1 == cfg.max_epochs
        attacked = _attack(run, due=(epoch + 1) % cfg.robust_every == 0 or improved or last)
        report, t_report = _report(run, last)
        status = "early_stopped" if stop else ("completed" if last else "running")
        record = _record(run, epoch + 1, status, train, val, tr, improved, attacked, report)
        record.eval_time_s, record.report_time_s, record.epoch_time_s = t_eval, t_report, time.perf_counter() - t0
        run.close_epoch(record, epoch + 1)
        if stop:
            message = f"no validation improvement for {cfg.patience} epochs (best epoch {run.early.best_epoch})"
            return run.result("early_stopped", message)
    return run.result("completed", f"ran {cfg.max_epochs} epochs")


@dataclass
class _Training:
    """One epoch's training: the step outputs summed over its ``steps`` (``slices`` slices in
    ``seconds``), and the non-finite loss that stopped it, if one did."""

    sums: dict[str, float]
    steps: int
    slices: int
    seconds: float
    error: str | None = None

    def mean(self, key: str) -> float:
        return _mean(self.sums, key, self.steps)


def _train_epoch(run: _Run, epoch: int) -> _Training:
    """Epoch ``epoch``'s optimiser steps (:meth:`Data.train_loader`: the clock's steps per epoch)."""
    t0 = time.perf_counter()
    done = _Training({}, 0, 0, 0.0)
    try:
        for batch in run.data.train_loader(epoch, run.clock.steps_per_epoch):
            for k, v in run.trainer.train_step(batch.to(run.runtime.device, non_blocking=True)).items():
                done.sums[k] = done.sums.get(k, 0.0) + v
            done.steps += 1
            done.slices += len(batch)
    except NonFiniteLoss as exc:
        done.error = str(exc)
    done.seconds = time.perf_counter() - t0
    return done


def _validate(run: _Run) -> tuple[EvalResult, EvalResult | None, float]:
    """The selection split's evaluation, the training volumes' (``train_eval_volumes``; None without
    them) and the seconds both took."""
    t0 = time.perf_counter()
    model = run.trainer.predictor  # the smoothed predictor for adversary='smoothing'
    loss_fn, runtime, data, clamp = run.trainer.loss_fn, run.runtime, run.data, run.cfg.clamp
    val = evaluate(model, data.loader(data.val, shuffle=False), loss_fn, runtime, clamp=clamp)
    if not math.isfinite(val.loss):
        return val, None, time.perf_counter() - t0
    tr = None
    if data.train_eval is not None:
        tr = evaluate(model, data.loader(data.train_eval, shuffle=False), loss_fn, runtime, clamp=clamp)
    return val, tr, time.perf_counter() - t0


def _attack(run: _Run, due: bool) -> tuple[list[RobustRow], dict[str, Any] | None, float]:
    """When ``due``: every configured attack on the fixed selection subset, and small-feature recovery
    (``instabilities``); the rows, the features (or None) and the seconds they took."""
    t0 = time.perf_counter()
    rows: list[RobustRow] = []
    feats = None
    if due:
        trainer, data, runtime, cfg = run.trainer, run.data, run.runtime, run.cfg
        robust_loader = data.loader(data.robust_val or data.val, shuffle=False)
        model = trainer.predictor  # an attack on a smoothed model differentiates through its mean
        robust_clean = evaluate(model, robust_loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
        rows = robustness(model, robust_loader, trainer.loss_fn, runtime, trainer.attacks(), robust_clean, cfg.clamp)
        feats = features(trainer, data.robust_val or data.val, runtime) if cfg.instabilities else None
    return rows, feats, time.perf_counter() - t0


def _report(run: _Run, last: bool) -> tuple[dict[str, Any] | None, float]:
    """At the last epoch, the best epoch's networks on the held-out split (:func:`report_evaluation`)."""
    t0 = time.perf_counter()
    report = None
    if last and run.best_nets is not None:
        with run.trainer.using(run.best_nets):
            report = {**report_evaluation(run.trainer, run.data, run.runtime), "epoch": run.early.best_epoch}
    return report, time.perf_counter() - t0


def _record(
    run: _Run,
    epoch: int,
    status: str,
    train: _Training,
    val: EvalResult,
    tr: EvalResult | None,
    improved: bool,
    attacked: tuple[list[RobustRow], dict[str, Any] | None, float],
    report: dict[str, Any] | None,
) -> EpochRecord:
    """The epoch's record of plain numbers (the caller fills in the evaluation and epoch times)."""
    cfg, early, nan = run.cfg, run.early, float("nan")
    rows, feats, t_rob = attacked
    return EpochRecord(
        epoch=epoch,
        status=status,
        epsilon=cfg.epsilon,
        epsilon_rms=cfg.epsilon_rms,
        epsilon_ref=cfg.epsilon_ref,
        train_loss=train.mean("recon_loss"),
        train_clean_loss=train.mean("clean_loss"),
        train_pert_loss=train.mean("pert_loss"),
        gen_objective=train.mean("gen_objective"),
        hinge=train.mean("hinge"),
        delta_sq=train.mean("delta_sq"),
        steps=train.steps,
        val_loss=val.loss,
        val_nmse=val.nmse,
        val_psnr=val.psnr,
        val_ssim=val.ssim,
        val_seed_nmse=val.seed_nmse,
        val_seed_psnr=val.seed_psnr,
        val_seed_ssim=val.seed_ssim,
        train_nmse=tr.nmse if tr else nan,
        train_psnr=tr.psnr if tr else nan,
        train_ssim=tr.ssim if tr else nan,
        train_seed_nmse=tr.seed_nmse if tr else nan,
        train_seed_psnr=tr.seed_psnr if tr else nan,
        train_seed_ssim=tr.seed_ssim if tr else nan,
        best_epoch=early.best_epoch,
        best_val_loss=early.best_loss,
        is_best=improved,
        train_time_s=train.seconds,
        eval_time_s=nan,
        robust_time_s=t_rob,
        epoch_time_s=nan,
        slices_per_s=train.slices / train.seconds if train.seconds > 0 else nan,
        robustness=robust_rows(rows, cfg.crop_size),
        over_budget=train.mean("over_budget") if cfg.adversarial else nan,
        delta_sq_budget=train.mean("delta_sq_budget") if cfg.adversarial else nan,
        lr_factor=run.trainer.lr_factor(),
        val_nmse_se=val.nmse_se,
        val_psnr_se=val.psnr_se,
        val_ssim_se=val.ssim_se,
        report_time_s=nan,
        report=report,
        feature_fnr=feats["random"]["fnr"] if feats else nan,
        feature_error=feats["random"]["error"] if feats else nan,
        init_from=run.init_source,
    )


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
