"""APPS (Hendrycks et al., 2021): 5,000 train and 5,000 test problems, standard-input and call-based.

Sources, both read into the same `Problem`s (`load_apps(split, source=...)`):
- the Hugging Face layout, one row per problem with the columns `problem_id, question, solutions,
  input_output, difficulty, url, starter_code` (`solutions` and `input_output` are JSON strings). `source` is
  the hub name (default `codeparrot/apps`) or a local directory of data files in that layout (`train.jsonl`,
  `test.jsonl`, or parquet); both are read with `datasets.load_dataset(source, split=split)`.
- the original directory layout: `source/<split>/<NNNN>/` with `question.txt`, `input_output.json`,
  `solutions.json`, `metadata.json` (`difficulty`, `url`) and an optional `starter_code.py`.

A problem's id is `<split>/<NNNN>` (train and test numbering overlap in APPS). Its prompt is the APPS / CodeRL
format: "\\nQUESTION:\\n" + question [+ "\\n" + starter code] + "\\nUse Call-Based format" (when the tests name
a function) or "\\nUse Standard Input format" + "\\nANSWER:\\n". Hidden tests are `input_output` as a stdio or
call `TestSpec`. Example tests are parsed from the statement as CodeRL did (see `parse_example_tests`);
problems without any get `example_tests=None`. Problems without hidden tests (a few rows of the data set have
an empty `input_output`) are skipped with a warning unless `skip_untested=False`, which makes them an error.

Validation: APPS publishes only train and test, so "validation" is a seeded held-out slice of the train split,
chosen only when asked for with the loader option `validation_size` (and `validation_seed`, default 0):

    load_apps("validation", validation_size=500)  # 500 train problems drawn with random.Random("apps/validation/0")
    load_apps("train", validation_size=500)       # the train split without those 500
    load_apps("train")                            # the whole train split, as published

Give both loads the same options (the run does: `suite.options` go to every split it loads), so the two never
share a problem; the slice is drawn from all train problems that have hidden tests, before `limit` and
`difficulties` apply, so it does not change with them. Validation problems keep their ids (`train/NNNN`) and
have `split="validation"`. Asking for "validation" without `validation_size` is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from envs.problem import Problem, SpecError, TestSpec
from envs.registry import register_suite

log = logging.getLogger(__name__)

SUITE = "apps"
HUB_NAME = "codeparrot/apps"
SPLITS = ("train", "test", "validation")
SOURCE_SPLITS = ("train", "test")  # what the data set holds; "validation" is a slice of "train"
COLUMNS = ("problem_id", "question", "solutions", "input_output", "difficulty", "url", "starter_code")


def format_apps_prompt(question: str, starter_code: str, call_based: bool) -> str:
    """The APPS / CodeRL prompt (CodeRL `generate.py`), shared by suites that reuse the format."""
    text = "\nQUESTION:\n" + question
    if starter_code:
        text += "\n" + starter_code
    text += "\nUse Call-Based format" if call_based else "\nUse Standard Input format"
    return text + "\nANSWER:\n"


# ---------------------------------------------------------------------------------------------------------
# Example tests from the statement (CodeRL's `extract_example_test.ipynb` idea, reimplemented)

_DASHED = re.compile(r"^\s*-{2,}\s*(.*?)\s*-{2,}\s*$")  # "-----Examples-----", "-----Sample Input 1-----"
_EXAMPLES_HEADER = re.compile(r"^examples?(\s*\d+)?$")
_INPUT_HEADER = re.compile(r"^(sample |example )?input(\s*\d+)?:?$")
_OUTPUT_HEADER = re.compile(r"^(sample |example )?output(\s*\d+)?:?$")
_INLINE_INPUT = re.compile(r"^\s*Input:\s*(\S.*)$")
_INLINE_OUTPUT = re.compile(r"^\s*Output:\s*(\S.*)$")


def _stdio_examples(question: str) -> list[dict]:
    """Input/output blocks of the statement's example section(s).

    Blocks open under an "Example(s)" header (dashed, or a line "Example 1:") at a line "Input" / "Output"
    (optionally "Sample ...", numbered, with a colon), or directly at a "Sample Input" / "Sample Output" line
    or dashed header (AtCoder). A block
    runs to the next blank line or header; any other dashed header ("Note", "Constraints") closes the section.
    The statement yields examples only when it gives as many inputs as outputs, at least one.
    """
    inputs: list[list[str]] = []
    outputs: list[list[str]] = []
    in_examples = False
    block: list[str] | None = None
    for raw in question.splitlines():
        line = raw.rstrip()
        dashed = _DASHED.match(line)
        if dashed:
            name = dashed.group(1).strip().lower()
            block = None
            if _EXAMPLES_HEADER.match(name):
                in_examples = True
            elif _INPUT_HEADER.match(name) and name != "input":
                block = []
                inputs.append(block)
            elif _OUTPUT_HEADER.match(name) and name != "output":
                block = []
                outputs.append(block)
            else:
                in_examples = False
            continue
        low = line.strip().lower()
        if _EXAMPLES_HEADER.match(low.rstrip(":")):  # "Example 1:" without dashes
            in_examples, block = True, None
            continue
        if (in_examples or low.startswith("sample")) and _INPUT_HEADER.match(low):
            block = []
            inputs.append(block)
            continue
        if (in_examples or low.startswith("sample")) and _OUTPUT_HEADER.match(low):
            block = []
            outputs.append(block)
            continue
        if not line.strip():
            if block:  # a blank line ends a block that has started
                block = None
            continue
        if block is not None:
            block.append(line)
    if not inputs or len(inputs) != len(outputs) or not all(inputs) or not all(outputs):
        return []
    return [{"input": "\n".join(i) + "\n", "output": "\n".join(o) + "\n"} for i, o in zip(inputs, outputs)]


class _JsonNames(ast.NodeTransformer):
    """Let `ast.literal_eval` read JSON's true/false/null as written in LeetCode statements."""

    _VALUES = {"true": True, "false": False, "null": None}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self._VALUES:
            return ast.copy_location(ast.Constant(self._VALUES[node.id]), node)
        return node


def _literal(node: ast.AST) -> Any:
    return ast.literal_eval(_JsonNames().visit(node))


def _call_examples(question: str) -> list[dict]:
    """LeetCode-style "Input: a = [1,2], k = 3" / "Output: 9" lines, as call arguments (in order) and result.

    An example whose input or output is not a Python/JSON literal is skipped.
    """
    cases = []
    lines = question.splitlines()
    for i, line in enumerate(lines):
        m_in = _INLINE_INPUT.match(line)
        if not m_in:
            continue
        following = [ln for ln in lines[i + 1:i + 3] if ln.strip()]
        m_out = _INLINE_OUTPUT.match(following[0]) if following else None
        if not m_out:
            continue
        try:
            call = ast.parse(f"f({m_in.group(1).strip()})", mode="eval").body
            args = [_literal(a) for a in call.args] + [_literal(k.value) for k in call.keywords]
            expected = _literal(ast.parse(m_out.group(1).strip(), mode="eval").body)
        except (SyntaxError, ValueError, TypeError, AttributeError, RecursionError):
            continue
        cases.append({"args": args, "expected": expected})
    return cases


def parse_example_tests(question: str, fn_name: str | None) -> TestSpec | None:
    """The example tests a statement shows, or None where it shows none that parse."""
    if fn_name:
        cases = _call_examples(question)
        return TestSpec("call", fn_name=fn_name, cases=tuple(cases)) if cases else None
    cases = _stdio_examples(question)
    return TestSpec("stdio", cases=tuple(cases)) if cases else None


# ---------------------------------------------------------------------------------------------------------
# Rows -> Problems


def _json_field(row: dict, key: str, where: str) -> Any:
    text = row.get(key)
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise SpecError(f"{where}: field {key!r} must be a JSON string, got {type(text).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: field {key!r} is not valid JSON ({e})") from None


def _as_text(value: Any, where: str, what: str) -> str:
    """A stdio input or output: a string, or a list of lines as some APPS rows store them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + "\n"
    raise SpecError(f"{where}: field 'input_output': {what} must be a string or a list of strings, "
                    f"got {type(value).__name__}")


def hidden_tests_from_input_output(io: Any, where: str) -> TestSpec:
    """APPS `input_output` ({"inputs", "outputs", optional "fn_name"}) as a stdio or call TestSpec."""
    if not isinstance(io, dict):
        raise SpecError(f"{where}: field 'input_output' must be a JSON object, got {type(io).__name__}")
    inputs, outputs = io.get("inputs"), io.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise SpecError(f"{where}: field 'input_output' needs lists 'inputs' and 'outputs'")
    if len(inputs) != len(outputs):
        raise SpecError(f"{where}: field 'input_output' has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise SpecError(f"{where}: field 'input_output' has no test cases")
    fn_name = io.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str):
            raise SpecError(f"{where}: field 'input_output': 'fn_name' must be a string")
        for i, args in enumerate(inputs):
            if not isinstance(args, list):
                raise SpecError(f"{where}: field 'input_output': inputs[{i}] of a call-based problem must be "
                                f"a list of arguments, got {type(args).__name__}")
        return TestSpec("call", fn_name=fn_name,
                        cases=tuple({"args": a, "expected": o} for a, o in zip(inputs, outputs)))
    return TestSpec("stdio", cases=tuple(
        {"input": _as_text(a, where, f"inputs[{i}]"), "output": _as_text(o, where, f"outputs[{i}]")}
        for i, (a, o) in enumerate(zip(inputs, outputs))))


def problem_from_row(row: dict, split: str, where: str, layout: str) -> Problem | None:
    """One APPS row (Hugging Face columns) as a Problem; None when it has no hidden tests."""
    for key in ("problem_id", "question"):
        if key not in row or row[key] is None:
            raise SpecError(f"{where}: missing field {key!r}")
    try:
        number = int(row["problem_id"])
    except (TypeError, ValueError):
        raise SpecError(f"{where}: field 'problem_id' must be an integer, got {row['problem_id']!r}") from None
    question = row["question"]
    if not isinstance(question, str):
        raise SpecError(f"{where}: field 'question' must be a string")
    starter = row.get("starter_code") or ""
    if not isinstance(starter, str):
        raise SpecError(f"{where}: field 'starter_code' must be a string")
    io = _json_field(row, "input_output", where)
    if io is None:
        return None
    hidden = hidden_tests_from_input_output(io, where)
    solutions = _json_field(row, "solutions", where) or []
    if not isinstance(solutions, list) or not all(isinstance(s, str) for s in solutions):
        raise SpecError(f"{where}: field 'solutions' must be a JSON list of strings")
    difficulty = row.get("difficulty")
    if difficulty is not None and not isinstance(difficulty, str):
        raise SpecError(f"{where}: field 'difficulty' must be a string")
    return Problem(
        suite=SUITE,
        problem_id=f"{split}/{number:04d}",
        split=split,
        statement=question,
        prompt=format_apps_prompt(question, starter, call_based=hidden.style == "call"),
        hidden_tests=hidden,
        example_tests=parse_example_tests(question, hidden.fn_name),
        starter_code=starter,
        references=tuple(solutions),
        difficulty=difficulty or None,
        metadata={"url": row.get("url") or "", "layout": layout},
    )


def _directory_rows(split_dir: Path) -> Iterator[tuple[dict, str]]:
    """Rows in the Hugging Face column layout, read from `split_dir/NNNN/*` (the original APPS files)."""
    for problem_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        where = f"{SUITE}: {problem_dir}"
        if not problem_dir.name.isdigit():
            raise SpecError(f"{where}: problem directories must be named by number (NNNN)")
        question_file = problem_dir / "question.txt"
        if not question_file.is_file():
            raise SpecError(f"{where}: missing file question.txt")
        row: dict[str, Any] = {"problem_id": int(problem_dir.name),
                               "question": question_file.read_text(encoding="utf-8")}
        for key in ("input_output", "solutions"):
            f = problem_dir / f"{key}.json"
            row[key] = f.read_text(encoding="utf-8") if f.is_file() else None
        meta_file = problem_dir / "metadata.json"
        meta = _json_field({"metadata.json": meta_file.read_text(encoding="utf-8")}, "metadata.json", where) \
            if meta_file.is_file() else None
        if meta is not None and not isinstance(meta, dict):
            raise SpecError(f"{where}: field 'metadata.json' must be a JSON object")
        row["difficulty"] = (meta or {}).get("difficulty")
        row["url"] = (meta or {}).get("url")
        starter = problem_dir / "starter_code.py"
        row["starter_code"] = starter.read_text(encoding="utf-8") if starter.is_file() else ""
        yield row, where


def _hf_rows(source: str, split: str, cache_dir: str | None) -> Iterator[tuple[dict, str]]:
    """Rows of `datasets.load_dataset(source, split=split)`: the hub name or a local directory of data files."""
    import datasets  # heavy; only APPS from the Hugging Face layout needs it

    try:
        ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e) or Path(source).exists():
            raise
        # `codeparrot/apps` ships a loading script next to its `train.jsonl` / `test.jsonl`; datasets >= 4 no
        # longer runs scripts, so read the repository's data file for the split directly.
        log.warning("%s: %s; reading hf://datasets/%s/%s.jsonl instead", source, e, source, split)
        ds = datasets.load_dataset("json", data_files={split: f"hf://datasets/{source}/{split}.jsonl"},
                                   split=split, cache_dir=cache_dir)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise SpecError(f"{SUITE}: {source} [{split}]: missing column(s) {missing}; expected {list(COLUMNS)}")
    for i, row in enumerate(ds):
        yield row, f"{SUITE}: {source} [{split}] row {i} (problem_id={row.get('problem_id')!r})"


def _is_directory_layout(source: str, split: str) -> bool:
    split_dir = Path(source) / split
    return split_dir.is_dir() and any(p.is_dir() and p.name.isdigit() for p in split_dir.iterdir())


def load_apps(split: str, source: str = HUB_NAME, limit: int | None = None,
              difficulties: Iterable[str] | None = None, skip_untested: bool = True,
              cache_dir: str | None = None, validation_size: int | None = None,
              validation_seed: int = 0) -> list[Problem]:
    """The problems of one APPS split from `source` (hub name, local Hugging Face layout, or directory layout).

    `limit` keeps the first N problems (in problem-id order); `difficulties` keeps only those levels
    ("introductory", "interview", "competition"); `cache_dir` is passed to `datasets.load_dataset`.
    `validation_size` (and `validation_seed`) hold out a seeded slice of train as the "validation" split, which
    "train" then excludes (see the module docstring); without it "train" is the whole published split.
    """
    if split not in SPLITS:
        raise ValueError(f"{SUITE}: unknown split {split!r}; expected one of {SPLITS}")
    if validation_size is not None and (not isinstance(validation_size, int) or validation_size <= 0):
        raise ValueError(f"{SUITE}: validation_size must be a positive integer, got {validation_size!r}")
    if split == "validation" and validation_size is None:
        raise ValueError(f"{SUITE}: the validation split is a seeded slice of the train split; give its size with "
                         f"the loader option validation_size=N (e.g. load_suite('apps', 'validation', "
                         f"validation_size=500), and the same option when loading 'train', which then excludes it)")
    source = str(source)
    read_split = "train" if split == "validation" else split
    if _is_directory_layout(source, read_split):
        rows, layout = _directory_rows(Path(source) / read_split), "directory"
    else:
        rows, layout = _hf_rows(source, read_split, cache_dir), "huggingface"
    problems: list[Problem] = []
    untested = []
    for row, where in rows:
        problem = problem_from_row(row, read_split, where, layout)
        if problem is None:
            if not skip_untested:
                raise SpecError(f"{where}: field 'input_output' is empty (no hidden tests)")
            untested.append(where)
            continue
        problems.append(problem)
    if untested:
        log.warning("%s [%s]: skipped %d problem(s) without hidden tests, e.g. %s",
                    SUITE, read_split, len(untested), untested[0])
    problems.sort(key=lambda p: p.problem_id)
    if read_split == "train" and validation_size is not None:
        held_out = validation_slice([p.problem_id for p in problems], validation_size, validation_seed, source)
        if split == "validation":
            problems = [dataclasses.replace(p, split="validation") for p in problems if p.problem_id in held_out]
        else:
            problems = [p for p in problems if p.problem_id not in held_out]
    if difficulties is not None:
        keep = set(difficulties)
        problems = [p for p in problems if p.difficulty in keep]
    return problems[:limit] if limit is not None else problems


def validation_slice(train_ids: list[str], size: int, seed: int, source: str = "") -> set[str]:
    """The ids of the validation slice: `size` of the (sorted) train ids drawn with a seeded generator."""
    if size >= len(train_ids):
        raise ValueError(f"{SUITE}: validation_size={size} leaves no train problems ({source} has "
                         f"{len(train_ids)} train problems with hidden tests)")
    rng = random.Random(f"{SUITE}/validation/{seed}")
    return set(rng.sample(sorted(train_ids), size))


register_suite(SUITE, load_apps, splits=SPLITS,
               description="APPS (Hendrycks et al., 2021), codeparrot/apps or the original directory layout")
