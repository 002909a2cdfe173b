"""The on-policy row filter of PPO/GRPO (`bcoder_ray.algorithms.lm_policy.on_policy_rows`) over buffer tables.

The buffer's schema (version 2) has nullable ``decoding``, ``logprobs``, ``truncated`` and ``run_id`` columns;
these tests set them on synthetic rows (``synthetic_rows`` / ``rows_to_table``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from onpolicy_reference import on_policy_expression, on_policy_mask, select_on_policy
from bcoder_ray.buffer.schema import rows_to_table
from bcoder_ray.buffer.synthetic import synthetic_rows


def _with_new_columns(table: pa.Table, decoding: list, has_logprobs: list[bool]) -> pa.Table:
    lengths = table["program_ids"].to_pylist()
    logprobs = [[-0.5] * len(ids) if ok else None for ids, ok in zip(lengths, has_logprobs)]
    columns = {"decoding": pa.array(decoding, pa.string()), "logprobs": pa.array(logprobs, pa.list_(pa.float32())),
               "truncated": pa.array([False] * table.num_rows), "run_id": pa.array(["run"] * table.num_rows)}
    for name, values in columns.items():  # the buffer's v2 rows have these columns: replace them
        table = table.drop_columns([name]) if name in table.column_names else table
        table = table.append_column(name, values)
    return table


def _hand_table() -> pa.Table:
    spec = [  # (name, source, policy_version, decoding, has logprobs)
        ("v3-sample", "generated", "3", "sample", True),
        ("v3-greedy", "generated", "3", "greedy", True),       # CodeRL-style greedy baseline: excluded
        ("v3-no-logprobs", "generated", "3", "sample", False),  # written before the column: not eligible
        ("v3-null-decoding", "generated", "3", None, True),    # decoding unknown: counts as sampled
        ("v2-sample", "generated", "2", "sample", True),       # the previous policy: off-policy
        ("human", "human", "3", None, True),
        ("v30-sample", "generated", "30", "sample", True),     # string equality, not a prefix match
        ("v3-sample-b", "generated", "3", "sample", True),
    ]
    rows = [{"tests_hash": "t", "suite": "toy", "split": "train", "problem_id": f"p{i % 3}", "source": s[1],
             "policy_version": s[2], "program": s[0], "program_ids": list(range(1, 2 + i)),
             "tokenizer_hash": "tok", "outcome": "failed"} for i, s in enumerate(spec)]
    table = rows_to_table(rows, "onpolicy-test")
    return _with_new_columns(table, [s[3] for s in spec], [s[4] for s in spec])


def test_exactly_the_current_versions_sampled_rows_with_logprobs():
    table = _hand_table()
    assert select_on_policy(table, "3")["program"].to_pylist() == ["v3-sample", "v3-null-decoding", "v3-sample-b"]
    assert select_on_policy(table, 3)["program"].to_pylist() == ["v3-sample", "v3-null-decoding", "v3-sample-b"]
    assert select_on_policy(table, "2")["program"].to_pylist() == ["v2-sample"]
    assert select_on_policy(table, "4").num_rows == 0
    # a table read before the `decoding` column existed: no greedy rows can be told apart, all sampled count
    old = table.drop_columns(["decoding"])
    assert select_on_policy(old, "3")["program"].to_pylist() == \
        ["v3-sample", "v3-greedy", "v3-null-decoding", "v3-sample-b"]


def test_filter_on_synthetic_buffer_rows_and_dataset_expression(tmp_path):
    rng = np.random.default_rng(0)
    table = pa.concat_tables([synthetic_rows(rng, 120, iteration=it, start=1000 * it, mean_tokens=8,
                                             max_tokens=20) for it in range(3)]
                             + [synthetic_rows(rng, 40, source="human", mean_tokens=8, max_tokens=20)])
    n = table.num_rows
    decoding = rng.choice(np.array(["sample", "greedy", None], dtype=object), n, p=[0.7, 0.2, 0.1]).tolist()
    has_logprobs = (rng.random(n) < 0.8).tolist()
    table = _with_new_columns(table, decoding, has_logprobs)
    rows = table.select(["policy_version", "source", "decoding", "logprobs"]).to_pylist()
    want = [r["policy_version"] == "v1" and r["source"] == "generated" and r["decoding"] != "greedy"
            and r["logprobs"] is not None for r in rows]
    assert any(want)
    assert on_policy_mask(table, "v1").to_pylist() == want
    # the same predicate as a pushdown expression over a Parquet dataset
    pq.write_table(table, tmp_path / "rows.parquet")
    scanned = ds.dataset(tmp_path / "rows.parquet").to_table(filter=on_policy_expression("v1"))
    assert scanned["program"].to_pylist() == select_on_policy(table, "v1")["program"].to_pylist()


def test_missing_or_corrupt_columns_are_named():
    table = _hand_table()
    with pytest.raises(KeyError, match="no 'logprobs' column"):
        on_policy_mask(table.drop_columns(["logprobs"]), "3")
    with pytest.raises(KeyError, match="policy_version"):
        on_policy_mask(table.drop_columns(["policy_version"]), "3")
    lp = table["logprobs"].to_pylist()
    lp[7] = lp[7][:-1]                                         # one log-prob short for v3-sample-b
    bad = table.set_column(table.schema.get_field_index("logprobs"), "logprobs",
                           pa.array(lp, pa.list_(pa.float32())))
    sid = table["sample_id"][7].as_py()
    with pytest.raises(ValueError, match=f"row 7 \\(sample_id {sid}\\) has 7 logprobs for 8 program tokens"):
        on_policy_mask(bad, "3")
    assert on_policy_mask(bad, "2").to_pylist().count(True) == 1   # a corrupt row of another version is not read
    with pytest.raises(TypeError, match="policy_version"):
        on_policy_mask(table, 3.0)
