"""Train/test hygiene: which problems of the evaluation splits also appear in the training split.

    report = contamination_report(train, {"validation": val, "test": test})
    print(report.summary())                      # one line per split, then the first pairs
    report.to_json()                             # the run folder's contamination.json
    train = [p for p in train if p.key not in report.train_keys()]   # suite.options.drop_contaminated

An evaluation problem is contaminated when one training problem
- has the same normalised statement ("prompt": the statement lower-cased, every run of whitespace one space,
  stripped; its sha256), or
- has the same normalised tests ("tests": each stdio case's input and output, each call case's arguments and
  expected value, whitespace-normalised as above; each assert and a check's source without spaces and with
  double quotes made single, so spelling does not hide a copy; the cases as a sorted multiset, so a reordered copy
  matches; its sha256), or
- holds at least `THRESHOLD` (half) of the statement's word 13-grams ("ngram": words are runs of letters and
  digits, lower-cased; `N` = 13 as in the decontamination of GPT-3, Brown et al. 2020, appendix C, and of the
  code sets built on it; a statement of fewer than 13 words is its whole word sequence as one gram, so a
  short statement matches only a training statement of the same words, punctuation aside). GPT-3 flags any shared
  13-gram; a share is used here because contest statements share boilerplate sentences ("The first line
  contains a single integer t ...") that are no leak.

The statement is `Problem.statement` (the data set's text), never the formatted prompt, whose frame every
problem shares. The cost is one pass over each split's statements and tests: on the 4,000 embedded training
problems against its 400 evaluation problems, under a second (docs/environments.md gives the figure).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from envs.problem import Problem, TestSpec

N = 13
THRESHOLD = 0.5
REASONS = ("prompt", "tests", "ngram")
_WORD = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hash(problem: Problem) -> str:
    return _sha(normalise(problem.statement))


def tests_hash(tests: TestSpec) -> str:
    """The hash of a test set's normalised content (see the module's docstring); the style is part of it."""
    if tests.style == "stdio":
        items = [normalise(c["input"]) + "\x00" + normalise(c["output"]) for c in tests.cases]
    elif tests.style == "call":
        items = [json.dumps([tests.fn_name, c["args"], c["expected"]], sort_keys=True, default=repr)
                 for c in tests.cases]
    elif tests.style == "assert":
        items = [_code(tests.setup)] + [_code(a) for a in tests.asserts]
    else:
        items = [_code(tests.check)]
    return _sha(tests.style + "\x01" + "\x01".join(sorted(items)))


def _code(source: str) -> str:
    """Python source with every space removed and double quotes made single, so `f('a')==1` and
    `f("a") == 1` are one test (parsing each assert with `ast` would be exact but 5x slower on 4,000 problems;
    this can only merge two tests that differ inside a string literal's spacing or quotes)."""
    return _SPACE.sub("", source).replace('"', "'")


def ngrams(statement: str, n: int = N) -> set[int]:
    """The statement's word n-grams, each as Python's hash of its words (a set of ints: cheap to build and to
    intersect; a collision can only add a match, never hide one)."""
    words = _WORD.findall(statement.lower())
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Match:
    split: str  # the evaluation split
    eval_key: str
    train_key: str
    reason: str  # one of REASONS
    overlap: float = 1.0  # ngram: the share of the evaluation statement's n-grams the training one holds


@dataclass
class Report:
    n: int
    threshold: float
    train_problems: int
    splits: dict[str, int]  # evaluation split -> problems checked
    matches: list[Match] = field(default_factory=list)
    seconds: float = 0.0

    def contaminated(self, split: str, reason: str | None = None) -> set[str]:
        """Keys of the evaluation problems of `split` matched (for `reason`, or any)."""
        return {m.eval_key for m in self.matches if m.split == split and (reason is None or m.reason == reason)}

    def train_keys(self) -> set[str]:
        """Keys of the training problems matched by some evaluation problem (what drop_contaminated removes)."""
        return {m.train_key for m in self.matches}

    def summary(self, show: int = 10) -> str:
        lines = [f"contamination (prompt hash, tests hash, {self.n}-gram share >= {self.threshold}): "
                 f"{self.train_problems} training problems, {self.seconds:.2f}s"]
        for split, total in self.splits.items():
            counts = ", ".join(f"{reason} {len(self.contaminated(split, reason))}" for reason in REASONS)
            lines.append(f"  {split}: {len(self.contaminated(split))}/{total} problems also in training ({counts}); "
                         f"{len({m.train_key for m in self.matches if m.split == split})} training problems "
                         f"involved")
        for m in self.matches[:show]:
            lines.append(f"    {m.split} {m.eval_key} ~ train {m.train_key}: {m.reason}"
                         + (f" {m.overlap:.2f}" if m.reason == "ngram" else ""))
        if len(self.matches) > show:
            lines.append(f"    ... {len(self.matches) - show} more pairs (all in the report file)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"n": self.n, "threshold": self.threshold, "train_problems": self.train_problems,
                "seconds": round(self.seconds, 3),
                "splits": {split: {"problems": total, "contaminated": len(self.contaminated(split)),
                                   **{reason: len(self.contaminated(split, reason)) for reason in REASONS}}
                           for split, total in self.splits.items()},
                "train_keys": sorted(self.train_keys()),
                "matches": [m.__dict__ for m in self.matches]}


def contamination_report(train: Sequence[Problem], evaluation: Mapping[str, Sequence[Problem]], n: int = N,
                         threshold: float = THRESHOLD) -> Report:
    """Every (evaluation problem, training problem) pair that matches by one of `REASONS`."""
    import time

    started = time.perf_counter()
    by_prompt = _index((prompt_hash(p), p.key) for p in train)
    by_tests = _index((tests_hash(p.hidden_tests), p.key) for p in train)
    train_grams = [ngrams(p.statement, n) for p in train]
    everything: set[int] = set().union(*train_grams) if train_grams else set()
    report = Report(n, threshold, len(train), {split: len(probs) for split, probs in evaluation.items()})
    suspects: list[tuple[str, Problem, set[int]]] = []
    for split, problems in evaluation.items():
        for p in problems:
            for reason, keys in (("prompt", by_prompt.get(prompt_hash(p), ())),
                                 ("tests", by_tests.get(tests_hash(p.hidden_tests), ()))):
                report.matches += [Match(split, p.key, k, reason) for k in keys]
            grams = ngrams(p.statement, n)
            # a cheap first filter against every training gram at once; the pairs are found below
            if grams and len(grams & everything) >= threshold * len(grams):
                suspects.append((split, p, grams))
    if suspects:  # a second pass over the training grams, for the few suspects only
        owners: dict[int, list[int]] = defaultdict(list)
        wanted = set().union(*(g for _, _, g in suspects))
        for i, grams in enumerate(train_grams):
            for g in grams & wanted:
                owners[g].append(i)
        for split, p, grams in suspects:
            shared: dict[int, int] = defaultdict(int)
            for g in grams:
                for i in owners.get(g, ()):
                    shared[i] += 1
            report.matches += [Match(split, p.key, train[i].key, "ngram", round(k / len(grams), 3))
                               for i, k in sorted(shared.items()) if k >= threshold * len(grams)]
    report.seconds = time.perf_counter() - started
    return report


def _index(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for h, key in pairs:
        out[h].append(key)
    return out
