"""The verdict of running one program against its tests, and the reward of eq. 2."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"  # a test's answer was wrong
    RUNTIME_ERROR = "runtime_error"  # raised, crashed, or timed out (then ExecResult.timeout is set)
    COMPILE_ERROR = "compile_error"  # the program does not compile


# eq. 2 (shared with CodeRL): the terminal reward of an episode.
REWARD: dict[Outcome, float] = {
    Outcome.PASSED: 1.0,
    Outcome.FAILED: -0.3,
    Outcome.RUNTIME_ERROR: -0.6,
    Outcome.COMPILE_ERROR: -1.0,
}
OUTCOMES = tuple(o.value for o in Outcome)


def reward_of(outcome: Outcome | str) -> float:
    return REWARD[Outcome(outcome)]


@dataclass
class TestResult:
    """One test's verdict. `status` is an Outcome value, "timeout", or "not_run"."""

    __test__ = False  # not a pytest test class

    status: str
    error: str | None = None
    judged_in_parent: bool = True  # False where the test's shape forced judging inside the program's process

    @property
    def passed(self) -> bool:
        return self.status == Outcome.PASSED.value


@dataclass
class ExecResult:
    outcome: Outcome
    reward: float
    tests: list[TestResult] = field(default_factory=list)
    timeout: bool = False
    error: str | None = None  # the first error message, if any
    wall_time: float = 0.0  # seconds spent executing (0 for a cache hit)
    cached: bool = False

    @property
    def passed(self) -> bool:
        return self.outcome == Outcome.PASSED

    @property
    def unjudgeable(self) -> int:
        """Tests whose verdict had to be taken inside the untrusted process."""
        return sum(not t.judged_in_parent for t in self.tests)

    def to_json(self) -> dict:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ExecResult":
        d = dict(d)
        d["outcome"] = Outcome(d["outcome"])
        d["tests"] = [TestResult(**t) for t in d.get("tests", [])]
        return cls(**d)
