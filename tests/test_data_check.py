"""The data check reads every slice: NaN/inf values, all-zero slices and slice-count mismatches are
reported per file (exit 1), and a study refuses such a folder before Ray starts."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from mriadv.data import check
from mriadv.data.check import check_folder

BROKEN = {  # file -> (how it is broken, what the check must say)
    "nan_kspace.h5": ("kspace", "nan", "'kspace' has NaN or inf values in slice 1 (1 of 4)"),
    "inf_target.h5": ("reconstruction_esc", "inf", "'reconstruction_esc' has NaN or inf values in slice 2 (1 of 4)"),
    "zero_kspace.h5": ("kspace", "zero", "'kspace' is all zero in slice 3 (1 of 4)"),
    "zero_target.h5": ("reconstruction_esc", "zero", "'reconstruction_esc' is all zero in slice 0 (1 of 4)"),
    "fewer_targets.h5": (
        "reconstruction_esc",
        "drop",
        "slice counts differ: 'reconstruction_esc' has 3 slices, 'kspace' 4",
    ),
}


def corrupt(path, key: str, how: str) -> None:
    with h5py.File(path, "r+") as f:
        data = f[key]
        if how == "nan":
            data[1, 3, 5] = np.nan
        elif how == "inf":
            data[2, 0, 0] = np.inf
        elif how == "zero":
            data[3 if key == "kspace" else 0] = 0
        else:  # one slice fewer than the k-space
            values = data[:-1]
            del f[key]
            f[key] = values


@pytest.fixture
def broken_folder(synthetic_root, tmp_path):
    """A copy of the synthetic data whose validation split holds one broken copy per kind."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    val = root / "singlecoil_val"
    good = sorted(val.glob("*.h5"))[0]
    for name, (key, how, _) in BROKEN.items():
        shutil.copy2(good, val / name)
        corrupt(val / name, key, how)
    return root


def test_each_broken_file_is_reported_and_the_check_exits_1(broken_folder, capsys):
    assert check.main([str(broken_folder)]) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    for name, (_, _, message) in BROKEN.items():
        assert sum(name in e for e in errors) == 1, (name, errors)
        assert any(name in e and message in e for e in errors), (name, message, errors)
    assert len(errors) == len(BROKEN)  # the valid files are not reported
    assert "train: " in out and "NOT usable" in out


def test_quick_check_skips_the_contents(broken_folder, capsys):
    assert check.main([str(broken_folder), "--quick"]) == 1  # the slice-count mismatch is layout
    err = capsys.readouterr().err
    assert "fewer_targets.h5" in err and "NaN" not in err and "all zero" not in err


def test_scan_verdicts_are_cached_per_file(broken_folder, tmp_path, monkeypatch):
    calls = []
    real = check.scan_volume
    monkeypatch.setattr(check, "scan_volume", lambda path, key: calls.append(path.name) or real(path, key))
    first = check_folder(broken_folder, cache_dir=tmp_path / "cache")
    scanned = len(calls)
    assert scanned == 3 + 2 + len(BROKEN) - 1  # every file that passed the layout check, once
    calls.clear()
    assert check_folder(broken_folder, cache_dir=tmp_path / "cache")["val"].errors == first["val"].errors
    assert calls == []
    fixed = broken_folder / "singlecoil_val" / "nan_kspace.h5"
    with h5py.File(fixed, "r+") as f:
        f["kspace"][1, 3, 5] = 0
    os.utime(fixed, ns=(fixed.stat().st_atime_ns, fixed.stat().st_mtime_ns + 10**9))
    again = check_folder(broken_folder, cache_dir=tmp_path / "cache")["val"].errors
    assert calls == ["nan_kspace.h5"] and not any("nan_kspace.h5" in e for e in again)


def test_the_study_refuses_such_a_folder_before_ray(broken_folder, tmp_path, capsys):
    from study.run import main

    saved = dict(os.environ)
    try:
        code = main(
            [
                "--space",
                "eps_sweep",
                "--profile",
                "smoke",
                "--data",
                str(broken_folder),
                "--results",
                str(tmp_path / "results"),
            ]
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: data folder") and err.count("\n") == 1
    assert "nan_kspace.h5" in err and "NaN or inf" in err and "all zero" in err
    assert "resources:" not in out  # stopped before Ray
