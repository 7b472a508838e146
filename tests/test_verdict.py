"""Never silently worse than the input: the paired comparison of a model with its zero-filled input
(mriadv.verdict) against closed forms, and every surface of a run that says it."""

from __future__ import annotations

import json
import math

import pytest

from mriadv import assess, train
from mriadv.assessment import format_assessment
from mriadv.fit import fit
from mriadv.verdict import VersusInput, flat, study_warning, versus_input


def _vols(values: list[float]) -> dict[str, float]:
    return {f"v{i}.h5": v for i, v in enumerate(values)}


def test_ratio_and_paired_errors_against_closed_forms():
    a, b = [0.02, 0.04, 0.06], [0.05, 0.07, 0.12]  # model and zero-filled NMSE per volume
    s, t = [0.80, 0.70, 0.75], [0.60, 0.62, 0.58]
    c = versus_input(_vols(a), _vols(b), _vols(s), _vols(t))
    ratio = 0.12 / 0.24  # mean(a) / mean(b) = 0.04 / 0.08
    assert c.ratio == pytest.approx(ratio)
    d = [x - ratio * y for x, y in zip(a, b)]  # sd 0.005, so SE(R) = 0.005 / sqrt(3) / 0.08
    assert d == pytest.approx([-0.005, 0.005, 0.0])
    assert c.ratio_se == pytest.approx(0.005 / math.sqrt(3) / 0.08)
    diffs = [-0.03, -0.03, -0.06]  # a - b: mean -0.04, sd 0.017320508
    assert c.d_nmse == pytest.approx(-0.04)
    assert c.d_nmse_se == pytest.approx(math.sqrt(sum((x + 0.04) ** 2 for x in diffs) / 2 / 3))
    assert c.d_ssim == pytest.approx((0.20 + 0.08 + 0.17) / 3)
    assert c.verdict == "beats" and c.volumes == 3


def test_a_model_proportional_to_its_input_has_an_exact_ratio():
    b = [0.1, 0.2, 0.4, 0.3]
    c = versus_input(_vols([2 * x for x in b]), _vols(b), _vols([0.5] * 4), _vols([0.6, 0.61, 0.62, 0.63]))
    assert c.ratio == pytest.approx(2.0) and c.ratio_se == pytest.approx(0.0, abs=1e-15)
    assert c.verdict == "worse"
    assert "(2.00x ± 0.00)" in c.line(96) and "worse than its input — 96 updates; try more steps" in c.line(96)


def test_a_difference_within_two_standard_errors_is_not_a_verdict():
    a, b = [0.10, 0.12, 0.08], [0.11, 0.10, 0.10]  # differences -0.01, +0.02, -0.02: mean -0.0033, SE 0.0133
    c = versus_input(_vols(a), _vols(b), _vols([0.7, 0.71, 0.69]), _vols([0.69, 0.72, 0.70]))
    assert c.verdict == "unclear" and "not distinguishable from its input" in c.line()
    # a lower NMSE with a clearly lower SSIM is worse, not better
    c = versus_input(_vols([0.05, 0.06, 0.07]), _vols([0.1, 0.11, 0.12]), _vols([0.5, 0.51, 0.52]), _vols([0.6] * 3))
    assert c.verdict == "worse"


def test_flat_columns_and_the_study_warning():
    c = VersusInput(0.03, 0.015, 0.5, 0.6, 2.0, 0.1, 0.015, 0.001, -0.1, 0.01, 4, "worse")
    row = flat(c)
    assert row["report_vs_input"] == "worse" and row["report_beats_input"] == 0.0
    assert row["report_vs_input_ratio"] == 2.0 and row["report_vs_input_ratio_se"] == 0.1
    assert study_warning(["worse", "unclear"]).startswith("WARNING: no model of this study beats")
    assert "too few updates" in study_warning(["worse"])
    assert study_warning(["worse", "beats"]) is None and study_warning([]) is None


@pytest.fixture(scope="module")
def one_step_run(synthetic_root, tmp_path_factory):
    """One update from a random start: a model certainly worse than its input, through the CLI."""
    out = tmp_path_factory.mktemp("one_step")
    argv = [
        "--data",
        str(synthetic_root),
        "--profile",
        "smoke",
        "--out",
        str(out),
        "--epsilon",
        "0",
        "--max-epochs",
        "1",
        "--set",
        "max_train_batches=1",
        "--set",
        "attacks=noise",
        "--set",
        "instabilities=false",
        "--results",
        str(out / "results"),
    ]
    return out, argv


def test_a_run_worse_than_its_input_says_so_on_every_surface(one_step_run, capsys, tmp_path):
    out, argv = one_step_run
    assert train.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "worse than its input" in lines[-1] and "1 updates; try more steps" in lines[-1], lines[-3:]
    record = json.loads((out / "records.jsonl").read_text().splitlines()[-1])
    vs = record["report"]["vs_input"]
    assert vs["verdict"] == "worse" and vs["ratio"] > 1 and vs["nmse"] > vs["zf_nmse"]
    # the record's per-volume numbers give the same ratio, computed here independently
    clean = json.loads(record["report"]["clean"]["volume_nmse"])
    zf = json.loads(record["report"]["zero_filled"]["volume_nmse"])
    assert vs["ratio"] == pytest.approx(sum(clean.values()) / sum(zf[k] for k in clean))
    # assess of the saved model prints the same verdict as its last line
    a = assess.assess(out, attacks=["noise"])
    assert a.versus_input["verdict"] == "worse"
    assert a.versus_input["ratio"] == pytest.approx(vs["ratio"], rel=1e-6)
    assert "worse than its input" in format_assessment(a)[-1]


def test_fit_logs_the_verdict_and_flattens_it(synthetic_root, tiny_config):
    lines: list[str] = []
    cfg = tiny_config(
        synthetic_root, max_epochs=1, max_train_batches=1, epsilon=0.0, attacks=("noise",), instabilities=False
    )
    result = fit(cfg, log=lines.append)
    assert "worse than its input" in lines[-1]
    flat_record = result.history[-1].flat()
    assert flat_record["report_vs_input"] == "worse" and flat_record["report_beats_input"] == 0.0
    assert flat_record["report_vs_input_ratio"] > 1
