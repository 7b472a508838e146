"""Training length in updates: the stream of passes cut into epochs of a fixed number of steps
(mriadv.data.stream), the validation parts chosen by file name only, and fit() on a cycled set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mriadv.config import TrainConfig, get_profile
from mriadv.data.files import VolumeInfo
from mriadv.data.split import validation_parts
from mriadv.data.loading import build_data
from mriadv.data.stream import EPOCH_SEED_STRIDE, EpochBatches, StreamDataset, pass_batches
from mriadv.fit import fit
from mriadv.runtime import Runtime


@pytest.mark.parametrize("n, batch", [(480, 4), (37, 4), (10, 3)])
def test_a_pass_is_the_shuffling_loaders_epoch(n, batch):
    """A pass equals, batch for batch, a shuffling DataLoader seeded as the run's loader is (an
    independent implementation: torch's own RandomSampler and BatchSampler)."""
    for p in range(3):
        gen = torch.Generator().manual_seed(5 * EPOCH_SEED_STRIDE + p)
        loader = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=gen)
        assert pass_batches(n, batch, 5, p) == [b.tolist() for b in loader]


def _decoded(sampler: EpochBatches, n: int) -> list[list[tuple[int, int]]]:
    return [[divmod(k, n) for k in b] for b in sampler]


def test_a_small_set_is_cycled_with_a_new_order_each_pass():
    n, batch, steps = 10, 4, 7  # 3 batches a pass: an epoch of 7 steps is 2 1/3 passes
    epochs = [_decoded(EpochBatches(n, batch, 0, e, steps), n) for e in range(3)]
    assert [len(e) for e in epochs] == [steps] * 3
    stream = [b for e in epochs for b in e]  # 21 batches = 7 whole passes
    for p in range(7):
        items = [item for b in stream[3 * p : 3 * p + 3] for item in b]
        assert all(q == p for q, _ in items)  # pass p's slices carry p (their masks' epoch)
        assert sorted(i for _, i in items) == list(range(n))  # every slice once per pass
    orders = {tuple(i for b in stream[3 * p : 3 * p + 3] for _, i in b) for p in range(7)}
    assert len(orders) == 7  # a new order every pass


def test_a_large_set_is_sampled_and_continues_where_the_last_epoch_stopped():
    n, batch, steps = 100, 4, 10  # 25 batches a pass: an epoch is 0.4 of a pass
    seen = [i for e in range(2) for b in _decoded(EpochBatches(n, batch, 0, e, steps), n) for _, i in b]
    assert len(seen) == len(set(seen)) == 80  # nothing twice before everything once
    third = _decoded(EpochBatches(n, batch, 0, 2, steps), n)
    assert {p for b in third for p, _ in b} == {0, 1}  # the rest of pass 0, then pass 1
    assert sorted(seen + [i for b in third[:5] for p, i in b]) == list(range(n))


def test_one_pass_per_epoch_without_steps():
    for e in range(3):
        assert [[k - e * 37 for k in b] for b in EpochBatches(37, 4, 2, e, None)] == pass_batches(37, 4, 2, e)


def test_stream_items_are_the_slices_with_the_pass_as_their_epoch(synthetic_root, tiny_config):
    cfg = tiny_config(synthetic_root, steps_per_epoch=7, max_train_batches=None)
    data = build_data(cfg, Runtime.resolve("cpu", "fp32", None))
    n = len(data.train)
    stream = StreamDataset(data.train)
    for p, i in ((0, 3), (2, 3), (5, n - 1)):
        data.train.set_epoch(p)  # the per-epoch dataset that a one-pass loader reads
        a, b = stream[p * n + i], data.train[i]
        assert torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
    assert not torch.equal(stream[3].image, stream[2 * n + 3].image)  # a new mask in another pass


def test_fit_makes_the_configured_updates_on_a_cycled_set_and_resumes_exactly(synthetic_root, tiny_config, tmp_path):
    cfg = tiny_config(
        synthetic_root, steps_per_epoch=8, max_epochs=2, epsilon=0.0, attacks=("noise",), instabilities=False
    )
    lines: list[str] = []
    full = fit(cfg, out_dir=tmp_path / "full", log=lines.append)
    assert [r.steps for r in full.history] == [8, 8]  # 12 slices in batches of 2: 6 steps a pass, cycled
    assert any("12 slices in 3 volumes; 8 steps of batch 2 per epoch (1.3 passes, cycled)" in s for s in lines)
    assert any("2 epochs: 16 updates" in s for s in lines)
    fit(TrainConfig.from_dict({"max_epochs": 1}, base=cfg), out_dir=tmp_path / "part", log=None)
    resumed = fit(cfg, out_dir=tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint.pt", log=None)
    assert resumed.history[-1].train_loss == full.history[-1].train_loss
    assert resumed.history[-1].val_nmse == full.history[-1].val_nmse


def test_the_demo_profile_fixes_its_updates_and_paper_keeps_one_pass():
    assert get_profile("demo").config().steps_per_epoch == 120
    assert get_profile("paper").config().steps_per_epoch is None
    assert "480 training slices" not in get_profile("demo").description


def _volumes(n: int) -> list[VolumeInfo]:
    return [VolumeInfo(f"file{i:03d}.h5", 4, (8, 8), (8, 8), (0, 8), "CORPD_FBK", 1.0, 0, 0) for i in range(n)]


def test_validation_parts_do_not_depend_on_the_seed_and_keep_the_held_out_volumes():
    vols = _volumes(20)
    sel, rep = validation_parts(vols, 0.5)
    assert len(rep) == 10 and [v.name for v in rep] != [f"file{i:03d}.h5" for i in range(1, 20, 2)]
    sub_sel, sub_rep = validation_parts(vols, 0.5, fraction=0.5)
    assert {v.name for v in sub_rep} <= {v.name for v in rep} and len(sub_rep) == 5
    assert {v.name for v in sub_sel} <= {v.name for v in sel} and len(sub_sel) == 5
    capped = validation_parts(vols, 0.5, max_volumes=6)
    assert [len(p) for p in capped] == [3, 3] and set(capped[1]) <= set(rep)
    nothing_held = validation_parts(vols, 0.0, max_volumes=4)
    assert len(nothing_held[0]) == 4 and nothing_held[1] == []


def test_two_seeds_report_on_the_same_volumes(synthetic_root, tiny_config):
    runtime = Runtime.resolve("cpu", "fp32", None)
    reports = [
        build_data(tiny_config(synthetic_root, seed=s, max_val_volumes=2), runtime).report.volumes for s in (0, 1, 7)
    ]
    assert len({tuple(v.name for v in r) for r in reports}) == 1
    assert np.all([len(r) == 1 for r in reports])
