"""The type every ranker has: what evaluation and the rollout need to rank candidates, whichever algorithm
trained it (B-Coder's R̃, CodeRL's critic, ...). An algorithm builds one in `Algorithm.load_ranker`."""

from __future__ import annotations

from typing import Sequence


class Ranker:
    """Scores candidate programs of a problem (higher is better); `score` takes token ids."""

    label: str = "ranker"

    def score(self, prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]]) -> list[float]:
        raise NotImplementedError
