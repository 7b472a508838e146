"""The data of a run: its datasets and per-epoch loaders (:func:`build_data`), the fixed preview
batch, and the folder itself: a profile's synthetic dataset when none is given, and the check that a
folder is usable before anything trains on it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mriadv.config import ConfigError, TrainConfig
from mriadv.data.check import check_folder
from mriadv.data.files import (
    SPLITS,
    ShapeBucketSampler,
    SliceDataset,
    resolve_split_dir,
    seeded_slices,
)
from mriadv.data.masks import make_mask_func
from mriadv.data.split import describe_volumes, validation_parts
from mriadv.data.stream import EPOCH_SEED_STRIDE, EpochBatches, StreamDataset, TrainingClock
from mriadv.data.synthetic import GENERATOR_VERSION, SyntheticSpec, ensure
from mriadv.data.transforms import Batch, UnetTransform, collate
from mriadv.protocols import get_protocol
from mriadv.runtime import Runtime

if TYPE_CHECKING:
    from mriadv.config import Profile


@dataclass
class Data:
    """The datasets of a run; loaders are made per epoch so that order depends only on (seed, epoch).

    ``val`` is the *selection* split (early stopping, ``best.pt``, the search); ``robust_val`` its
    fixed subset that the per-epoch attacks use; ``report`` the held-out split (``report_split``:
    ``'test'`` for a ``singlecoil_test/`` with targets, ``'report'`` for the validation volumes held
    out by name, ``'selection'`` when nothing is held out) that the best epoch is reported on."""

    train: SliceDataset
    val: SliceDataset
    train_eval: SliceDataset | None
    batch_size: int
    num_workers: int
    pin_memory: bool
    bucketed: bool  # evaluation batches carry k-space: batch by k-space shape
    seed: int
    report: SliceDataset | None = None
    report_split: str = "selection"
    robust_val: SliceDataset | None = None
    train_bucketed: bool = False  # training batches carry k-space (k-space training)
    augment: str = "none"  # what the training slices get ('none' or 'flip': cfg.augment, 'auto' resolved)
    # fixed-order loaders with workers by (id(dataset), epoch), each held with its dataset so the id is not reused
    _fixed_loaders: dict[tuple[int, int], tuple[SliceDataset, torch.utils.data.DataLoader]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def loader(self, dataset: SliceDataset, shuffle: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
        """The batches of ``dataset`` in epoch ``epoch``'s order (``shuffle``) or in a fixed one.

        With loader workers, a fixed-order loader (evaluation: validation, each attack, the report) is
        made once per dataset and epoch and keeps its workers between passes (``persistent_workers``):
        an epoch iterates the same split once per attack, and forking the workers for every pass cost
        more than the pass itself on the small evaluation splits. Without workers, a new loader per call."""
        dataset.set_epoch(epoch)
        keep = not shuffle and self.num_workers > 0
        if keep and (id(dataset), epoch) in self._fixed_loaders:
            return self._fixed_loaders[id(dataset), epoch][1]
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate)
        if keep:
            common["persistent_workers"] = True
        if self.bucketed:
            sampler = ShapeBucketSampler(dataset.kspace_shapes(), self.batch_size, shuffle, self.seed)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
        else:
            gen = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=self.batch_size, shuffle=shuffle, generator=gen, **common
            )
        if keep:
            self._fixed_loaders[id(dataset), epoch] = (dataset, loader)
        return loader

    def train_loader(self, epoch: int, steps: int | None) -> torch.utils.data.DataLoader:
        """Epoch ``epoch``'s training batches: ``steps`` batches of the stream of passes over the
        training set (:mod:`mriadv.data.stream`; cycled or sampled), or one pass when ``steps`` is None
        (then batch for batch ``loader(train, shuffle=True, epoch=epoch)``)."""
        shapes = self.train.kspace_shapes() if self.train_bucketed else None
        sampler = EpochBatches(len(self.train), self.batch_size, self.seed, epoch, steps, shapes)
        return torch.utils.data.DataLoader(
            StreamDataset(self.train),
            batch_sampler=sampler,
            # the workers' base seed from a generator of the run's own, not from torch's global one
            generator=torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
        )

    def clock(self, cfg: TrainConfig) -> TrainingClock:
        """The run's updates on this training set: ``cfg.steps_per_epoch`` (or one pass), capped by
        ``cfg.max_train_batches``, times ``cfg.max_epochs``."""
        pass_steps = len(self.train_loader(0, None))
        steps = cfg.steps_per_epoch if cfg.steps_per_epoch is not None else pass_steps
        if cfg.max_train_batches is not None:
            steps = min(steps, cfg.max_train_batches)
        return TrainingClock(
            len(self.train), len(self.train.volumes), self.batch_size, pass_steps, steps, cfg.max_epochs, self.augment
        )

    def split_description(self) -> str:
        """What the validation parts hold, e.g. ``selection 3 volumes (2 CORPD_FBK, 1 CORPDFS_FBK);
        held-out (report) 3 volumes (...)``."""
        held = describe_volumes(self.report.volumes) if self.report is not None else "none"
        return f"selection {describe_volumes(self.val.volumes)}; held-out ({self.report_split}) {held}"

    def kspace_shape(self) -> tuple[int, int] | None:
        report = self.report.volumes if self.report is not None else []
        shapes = {v.kspace_shape for v in self.train.volumes + self.val.volumes + report}
        return next(iter(shapes)) if len(shapes) == 1 else None


def build_data(cfg: TrainConfig, runtime: Runtime, training: bool = True) -> Data:
    """The datasets and loader settings of ``cfg``.

    ``training=True`` (fit) refuses a folder whose two splits resolve to the same files (a flat folder
    of .h5 files), which would validate on the training volumes; ``training=False`` (assessing a saved
    model) accepts it, since only the validation split is used.
    """
    if cfg.data is None:
        raise ConfigError("config key 'data' is None: give a data folder (or use a profile's synthetic data)")
    root = Path(cfg.data)
    if training and resolve_split_dir(root, "train").resolve() == resolve_split_dir(root, "val").resolve():
        raise ConfigError(
            f"config key 'data': {root} has no sub-folders {SPLITS['train']}/ and {SPLITS['val']}/, "
            "so training would validate on its training volumes; training needs both sub-folders"
        )
    mask_func = make_mask_func(cfg.mask_type, cfg.center_fraction, cfg.acceleration)
    # what training needs decides the training batches (their order too: batches that carry k-space
    # are bucketed by shape); what the run evaluates only decides the evaluation batches, so the same
    # training config trains the same model whatever it evaluates
    train_k = cfg.perturbation == "kspace" or cfg.arch == "unrolled"  # the unrolled network takes the measurements
    keep_k = (
        train_k
        or "pgd_kspace" in cfg.attacks
        or (cfg.report_protocol is not None and get_protocol(cfg.report_protocol).needs_kspace)
    )
    train_tf = UnetTransform(mask_func, cfg.crop_size, train=True, seed=cfg.seed, clamp=cfg.clamp, keep_kspace=train_k)
    fixed_tf = UnetTransform(mask_func, cfg.crop_size, train=False, seed=cfg.seed, clamp=cfg.clamp, keep_kspace=keep_k)
    common = dict(target_key=cfg.target_key, crop_size=cfg.crop_size, seed=cfg.seed, cache_dir=cfg.cache_dir)
    train = SliceDataset(
        root, "train", train_tf, volume_fraction=cfg.train_fraction, max_volumes=cfg.max_train_volumes, **common
    )
    val = SliceDataset(root, "val", fixed_tf, **common)  # every validation volume; parts by name below
    report, report_split = None, "selection"
    if (root / SPLITS["test"]).is_dir():  # a test split with targets is the report split
        test = SliceDataset(root, "test", fixed_tf, **common)
        if all(v.target_shape is not None for v in test.volumes):
            report, report_split = test, "test"
    held = cfg.report_fraction if report is None else 0.0
    try:  # split first, by file name only, then sub-sample: the held-out volumes do not depend on the seed
        selection, held_out = validation_parts(val.volumes, held, cfg.val_fraction, cfg.max_val_volumes)
    except ValueError as exc:
        raise ConfigError(f"config key 'report_fraction' = {cfg.report_fraction}: {val.folder}: {exc}") from None
    val = val.restricted(selection, fixed_tf)
    if held_out:
        report, report_split = val.restricted(held_out, fixed_tf), "report"
    robust_val = val.with_slices(seeded_slices(val.volumes, cfg.robust_slices_per_volume, cfg.seed))
    train_eval = train.restricted(train.volumes[: cfg.train_eval_volumes], fixed_tf) if cfg.train_eval_volumes else None
    workers = cfg.num_workers
    if workers is None:  # on CUDA one per CPU of the run's share, at most 8: packed trials fork their share only
        share = cfg.threads if cfg.threads is not None else torch.get_num_threads()  # a trial: its Ray CPUs
        workers = min(8, len(os.sched_getaffinity(0)), share) if runtime.is_cuda else 0
    data = Data(
        train,
        val,
        train_eval,
        cfg.batch_size,
        workers,
        runtime.is_cuda,
        keep_k,
        cfg.seed,
        train_bucketed=train_k,
        report=report,
        report_split=report_split,
        robust_val=robust_val,
    )
    augment = cfg.augment
    if augment == "auto":  # flips where the data is repeated within an epoch, which over-fits a small folder
        augment = "flip" if data.clock(cfg).passes_per_epoch > 1 else "none"
    if augment != "none":
        data.train = train.restricted(train.volumes, dataclasses.replace(train_tf, augment=augment))
    data.augment = augment
    return data


def data_lines(cfg: TrainConfig) -> list[str]:
    """What ``cfg`` trains on and reports on, without a device: the updates it makes on its data
    folder (:meth:`Data.clock`) and what the validation parts hold (:meth:`Data.split_description`),
    for the lines a study prints before its trials start."""
    data = build_data(cfg, Runtime.resolve("cpu", "fp32", None))
    return [data.clock(cfg).describe(), data.split_description()]


def preview_batch(dataset: SliceDataset, count: int = 2) -> Batch:
    """A fixed batch for previews: the middle slice of the first ``count`` volumes that share the
    first volume's k-space shape (real fastMRI widths differ: 368, 372, ..., and batches that carry
    k-space cannot mix them)."""
    starts, i = [], 0
    shape = dataset.volumes[0].kspace_shape
    for v in dataset.volumes:
        if v.kspace_shape == shape:
            starts.append(i + v.num_slices // 2)
        i += v.num_slices
    return collate([dataset[j] for j in starts[:count]])


def synthetic_data(profile: Profile, results_dir: Path, seed: int = 0) -> Path:
    """The profile's synthetic dataset under ``results_dir/.data``, generated on first use."""
    spec = SyntheticSpec(**profile.synthetic, seed=seed)
    name = (
        f"synthetic_v{GENERATOR_VERSION}_{spec.size}px_{spec.volumes}+{spec.val_volumes}x{spec.slices}_seed{spec.seed}"
    )
    return ensure(results_dir / ".data" / name, spec)


def validate_data(folder: str | Path, crop_size: int, cache_dir: str | Path | None = None) -> str | None:
    """None if ``folder`` is usable for training, else a message listing what is wrong (every slice
    is read once: non-finite or all-zero slices fail here, not at the first step; verdicts are
    cached per file in ``cache_dir`` when given)."""
    reports = check_folder(folder, crop_size, cache_dir=cache_dir)
    errors = [e for r in reports.values() for e in r.errors]
    if "train" not in reports or "val" not in reports:
        errors.append(f"{folder}: needs sub-folders singlecoil_train/ and singlecoil_val/")
    return "; ".join(errors) if errors else None


__all__ = [
    "EPOCH_SEED_STRIDE",
    "Data",
    "build_data",
    "preview_batch",
    "synthetic_data",
    "data_lines",
    "validate_data",
]
