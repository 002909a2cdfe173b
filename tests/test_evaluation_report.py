"""Table 1 (JSON + markdown), the Figure 3 statement, and the figures as PNG files."""

from __future__ import annotations

import json
import random
import struct
import zlib

import pytest

from bcoder_ray.evaluation.metrics import CandidateRecord, metrics_from_candidates, rtilde_outcome_order, write_candidates
from bcoder_ray.evaluation.plots import curve_points, plot_ranking_gain, plot_rtilde_density, plot_training_curve
from bcoder_ray.evaluation.report import (ReportError, load_metrics, summary_line, table1_markdown, table1_rows,
                               write_json)
from envs.result import REWARD, Outcome

MEAN_RTILDE = {"passed": 1.0, "failed": 0.2, "runtime_error": -0.4, "compile_error": -1.2}


def records(model: str = "m", rtilde: bool = True, seed: int = 0, problems: int = 6, m: int = 8,
            difficulties=("introductory", "interview", "competition")) -> list[CandidateRecord]:
    rng = random.Random(seed)
    out = []
    for p in range(problems):
        for i in range(m):
            outcome = rng.choice(list(MEAN_RTILDE))
            out.append(CandidateRecord(
                suite="apps", split="test", problem_id=str(p), difficulty=difficulties[p % len(difficulties)],
                sample_index=i, program=f"print({i})", outcome=outcome, reward=REWARD[Outcome(outcome)],
                passed=outcome == "passed", example_passed=None,
                rtilde=MEAN_RTILDE[outcome] + rng.gauss(0, 0.2) if rtilde else None, model=model,
                ranker="q" if rtilde else None))
    return out


def assert_png(path) -> None:
    """A PNG signature, an IHDR with a non-empty image, and chunks whose CRCs check, up to IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_table1_markdown_layout_and_values():
    ranked = metrics_from_candidates(records("bcoder"), ks=(1, 5))
    ranked["label"] = "B-Coder iter 3"
    ranked["sampling"] = {"temperature": 0.6}
    plain = metrics_from_candidates(records("ckpt", rtilde=False, seed=1), ks=(1, 5))
    text = table1_markdown([(None, ranked), ("θ_ckpt", plain)], ks=(1, 5), include_paper=True)
    lines = text.strip().splitlines()
    assert lines[0] == ("| model | pass@1 intro | pass@1 inter | pass@1 comp | pass@1 all | pass@5 intro | "
                        "pass@5 inter | pass@5 comp | pass@5 all |")
    assert lines[2].startswith("| B-Coder iter 3 (ranked by R̃, m=8, T=0.6) | ")
    assert lines[3].startswith("| θ_ckpt (pass@k, m=8) | ")
    assert lines[-1].startswith("| B-Coder (ranked, m=256, T=0.6), paper | 6.70 | 1.50 | 0.30 | 2.30 | 10.40 |")
    cells = lines[2].split(" | ")
    assert float(cells[4]) == pytest.approx(100 * ranked["overall"]["ranked_pass@k"]["1"], abs=0.005)
    assert float(cells[1]) == pytest.approx(
        100 * ranked["by_difficulty"]["introductory"]["ranked_pass@k"]["1"], abs=0.005)
    # the same numbers as data
    table = table1_rows([(None, ranked)], ks=(1,), variant="pass")
    assert table["columns"] == ["introductory", "interview", "competition", "all"]
    assert table["rows"][0]["values"]["1"]["all"] == pytest.approx(100 * ranked["overall"]["pass@k"]["1"])


def test_metrics_json_round_trip_and_bad_files(tmp_path):
    metrics = metrics_from_candidates(records(), ks=(1,))
    write_json(tmp_path / "run" / "metrics.json", metrics)
    assert load_metrics(tmp_path / "run") == metrics
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ReportError, match="other.json: not a metrics file"):
        load_metrics(tmp_path / "other.json")
    with pytest.raises(ReportError, match="no such metrics file"):
        load_metrics(tmp_path / "missing.json")
    assert summary_line(metrics).startswith("ranked by R̃ pass@1 = ")
    assert "CI" in summary_line(metrics)
    assert summary_line({**metrics, "ranker": "critic-final"}).startswith("ranked by the critic pass@1 = ")


def test_rtilde_order_statement():
    good = rtilde_outcome_order(records())
    assert good["holds"] is True and good["holds_centred"] is True
    assert good["statement"].startswith("Mean R̃ orders the outcomes as the paper expects")
    flipped = [CandidateRecord(**{**r.to_json(), "rtilde": -r.rtilde}) for r in records()]
    bad = rtilde_outcome_order(flipped)
    assert bad["holds"] is False and "does NOT order" in bad["statement"]
    only_passes = [r for r in records() if r.passed]
    assert rtilde_outcome_order(only_passes)["holds"] is None


def test_plots_are_written_as_valid_pngs(tmp_path):
    candidates = tmp_path / "candidates.jsonl"
    write_candidates(candidates, records(m=8))
    assert_png(plot_rtilde_density(candidates, tmp_path / "fig3.png"))
    assert_png(plot_ranking_gain(candidates, tmp_path / "fig5.png", ks=(1, 5)))
    per_iteration = []
    for it in range(3):
        metrics = metrics_from_candidates(records(seed=it), ks=(1,))
        metrics["iteration"] = it
        per_iteration.append(metrics)
    points = curve_points(per_iteration)
    assert [p["iteration"] for p in points] == [0, 1, 2]
    assert all(p["low"] <= p["value"] <= p["high"] for p in points)
    assert_png(plot_training_curve({"B-Coder": points, "no conservative op": points[:2]}, tmp_path / "fig1.png"))


def test_training_curve_points_from_a_run_folder(tmp_path):
    from bcoder_ray.evaluation.plots import training_curve_from_run

    lines = [{"iteration": 1, "rollout": {"programs": 40, "passed": 10, "pass_rate": 0.25},
              "eval": {"overall": metrics_from_candidates(records(seed=1), ks=(1,))["overall"]}},
             {"iteration": 0, "rollout": {"programs": 40, "passed": 4, "pass_rate": 0.1}, "eval": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert training_curve_from_run(tmp_path) == [{"iteration": 0, "value": pytest.approx(10.0)},
                                                 {"iteration": 1, "value": pytest.approx(25.0)}]
    held_out = training_curve_from_run(tmp_path, source="eval")
    assert [p["iteration"] for p in held_out] == [1] and held_out[0]["low"] <= held_out[0]["value"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        training_curve_from_run(tmp_path / "missing")
