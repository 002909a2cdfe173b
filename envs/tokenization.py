"""How prompts and programs become token ids, the same way for sampling, the buffer, the learner and the env.

It lives in `envs` because the gymnasium env needs it and `envs` never imports `bcoder_ray`;
`bcoder_ray.tokenization` re-exports it.

- A prompt is `tokenizer(text)` with the tokenizer's own special tokens, truncated from the left to keep its
  last `max_len` tokens (the end of a prompt, where the answer starts, matters most).
- A program is `tokenizer(text, add_special_tokens=False)` followed by EOS, the terminal action of the MDP.
  A program longer than `max_len` is cut at `max_len` tokens with no EOS: its episode ended at the length limit.
- The ids that end a program (`stop_ids`) are EOS and any others the model's generation config names (an
  instruct model's end-of-turn token, e.g. Llama 3's `<|eot_id|>`): a sampled program ends at the first of them,
  and decoding stops there. Encoded programs end with EOS itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from transformers import PreTrainedTokenizerBase


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; programs need one to end")
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer: PreTrainedTokenizerBase, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The token ids that end a program: EOS first, then the `extra` ones (deduplicated, in order)."""
    ids = [eos_id(tokenizer)]
    for i in extra:
        if int(i) not in ids:
            ids.append(int(i))
    return tuple(ids)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, or EOS where the tokenizer has none (GPT-2); padding is always masked out."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids[-max_len:])


def encode_program(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) >= max_len:
        return ids[:max_len]
    return ids + [eos_id(tokenizer)]


def program_end(ids: Sequence[int], stop: Sequence[int]) -> int | None:
    """The index of the first stop id in `ids` (None: the program has none, it was cut at the length limit)."""
    stop = set(stop)
    return next((i for i, t in enumerate(ids) if t in stop), None)


def decode_program(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stop: Sequence[int] | None = None) -> str:
    """The program's text, up to its first stop id (`stop`, default EOS alone)."""
    ids = list(ids)
    end = program_end(ids, stop if stop is not None else (eos_id(tokenizer),))
    if end is not None:
        ids = ids[:end]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer maps (its vocabulary, merges and special tokens), not of its name."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        h.update(type(tokenizer).__name__.encode("utf-8"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()[:16]
