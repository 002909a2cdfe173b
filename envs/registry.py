"""The suite registry: a suite is one module plus one `register_suite` call.

    from envs.registry import register_suite, load_suite

    def load_my_suite(split: str, **options) -> list[Problem]: ...
    register_suite("mysuite", load_my_suite, splits=("train", "test"))
    problems = load_suite("mysuite", "train")

Like gymnasium's environment registry, this table is the one piece of process-wide state in `envs`: it only
maps names to loader functions, and it is filled when `envs` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from envs.problem import Problem


class UnknownSuiteError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    loader: Callable[..., list[Problem]]
    splits: tuple[str, ...]
    description: str = ""


_SUITES: dict[str, SuiteInfo] = {}


def register_suite(name: str, loader: Callable[..., list[Problem]], splits: tuple[str, ...],
                   description: str = "") -> None:
    """Register `loader(split, **options) -> list[Problem]` under `name`. Re-registering replaces."""
    _SUITES[name] = SuiteInfo(name, loader, tuple(splits), description)


def suite_info(name: str) -> SuiteInfo:
    if name not in _SUITES:
        raise UnknownSuiteError(f"unknown suite {name!r}; registered suites: {sorted(_SUITES)}")
    return _SUITES[name]


def suite_names() -> list[str]:
    return sorted(_SUITES)


def load_suite(name: str, split: str, **options) -> list[Problem]:
    """Load the problems of one split of a registered suite."""
    info = suite_info(name)
    if split not in info.splits:
        raise ValueError(f"suite {name!r} has no split {split!r}; its splits are {info.splits}")
    return info.loader(split, **options)
