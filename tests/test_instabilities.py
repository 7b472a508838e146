"""The seed's type-2 and type-3 instabilities: the inserted feature is exactly what was asked for and is
in the data; a perfect reconstructor loses no feature; nested masks nest; more samples help the
zero-filled input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mriadv.data.files import SliceDataset, seeded_slices
from mriadv.data.masks import NestedMaskFunc, make_mask_func, volume_seed
from mriadv.data.transforms import UnetTransform, center_crop, zero_filled_magnitude
from mriadv.fft import fft2c, ifft2c
from mriadv.instabilities import (
    FeatureSearch,
    FeatureSpec,
    case_metrics,
    feature_case,
    feature_example,
    feature_recovery,
    footprint,
    footprint_masks,
    format_features,
    format_sampling,
    insert_feature,
    measured_input,
    sampling_sweep,
    valid_anchors,
)
from mriadv.models import UNet
from mriadv.runtime import Runtime

CROP = 64


@pytest.fixture(scope="module")
def val_set(synthetic_root):
    tf = UnetTransform(make_mask_func("random", 0.08, 4.0), CROP, train=False)
    return SliceDataset(synthetic_root, "val", tf, crop_size=CROP)


@pytest.fixture(scope="module")
def runtime():
    return Runtime.resolve("cpu")


@pytest.mark.parametrize("shape", ["disc", "square"])
@pytest.mark.parametrize("size", [1, 4, 9, 10, 13, 25])
def test_footprint_has_the_exact_area(size, shape):
    offsets = footprint(size, shape)
    assert offsets.shape == (size, 2) and len({tuple(o) for o in offsets}) == size
    masks = footprint_masks(np.array([[20, 30]]), offsets, (CROP, CROP))
    assert masks.dtype == torch.bool and int(masks.sum()) == size


@pytest.mark.parametrize("side", [2, 3, 4])
def test_a_square_of_side_s_is_an_s_by_s_block(side):
    o = footprint(side * side, "square")
    assert np.ptp(o[:, 0]) == side - 1 and np.ptp(o[:, 1]) == side - 1


def _slice(val_set, i=1):
    raw = val_set.read(i)
    kspace = torch.from_numpy(raw.kspace)
    target = center_crop(torch.from_numpy(raw.target), (CROP, CROP)).float()
    return raw, kspace, target


@pytest.mark.parametrize("contrast", [0.5, 2.0, -0.3])
def test_inserted_feature_has_the_requested_area_and_contrast(val_set, contrast):
    _, kspace, target = _slice(val_set)
    offsets = footprint(10, "disc")
    anchors = np.argwhere(
        valid_anchors(target.numpy(), offsets, 0.25, contrast, zero_filled_magnitude(kspace, (CROP, CROP)).numpy())
    )[:3]
    masks = footprint_masks(anchors, offsets, (CROP, CROP))
    ins = insert_feature(kspace, target, masks, contrast)
    added = (ins.target - target).double()
    for k in range(len(anchors)):
        m = masks[k]
        assert int(m.sum()) == 10
        assert torch.all(added[k][~m] == 0)  # nothing outside the footprint
        local = target.double()[m].mean()
        assert float(added[k][m].mean() / local) == pytest.approx(contrast, rel=1e-5)  # exact contrast
        assert torch.allclose(added[k][m], added[k][m][0].expand(10), rtol=1e-5)  # one constant plateau
        assert float(ins.level[k]) == pytest.approx(float(local), rel=1e-6)


def test_feature_kspace_is_the_fft_of_the_modified_image(val_set):
    """Round trip through mriadv.fft: the k-space is F of the modified full image, and its centre-cropped
    magnitude is the clean magnitude plus the feature (the synthetic target is exactly |C F^-1 y|)."""
    _, kspace, target = _slice(val_set)
    offsets = footprint(12, "square")
    anchors = np.argwhere(valid_anchors(target.numpy(), offsets, 0.25, 0.8))[[0, -1]]
    masks = footprint_masks(anchors, offsets, (CROP, CROP))
    ins = insert_feature(kspace, target, masks, 0.8)
    H, W = kspace.shape
    top, left = (H - CROP) // 2, (W - CROP) // 2
    for k in range(2):
        image = ifft2c(ins.kspace[k].to(torch.complex128))
        assert torch.allclose(fft2c(image), ins.kspace[k].to(torch.complex128), atol=1e-12)
        mag = image[top : top + CROP, left : left + CROP].abs()
        assert torch.allclose(mag.float(), ins.target[k], rtol=1e-4, atol=1e-4 * float(target.max()))
        outside = torch.ones(H, W, dtype=torch.bool)
        outside[top : top + CROP, left : left + CROP] = ~masks[k]
        clean = ifft2c(kspace.to(torch.complex128))
        assert torch.allclose(image[outside], clean[outside], atol=1e-6 * float(target.max()))


def test_positions_are_in_tissue_and_inside_the_crop():
    target = np.zeros((20, 20))
    target[5:15, 5:15] = 1.0  # tissue, air elsewhere
    target[9, 9] = 0.1  # a dark hole
    offsets = footprint(9, "square")  # 3x3 around the anchor
    valid = valid_anchors(target, offsets, 0.5, 0.5)
    want = np.zeros_like(valid)
    want[6:14, 6:14] = True
    want[8:11, 8:11] = False  # the hole is in their footprint
    assert np.array_equal(valid, want)
    assert not valid_anchors(np.zeros((20, 20)), offsets, 0.5, 0.5).any()


def test_clean_path_reproduces_the_transform(val_set):
    """The feature's input is built like the data pipeline's: with no feature it is the sample itself."""
    raw = val_set.read(2)
    sample = UnetTransform(val_set.transform.mask_func, CROP, train=False, keep_kspace=True)(raw)
    x = measured_input(torch.from_numpy(raw.kspace), sample.mask, (CROP, CROP), sample.mean, sample.std, 6.0)
    assert torch.equal(x, sample.image[0])


def test_perfect_reconstructor_loses_no_feature_and_identity_is_measured(val_set):
    search = FeatureSearch(restarts=4, seed=3)
    case = feature_case(val_set.read(1), val_set.transform, FeatureSpec(size=10, contrast=0.5), search)
    assert case is not None and case.inputs.shape == (5, 1, CROP, CROP) == case.targets.shape
    perfect = case_metrics(case, case.targets)  # the fully sampled target, with and without the feature
    assert torch.allclose(perfect["error"], torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(perfect["contrast"], torch.ones(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(perfect["fnaf_nmse"], torch.zeros(4, dtype=torch.float64), atol=1e-9)
    assert not (perfect["error"] > search.threshold).any()  # false-negative rate 0
    # a reconstruction that ignores the feature has error exactly 1 and recovers no contrast
    ignore = case.targets[:1].expand_as(case.targets)
    blind = case_metrics(case, ignore)
    assert torch.allclose(blind["error"], torch.ones(4, dtype=torch.float64))
    assert torch.allclose(blind["contrast"], torch.zeros(4, dtype=torch.float64), atol=1e-6)
    # the feature is in the data: the zero-filled input changes at its footprint, and only partly recovers it
    zf = case_metrics(case, case.inputs)
    assert ((zf["contrast"] > 0.05) & (zf["contrast"] < 0.95)).all()


def test_positions_are_seeded_per_slice(val_set):
    spec, search = FeatureSpec(), FeatureSearch(restarts=3, seed=1)
    a = feature_case(val_set.read(0), val_set.transform, spec, search)
    b = feature_case(val_set.read(0), val_set.transform, spec, search)
    c = feature_case(val_set.read(0), val_set.transform, spec, FeatureSearch(restarts=3, seed=2))
    assert np.array_equal(a.anchors, b.anchors) and not np.array_equal(a.anchors, c.anchors)
    assert torch.equal(a.inputs, b.inputs)


def test_feature_recovery_over_a_dataset(val_set, runtime):
    search = FeatureSearch(restarts=3)
    res = feature_recovery(nn.Identity(), val_set, runtime, FeatureSpec(size=9, shape="square"), search)
    assert res.num_volumes == 2 and res.num_slices + res.skipped_slices == len(val_set)
    # the identity is the zero-filled input: the model's rows equal the baseline's
    assert res.random.as_dict() == res.zero_filled_random.as_dict()
    assert res.worst.error >= res.random.error and res.worst.fnr >= res.random.fnr
    assert 0 <= res.random.fnr <= 1 and set(res.random.volume_fnr) == {v.name for v in val_set.volumes}
    d = res.as_dict()
    assert d["spec"]["size"] == 9 and math.isfinite(d["worst"]["error_se"])  # two volumes: a standard error
    assert len(format_features(res)) == 5
    # a U-Net runs through the same path; its eval/train mode is restored
    torch.manual_seed(0)
    unet = UNet(1, 1, 4, 2)
    unet.train()
    sub = val_set.with_slices(seeded_slices(val_set.volumes, 1, 0))
    out = feature_recovery(unet, sub, runtime, FeatureSpec(), search)
    assert unet.training and out.num_slices == 2 and math.isfinite(out.worst.error)
    images = feature_example(unet, sub, runtime, 0, FeatureSpec(), search)
    assert set(images) >= {"target", "input", "recon", "difference", "mask"}
    assert images["mask"].sum() == 10 and images["recon"].shape == (CROP, CROP)


def test_no_tissue_is_refused(val_set, runtime):
    with pytest.raises(ValueError, match="tissue"):
        feature_recovery(
            nn.Identity(),
            val_set.with_slices([(val_set.volumes[0], 0)]),
            runtime,
            FeatureSpec(size=400),
            FeatureSearch(tissue_fraction=1.0),
        )


@pytest.mark.parametrize("bad", [dict(size=0), dict(shape="star"), dict(contrast=0.0), dict(contrast=-1.0)])
def test_feature_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        FeatureSpec(**bad)


@pytest.mark.parametrize("num_cols", [74, 368, 372])
@pytest.mark.parametrize("cf", [0.04, 0.08])
def test_nested_masks_are_supersets_with_the_requested_acceleration(num_cols, cf):
    accs = [8, 6, 4, 3, 2] if cf == 0.08 else [16, 8, 4, 2]
    for name in ("file1000001.h5", "file1000002.h5"):
        masks = [NestedMaskFunc(cf, a)(num_cols, volume_seed(name)) for a in accs]
        centre = NestedMaskFunc(cf, accs[0]).center_slice(num_cols)
        for a, m in zip(accs, masks):
            assert m.dtype == bool and m[centre].all()  # the centre band is always in
            assert abs(int(m.sum()) - num_cols / a) <= 0.5  # W / R within rounding
        for fewer, more in zip(masks, masks[1:]):
            assert np.all(more >= fewer) and more.sum() > fewer.sum()  # more samples are a superset
    # different volumes get different masks
    a = NestedMaskFunc(0.08, 4)(368, volume_seed("a.h5"))
    b = NestedMaskFunc(0.08, 4)(368, volume_seed("b.h5"))
    assert not np.array_equal(a, b)


def test_identity_improves_with_more_samples(val_set, runtime):
    rows = sampling_sweep(nn.Identity(), val_set, runtime, accelerations=(2, 8, 4), zero_filled=False)
    assert [r.acceleration for r in rows] == [8.0, 4.0, 2.0]  # fewest samples first
    nmse = [r.nmse for r in rows]
    assert nmse[0] > nmse[1] > nmse[2]
    assert rows[0].ssim < rows[1].ssim < rows[2].ssim
    assert not any(r.stagnant for r in rows) and math.isnan(rows[0].d_nmse)
    assert all(r.d_nmse < 0 for r in rows[1:])
    assert [r.effective_acceleration for r in rows] == sorted(r.effective_acceleration for r in rows)[::-1]
    for r in rows:
        assert r.acceleration * 0.85 < r.effective_acceleration < r.acceleration * 1.15
    assert len(format_sampling(rows)) == 4 and rows[1].as_dict()["acceleration"] == 4.0


def test_sweep_flags_a_model_that_does_not_improve(val_set, runtime):
    """A 'model' that ignores its input cannot gain from samples: every row after the first is flagged,
    while the zero-filled input beside it is not."""

    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    rows = sampling_sweep(Constant(), val_set, runtime, accelerations=(6, 3))
    assert rows[1].stagnant and not rows[1].zf_stagnant
    assert rows[1].zf_nmse < rows[0].zf_nmse


def test_sweep_rejects_an_acceleration_the_centre_does_not_allow(val_set, runtime):
    with pytest.raises(ValueError, match="center_fraction"):
        sampling_sweep(nn.Identity(), val_set, runtime, accelerations=(4, 16), center_fraction=0.08)


def test_assess_runs_both_instabilities_and_writes_them(synthetic_root, tmp_path, capsys):
    from mriadv.assess import assess, main
    from mriadv.config import TrainConfig
    from mriadv.fit import fit

    cfg = TrainConfig.from_dict(
        dict(
            data=str(synthetic_root),
            crop_size=CROP,
            unet_chans=4,
            unet_pools=2,
            epsilon=0.0,
            loss="mse",
            attacks=("noise",),
            attack_budgets=(20.0,),
            train_eval_volumes=0,
            max_epochs=1,
            max_train_batches=2,
            batch_size=2,
            device="cpu",
            threads=1,
        )
    )
    fit(cfg, out_dir=tmp_path / "run", log=None)
    plain = assess(tmp_path / "run")
    assert plain.features is None and plain.sampling is None  # nothing new unless asked for
    out = tmp_path / "a.json"
    assert (
        main(
            [
                str(tmp_path / "run"),
                "--instabilities",
                "--sampling",
                "8",
                "4",
                "--feature-restarts",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "small features (type 2)" in printed and "sampling sweep (type 3)" in printed
    import json

    d = json.loads(out.read_text())
    assert d["features"]["search"]["restarts"] == 2 and d["features"]["spec"] == FeatureSpec().__dict__
    assert [r["acceleration"] for r in d["sampling"]] == [8.0, 4.0]
    assert d["clean"]["nmse"] == pytest.approx(plain.clean["nmse"])
    # a bad option is refused by name, exit 2
    assert main([str(tmp_path / "run"), "--features", "--feature-contrast", "-2"]) == 2
    assert main([str(tmp_path / "run"), "--sampling", "20"]) == 2
