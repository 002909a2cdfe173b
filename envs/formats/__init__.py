"""Row layouts the `files` suite reads (`suite.options.format`): each adapter turns one raw row of a published
data set's layout into the documented schema of `envs/formats/native.py`, or skips it with a reason.

| format | layout |
| --- | --- |
| `native` | the documented schema itself |
| `apps`, `taco` | APPS / TACO: `question`, `input_output` (JSON: inputs, outputs, optional fn_name), `solutions` |
| `codecontests` | DeepMind CodeContests: `description`, `public_tests` / `private_tests` / `generated_tests` |
| `livecodebench` | LiveCodeBench code generation: `question_content`, `public_test_cases` / `private_test_cases` |
| `verification_info` | PrimeIntellect verifiable-coding: `prompt`, `gold_standard_solution`, `verification_info` |
"""

from __future__ import annotations

from typing import Callable

from envs.formats import apps_io, codecontests, livecodebench, verification_info
from envs.formats.common import Skip

# adapter(raw row, where, row number) -> a row of the native schema; raises Skip for a row to leave out
Adapter = Callable[[dict, str, int], dict]
FORMATS: dict[str, Adapter | None] = {
    "native": None,
    "apps": apps_io.adapt,
    "taco": apps_io.adapt,
    "codecontests": codecontests.adapt,
    "livecodebench": livecodebench.adapt,
    "verification_info": verification_info.adapt,
}

__all__ = ["FORMATS", "Adapter", "Skip"]
