"""Dataset, transforms, index cache and the folder check, on synthetic fastMRI-format files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from mriadv.data.check import check_folder
from mriadv.data.files import SliceDataset, ShapeBucketSampler, acquired_band, build_index
from mriadv.data.masks import RandomMaskFunc
from mriadv.data.transforms import UnetTransform, collate, image_from_normalized_kspace


def make_dataset(root, split="train", train=True, crop=64, keep_kspace=False, **kw):
    tf = UnetTransform(RandomMaskFunc(0.08, 4), crop_size=crop, train=train, keep_kspace=keep_kspace)
    return SliceDataset(root, split, tf, crop_size=crop, **kw)


def test_dataset_shapes_order_and_normalisation(synthetic_root):
    ds = make_dataset(synthetic_root)
    assert len(ds) == 3 * 4
    names = [v.name for v, _ in ds.slices]
    assert names == sorted(names)  # deterministic order
    s = ds[5]
    assert s.image.shape == (1, 64, 64) and s.target.shape == (1, 64, 64)
    assert s.image.dtype == torch.float32
    # instance normalisation: the input has mean 0 and std 1 before clamping (clamping at 6 sigma
    # changes them very little)
    assert abs(float(s.image.mean())) < 0.05 and abs(float(s.image.std()) - 1) < 0.05
    # the target is normalised with the input's statistics: de-normalising gives the file's target
    with h5py.File(ds.folder / s.fname) as f:
        ref = f["reconstruction_esc"][s.slice_num]
        assert float(s.max_value) == pytest.approx(float(f.attrs["max"]))
    denorm = s.target[0] * (s.std + 1e-11) + s.mean
    np.testing.assert_allclose(denorm.numpy(), ref, rtol=1e-4, atol=1e-5 * ref.max())


def test_input_is_zero_filled_magnitude_of_masked_kspace(synthetic_root):
    ds = make_dataset(synthetic_root, "val", train=False, keep_kspace=True)
    s = ds[1]
    with h5py.File(ds.folder / s.fname) as f:
        k = f["kspace"][s.slice_num]
    mask = s.mask.numpy()
    # independent computation in NumPy: mask columns, centred orthonormal inverse FFT, crop, magnitude
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * mask[None, :]), norm="ortho"))
    top, left = (img.shape[0] - 64) // 2, (img.shape[1] - 64) // 2
    mag = np.abs(img[top : top + 64, left : left + 64])
    expected = np.clip((mag - mag.mean()) / mag.std(ddof=1), -6, 6)
    np.testing.assert_allclose(s.image[0].numpy(), expected, atol=1e-4)
    # the carried k-space reproduces the input exactly (the path k-space perturbations take)
    b = collate([s])
    again = image_from_normalized_kspace(b.kspace, b.mean, b.std, (64, 64), 6.0)
    torch.testing.assert_close(again, b.image, atol=1e-5, rtol=1e-5)
    # zero-padded phase encodes are never sampled
    left, right = acquired_band(h5py.File(ds.folder / s.fname)["ismrmrd_header"][()], k.shape[-1])
    assert not mask[:left].any() and not mask[right:].any() and mask[left:right].any()


def test_validation_masks_fixed_per_volume_training_masks_vary(synthetic_root):
    val = make_dataset(synthetic_root, "val", train=False, keep_kspace=True)
    a, b = val[0], val[0]
    assert torch.equal(a.mask, b.mask) and torch.equal(a.image, b.image)
    assert torch.equal(val[0].mask, val[1].mask)  # same volume, same mask
    train = make_dataset(synthetic_root, "train", train=True, keep_kspace=True)
    m0 = train[0].mask
    train.set_epoch(1)
    m1 = train[0].mask
    assert not torch.equal(m0, m1)
    train.set_epoch(0)
    assert torch.equal(train[0].mask, m0)  # a pure function of (seed, epoch, file, slice)


def test_crop_smaller_than_target_and_target_from_kspace(synthetic_root):
    ds = make_dataset(synthetic_root, crop=48)
    assert ds[0].image.shape == (1, 48, 48)
    # max_value is the max of the cropped target volume, computed (not attrs['max'])
    v = ds.volumes[0]
    with h5py.File(ds.folder / v.name) as f:
        t = f["reconstruction_esc"][()][:, 8:56, 8:56]
    assert v.max_value == pytest.approx(float(t.max()), rel=1e-6)
    ds_k = SliceDataset(synthetic_root, "train", UnetTransform(RandomMaskFunc(), 64), target_key="kspace", crop_size=64)
    s = ds_k[0]
    with h5py.File(ds_k.folder / s.fname) as f:
        esc = f["reconstruction_esc"][s.slice_num]
    denorm = (s.target[0] * (s.std + 1e-11) + s.mean).numpy()
    np.testing.assert_allclose(denorm, esc, rtol=1e-3, atol=1e-4 * esc.max())


def test_volume_subsampling_is_seeded(synthetic_root):
    a = make_dataset(synthetic_root, max_volumes=2, seed=1)
    b = make_dataset(synthetic_root, max_volumes=2, seed=1)
    assert [v.name for v in a.volumes] == [v.name for v in b.volumes]
    assert len(a.volumes) == 2


def test_index_is_cached_and_notices_changes(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "singlecoil_val", data)
    cache = tmp_path / "cache"
    first = build_index(data, cache_dir=cache)
    files = list(cache.glob("index-*.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = build_index(data, cache_dir=cache)
    assert again == first and files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    (data / first[0].name).unlink()
    assert len(build_index(data, cache_dir=cache)) == len(first) - 1


def test_shape_bucket_sampler_groups_shapes():
    shapes = [(640, 368)] * 5 + [(640, 372)] * 3
    batches = list(ShapeBucketSampler(shapes, batch_size=2, shuffle=True, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len({shapes[i] for i in b}) == 1


def test_collate_rejects_mixed_kspace_shapes(synthetic_root):
    s = make_dataset(synthetic_root, "val", train=False, keep_kspace=True)[0]
    other = s._replace(kspace=torch.zeros(10, 10, dtype=torch.complex64))
    with pytest.raises(ValueError, match="different k-space shapes"):
        collate([s, other])


# ----------------------------------------------------------------------------------------------
# python -m mriadv.data.check
# ----------------------------------------------------------------------------------------------
def run_check(folder):
    return subprocess.run([sys.executable, "-m", "mriadv.data.check", str(folder)], capture_output=True, text=True)


def test_check_good_folder(synthetic_root):
    out = run_check(synthetic_root)
    assert out.returncode == 0, out.stderr
    assert "train:" in out.stdout and "3 volumes, 12 slices" in out.stdout
    assert "128x74" in out.stdout and "64x64" in out.stdout


def test_check_empty_folder_is_an_error(tmp_path):
    out = run_check(tmp_path)
    assert out.returncode == 1
    assert "no .h5 files" in out.stderr


def test_check_corrupt_files_each_named(synthetic_root, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(synthetic_root / "singlecoil_val", bad)
    good = sorted(bad.glob("*.h5"))
    (bad / "notes.h5").write_text("this is not HDF5")
    with h5py.File(bad / "nokspace.h5", "w") as f:
        f["reconstruction_esc"] = np.zeros((2, 64, 64), np.float32)
    with h5py.File(bad / "rank2.h5", "w") as f:
        f["kspace"] = np.zeros((128, 74), np.complex64)
    data = good[0].read_bytes()
    (bad / "truncated.h5").write_bytes(data[: len(data) // 2])
    out = run_check(bad)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 4
    for name, problem in [
        ("notes.h5", "not a readable HDF5"),
        ("nokspace.h5", "no 'kspace'"),
        ("rank2.h5", "rank 2"),
        ("truncated.h5", "truncated"),
    ]:
        assert any(name in e and problem in e for e in errors), (name, errors)
    assert f"{len(good)} volumes" in out.stdout  # the good files are still listed
    reports = check_folder(bad)
    assert not reports["data"].ok


# ----------------------------------------------------------------------------------------------
# training data: never validate on the training volumes
# ----------------------------------------------------------------------------------------------
def test_training_refuses_a_flat_folder(tiny_config, synthetic_root, tmp_path):
    from mriadv.config import ConfigError
    from mriadv.data.loading import build_data
    from mriadv.fit import fit
    from mriadv.runtime import Runtime

    flat = tmp_path / "flat"
    shutil.copytree(synthetic_root / "singlecoil_train", flat)  # .h5 files, no split sub-folders
    cfg = tiny_config(flat, max_epochs=1)
    for call in (lambda: build_data(cfg, Runtime.resolve("cpu", "fp32")), lambda: fit(cfg, tmp_path / "run", log=None)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert str(flat) in message and "singlecoil_train/" in message and "singlecoil_val/" in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _infos(names, slices=10):
    from mriadv.data.files import VolumeInfo

    return [VolumeInfo(n, slices, (64, 40), (32, 32), (0, 40), "CORPD_FBK", 1.0, 0, 0) for n in names]


def _acq_infos(names, acquisitions):
    from mriadv.data.files import VolumeInfo

    return [VolumeInfo(n, 10, (64, 40), (32, 32), (0, 40), a, 1.0, 0, 0) for n, a in zip(names, acquisitions)]


def test_report_split_is_disjoint_and_depends_on_names_only():
    from mriadv.data.split import split_for_report

    vols = _infos(["d.h5", "a.h5", "c.h5", "b.h5", "e.h5"])
    sel, rep = split_for_report(vols, 0.5)
    assert len(sel) == 3 and len(rep) == 2 and not {v.name for v in sel} & {v.name for v in rep}
    assert [v.name for v in sel] == sorted(v.name for v in sel) and [v.name for v in rep] == sorted(v.name for v in rep)
    again = split_for_report(list(reversed(vols)), 0.5)  # the order files are listed in does not matter
    assert [[v.name for v in part] for part in again] == [[v.name for v in sel], [v.name for v in rep]]
    sel, rep = split_for_report(vols, 0.0)
    assert len(sel) == 5 and rep == []
    with pytest.raises(ValueError, match="cannot be split"):
        split_for_report(vols[:1], 0.5)


def test_report_split_holds_every_acquisition_in_each_part_when_names_alternate():
    """The synthetic writer's old pattern (and many real folders): acquisitions alternating in name
    order. A split by alternate names put every proton-density volume in one part; the stratified split
    puts floor or ceil of half of each acquisition in each part."""
    from mriadv.data.split import describe_volumes, split_for_report, validation_parts

    for n in (4, 6, 8, 20, 21):
        names = [f"file{i:04d}.h5" for i in range(n)]
        vols = _acq_infos(names, ["CORPD_FBK" if i % 2 == 0 else "CORPDFS_FBK" for i in range(n)])
        sel, rep = split_for_report(vols, 0.5)
        for acq in ("CORPD_FBK", "CORPDFS_FBK"):
            total = sum(v.acquisition == acq for v in vols)
            held = sum(v.acquisition == acq for v in rep)
            assert held in (total // 2, (total + 1) // 2), (n, acq, held, total)
            assert sum(v.acquisition == acq for v in sel) == total - held
        # never every second name
        assert [v.name for v in rep] != names[1::2]
        # a sub-sampled part keeps both acquisitions while it has room for two volumes
        if n % 2 == 0:
            sub_sel, sub_rep = validation_parts(vols, 0.5, max_volumes=4)
            assert [len(sub_sel), len(sub_rep)] == [2, 2]
            both = {"CORPD_FBK", "CORPDFS_FBK"}
            assert {v.acquisition for v in sub_sel} == {v.acquisition for v in sub_rep} == both
    assert describe_volumes(rep) == "10 volumes (5 CORPDFS_FBK, 5 CORPD_FBK)"
    assert describe_volumes(_infos(["x.h5"], slices=2)[:0]) == "0 volumes"


def test_the_smoke_profiles_held_out_volumes_hold_both_acquisitions(tmp_path, tiny_config):
    """The smoke profile's synthetic folder (4 validation volumes): its held-out part was two
    fat-suppressed volumes; now one of each, and the synthetic writer's acquisitions are balanced
    but not in lockstep with the volume index."""
    from mriadv.config import get_profile
    from mriadv.data.loading import build_data, synthetic_data
    from mriadv.data.synthetic import SyntheticSpec, acquisition_order
    from mriadv.runtime import Runtime

    root = synthetic_data(get_profile("smoke"), tmp_path)
    data = build_data(tiny_config(root), Runtime.resolve("cpu", "fp32", None))
    assert sorted(v.acquisition for v in data.report.volumes) == ["CORPDFS_FBK", "CORPD_FBK"]
    assert sorted(v.acquisition for v in data.val.volumes) == ["CORPDFS_FBK", "CORPD_FBK"]
    assert "held-out (report) 2 volumes (1 CORPDFS_FBK, 1 CORPD_FBK)" in data.split_description()
    spec = SyntheticSpec(**get_profile("demo").synthetic)
    for split, count in ((0, spec.volumes), (1, spec.val_volumes)):
        order = acquisition_order(spec, split)
        assert sorted(order).count("CORPD_FBK") == (count + 1) // 2
        assert order != ["CORPD_FBK" if i % 2 == 0 else "CORPDFS_FBK" for i in range(count)]


def test_seeded_slices_cover_every_volume_and_are_fixed():
    from mriadv.data.files import seeded_slices

    vols = _infos(["a.h5", "b.h5", "c.h5"]) + _infos(["short.h5"], slices=1)
    picked = seeded_slices(vols, 2, seed=0)
    per = {}
    for v, s in picked:
        per.setdefault(v.name, []).append(s)
    assert {k: len(v) for k, v in per.items()} == {"a.h5": 2, "b.h5": 2, "c.h5": 2, "short.h5": 1}
    assert all(len(set(v)) == len(v) and v == sorted(v) for v in per.values())
    assert picked == seeded_slices(vols, 2, seed=0)  # fixed: the same every epoch and trial
    assert len(seeded_slices(vols, 0)) == 31  # 0: every slice
