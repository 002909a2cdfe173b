"""Critic Sampling (CodeRL Figure 3) on a scripted sampler and critic: cut points, allocation, rounds, the F-empty
fallback, the n@k order and the sample count. Pure logic: no model, exact values."""

from __future__ import annotations

import pytest

from bcoder_ray.algorithms.coderl.critic_sampling import (CriticSamplingRefused, allocate, critic_sampling, cut_point,
                                                   pool_order, require_example_tests)

EOS = 1
N = 5
SEED = 100
# the scripted critic's p(passed) of a prefix ending in each token (p(failed) = 1 - p(passed)); tokens 40+k,
# which the scripted sampler appends to seeds, have p(passed) < 1/2, so a cut falls right before them
VALUE = {10: 0.6, 11: 0.8, 12: 0.55, 13: 0.9, 14: 0.7, 20: 0.3, 21: 0.2, 22: 0.1, 40: 0.4, 41: 0.35, 42: 0.3}
ROUND0 = [[10, 11, 20, EOS], [21, EOS], [12, 13, 14, EOS], [10, EOS], [22, EOS]]


def value_fn(programs):
    """p(passed | w_0…w_t) = VALUE[w_t]; at EOS, the mean VALUE of the program's other tokens."""
    out = []
    for program in programs:
        body = [VALUE[w] for w in program if w != EOS]
        p_pass = [VALUE[w] if w != EOS else sum(body) / len(body) for w in program]
        out.append((p_pass, [1.0 - p for p in p_pass]))
    return out


def passes_if_11_or_13(programs):
    return [11 in p or 13 in p for p in programs]


class ScriptedSampler:
    """Plain sampling returns ROUND0; a seed's k-th continuation is seed + [40 + k, EOS]. Records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, prefixes, counts, seed):
        self.calls.append((prefixes, counts, seed))
        if prefixes == [[]]:
            return [list(p) for p in ROUND0[:counts[0]]]
        return [prefix + [40 + k, EOS] for prefix, count in zip(prefixes, counts) for k in range(count)]


# ------------------------------------------------------------------------------------------ cut points
@pytest.mark.parametrize("p_pass, p_fail, expected", [
    ([0.55, 0.6, 0.8, 0.7, 0.5], [0.45, 0.4, 0.2, 0.3, 0.5], 3),  # highest p(passed) at t=2: keep w_0..w_2
    ([0.6, 0.4, 0.9, 0.95], [0.4, 0.6, 0.1, 0.05], 1),            # p(failed) > p(passed) first at t=1: earlier
    ([0.1, 0.2, 0.9], [0.05, 0.1, 0.05], 2),                       # best is the last token: capped at T-1
    ([0.3, 0.9, 0.9], [0.7, 0.1, 0.1], 0),                         # fails at the first token: empty seed
    ([0.5, 0.7, 0.7, 0.2], [0.0, 0.0, 0.0, 0.0], 2),               # ties: the first maximum
    ([0.5, 0.5], [0.5, 0.5], 1),                                   # equal is not "p(failed) > p(passed)"
    ([0.9], [0.1], 0),                                             # a one-token program: nothing to keep
])
def test_cut_points(p_pass, p_fail, expected):
    assert cut_point(p_pass, p_fail) == expected


def test_cut_point_rejects_mismatched_values():
    with pytest.raises(ValueError, match="p_pass \\(2\\) and p_fail \\(3\\)"):
        cut_point([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-empty"):
        cut_point([], [])


def test_cut_points_on_the_scripted_critic():
    (p0, f0), (p2, f2) = value_fn([ROUND0[0], ROUND0[2]])
    assert cut_point(p0, f0) == 2          # [10, 11 | 20 ...]: best at 11, and 20 is the first failing token
    assert cut_point(p2, f2) == 2          # [12, 13 | 14, EOS]: best at 13


# ------------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("n, values, expected", [
    (10, [0.2, 0.9, 0.5], [3, 4, 3]),            # ⌊10/3⌋ = 3 each, the remainder 1 to the best (0.9)
    (10, [0.1, 0.8, 0.7, 0.3], [2, 3, 3, 2]),     # remainder 2 to the two best
    (5, [0.5, 0.5, 0.5], [2, 2, 1]),              # ties: the earlier seeds first
    (2, [0.1, 0.3, 0.2], [0, 1, 1]),              # |F| > N: one each to the N best
    (6, [0.4, 0.1], [3, 3]),                      # no remainder
    (3, [float("-inf"), 0.2], [1, 2]),            # an empty seed (value -inf) comes last
])
def test_allocation(n, values, expected):
    counts = allocate(n, values)
    assert counts == expected and sum(counts) == n


def test_allocation_rejects_no_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        allocate(4, [])


# ------------------------------------------------------------------------------------------ rounds
def test_rounds_on_a_scripted_critic():
    sampler = ScriptedSampler()
    result = critic_sampling(N, 3, sampler, passes_if_11_or_13, value_fn, seed=SEED)
    # round 0: plain sampling; F = {program 0, program 2}, seeds [10, 11] (value 0.8) and [12, 13] (value 0.9)
    # round 1: ⌊5/2⌋ = 2 each, the remainder 1 to the better seed [12, 13]
    # round 2: all 5 of round 1 pass (they keep 11 or 13), each cut before its 40+k token: one continuation each
    assert sampler.calls == [
        ([[]], [N], SEED),
        ([[10, 11], [12, 13]], [2, 3], SEED + 1),
        ([[10, 11], [10, 11], [12, 13], [12, 13], [12, 13]], [1, 1, 1, 1, 1], SEED + 2),
    ]
    assert [r.plain for r in result.rounds] == [True, False, False]
    assert result.rounds[1].programs == [[10, 11, 40, EOS], [10, 11, 41, EOS], [12, 13, 40, EOS],
                                         [12, 13, 41, EOS], [12, 13, 42, EOS]]
    assert result.n_sampled == 3 * N == len(result.programs) == len(result.passes_examples)
    assert result.programs[:N] == ROUND0


def test_pool_order_for_n_at_k():
    passes = [False, True, False, True, True, False]
    p_passed = [0.9, 0.2, 0.1, 0.7, 0.2, 0.5]
    # passing ones by p(passed): 3 (0.7), then 1 and 4 tie at 0.2 (earlier first); then the rest: 0, 5, 2
    assert pool_order(passes, p_passed) == [3, 1, 4, 0, 5, 2]


def test_result_order_and_submissions():
    result = critic_sampling(N, 2, ScriptedSampler(), passes_if_11_or_13, value_fn, seed=SEED)
    assert result.order == pool_order(result.passes_examples, result.p_passed)
    n_pass = sum(result.passes_examples)
    assert all(result.passes_examples[i] for i in result.order[:n_pass])
    passing_values = [result.p_passed[i] for i in result.order[:n_pass]]
    assert passing_values == sorted(passing_values, reverse=True)
    # p(passed) of a whole program is the critic's value of its last prefix (the EOS state)
    assert result.p_passed[2] == pytest.approx((0.55 + 0.9 + 0.7) / 3)
    assert result.submissions(1) == [ROUND0[2]]          # the best example-passing program: 0.717 > 0.6 ...
    assert len(result.submissions(100)) == result.n_sampled


def test_empty_f_is_plain_sampling():
    sampler = ScriptedSampler()
    result = critic_sampling(N, 3, sampler, lambda programs: [False] * len(programs), value_fn, seed=SEED)
    assert sampler.calls == [([[]], [N], SEED + r) for r in range(3)]
    assert result.programs == ROUND0 * 3 and result.n_sampled == 15
    assert result.order == sorted(range(15), key=lambda i: (-result.p_passed[i], i))


def test_f_is_taken_from_the_latest_round():
    """Round 1's continuations fail the example tests, so round 2 falls back to plain sampling."""
    sampler = ScriptedSampler()
    only_round0 = lambda programs: [p in (ROUND0[0], ROUND0[2]) for p in programs]   # noqa: E731
    critic_sampling(N, 3, sampler, only_round0, value_fn, seed=SEED)
    assert [c[0] for c in sampler.calls] == [[[]], [[10, 11], [12, 13]], [[]]]


def test_misbehaving_callables_are_named():
    with pytest.raises(ValueError, match="round 0: sample_fn returned 4 programs"):
        critic_sampling(N, 1, lambda prefixes, counts, seed: ROUND0[:4], passes_if_11_or_13, value_fn)
    bad_seed = lambda prefixes, counts, seed: ROUND0 if prefixes == [[]] else [[9, EOS]] * sum(counts)  # noqa
    with pytest.raises(ValueError, match="round 1: program 0 does not start with its seed 0"):
        critic_sampling(N, 2, bad_seed, passes_if_11_or_13, value_fn)
    with pytest.raises(ValueError, match="value_fn gave 2 p_pass"):
        critic_sampling(N, 1, ScriptedSampler(), passes_if_11_or_13, lambda ps: [([0.5] * 2, [0.5] * 2)] * len(ps))
    with pytest.raises(ValueError, match="n and rounds"):
        critic_sampling(0, 1, ScriptedSampler(), passes_if_11_or_13, value_fn)


def test_refusal_without_example_tests():
    with pytest.raises(CriticSamplingRefused, match="apps/0042: no example tests"):
        require_example_tests("apps/0042", None)
    with pytest.raises(ValueError):                      # a ValueError, for callers that catch those
        require_example_tests("humaneval/7", [])
    require_example_tests("apps/0001", object())         # a test spec: no refusal
