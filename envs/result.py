"""The verdict of running one program against its tests, and the reward of eq. 2; or, when the sandbox itself
failed, an infrastructure status that is no verdict at all.

A result is either a verdict (`outcome` one of the four program outcomes of `OUTCOMES`, `reward` from eq. 2)
or an infrastructure failure (`is_infra`: `outcome` is `Outcome.INFRA_ERROR`, `reward` is None, `infra_error`
says what failed). Infrastructure results are never cached and must never be written to the buffer as a
reward: drop them (`[r for r in results if not r.is_infra]`) and count them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"  # a test's answer was wrong
    RUNTIME_ERROR = "runtime_error"  # raised, crashed, or timed out (then ExecResult.timeout is set)
    COMPILE_ERROR = "compile_error"  # the program does not compile
    INFRA_ERROR = "infra_error"  # not a program outcome: the sandbox failed (ExecResult.infra_error says how)


# eq. 2 (shared with CodeRL): the terminal reward of an episode. INFRA_ERROR has none.
REWARD: dict[Outcome, float] = {
    Outcome.PASSED: 1.0,
    Outcome.FAILED: -0.3,
    Outcome.RUNTIME_ERROR: -0.6,
    Outcome.COMPILE_ERROR: -1.0,
}
OUTCOMES = tuple(o.value for o in REWARD)  # the four program outcomes (never "infra_error")

# Which limit stopped a program (`ExecResult.limit`): the Executor keys of the same names.
LIMITS = ("cpu_time_per_test", "cpu_time_per_program", "timeout_per_test", "timeout_per_program")


@dataclass
class TestResult:
    """One test's verdict. `status` is an Outcome value, "timeout", or "not_run"."""

    __test__ = False  # not a pytest test class

    status: str
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == Outcome.PASSED.value


@dataclass
class ExecResult:
    outcome: Outcome
    reward: float | None  # None exactly when is_infra
    tests: list[TestResult] = field(default_factory=list)
    timeout: bool = False  # the program's own timeout (a limit in `limit` fired); a runtime error
    error: str | None = None  # the first error message, if any
    wall_time: float = 0.0  # seconds spent executing (0 for a cache hit)
    cached: bool = False
    limit: str | None = None  # which limit of LIMITS fired (program's timeout, or an infra timeout), else None
    cpu_time: float = 0.0  # CPU seconds of the program's processes, descendants included (0 for a cache hit)
    infra_error: str | None = None  # set exactly when the sandbox failed: the result is no verdict
    attempts: int = 1  # runs on fresh workers it took (> 1 after an infrastructure failure was retried)

    @property
    def passed(self) -> bool:
        return self.outcome == Outcome.PASSED

    @property
    def is_infra(self) -> bool:
        """True when this is not a verdict about the program (never cache it, never train on it)."""
        return self.infra_error is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ExecResult":
        d = dict(d)
        d["outcome"] = Outcome(d["outcome"])
        # (results written before the child-judged path went carry a `judged_in_parent` flag per test)
        d["tests"] = [TestResult(**{k: v for k, v in t.items() if k != "judged_in_parent"}) for t in d.get("tests", [])]
        return cls(**d)


def infra_result(message: str, n_tests: int, wall: float = 0.0, limit: str | None = None,
                 attempts: int = 1) -> ExecResult:
    """The sandbox failed (`message` says how): no verdict, no reward."""
    return ExecResult(Outcome.INFRA_ERROR, None, [TestResult("not_run") for _ in range(n_tests)], error=message,
                      wall_time=wall, limit=limit, infra_error=message, attempts=attempts)
