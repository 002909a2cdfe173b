"""A reference implementation, in plain pyarrow, of the on-policy selection of PPO and GRPO (baselines.md §2: "each
update uses only programs sampled by the current policy"): the oracle the tests hold the buffer's own filter
(`bcoder_ray.buffer.Filters` with policy_versions, decoding, sources, require_logprobs) against.

A row is eligible when all hold:
- ``policy_version`` equals the current policy's (the buffer column is a string; ints are compared as ``str``);
- ``source`` is "generated" (human programs were sampled by no policy);
- it is not a greedy baseline: where the table has a ``decoding`` column, its value is not "greedy" (null,
  i.e. written before the column existed, counts as sampled);
- its ``logprobs`` (the per-token log-probabilities of the distribution actually sampled) are not null.
  A table without a ``logprobs`` column has no eligible row: that is an error (naming the column), not an
  empty selection that would stall training.
Where ``program_ids`` is present, an eligible row's ``logprobs`` must have one entry per program token (raises,
naming the row's ``sample_id``, otherwise: such a row is corrupt, not merely ineligible).

Public API
----------
- ``on_policy_mask(table, policy_version) -> pa.ChunkedArray``: bool per row, no nulls.
- ``select_on_policy(table, policy_version) -> pa.Table``: the eligible rows, order kept.
- ``on_policy_expression(policy_version, *, has_decoding=True) -> pc.Expression``: the same predicate for a
  ``pyarrow.dataset`` scan (pushdown); the length check is not part of it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

GENERATED = "generated"   # bcoder_ray.buffer.schema.SOURCES
GREEDY = "greedy"         # the coming `decoding` column: "sample" | "greedy"
LOGPROBS = "logprobs"
REQUIRED = ("policy_version", "source")


def _version(policy_version: str | int) -> str:
    if isinstance(policy_version, bool) or not isinstance(policy_version, (str, int)):
        raise TypeError(f"policy_version must be a str (the buffer column) or an int, got "
                        f"{type(policy_version).__name__}")
    return str(policy_version)


def _check_columns(table: pa.Table) -> None:
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise KeyError(f"on-policy filter: the table lacks column(s) {missing}; it has {table.column_names}")
    if LOGPROBS not in table.column_names:
        raise KeyError(f"on-policy filter: the table has no '{LOGPROBS}' column (per-token sampling log-probs); "
                       f"rows without it are not eligible for PPO/GRPO (read it from the buffer, or the buffer "
                       f"predates the column)")


def _check_lengths(table: pa.Table, keep: pa.ChunkedArray) -> None:
    if "program_ids" not in table.column_names:
        return
    mismatch = pc.and_(keep, pc.not_equal(pc.list_value_length(table[LOGPROBS]),
                                          pc.list_value_length(table["program_ids"])))
    mismatch = pc.fill_null(mismatch, False)
    if pc.any(mismatch).as_py():
        i = pc.index(mismatch, True).as_py()
        sid = table["sample_id"][i].as_py() if "sample_id" in table.column_names else None
        n_lp = len(table[LOGPROBS][i].as_py())
        n_ids = len(table["program_ids"][i].as_py())
        raise ValueError(f"on-policy filter: row {i}" + (f" (sample_id {sid})" if sid else "") +
                         f" has {n_lp} logprobs for {n_ids} program tokens")


def on_policy_mask(table: pa.Table, policy_version: str | int) -> pa.ChunkedArray:
    """Boolean mask of the rows eligible for an on-policy update by ``policy_version`` (see the module docstring)."""
    version = _version(policy_version)
    _check_columns(table)
    keep = pc.and_(pc.equal(table["policy_version"], version), pc.equal(table["source"], GENERATED))
    if "decoding" in table.column_names:
        keep = pc.and_(keep, pc.fill_null(pc.not_equal(table["decoding"], GREEDY), True))
    keep = pc.fill_null(pc.and_(keep, pc.is_valid(table[LOGPROBS])), False)
    _check_lengths(table, keep)
    return keep


def select_on_policy(table: pa.Table, policy_version: str | int) -> pa.Table:
    """The rows of ``table`` eligible for an on-policy update by ``policy_version`` (order kept)."""
    return table.filter(on_policy_mask(table, policy_version))


def on_policy_expression(policy_version: str | int, *, has_decoding: bool = True) -> pc.Expression:
    """``on_policy_mask``'s predicate as a dataset expression (``has_decoding``: the scanned schema has the column)."""
    version = _version(policy_version)
    expr = (pc.field("policy_version") == version) & (pc.field("source") == GENERATED) & \
        pc.field(LOGPROBS).is_valid()
    if has_decoding:
        expr = expr & ((pc.field("decoding") != GREEDY) | pc.field("decoding").is_null())
    return expr
