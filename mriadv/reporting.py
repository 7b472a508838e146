"""What a run reports besides its per-epoch numbers: the held-out evaluation of its best networks
(:func:`report_evaluation`, on the last epoch's record) and the preview of two validation slices
(:func:`write_preview`, ``preview.npz`` beside the checkpoint), both in fp32 and eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mriadv.atomic import atomic_write
from mriadv.attacks import PGDAttack
from mriadv.data.files import SliceDataset
from mriadv.data.loading import Data, preview_batch
from mriadv.evaluate import evaluate, preview, robustness
from mriadv.instabilities import (
    SWEEP_ACCELERATIONS,
    FeatureSearch,
    FeatureSpec,
    NoTissue,
    feature_recovery,
    sampling_sweep,
)
from mriadv.protocols import get_protocol
from mriadv.records import clean_row, robust_rows
from mriadv.runtime import Runtime
from mriadv.trainer import Trainer, eval_mode
from mriadv.verdict import compare

PREVIEW_NAME = "preview.npz"


def report_evaluation(trainer: Trainer, data: Data, runtime: Runtime) -> dict[str, Any]:
    """The held-out evaluation of the networks the trainer holds (``fit`` passes the best epoch's):
    clean and every configured attack on every slice of the report split, and the same for the
    zero-filled input itself (an identity "reconstructor"), so that a report shows what the network
    adds and what an attack takes away. Per-volume NMSE and SSIM are kept for paired comparisons, and
    ``vs_input`` compares the model with its input (:mod:`mriadv.verdict`)."""
    cfg = trainer.cfg
    dataset = data.report if data.report is not None else data.val
    loader = data.loader(dataset, shuffle=False)
    model = trainer.predictor  # the smoothed predictor for adversary='smoothing'
    clean = evaluate(model, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
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
        found = robustness(model, loader, trainer.loss_fn, runtime, attacks, clean, cfg.clamp)
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
        out["features"] = features(trainer, dataset, runtime)
        sweep = sampling_sweep(
            model,
            dataset,
            runtime,
            SWEEP_ACCELERATIONS,
            cfg.center_fraction,
            batch_size=cfg.batch_size,
            loss_fn=trainer.loss_fn,
        )
        out["sampling"] = [{k: v for k, v in row.as_dict().items() if k != "volume_nmse"} for row in sweep]
    return out


def features(trainer: Trainer, dataset: SliceDataset, runtime: Runtime) -> dict[str, Any] | None:
    """Small-feature recovery (:func:`mriadv.instabilities.feature_recovery`, default feature and
    search) as a plain dict, or None where no slice has tissue to put a feature in."""
    try:
        result = feature_recovery(trainer.predictor, dataset, runtime, FeatureSpec(), FeatureSearch())
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
        model = trainer.predictor  # built in eval mode: the smoothed predictor for adversary='smoothing'
        if cfg.attack_budgets:
            domain = "kspace" if cfg.arch == "unrolled" else "image"
            budget, sampled = max(cfg.attack_budgets), cfg.kspace_sampled_only
            pgd = PGDAttack(budget, cfg.pgd_steps, cfg.pgd_step_scale, domain, sampled, cfg.clamp)
            perturbed["pgd"] = pgd(model, batch, runtime).batch
        if trainer.generator is not None:
            perturbed["generator"] = trainer.perturbed_batch(batch, trainer.generator_perturb(batch))
        arrays = preview(model, batch, runtime, perturbed)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez_compressed(f, **{k: v.astype(np.float16) for k, v in arrays.items()})


__all__ = ["PREVIEW_NAME", "features", "report_evaluation", "write_preview"]
