"""Value-guided search (`bcoder_ray.model.value_search`): the selection rule, the search against a replay without a
KV cache, plain sampling when nothing is pruned, exact token counts, B-Coder's prefix value, the table at equal
tokens (`bcoder_ray.evaluation.search_budget`) and `experiments/value_search.py` on a tiny run folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bcoder_ray.model.lm import PolicyLM, load_lm
from bcoder_ray.model.prefix_value import PrefixValue
from bcoder_ray.model.sampling import sample_programs, warp_scores
from bcoder_ray.model.value_search import SearchSettings, select, value_guided_search
from learner_fixtures import EOS, KINDS, PAD, tiny_checkpoint
from tests.experiment_scripts import load_experiment

torch.set_num_threads(1)
PROMPT = [5, 6, 7, 8]
NEVER = 10_000  # a stop id no token has: no program ends before max_new_tokens


class CountToken(PrefixValue):
    """Prefers prefixes holding a known token: the value is how often `token` appears; records every call."""

    label = "count"

    def __init__(self, token: int):
        self.token, self.calls = token, []

    def values(self, prompt_ids, prefixes):
        self.calls.append([list(w) for w in prefixes])
        return [float(sum(t == self.token for t in w)) for w in prefixes]


class Constant(PrefixValue):
    def __init__(self, v: float):
        self.v = v

    def values(self, prompt_ids, prefixes):
        return [self.v] * len(prefixes)


@pytest.fixture(scope="module", params=KINDS)
def policy(request, tmp_path_factory):
    return PolicyLM(load_lm(tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))))


# ---------------------------------------------------------------------------------------------- the selection rule
def test_select_keeps_the_best_refills_or_stops_the_rest_and_stops_below_the_threshold():
    values = [0.5, 2.0, -1.0, 2.0, 1.0]
    # keep 2: rows 1 and 3 (tie: the lower row first); the others become copies of 1, 3, 1 in turn
    assert select(values, keep=2, refill=True) == ([1, 1, 3, 3, 1], [False] * 5)
    assert select(values, keep=2, refill=False) == ([0, 1, 2, 3, 4], [True, False, True, False, True])
    # below the threshold: stopped, never refilled; the survivors' copies fill only the other pruned rows
    assert select(values, keep=1, refill=True, threshold=0.0) == ([1, 1, 2, 1, 1], [False, False, True, False, False])
    assert select(values, keep=5, refill=True) == (list(range(5)), [False] * 5)
    with pytest.raises(ValueError, match="NaN"):
        select([0.0, math.nan], keep=1, refill=True)


# ---------------------------------------------------------------------------------------------- the search itself
def replay(policy: PolicyLM, value: PrefixValue, s: SearchSettings, *, max_new_tokens: int, eos: int,
           temperature: float, seed: int):
    """The search written out without a KV cache: every step, each row's logits from a full forward of the prompt
    and its tokens so far; rows copied as lists. Returns (programs, generated tokens)."""
    lm = policy.lm
    generator = torch.Generator().manual_seed(seed)
    rows = [[] for _ in range(s.particles)]
    done, stopped = [False] * s.particles, [False] * s.particles
    generated = 0
    with torch.no_grad():
        for step in range(1, max_new_tokens + 1):
            if lm.config.is_encoder_decoder:
                start = [lm.config.decoder_start_token_id]
                logits = lm(input_ids=torch.tensor([PROMPT] * len(rows)),
                            decoder_input_ids=torch.tensor([start + r for r in rows])).logits[:, -1]
            else:
                logits = lm(input_ids=torch.tensor([PROMPT + r for r in rows])).logits[:, -1]
            drawn = torch.multinomial(warp_scores(logits.float(), temperature, 1.0).softmax(-1), 1,
                                      generator=generator).squeeze(1).tolist()
            generated += done.count(False)
            for i, t in enumerate(drawn):
                if not done[i]:
                    rows[i].append(t)
                    done[i] = t == eos
                else:
                    rows[i].append(PAD)
            if all(done) or step == max_new_tokens:
                break
            active = [i for i in range(len(rows)) if not done[i]]
            if step % s.every == 0 and (len(active) > s.keep or s.threshold is not None):
                source, stop = select(value.values(PROMPT, [rows[i] for i in active]), s.keep, s.refill, s.threshold)
                copies = [list(rows[active[j]]) for j in source]
                for i, row, st in zip(active, copies, stop):
                    rows[i] = row
                    if st:
                        stopped[i] = done[i] = True
    cut = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
    return [r for r, st in zip(cut, stopped) if not st], generated


@pytest.mark.parametrize("settings", [SearchSettings(particles=4, every=2, keep=1),
                                      SearchSettings(particles=5, every=3, keep=2, refill=False),
                                      SearchSettings(particles=4, every=2, keep=2, threshold=1.0)],
                         ids=["smc", "screen", "threshold"])
def test_the_search_is_its_replay_without_a_cache(policy, settings):
    """Copies of rows (tokens and KV cache) continue exactly as the same rows decoded from scratch would."""
    value = CountToken(token=PAD + 2)
    kwargs = dict(max_new_tokens=10, temperature=1.0, seed=11)
    got = value_guided_search(policy, PROMPT, value, settings, eos_id=EOS, pad_id=PAD, **kwargs)
    programs, generated = replay(policy, CountToken(token=PAD + 2), settings, eos=EOS, **kwargs)
    assert got.programs == programs and got.generated_tokens == generated
    assert got.selections == len(value.calls) > 0
    assert got.value_tokens == sum(len(w) for call in value.calls for w in call)


def test_a_value_that_prefers_a_token_leads_every_program_to_it(policy):
    kwargs = dict(max_new_tokens=12, eos_id=NEVER, pad_id=PAD, temperature=1.0, seed=0)
    plain = sample_programs(policy, [PROMPT], 8, **kwargs)[0]
    token = max(range(48), key=lambda t: sum(w.count(t) for w in plain))   # the policy's likeliest token here
    found = value_guided_search(policy, PROMPT, CountToken(token), SearchSettings(particles=8, every=1, keep=1),
                                **kwargs)
    # every step the particle holding the token most often survives and all 8 continue from it, so the programs
    # share all but the token drawn after the last selection, and hold the token far more often than plain ones
    assert all(w[:11] == found.programs[0][:11] for w in found.programs)
    plain_mean = sum(w.count(token) for w in plain) / len(plain)
    assert min(w.count(token) for w in found.programs) >= plain_mean + 3
    assert found.generated_tokens == 8 * 12 and found.selections == 11


@pytest.mark.parametrize("threshold", [None, -math.inf])
def test_nothing_pruned_is_plain_sampling_for_the_same_seed(policy, threshold):
    kwargs = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.8, top_p=0.9, seed=3)
    for k in (1, 4):
        value = CountToken(token=9)
        got = value_guided_search(policy, PROMPT, value, SearchSettings(particles=k, every=2, keep=k,
                                                                         threshold=threshold), **kwargs)
        assert got.programs == sample_programs(policy, [PROMPT], k, **kwargs)[0]
        assert got.generated_tokens == sum(len(w) for w in got.programs) and got.stopped == 0
        assert (len(value.calls) > 0) == (threshold is not None)   # asked only when a threshold may stop one


def test_token_counts_are_exact(policy):
    kwargs = dict(max_new_tokens=10, eos_id=NEVER, pad_id=PAD, seed=1)
    value = CountToken(token=9)
    screen = value_guided_search(policy, PROMPT, value, SearchSettings(particles=6, every=3, keep=2, refill=False),
                                 **kwargs)
    assert screen.generated_tokens == 6 * 3 + 2 * (10 - 3) and screen.stopped == 4
    assert [len(w) for w in screen.programs] == [10, 10] and screen.selections == 1 and screen.value_tokens == 6 * 3
    smc = value_guided_search(policy, PROMPT, value, SearchSettings(particles=6, every=3, keep=2), **kwargs)
    assert smc.generated_tokens == 6 * 10 and smc.selections == 3             # at 3, 6 and 9 tokens
    assert smc.value_tokens == 6 * (3 + 6 + 9) and len(smc.programs) == 6
    stopped = value_guided_search(policy, PROMPT, Constant(-1.0), SearchSettings(particles=6, every=3, keep=6,
                                                                                  threshold=0.0), **kwargs)
    assert stopped.programs == [] and stopped.generated_tokens == 6 * 3 and stopped.stopped == 6


def test_a_value_of_the_wrong_length_is_refused(policy):
    class Short(PrefixValue):
        label = "short"

        def values(self, prompt_ids, prefixes):
            return [0.0]

    with pytest.raises(ValueError, match="value 'short': 1 values for 3 prefixes"):
        value_guided_search(policy, PROMPT, Short(), SearchSettings(particles=3, every=1, keep=1),
                            max_new_tokens=4, eos_id=NEVER, pad_id=PAD)


# ---------------------------------------------------------------------------------------------- B-Coder's value
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A B-Coder run folder (θ, φ moved off their initialisation) and a PPO one (no value) on the embedded suite."""
    from envs.registry import load_suite
    from learner_fixtures import tiny_run_folders

    problems = load_suite("embedded", "test", limit=3)
    return tiny_run_folders(tmp_path_factory.mktemp("value_search"), problems, names=("bcoder", "ppo"))


def test_bcoder_values_a_prefix_by_the_q_of_its_last_token(runs):
    from bcoder_ray.algorithms import load_prefix_value
    from bcoder_ray.algorithms.bcoder import ranking
    from bcoder_ray.loop.run_folder import load_run

    run = load_run(runs["bcoder"])
    ref = run.algorithm().prefix_value(run.state.algorithm)
    assert ref.spec == {"theta_dir": run.state.algorithm["theta"], "phi_dir": run.state.algorithm["phi"]}
    value = load_prefix_value(ref, run.context())
    prompt, program = [5, 17, 42, 9], [8, 99, 3, 120, 0]
    whole = ranking.token_scores(value.model, [prompt], [program], gamma=0.999, pad_id=value.model.pad_id)[0]
    # the prefixes of every length, batched (padded) together: each is the Q of the whole program at its last token
    got = value.values(prompt, [program[:t] for t in range(1, len(program) + 1)])
    assert got == pytest.approx(whole.q, abs=1e-5)
    assert len(set(round(q, 4) for q in got)) > 1                  # a trained stand-in: the values differ
    assert value.score([prompt], [program]) == pytest.approx([whole.total], abs=1e-6)   # and it ranks by R̃


def test_an_algorithm_without_a_value_is_refused(runs, tmp_path):
    from bcoder_ray.loop.run_folder import load_run

    run = load_run(runs["ppo"])
    assert run.algorithm().prefix_value(run.state.algorithm) is None
    with pytest.raises(NotImplementedError, match="'ppo' learns no value of program prefixes"):
        run.algorithm().load_prefix_value({}, "x")
    with pytest.raises(SystemExit, match="'ppo' has no value of program prefixes .* B-Coder's Q_θ"):
        value_search_script().main(["--run", runs["ppo"], "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- the table
def test_the_table_reads_plain_sampling_at_equal_tokens_exactly():
    from bcoder_ray.evaluation.search_budget import PlainPool, SearchOutcome, at_m, budget_table, tokens_to_reach

    # problem a: the best-scored program fails, the second passes; problem b: a tie at the top, one of two passes
    a = PlainPool((3.0, 2.0, 1.0, 0.0), (False, True, False, False), (10, 10, 10, 10))
    b = PlainPool((1.0, 1.0, 0.0, 0.0), (True, False, False, False), (20, 20, 20, 20))
    # 1@m by hand: a passes when program 1 is drawn and program 0 is not; b by the tie (and the 0-score pair)
    curve_a, curve_b = [0, 1 / 4, 2 / 6, 1 / 4, 0], [0, 1 / 4, (0.5 + 2) / 6, (0.5 + 0.5 + 1) / 4, 0.5]
    searches = {"reaches": [SearchOutcome(15, 1.0, 40), SearchOutcome(45, 0.0, 80)],    # 30 tokens: plain m = 2
                "cheap": [SearchOutcome(10, 0.25), SearchOutcome(20, 0.375)]}           # 15 tokens: plain m = 1
    table = budget_table([a, b], ms=(1, 2, 4), searches=searches, ranker="R̃")
    rows = {r.settings: r for r in table.rows}
    assert table.tokens_per_program == 15 and rows["m=4"].tokens == 60
    for m in (1, 2, 4):
        assert rows[f"m={m}"].pass_at_1 == pytest.approx((curve_a[m] + curve_b[m]) / 2, abs=1e-12)
    reaches = rows["reaches"]
    assert reaches.tokens == 30 and reaches.plain_m == 2 and reaches.value_tokens == 60
    assert reaches.vs_plain.mean == pytest.approx(((1 - curve_a[2]) + (0 - curve_b[2])) / 2, abs=1e-12)
    mean_curve = [(x + y) / 2 for x, y in zip(curve_a, curve_b)]
    assert reaches.plain_tokens is None                             # plain never reaches 50% within m = 4
    cheap = rows["cheap"]                                           # 31.25% lies between m = 1 (25%) and m = 2 (37.5%)
    assert cheap.plain_tokens == pytest.approx((1 + (0.3125 - mean_curve[1]) / (mean_curve[2] - mean_curve[1])) * 15)
    assert cheap.saved == pytest.approx(1 - 15 / cheap.plain_tokens)
    assert tokens_to_reach(mean_curve, 15, 0.0) == 0.0
    curves = np.array([curve_a, curve_b])
    assert at_m(curves, 4.5) is None                                 # past m_max: no plain row to pair with
    assert list(at_m(curves, 1.5)) == pytest.approx([(curve_a[1] + curve_a[2]) / 2, (curve_b[1] + curve_b[2]) / 2])
    # the goal: plain's best row is m=2 (37.5%, 30 tokens); "reaches" gets there with as many tokens, not half
    assert table.goal == {"plain": "m=2", "plain_pass@1": pytest.approx(0.375), "plain_tokens": 30.0,
                          "search": "reaches", "search_tokens": 30.0, "token_ratio": 1.0, "met": False}
    assert "goal (≤ 50%) not met" in table.markdown()
    assert "| search | reaches | 30 | 60 | 50.0 |" in table.markdown()
    half = budget_table([a, b], ms=(1, 2, 4), searches={"half": [SearchOutcome(15, 0.5), SearchOutcome(15, 0.25)]})
    assert half.goal["token_ratio"] == 0.5 and half.goal["met"]
    with pytest.raises(ValueError, match="search 'x' has 1 outcomes for 2 problems"):
        budget_table([a, b], ms=(4,), searches={"x": [SearchOutcome(1, 0.0)]})


# ---------------------------------------------------------------------------------------------- the experiment
def value_search_script():
    return load_experiment("value_search")


def test_search_settings_parse_and_refuse_what_they_cannot_read():
    script = value_search_script()
    assert script.parse_search("k=8,n=16,keep=2,refill=0,stop=-0.5") == SearchSettings(8, 16, 2, False, -0.5)
    for bad, why in (("k=8,x=1", "'x=1' is not one of"), ("k=eight", "needs a number"), ("k=0", "must be ≥ 1")):
        with pytest.raises(SystemExit, match=why):
            script.parse_search(bad)


def test_the_experiment_on_a_tiny_run_writes_one_table(runs, tmp_path, capsys):
    script = value_search_script()
    args = ["--run", runs["bcoder"], "--split", "test", "--problems", "2", "--m", "1", "2", "--search",
            "k=2,n=4,keep=1", "k=3,n=4,keep=1,refill=0", "--max-new-tokens", "12", "--workers", "1",
            "--out", str(tmp_path)]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "value_search.json").read_text())
    assert [r["settings"] for r in saved["rows"]] == ["m=1", "m=2", "k=2 n=4 keep=1 refill", "k=3 n=4 keep=1 drop"]
    assert saved["n_problems"] == 2 and len(saved["problems"]) == 2
    for problem in saved["problems"]:
        assert len(problem["plain"]["tokens"]) == 2 and all(1 <= t <= 12 for t in problem["plain"]["tokens"])
        smc, screen = problem["search"]["k=2 n=4 keep=1 refill"], problem["search"]["k=3 n=4 keep=1 drop"]
        assert 2 <= smc["tokens"] <= 2 * 12 and 0 <= smc["pass_at_1"] <= 1
        assert screen["tokens"] <= 3 * 4 + 12                       # 3 prefixes of ≤ 4 tokens, one finished
    assert printed.startswith("Value-guided search") and "Goal:" in printed
    assert (tmp_path / "value_search.md").read_text() in printed
