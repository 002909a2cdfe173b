"""Labels that are right: a human program is labelled by the execution of the text the buffer stores."""

from __future__ import annotations

import pytest

import envs  # noqa: F401  (registers the suites)
from bcoder_ray.human_seed import human_rows
from bcoder_ray.tokenization import decode_program, encode_program, eos_id
from bcoder_ray.warm_start import train_tokenizer
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
