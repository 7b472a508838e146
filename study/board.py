"""TensorBoard for a study: each trial's folder is one run holding its scalars, images and HParams.

Ray's own TBX/CSV/JSON loggers are switched off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``, see
study/run.py): their HParams entry (written into the same folders) took precedence in TensorBoard's
HParams dashboard and left this one's rows empty. What is written, and by whom:

* the trial's worker (:class:`TrialBoard`): at start the HParams experiment (the hyperparameters,
  the searched ones first, and :func:`hparams_metrics`, the same list in every trial) and the
  session start (the trial's values); after each epoch the scalars of :data:`SCALARS`, the attacks
  (``rob/pgd_e5000_nmse``), the objectives at the best epoch so far (``best/val_nmse``, what Optuna
  is told) and, on the last epoch, the held-out report split (``report/nmse``,
  ``report/rob_pgd_e5000_nmse``; ``report_zero_filled/...`` for the zero-filled input); validation
  images. A tag is the flat key of ``trials.parquet`` with its first ``_`` as ``/``;
* the driver (:func:`write_session_end`, from :class:`study.results.ResultsCallback`): the session
  end, SUCCESS or FAILURE (an error or a NaN stop), once Tune says the trial is over, so an errored
  trial shows FAILURE even when its worker died, and a running or killed one has no end status
  (TensorBoard's "Unknown"). A RUNNING status cannot be written at the start and replaced later:
  TensorBoard's fast loader (tensorboard-data-server) keeps a tag's first value, its Python loader
  the last; each tag is therefore written once.

A value that is not finite is not written (a NaN-stopped epoch, an attack that was not run), so
every trial has the same tags where it has values (the generator's are missing where epsilon = 0).
Budgets in tags are at 320x320 (``e5000``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mriadv.units import robust_key

# per-epoch scalar tags: (tag, EpochRecord field)
SCALARS = (
    ("train/loss", "train_loss"),
    ("train/clean_loss", "train_clean_loss"),
    ("train/pert_loss", "train_pert_loss"),
    ("train/gen_objective", "gen_objective"),
    ("train/hinge", "hinge"),
    ("train/delta_sq", "delta_sq"),
    ("val/loss", "val_loss"),
    ("val/nmse", "val_nmse"),
    ("val/psnr", "val_psnr"),
    ("val/ssim", "val_ssim"),
    ("train_eval/nmse", "train_nmse"),
    ("train_eval/psnr", "train_psnr"),
    ("train_eval/ssim", "train_ssim"),
    ("time/epoch_s", "epoch_time_s"),
)
IMAGE_KEYS = ("input", "recon", "target", "pgd_delta", "pgd_recon", "generator_delta", "generator_recon")
CLEAN_METRICS = ("nmse", "psnr", "ssim")
ATTACK_METRICS = ("nmse", "psnr", "ssim", "d_nmse")  # of an attack's row (d_: the change from clean)
DEFAULT_SHOWN = 5  # TensorBoard's HParams table ticks the first five metrics (and hyperparameters)
SUCCESS, FAILURE = "SUCCESS", "FAILURE"


def tag_of(key: str) -> str:
    """The scalar tag of a flat result key: ``rob_pgd_e5000_nmse`` -> ``rob/pgd_e5000_nmse``."""
    return key.replace("_", "/", 1)


def report_tag(metric: str) -> str:
    """The report-split tag of a selection-split metric name: ``val_nmse`` -> ``report/nmse``,
    ``rob_pgd_e5000_nmse`` -> ``report/rob_pgd_e5000_nmse`` (the flat names of
    :meth:`mriadv.records.EpochRecord.flat` without their ``report_`` prefix)."""
    return "report/" + (metric[len("val_") :] if metric.startswith("val_") else metric)


def hparams_metrics(objectives: Iterable[str], budgets_ref: Iterable[float]) -> list[str]:
    """The HParams dashboard's metrics, identical in every trial of a study: first (ticked by
    default) the objectives at the best epoch (``best/<metric>``), then on the held-out report split
    the clean NMSE, each attacked objective and the clean SSIM; then the other report values (PGD
    at every budget: NMSE, its change from clean, SSIM), the zero-filled input's, and the last
    epoch's selection-split values. An entry's value is the scalar's last one, so a trial shows the
    state it ended in."""
    objectives, budgets = list(objectives), list(budgets_ref)
    first = [f"best/{m}" for m in objectives] + ["report/nmse"]
    first += [report_tag(m) for m in objectives if m.startswith("rob_")] + ["report/ssim"]
    rest = ["report/psnr"] + [report_tag(robust_key("pgd", b, m)) for b in budgets for m in ("nmse", "d_nmse", "ssim")]
    rest += ["report_zero_filled/nmse", "report_zero_filled/ssim"]
    rest += [tag for tag, _ in SCALARS if tag.startswith("val/")]
    rest += [tag_of(robust_key("pgd", b, m)) for b in budgets for m in ("nmse", "ssim")]
    return list(dict.fromkeys(first + rest))


def _summary(tag: str, **plugin_data: Any):
    """A Summary holding one HParams plugin message (experiment, session start or end)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])


def hparams_summaries(hparams: dict[str, Any], searched: Iterable[str], metrics: list[str]) -> list[Any]:
    """The experiment and session-start summaries of a trial. ``searched`` hyperparameters are
    marked as differing, so TensorBoard lists (and ticks) them first."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    searched = set(searched)
    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        else:
            start.hparams[name].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind), differs=name in searched))
    infos.sort(key=lambda info: not info.differs)
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics]
    )
    return [
        _summary(metadata.EXPERIMENT_TAG, experiment=experiment),
        _summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
    ]


def session_end_summary(status: str):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(f"STATUS_{status}"), end_time_secs=time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


class TrialBoard:
    """The trial's own event file, in its folder: HParams at start, scalars and images per epoch.

    Args:
        folder: the trial's folder (TensorBoard's run: one per trial).
        hparams: the trial's hyperparameters (numbers, strings, booleans; anything else as text).
        searched: the names among them that the study searches.
        metrics: the HParams metrics, :func:`hparams_metrics`.
    """

    def __init__(self, folder: Path, hparams: dict[str, Any], searched: Iterable[str], metrics: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), filename_suffix=".mriadv")
        for summary in hparams_summaries(hparams, searched, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, record: Any, best: dict[str, float], preview_file: Path | None) -> None:
        """Scalars and images of one :class:`~mriadv.records.EpochRecord`; ``best`` maps each
        objective to its value at the best epoch so far."""
        step = record.epoch
        for tag, key in SCALARS:
            self.scalar(tag, getattr(record, key), step)
        for row in record.robustness:
            for m in ATTACK_METRICS:
                self.scalar(tag_of(robust_key(row["attack"], row["budget_ref"], m)), row[m], step)
        for metric, value in best.items():
            self.scalar(f"best/{metric}", value, step)
        if record.report is not None:
            for key, value in record.flat().items():
                tag = report_scalar_tag(key)
                if tag is not None:
                    self.scalar(tag, value, step)
        if preview_file is not None and preview_file.is_file():
            with np.load(preview_file) as arrays:
                for key in IMAGE_KEYS:
                    if key in arrays:
                        images = _to_unit(arrays[key].astype(np.float32))[:, None]  # (N, 1, H, W)
                        self.writer.add_images(f"images/{key}", images, step, dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def report_scalar_tag(key: str) -> str | None:
    """The tag of a flat report-split key (``report_nmse``, ``zf_report_rob_pgd_e5000_ssim``), or
    None for the keys that are not written (standard errors, other changes, bookkeeping)."""
    for prefix, group in (("zf_report_", "report_zero_filled/"), ("report_", "report/")):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest in CLEAN_METRICS:
                return group + rest
            if not rest.startswith("rob_"):
                return None
            parts = rest.rsplit("_", 2)  # rob_<attack>_e<budget>, [d,] metric
            return group + rest if (f"d_{parts[-1]}" if parts[-2] == "d" else parts[-1]) in ATTACK_METRICS else None
    return None


def write_session_end(folder: Path, status: str, started: bool | None = None) -> bool:
    """Append the HParams session end (``SUCCESS`` or ``FAILURE``) to a trial's run, as a second
    event file in its folder (TensorBoard merges a folder's files into one run). Nothing is written
    where the trial never wrote its session start (it failed before its trainable ran): False.
    ``started``: whether it did, where the run's files are elsewhere (object storage); else the
    folder is looked at."""
    from torch.utils.tensorboard.writer import FileWriter

    if not (any(folder.glob("events.out.tfevents.*")) if started is None else started):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(str(folder), filename_suffix=".end")
    writer.add_summary(session_end_summary(status))
    writer.close()
    return True


def _to_unit(x: np.ndarray) -> np.ndarray:
    """Scale each image to [0, 1] for display (perturbations are symmetric about 0)."""
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)
