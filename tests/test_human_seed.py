"""Labels that are right: a human program is labelled by the execution of the text the buffer stores."""

from __future__ import annotations

import pytest

import envs  # noqa: F401  (registers the suites)
from bcoder_ray.buffer.human_seed import human_rows, seeded_problems
from bcoder_ray.model.tokenization import decode_program, encode_program, eos_id
from bcoder_ray.model.warm_start import train_tokenizer
from envs.execute import Executor
from envs.registry import load_suite


@pytest.fixture(scope="module")
def problems():
    return load_suite("embedded", "train")[:4]


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer([p.prompt + r for p in problems for r in p.references], vocab_size=300)


def test_a_truncated_human_program_is_labelled_by_its_cut_text(problems, tokenizer):
    full = [len(encode_program(tokenizer, p.references[0], 10_000)) for p in problems]
    limit = min(full) // 2  # every reference is cut
    with Executor(workers=1) as ex:
        cut_rows, lost = human_rows(problems, tokenizer, limit, ex)
        whole_rows, lost_whole = human_rows(problems, tokenizer, max(full), ex)
    assert lost == lost_whole == 0  # every program got a verdict
    for row, p in zip(cut_rows, problems):
        assert row["truncated"] is True and len(row["program_ids"]) == limit
        assert row["program_ids"][-1] != eos_id(tokenizer)
        assert row["program"] == decode_program(tokenizer, row["program_ids"]) != p.references[0]
        assert row["outcome"] != "passed" and row["reward"] < 0  # the cut text fails, as it is executed
    for row, p in zip(whole_rows, problems):
        assert row["truncated"] is False and row["program"] == p.references[0]
        assert row["outcome"] == "passed" and row["reward"] == 1.0


class FlakySandbox:
    """An executor whose sandbox fails (no verdict) for programs containing `bad`, always, and for the others
    on the first attempt only: what the re-runs and the drop are for."""

    def __init__(self, real, bad: str):
        self.real, self.bad, self.seen = real, bad, set()

    def run_batch(self, jobs):
        from envs.result import infra_result

        out = []
        for (program, tests), result in zip(jobs, self.real.run_batch(jobs)):
            first = program not in self.seen
            self.seen.add(program)
            out.append(infra_result("worker killed from outside", len(result.tests))
                       if self.bad in program or first else result)
        return out


def test_programs_without_a_verdict_are_rerun_then_left_out_never_labelled(problems, tokenizer):
    from bcoder_ray.model.candidates import score_with_reruns

    with Executor(workers=1) as ex:
        sandbox = FlakySandbox(ex, bad=problems[0].references[0][:20])
        results = score_with_reruns(sandbox, problems, [p.references[0] for p in problems])
        assert [r.is_infra for r in results] == [True, False, False, False]  # re-runs give the others theirs
        assert all(r.outcome.value == "passed" for r in results[1:])
        rows, lost = human_rows(problems, tokenizer, 10_000, FlakySandbox(ex, bad=problems[0].references[0][:20]))
    assert lost == 1 and len(rows) == len(problems) - 1
    assert problems[0].problem_id not in {r["problem_id"] for r in rows}  # not written as a reward


def test_seeded_problems_are_the_loops_or_the_whole_train_split_once_each():
    train = load_suite("embedded", "train")[:10]
    loop, warm = train[:4], train[4:]
    assert seeded_problems(loop, warm, "loop") == loop
    assert [p.problem_id for p in seeded_problems(loop, warm, "train")] == [p.problem_id for p in train]
    # without max_train_problems the warm start learns from the loop's own problems: nothing is seeded twice
    assert [p.problem_id for p in seeded_problems(train, train, "train")] == [p.problem_id for p in train]
    with pytest.raises(ValueError, match="human_programs"):
        seeded_problems(loop, warm, "all")
