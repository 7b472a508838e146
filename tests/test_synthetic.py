import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as etree
from dataclasses import asdict, fields
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from mriadv.data import synthetic
from mriadv.data.phantom import knee_magnitude, slice_positions, smooth_polynomial
from mriadv.data.synthetic import (
    SPLITS,
    SyntheticSpec,
    build_parser,
    ensure,
    generate,
    geometry,
    split_file_names,
    synthesize_volume,
)
from mriadv.fft import ifft2c

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(volumes=3, val_volumes=2, slices=6, size=64, seed=7)
ISMRMRD_NS = {"ismrmrd_namespace": "http://www.ismrm.org/ISMRMRD"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", SPEC)


def _all_files(root: Path) -> list[Path]:
    return [p for split in SPLITS for p in sorted((root / split).glob("*.h5"))]


def _load(path: Path) -> dict:
    with h5py.File(path, "r") as hf:
        out = {k: hf[k][()] for k in hf.keys()}
        out["attrs"] = dict(hf.attrs)
    return out


def _et_query(root: etree.Element, qlist: list[str]) -> str:
    """fastMRI's ``et_query``: namespaced path lookup in the ISMRMRD header."""
    s = "."
    prefix = "ismrmrd_namespace"
    for el in qlist:
        s += f"//{prefix}:{el}"
    value = root.find(s, ISMRMRD_NS)
    assert value is not None, f"header lacks {qlist}"
    return str(value.text)


def _fastmri_metadata(path: Path) -> dict:
    """A copy of fastMRI's ``SliceDataset._retrieve_metadata``."""
    with h5py.File(path, "r") as hf:
        et_root = etree.fromstring(hf["ismrmrd_header"][()])
        enc = ["encoding", "encodedSpace", "matrixSize"]
        enc_size = tuple(int(_et_query(et_root, enc + [a])) for a in "xyz")
        rec = ["encoding", "reconSpace", "matrixSize"]
        recon_size = tuple(int(_et_query(et_root, rec + [a])) for a in "xyz")
        lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
        center = int(_et_query(et_root, lims + ["center"]))
        maximum = int(_et_query(et_root, lims + ["maximum"])) + 1
        padding_left = enc_size[1] // 2 - center
        return {
            "padding_left": padding_left,
            "padding_right": padding_left + maximum,
            "encoding_size": enc_size,
            "recon_size": recon_size,
            "num_slices": hf["kspace"].shape[0],
            "root": et_root,
        }


def _crop(x: np.ndarray, size: int) -> np.ndarray:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def _numpy_ifft2c(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho", axes=axes), axes=axes)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _histogram_peaks(img: np.ndarray, mask: np.ndarray) -> int:
    """Number of distinct modes of the intensity histogram inside ``mask`` (>= 1.5 % of pixels each)."""
    values = img[mask] / np.percentile(img[mask], 99)
    hist, _ = np.histogram(values, bins=32, range=(0, 1.2))
    hist = np.convolve(hist, [1, 2, 1], mode="same") / 4 / values.size
    peaks = [i for i in range(1, 31) if hist[i] >= hist[i - 1] and hist[i] > hist[i + 1] and hist[i] > 0.015]
    return len(peaks)


def _internal_edge_fraction(img: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of pixels 3 px inside the object whose gradient exceeds 15 % of the bright level per px."""
    inner = ndimage.binary_erosion(mask, iterations=3)
    gy, gx = np.gradient(img / np.percentile(img[mask], 99))
    return float((np.hypot(gy, gx)[inner] > 0.15).mean())


def _lag1(img: np.ndarray) -> float:
    return (_corr(img[:, :-1], img[:, 1:]) + _corr(img[:-1], img[1:])) / 2


# ---------------------------------------------------------------- spec, geometry, names


@pytest.mark.parametrize(
    "field,value",
    [
        ("volumes", 0),
        ("val_volumes", -1),
        ("slices", 0),
        ("size", 31),
        ("size", 30),
        ("size", 65),
        ("seed", -1),
        ("size", 64.0),
        ("slices", True),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**{field: value})


@pytest.mark.parametrize("size,width,acquired", [(320, 368, 342), (64, 74, 68), (96, 110, 102), (32, 36, 34)])
def test_geometry_matches_fastmri_proportions(size, width, acquired):
    g = geometry(size)
    assert (g.height, g.width, g.acquired) == (2 * size, width, acquired)
    assert g.padding_left == (width - acquired) // 2 == width // 2 - acquired // 2
    assert g.padding_right - g.padding_left == acquired


def test_layout_names_and_manifest(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*SPLITS, "synthetic.json"])
    names = split_file_names(SPEC)
    for split, expected in names.items():
        found = sorted(p.name for p in (dataset / split).iterdir())
        assert found == sorted(expected)
        split_digit = SPLITS.index(split)
        assert all(re.fullmatch(rf"file007{split_digit}\d{{4}}\.h5", n) for n in found)
    all_names = [n for v in names.values() for n in v]
    assert len(set(all_names)) == SPEC.volumes + SPEC.val_volumes
    manifest = json.loads((dataset / "synthetic.json").read_text())
    assert manifest["spec"] == asdict(SPEC)
    assert not [p for p in dataset.parent.iterdir() if ".partial-" in p.name]  # temp folder renamed away


# ---------------------------------------------------------------- phantom


def test_slice_positions_closed_form():
    np.testing.assert_array_equal(slice_positions(1), np.zeros((1, 1, 1), np.float32))
    t = slice_positions(5)
    assert t.shape == (5, 1, 1) and t.dtype == np.float32
    np.testing.assert_array_equal(t.ravel(), np.float32([-1, -0.5, 0, 0.5, 1]))
    with pytest.raises(ValueError, match="slices"):
        slice_positions(0)


@pytest.mark.parametrize("crop,shape,slices", [(32, (64, 36), 1), (40, (80, 46), 3), (34, (34, 41), 2)])
def test_knee_magnitude_shape_range_and_determinism(crop, shape, slices):
    img = knee_magnitude(np.random.default_rng(5), crop, shape, slices, fat_suppressed=False)
    assert img.shape == (slices, *shape) and img.dtype == np.float32
    assert img.min() >= 0 and 0.5 < img.max() < 1.5
    again = knee_magnitude(np.random.default_rng(5), crop, shape, slices, fat_suppressed=False)
    assert np.array_equal(img, again)
    assert not np.array_equal(img, knee_magnitude(np.random.default_rng(6), crop, shape, slices, False))


def test_knee_magnitude_fills_crop_window_and_leaves_oversampled_rows_dark():
    crop, shape = 48, (96, 56)
    img = knee_magnitude(np.random.default_rng(0), crop, shape, 3, fat_suppressed=False)
    centre = _crop(img, crop)
    assert 0.3 < (centre > 0.05).mean() < 0.95
    quarter = crop // 2 - 2
    outer = np.concatenate([img[:, :quarter], img[:, -quarter:]], axis=1)
    assert outer.max() == 0  # the leg lies inside the central half of the readout rows


def test_fat_suppression_darkens_fat_and_brightens_fluid():
    kwargs = dict(crop=64, shape=(128, 74), slices=2)
    pd = knee_magnitude(np.random.default_rng(1), fat_suppressed=False, **kwargs)
    fs = knee_magnitude(np.random.default_rng(1), fat_suppressed=True, **kwargs)  # same anatomy
    obj = pd > 0.05
    # PD: fat/marrow are the bright majority; PDFS: they are dark and only fluid stays bright
    assert np.median(fs[obj]) < 0.75 * np.median(pd[obj])
    assert fs.max() > 0.7 and (fs[obj] > 0.6).mean() < (pd[obj] > 0.6).mean()


@pytest.mark.parametrize("crop,shape", [(1, (4, 4)), (32, (31, 40)), (32, (64,))])
def test_knee_magnitude_rejects_bad_grid(crop, shape):
    with pytest.raises(ValueError, match="crop|shape"):
        knee_magnitude(np.random.default_rng(0), crop, shape, 2, fat_suppressed=False)


def test_smooth_polynomial_peak_is_amplitude_and_broadcasts():
    g = np.linspace(-1, 1, 9)
    y, x, t = g[None, :, None], g[None, None, :], np.array([-1.0, 1.0])[:, None, None]
    state = np.random.default_rng(3).bit_generator.state
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    field = smooth_polynomial(rng, y, x, t, 0.25)  # the grid the amplitude is defined on
    assert field.shape == (2, 9, 9) and field.dtype == np.float32
    assert np.abs(field).max() == pytest.approx(0.25, rel=1e-6)
    rng.bit_generator.state = state
    dense = np.linspace(-1, 1, 33)
    same = smooth_polynomial(rng, dense[None, :, None], dense[None, None, :], t, 0.25)
    np.testing.assert_array_equal(same[:, ::4, ::4], field)  # same coefficients, finer grid
    # a quadratic: third differences vanish along both axes
    assert np.abs(np.diff(same, n=3, axis=1)).max() < 1e-6
    assert np.abs(np.diff(same, n=3, axis=2)).max() < 1e-6


# ---------------------------------------------------------------- file schema


def test_schema_dtypes_shapes_attrs(dataset):
    g = geometry(SPEC.size)
    acquisitions = set()
    for path in _all_files(dataset):
        with h5py.File(path, "r") as hf:
            assert set(hf.keys()) == {"kspace", "reconstruction_esc", "reconstruction_rss", "ismrmrd_header"}
            assert hf["kspace"].dtype == np.complex64
            assert hf["kspace"].shape == (SPEC.slices, 2 * SPEC.size, g.width)
            for key in ("reconstruction_esc", "reconstruction_rss"):
                assert hf[key].dtype == np.float32
                assert hf[key].shape == (SPEC.slices, SPEC.size, SPEC.size)
            assert isinstance(hf["ismrmrd_header"][()], bytes)
            attrs = dict(hf.attrs)
        assert set(attrs) >= {"max", "norm", "acquisition", "patient_id"}
        assert attrs["acquisition"] in ("CORPD_FBK", "CORPDFS_FBK")
        acquisitions.add(attrs["acquisition"])
        assert re.fullmatch(r"[0-9a-f]{64}", attrs["patient_id"])
    assert acquisitions == {"CORPD_FBK", "CORPDFS_FBK"}


def test_header_parses_like_fastmri_and_padding_matches_zero_columns(dataset):
    g = geometry(SPEC.size)
    for path in _all_files(dataset):
        meta = _fastmri_metadata(path)
        assert meta["encoding_size"] == (2 * SPEC.size, g.width, 1)
        assert meta["recon_size"] == (SPEC.size, SPEC.size, 1)
        assert meta["num_slices"] == SPEC.slices
        for space in ("encodedSpace", "reconSpace"):
            fov = [float(_et_query(meta["root"], ["encoding", space, "fieldOfView_mm", a])) for a in "xyz"]
            assert all(v > 0 for v in fov)
        field = float(_et_query(meta["root"], ["acquisitionSystemInformation", "systemFieldStrength_T"]))
        assert field in (1.5, 3.0)
        kspace = _load(path)["kspace"]
        left, right = meta["padding_left"], meta["padding_right"]
        assert (left, right) == (g.padding_left, g.padding_right)
        assert np.all(kspace[..., :left] == 0) and np.all(kspace[..., right:] == 0)
        # every acquired column holds signal or noise in every slice
        assert np.all(np.abs(kspace[..., left:right]).max(axis=-2) > 0)


def test_esc_is_crop_of_ifft_magnitude_and_attrs_match(dataset):
    for path in _all_files(dataset):
        d = _load(path)
        expected = np.abs(_crop(_numpy_ifft2c(d["kspace"].astype(np.complex128)), SPEC.size))
        np.testing.assert_allclose(d["reconstruction_esc"], expected, rtol=1e-4, atol=1e-6 * expected.max())
        via_torch = _crop(ifft2c(torch.from_numpy(d["kspace"])).abs().numpy(), SPEC.size)
        np.testing.assert_allclose(d["reconstruction_esc"], via_torch, rtol=1e-4, atol=1e-6 * expected.max())
        esc = d["reconstruction_esc"]
        assert d["attrs"]["max"] == pytest.approx(float(esc.max()), rel=1e-6)
        assert d["attrs"]["norm"] == pytest.approx(float(np.linalg.norm(esc.astype(np.float64))), rel=1e-6)
        # rss is a different, but closely related, reference
        assert not np.allclose(d["reconstruction_rss"], esc)
        assert _corr(d["reconstruction_rss"], esc) > 0.95


def test_absolute_scale_is_fastmri_like_and_varies(dataset):
    maxima = [float(_load(p)["attrs"]["max"]) for p in _all_files(dataset)]
    assert all(3e-6 < m < 1e-3 for m in maxima)  # not unit scale
    assert max(maxima) / min(maxima) > 1.05


# ---------------------------------------------------------------- determinism


def test_same_spec_gives_identical_kspace_and_other_seed_differs(dataset, tmp_path):
    again = generate(tmp_path / "again", SPEC)
    other = generate(tmp_path / "other", SyntheticSpec(**{**asdict(SPEC), "seed": 8}))
    for a, b in zip(_all_files(dataset), _all_files(again)):
        assert a.name == b.name
        da, db = _load(a), _load(b)
        assert np.array_equal(da["kspace"], db["kspace"])
        assert np.array_equal(da["reconstruction_esc"], db["reconstruction_esc"])
        assert da["ismrmrd_header"] == db["ismrmrd_header"]
        assert da["attrs"]["patient_id"] == db["attrs"]["patient_id"]
    first, first_other = _load(_all_files(dataset)[0]), _load(_all_files(other)[0])
    assert not np.allclose(first["reconstruction_rss"], first_other["reconstruction_rss"])
    assert _all_files(dataset)[0].name != _all_files(other)[0].name


def test_generation_does_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    synthesize_volume(SyntheticSpec(slices=2, size=32), 0, 0)
    assert np.random.random() == before


# ---------------------------------------------------------------- anatomy-likeness


def test_targets_have_many_tissue_levels_unlike_a_single_ellipse(dataset):
    yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
    noise = np.random.default_rng(0).standard_normal((64, 64))
    ellipse = ((yy / 0.8) ** 2 + (xx / 0.6) ** 2 < 1) * (1 + 0.3 * xx + 0.2 * yy) * (1 + 0.05 * noise)
    # negative control: a single (biased, textured) ellipse has one mode and no internal edges
    assert _histogram_peaks(ellipse, ellipse > 0.05) < 2
    assert _internal_edge_fraction(ellipse, ellipse > 0.05) < 0.01
    for path in _all_files(dataset):
        d = _load(path)
        rss = d["reconstruction_rss"]
        obj = rss > 0.05 * rss.max()
        assert 0.3 < obj.mean() < 0.95  # an object, surrounded by background
        # many structures inside the object, not just an outline
        assert min(_internal_edge_fraction(rss[s], obj[s]) for s in range(SPEC.slices)) > 0.03
        # distinct levels over a wide range: dark cortex/ligaments and bright fat/fluid/marrow
        inside = rss[obj] / np.percentile(rss[obj], 99)
        assert (inside < 0.2).mean() > 0.01 and (inside > 0.6).mean() > 0.02
        if d["attrs"]["acquisition"] == "CORPD_FBK":  # muscle vs fat/marrow: a bimodal histogram
            assert min(_histogram_peaks(rss[s], obj[s]) for s in range(SPEC.slices)) >= 2


def test_targets_are_spatially_smooth_not_noise(dataset):
    esc = _load(_all_files(dataset)[1])["reconstruction_esc"]
    assert min(_lag1(esc[s]) for s in range(SPEC.slices)) > 0.8
    noise = np.random.default_rng(0).standard_normal((64, 64))
    assert abs(_lag1(noise)) < 0.1  # the statistic does separate texture from noise


def test_neighbouring_slices_alike_volumes_differ(dataset):
    vols = [_load(p)["reconstruction_esc"] for p in _all_files(dataset)]
    vols = [v / v.max() for v in vols]
    adjacent = [_corr(v[s], v[s + 1]) for v in vols for s in range(SPEC.slices - 1)]
    pairs = [(i, j) for i in range(len(vols)) for j in range(i + 1, len(vols))]
    across = [_corr(vols[i][s], vols[j][s]) for i, j in pairs for s in (0, 3)]
    assert min(adjacent) > 0.8  # only 6 slices span the stack here, so neighbours are far apart
    assert np.mean(adjacent) > np.mean(across) + 0.15
    assert max(across) < min(adjacent)
    # but slices of a volume are not copies of each other
    assert all(not np.allclose(v[0], v[-1]) for v in vols)


def test_background_dark_and_object_in_central_rows(dataset):
    d = _load(_all_files(dataset)[0])
    esc, rss = d["reconstruction_esc"], d["reconstruction_rss"]
    obj = rss > 0.05 * rss.max()
    background = rss < 1e-3 * rss.max()
    assert background.mean() > 0.05
    ratio = esc[background].mean() / esc[obj].mean()
    assert 0.002 < ratio < 0.08  # dark but with measurement noise, a few per cent of the signal
    full = np.abs(_numpy_ifft2c(d["kspace"]))  # (S, 2C, W)
    quarter = SPEC.size // 2
    outer_rows = np.concatenate([full[:, : quarter - 2], full[:, -(quarter - 2) :]], axis=1)
    assert outer_rows.mean() < 0.1 * full[:, quarter:-quarter].mean()


def test_smooth_nontrivial_phase_and_measurement_noise(dataset):
    d = _load(_all_files(dataset)[0])
    image = _crop(_numpy_ifft2c(d["kspace"]), SPEC.size)
    rss = d["reconstruction_rss"]
    strong = rss > 0.3 * rss.max()
    # phase differences between neighbouring strong pixels are small, but phase spans > 1 rad
    step = np.angle(image[:, :, 1:] * np.conj(image[:, :, :-1]))[strong[:, :, 1:] & strong[:, :, :-1]]
    assert np.median(np.abs(step)) < 0.1
    unit = image[strong] / np.abs(image[strong])
    spread = np.angle(unit * np.conj(unit.mean()))  # phase around its mean direction
    assert np.percentile(spread, 98) - np.percentile(spread, 2) > 0.8
    # esc differs from the noise-free rss by measurement noise/truncation of a few per cent
    rel = np.sqrt(np.mean((d["reconstruction_esc"][strong] - rss[strong]) ** 2)) / rss[strong].mean()
    assert 0.005 < rel < 0.15


# ---------------------------------------------------------------- ensure / generate


def test_ensure_reuses_complete_dataset(dataset):
    before = {p: p.stat().st_mtime_ns for p in [dataset / "synthetic.json", *_all_files(dataset)]}
    assert ensure(dataset, SPEC) == dataset
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    assert len(_all_files(dataset)) == SPEC.volumes + SPEC.val_volumes


def test_ensure_rejects_other_spec_and_foreign_folders(dataset, tmp_path):
    with pytest.raises(FileExistsError, match="spec"):
        ensure(dataset, SyntheticSpec(**{**asdict(SPEC), "slices": 5}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        ensure(foreign, SPEC)
    with pytest.raises(FileExistsError, match="already exists"):
        generate(dataset, SPEC)


def test_ensure_generates_when_missing_or_empty_and_detects_incomplete(tmp_path):
    small = SyntheticSpec(volumes=1, val_volumes=1, slices=2, size=32)
    out = ensure(tmp_path / "a" / "b", small)
    assert len(_all_files(out)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_all_files(ensure(empty, small))) == 2
    _all_files(out)[0].unlink()
    with pytest.raises(FileExistsError, match="incomplete"):
        ensure(out, small)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, volume):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, volume)

    real_write = synthetic.write_volume
    monkeypatch.setattr(synthetic, "write_volume", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", SyntheticSpec(volumes=2, val_volumes=1, slices=2, size=32))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- command line


def test_cli_defaults_come_from_spec():
    args = build_parser().parse_args(["somewhere"])
    assert {f.name: getattr(args, f.name) for f in fields(SyntheticSpec)} == asdict(SyntheticSpec())


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "mriadv.data.synthetic", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_cli_writes_reuses_and_rejects(tmp_path):
    out = tmp_path / "cli"
    args = [str(out), "--volumes", "1", "--val-volumes", "1", "--slices", "2", "--size", "32", "--seed", "3"]
    run = _cli(*args)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "(2, 64, 36)" in run.stdout and "file0030" in run.stdout
    assert sorted(p.name for p in _all_files(out)) == ["file00300000.h5", "file00310000.h5"]
    again = _cli(*args)
    assert again.returncode == 0 and "reused" in again.stdout
    mismatch = _cli(*args[:-1], "4")
    assert mismatch.returncode == 1 and "spec" in mismatch.stderr


@pytest.mark.parametrize("bad", [["--size", "33"], ["--volumes", "0"], ["--seed", "-2"], ["--size", "abc"]])
def test_cli_bad_values_exit_2(tmp_path, bad):
    run = _cli(str(tmp_path / "x"), *bad)
    assert run.returncode == 2
    assert "error" in run.stderr
    assert not (tmp_path / "x").exists()
    if bad[1] != "abc":  # our own validation: a single line naming the field
        assert len(run.stderr.strip().splitlines()) == 1
        assert bad[0].lstrip("-").replace("-", "_") in run.stderr
