"""The buffer's columns, and turning caller rows into a validated Arrow table of them.

One row per sample (program). Prompts live in their own table keyed by (suite, problem_id, tokenizer_hash);
cached targets live only in sidecar files per fingerprint, with the columns their writer gives (`targets.py`).

Schema versions. 1: the first layout, with inline targets (target_actions, a_ckpt, v_phi, targets_fingerprint).
2: inline targets gone; `decoding`, `logprobs`, `truncated`, `run_id` added (all nullable). A version-1 file
still reads: `conform` gives its missing columns as nulls (with the read defaults below) and drops the old
inline columns, which readers ignore (their rows simply lack targets until `write_targets` fills them).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from envs.problem import program_hash
from envs.result import OUTCOMES, REWARD, ExecResult, Outcome

SCHEMA_VERSION = 2
SOURCES = ("human", "generated")
TRAIN_SPLIT = "train"

_ids = pa.list_(pa.int32())
_floats = pa.list_(pa.float32())

SAMPLE_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("program_hash", pa.string(), nullable=False),  # envs.problem.program_hash(program)
    pa.field("tests_hash", pa.string(), nullable=False),  # TestSpec.content_hash() of the hidden tests
    pa.field("suite", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # "human" | "generated"
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("policy_version", pa.string(), nullable=False),
    pa.field("actor", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),  # JSON of the sampling settings ("{}" for human rows)
    pa.field("program", pa.string(), nullable=False),
    pa.field("program_ids", _ids, nullable=False),  # bcoder_ray.model.tokenization.encode_program
    pa.field("tokenizer_hash", pa.string(), nullable=False),  # bcoder_ray.model.tokenization.tokenizer_fingerprint
    pa.field("outcome", pa.string(), nullable=False),  # envs.result.Outcome value
    pa.field("reward", pa.float64(), nullable=False),  # eq. 2, REWARD[outcome]
    pa.field("tests_passed", pa.int32(), nullable=False),
    pa.field("tests_total", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("timeout", pa.bool_(), nullable=False),
    pa.field("exec_time", pa.float64(), nullable=False),
    # version 2 (absent from version-1 files: read as nulls, then the READ_DEFAULTS)
    pa.field("decoding", pa.string()),  # "sample" | "greedy" (e.g. a greedy baseline); null reads as "sample"
    pa.field("logprobs", _floats),  # log-probability of each program token under the distribution sampled
    pa.field("truncated", pa.bool_()),  # the stored program was cut at the length limit; null reads as false
    pa.field("run_id", pa.string()),  # the run that wrote the row, or null
])
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)
V2_COLUMNS = ("decoding", "logprobs", "truncated", "run_id")
# Columns every sample file has, whatever its schema version (what opening a file checks).
FILE_COLUMNS = tuple(c for c in SAMPLE_COLUMNS if c not in V2_COLUMNS)
DECODINGS = ("sample", "greedy")
# How a null (or, in an older file, absent) value reads.
READ_DEFAULTS: dict[str, Any] = {"decoding": "sample", "truncated": False}
REQUIRED_COLUMNS = ("tests_hash", "suite", "split", "problem_id", "source", "program", "program_ids",
                    "tokenizer_hash", "outcome")
# Filled in when a caller leaves them out (None = computed, see `rows_to_table`).
DEFAULTS: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION, "sample_id": None, "program_hash": None, "iteration": 0,
    "policy_version": "", "actor": "", "sampling": "{}", "reward": None, "tests_passed": 0, "tests_total": 0,
    "error": None, "timeout": False, "exec_time": 0.0, "decoding": "sample", "logprobs": None,
    "truncated": False, "run_id": None,
}
# Low-cardinality strings: dictionary-encoded, with statistics for row-group pruning.
DICTIONARY_COLUMNS = ["suite", "split", "problem_id", "source", "policy_version", "actor", "sampling",
                      "tokenizer_hash", "outcome", "decoding", "run_id"]
STATISTICS_COLUMNS = DICTIONARY_COLUMNS + ["iteration", "schema_version", "truncated"]

PROMPT_SCHEMA = pa.schema([
    pa.field("suite", pa.string(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("tokenizer_hash", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_ids", _ids, nullable=False),  # bcoder_ray.model.tokenization.encode_prompt
])
PROMPT_KEY = ("suite", "problem_id", "tokenizer_hash")

# What every sampler batch holds (bcoder_ray.model.batch.collate consumes them); a fingerprint's target columns and
# the `extra_columns` asked for follow.
LEARNER_COLUMNS = ("prompt_ids", "program_ids", "reward", "is_human")


class BufferError(ValueError):
    """A row, file or request the buffer cannot accept; the message names the row, file or key at fault."""


def sampling_json(sampling: Mapping[str, Any] | str | None) -> str:
    if sampling is None:
        return "{}"
    if isinstance(sampling, str):
        return sampling
    return json.dumps(dict(sampling), sort_keys=True, separators=(",", ":"), default=str)


def make_row(problem, program: str, program_ids: Sequence[int], result: ExecResult, *, source: str,
             tokenizer_hash: str, iteration: int = 0, policy_version: str = "", actor: str = "",
             sampling: Mapping[str, Any] | str | None = None, decoding: str = "sample",
             logprobs: Sequence[float] | None = None, truncated: bool = False,
             run_id: str | None = None) -> dict[str, Any]:
    """One buffer row from an `envs.problem.Problem`, a program, its token ids and its `ExecResult`.
    `decoding`: "sample" or "greedy"; `logprobs`: one log-probability per program token (of the distribution
    actually sampled) or None; `truncated`: the program was cut at the length limit; `run_id`: the writing run."""
    return {
        "tests_hash": problem.hidden_tests.content_hash(), "suite": problem.suite, "split": problem.split,
        "problem_id": problem.problem_id, "source": source, "iteration": iteration,
        "policy_version": policy_version, "actor": actor, "sampling": sampling_json(sampling),
        "program": program, "program_hash": program_hash(program), "program_ids": list(program_ids),
        "tokenizer_hash": tokenizer_hash, "outcome": Outcome(result.outcome).value, "reward": result.reward,
        "tests_passed": sum(t.passed for t in result.tests), "tests_total": len(result.tests),
        "error": result.error, "timeout": bool(result.timeout), "exec_time": float(result.wall_time),
        "decoding": decoding, "logprobs": None if logprobs is None else [float(x) for x in logprobs],
        "truncated": bool(truncated), "run_id": run_id,
    }


def prompt_rows(problems: Iterable, tokenizer, max_len: int, text_format=None) -> list[dict[str, Any]]:
    """Prompt-table rows for `problems`, encoded with `bcoder_ray.model.tokenization.encode_prompt` in `text_format`
    (a `bcoder_ray.model.tokenization.TextFormat`; None: the plain one), keyed by its tokenizer_hash."""
    from bcoder_ray.model.tokenization import TextFormat, tokenizer_fingerprint  # transformers: import lazily

    fmt = text_format if text_format is not None else TextFormat()
    fp = tokenizer_fingerprint(tokenizer, text_format)
    return [{"suite": p.suite, "problem_id": p.problem_id, "tokenizer_hash": fp, "prompt": p.prompt,
             "prompt_ids": fmt.prompt_ids(tokenizer, p.prompt, max_len)} for p in problems]


def _as_table(rows: Any, schema: pa.Schema, what: str) -> pa.Table:
    """A `pa.Table`, a dict of columns or a list of row dicts, as a table (columns not yet ordered)."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, Mapping):
        cols = {}
        for name, col in rows.items():
            if name == "sampling" and not isinstance(col, (pa.Array, pa.ChunkedArray)):
                col = [sampling_json(s) for s in col]
            typ = schema.field(name).type if name in schema.names else None
            cols[name] = col if isinstance(col, (pa.Array, pa.ChunkedArray)) else pa.array(col, type=typ)
        return pa.table(cols)
    rows = list(rows)
    if not rows:
        return schema.empty_table()
    names: list[str] = []
    for r in rows:
        if not isinstance(r, Mapping):
            raise BufferError(f"{what}: rows must be dicts, got {type(r).__name__}")
        names.extend(k for k in r if k not in names)
    unknown = [n for n in names if n not in schema.names]
    if unknown:
        raise BufferError(f"{what}: unknown column(s) {unknown}; the schema has {list(schema.names)}")
    cols = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if name == "sampling":
            values = [sampling_json(v) for v in values]
        try:
            cols[name] = pa.array(values, type=schema.field(name).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise BufferError(f"{what}: column {name!r} does not fit {schema.field(name).type}: {e}") from e
    return pa.table(cols)


def _first_bad(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first True in a boolean mask (nulls count as True)."""
    arr = pc.fill_null(mask, True)
    return int(np.flatnonzero(arr.to_numpy(zero_copy_only=False))[0])


def _check(bad: Any, table: pa.Table, what: str, message: str) -> None:
    bad = pc.fill_null(bad, True)
    if pc.any(bad).as_py():
        i = _first_bad(bad)
        key = f"{table['suite'][i].as_py()}/{table['problem_id'][i].as_py()}" if "problem_id" in table.column_names else "?"
        raise BufferError(f"{what}: row {i} (problem {key}): {message}")


def sample_ids(batch_key: str, table: pa.Table) -> pa.Array:
    """Deterministic ids: hash of (batch_key, index in batch, program_hash, suite/problem_id, source, iteration)."""
    cols = [table[c].to_pylist() for c in ("program_hash", "suite", "problem_id", "source", "iteration")]
    out = []
    for i, (ph, suite, pid, src, it) in enumerate(zip(*cols)):
        key = f"{batch_key}\x1f{i}\x1f{ph}\x1f{suite}/{pid}\x1f{src}\x1f{it}"
        out.append(hashlib.sha256(key.encode("utf-8")).hexdigest()[:32])
    return pa.array(out, pa.string())


def rows_to_table(rows: Any, batch_key: str, what: str = "append") -> pa.Table:
    """Validate caller rows and return them as a table of exactly `SAMPLE_SCHEMA` (computed columns filled)."""
    table = _as_table(rows, SAMPLE_SCHEMA, what)
    n = table.num_rows
    unknown = [c for c in table.column_names if c not in SAMPLE_SCHEMA.names]
    if unknown:
        raise BufferError(f"{what}: unknown column(s) {unknown}; the schema has {list(SAMPLE_SCHEMA.names)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise BufferError(f"{what}: missing required column(s) {missing}")
    for c in REQUIRED_COLUMNS:
        if table[c].null_count:
            _check(pc.is_null(table[c]), table, what, f"{c} is null")
    cols: dict[str, Any] = {}
    for field in SAMPLE_SCHEMA:
        name = field.name
        if name in table.column_names:
            try:
                col = table[name].cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise BufferError(f"{what}: column {name!r} does not fit {field.type}: {e}") from e
            default = DEFAULTS.get(name)
            if col.null_count and default is not None:
                col = pc.fill_null(col, pa.scalar(default, field.type))
        else:
            default = DEFAULTS.get(name)
            col = pa.nulls(n, field.type) if default is None else pa.repeat(pa.scalar(default, field.type), n)
        cols[name] = col
    if n and pc.any(pc.is_null(cols["program_hash"])).as_py():
        progs, hashes = cols["program"].to_pylist(), cols["program_hash"].to_pylist()
        cols["program_hash"] = pa.array([h if h is not None else program_hash(p) for p, h in zip(progs, hashes)])
    out = pa.table(cols)

    _check(pc.invert(pc.is_in(out["source"], value_set=pa.array(SOURCES))), out, what,
           f"source must be one of {SOURCES}")
    _check(pc.invert(pc.is_in(out["outcome"], value_set=pa.array(OUTCOMES))), out, what,
           f"outcome must be one of {OUTCOMES}")
    expected = pc.take(pa.array([REWARD[Outcome(o)] for o in OUTCOMES], pa.float64()),
                       pc.index_in(out["outcome"], value_set=pa.array(OUTCOMES)))
    if out["reward"].null_count:
        out = out.set_column(out.schema.get_field_index("reward"), "reward",
                             pc.coalesce(out["reward"], expected))
    _check(pc.greater(pc.abs(pc.subtract(out["reward"], expected)), 1e-9), out, what,
           "reward disagrees with its outcome (eq. 2)")
    _check(pc.equal(pc.list_value_length(out["program_ids"]), 0), out, what, "program_ids is empty")
    _check(pc.invert(pc.is_in(out["decoding"], value_set=pa.array(DECODINGS))), out, what,
           f"decoding must be one of {DECODINGS}")
    n_ids = pc.list_value_length(out["program_ids"])
    _check(pc.and_kleene(pc.is_valid(out["logprobs"]), pc.not_equal(pc.list_value_length(out["logprobs"]), n_ids)),
           out, what, "logprobs must have one value per program token (or be null)")
    out = out.set_column(out.schema.get_field_index("sample_id"), "sample_id", sample_ids(batch_key, out))
    out = out.set_column(out.schema.get_field_index("schema_version"), "schema_version",
                         pa.array(np.full(n, SCHEMA_VERSION, np.int16)))
    return out.cast(SAMPLE_SCHEMA)


def conform(table: pa.Table, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows read from a sample file of any schema version as `columns` (default: all) of `SAMPLE_SCHEMA`:
    columns the file lacks come back as nulls, `READ_DEFAULTS` replace nulls, other columns (a version-1
    file's inline targets) are dropped."""
    names = SAMPLE_COLUMNS if columns is None else tuple(columns)
    fields = [SAMPLE_SCHEMA.field(c) for c in names]
    cols = []
    for field in fields:
        if field.name in table.column_names:
            col = table[field.name]
            if col.type != field.type:
                col = col.cast(field.type)
        else:
            col = pa.nulls(table.num_rows, field.type)
        default = READ_DEFAULTS.get(field.name)
        if default is not None and col.null_count:
            col = pc.fill_null(col, pa.scalar(default, field.type))
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def prompts_to_table(rows: Any) -> pa.Table:
    table = _as_table(rows, PROMPT_SCHEMA, "put_prompts")
    missing = [c for c in PROMPT_SCHEMA.names if c not in table.column_names]
    if missing:
        raise BufferError(f"put_prompts: missing column(s) {missing}")
    table = table.select(PROMPT_SCHEMA.names)
    for c in PROMPT_SCHEMA.names:
        if table[c].null_count:
            i = _first_bad(pc.is_null(table[c]))
            raise BufferError(f"put_prompts: row {i}: {c} is null")
    return table.cast(PROMPT_SCHEMA)


def prompt_keys(table: pa.Table) -> pa.ChunkedArray:
    """One string per row joining (suite, problem_id, tokenizer_hash): the prompt join key."""
    return pc.binary_join_element_wise(*(table[c] for c in PROMPT_KEY), "\x1f")
