"""`files`: your own problems, from JSON Lines, JSON or Parquet files, or a `datasets` hub name.

    load_suite("files", "train", source="my_problems.jsonl")                    # the documented schema
    load_suite("files", "test", source="lcb/", format="livecodebench")          # a published layout
    load_suite("files", "train", source="apps.jsonl", format="apps", compare="float")

Options (`suite.options` in a run):
- `source`: a file, a folder with one file per split, or a hub name (`envs/datafiles.py` says how each is
  read and how a row's split is found; `split_column` names the split field, default "split");
- `format`: the row layout, `native` (default: the schema of `envs/formats/native.py`) or an adapter of
  `envs/formats/` (apps, taco, codecontests, livecodebench, verification_info);
- `compare`: a comparison rule (a name, or {"rule": "float", "abs_tol": 1e-4, ...}) for the stdio tests that
  name none themselves (`envs.problem.Comparison`);
- `prompt_format`: "apps" (default: the APPS / CodeRL frame of the shipped suites) or "plain";
- `check_references` (default true): run every problem's reference solutions at load, and leave out each
  problem whose references all fail (its tests are wrong, or its references are: no reward from it can be
  trusted); they are logged. Problems without references are kept. The verdicts are cached by each problem's
  tests and references (`envs/reference_check.py`, under $BCODER_CACHE), so a second load of the same data runs
  nothing and an edited file re-checks only the problems that changed; `reference_cache: false` checks afresh.
  `python -m envs.validate files` reports every failing reference;
- `limit`: the first N problems of the split; `streaming`, `cache_dir`: for a hub source; `workers`: sandbox
  workers for the reference check.

Rows are read in file order; ids must be unique within a split. Malformed rows raise `SpecError` naming the
file, the row and the field; rows an adapter cannot use (another language's tests) are skipped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from envs.datafiles import split_rows
from envs.formats import FORMATS, Skip
from envs.formats.native import parse_row
from envs.problem import Comparison, Problem, SpecError
from envs.registry import register_suite

log = logging.getLogger(__name__)

SUITE = "files"
SPLITS = ("train", "validation", "test")


def load_files(split: str, source: str | None = None, format: str = "native", split_column: str = "split",
               compare: Any = None, prompt_format: str = "apps", check_references: bool = True,
               reference_cache: bool = True, limit: int | None = None, streaming: bool = False, cache_dir: str | None = None,
               workers: int | None = None) -> list[Problem]:
    """The problems of one split of `source` (see the module's docstring for the options)."""
    if source is None:
        raise ValueError(f"{SUITE}: give the data with the option source=PATH (suite.options.source in a run)")
    if format not in FORMATS:
        raise ValueError(f"{SUITE}: unknown format {format!r}; expected one of {sorted(FORMATS)}")
    adapter = FORMATS[format]
    default_compare = Comparison.from_json(compare, "suite option 'compare'") if compare is not None else None
    base_dir = Path(source).parent if Path(source).is_file() else Path(source)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    skipped: dict[str, int] = {}
    for number, row in enumerate(split_rows(source, split, split_column, streaming, cache_dir), 1):
        data = row.data
        if adapter is not None:
            try:
                data = adapter(data, row.where, number)
            except Skip as e:
                skipped[str(e)] = skipped.get(str(e), 0) + 1
                continue
        data = {k: v for k, v in data.items() if k != split_column or k == "split"}
        problem = parse_row(data, row.where, suite=SUITE, split=split, prompt_format=prompt_format,
                            base_dir=base_dir, default_compare=default_compare)
        if problem.problem_id in seen:
            raise SpecError(f"{row.where} (id={problem.problem_id}): field 'id': {problem.problem_id!r} is also the id "
                            f"of {seen[problem.problem_id]} (ids must be unique within a split)")
        seen[problem.problem_id] = row.where
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if skipped:
        log.warning("%s: %s [%s]: skipped %s", SUITE, source, split,
                    ", ".join(f"{n} row(s): {why}" for why, n in sorted(skipped.items())))
    if check_references:
        problems = drop_broken(problems, str(source), split, workers, reference_cache)
    return problems


def drop_broken(problems: list[Problem], source: str, split: str, workers: int | None = None,
                cache: bool = True) -> list[Problem]:
    """`problems` without those whose references all fail (each logged): never trained or evaluated on."""
    if not any(p.references for p in problems):
        return problems
    from envs.reference_check import broken_references

    broken, ran = broken_references(problems, source, split, workers, cache)
    log.info("%s: %s [%s]: reference check: %d problem(s) run, the others' verdicts cached", SUITE, source, split,
             ran)
    for p in problems:
        if p.key in broken:
            log.warning("%s: %s: all %d reference solution(s) fail (%s); left out", SUITE, p.metadata.get("where", p.key),
                        len(p.references), broken[p.key])
    return [p for p in problems if p.key not in broken]


register_suite(SUITE, load_files, splits=SPLITS,
               description="your own problems: JSONL / JSON / Parquet files or a hub data set (envs/formats)")
