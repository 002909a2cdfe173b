"""The type of a value of program prefixes: what value-guided search (`bcoder_ray.model.value_search`) asks of an
algorithm's learned value while it samples, whichever algorithm learned it (B-Coder's Q_θ). An algorithm builds one
in `Algorithm.load_prefix_value`."""

from __future__ import annotations

from typing import Sequence


class PrefixValue:
    """Values the unfinished (or just finished) programs of one prompt: higher is a better program expected from
    the prefix, on one scale for all prefixes of a call (search compares prefixes of the same length)."""

    label: str = "value"

    def values(self, prompt_ids: Sequence[int], prefixes: Sequence[Sequence[int]]) -> list[float]:
        """One value per prefix (token ids of the program so far, none empty), in the prefixes' order."""
        raise NotImplementedError
