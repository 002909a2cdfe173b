"""The `files` suite's reference check at load (`check_references`), cached so that a second load of the same
data runs nothing.

Each problem with references gets a check key: sha256 of `CHECK_VERSION`, its hidden tests' content hash (the
comparison rule included) and the hash of each reference, in order. A verdict ("passes": at least one reference
passes; or why all fail) is stored under that key in one JSON file per data source and split, under the
project's cache (`envs.cache.cache_dir`, honouring $BCODER_CACHE): `<cache>/envs/reference_checks/<hash of
source and split>.json`. A load reuses the verdict of every problem whose key is stored and runs only the
others (a new or edited problem), then rewrites the file with the verdicts of the problems it loaded (so it never
grows past the data). A problem whose references got no verdict from the sandbox (infrastructure failures) is
left out of this load as before but never stored. An unreadable file is a miss, an unwritable cache only
costs the next load the same work.

Why a cache rather than `check_references: false` by default: a run would then train on problems whose tests
reject their own solutions unless the user remembered `python -m envs.validate`, and the check's cost (every
reference of every problem, minutes on a large set) is paid once per data set this way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from envs.cache import cache_dir, read_json, write_json
from envs.problem import Problem, program_hash

log = logging.getLogger(__name__)

# Bump when what makes a reference pass changes (the judging of envs/harness_judge.py or envs/compare.py, the
# executor's default limits): every stored verdict is then stale.
CHECK_VERSION = 1
PASSES = ""  # the stored verdict of a problem with a passing reference (else the reason all fail)


def check_key(problem: Problem) -> str:
    blob = json.dumps([CHECK_VERSION, problem.hidden_tests.content_hash(), [program_hash(r) for r in problem.references]])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def store_path(source: str, split: str) -> Path:
    """The file holding the verdicts of one source's split (a path is made absolute, so the same file read from
    another working directory shares it)."""
    where = str(Path(source).resolve()) if Path(source).exists() else source
    name = hashlib.sha256(json.dumps([where, split]).encode("utf-8")).hexdigest()[:32]
    return cache_dir("reference_checks", f"{name}.json")


def broken_references(problems: Sequence[Problem], source: str, split: str, workers: int | None = None,
                      cache: bool = True) -> tuple[dict[str, str], int]:
    """({problem key: why} of the problems whose references all fail, how many problems were run now)."""
    keys = {p.key: check_key(p) for p in problems if p.references}
    path = store_path(source, split)
    stored = read_json(path) if cache else None
    entries = stored.get("verdicts") if isinstance(stored, dict) and stored.get("version") == CHECK_VERSION else None
    entries = entries if isinstance(entries, dict) else {}
    # the verdicts of this load's problems: stored ones first, the rest run now
    verdicts = {key: entries[key] for key in keys.values() if isinstance(entries.get(key), str)}
    todo = [p for p in problems if p.key in keys and keys[p.key] not in verdicts]
    unsure: dict[str, str] = {}  # no verdict from the sandbox: left out now, never stored
    if todo:
        from envs.execute import Executor
        from envs.validate import validate_problems, why_broken

        with Executor(workers=workers or min(2, len(todo))) as executor:
            report = validate_problems(executor, todo, "", "")
        why = why_broken(report)
        no_verdict = {key for key, _, r in report.broken if r.is_infra}
        for p in todo:
            if p.key in why and p.key in no_verdict:
                unsure[keys[p.key]] = why[p.key]
            else:
                verdicts[keys[p.key]] = why.get(p.key, PASSES)
    if cache and verdicts != entries:
        if not write_json(path, {"version": CHECK_VERSION, "source": source, "split": split, "verdicts": verdicts}):
            log.warning("reference check: cannot write the cache %s; the next load checks again", path)
    decided = {**verdicts, **unsure}
    broken = {k: decided[key] for k, key in keys.items() if decided[key] != PASSES}
    return broken, len(todo)
