"""How prompts and programs become token ids, the same way for sampling, the buffer, the learner and the env.

It lives in `envs` because the gymnasium env needs it and `envs` never imports `bcoder_ray`;
`bcoder_ray.tokenization` re-exports it.

- A prompt is `tokenizer(text)` with the tokenizer's own special tokens, truncated from the left to keep its
  last `max_len` tokens (the end of a prompt, where the answer starts, matters most).
- A program is `tokenizer(text, add_special_tokens=False)` followed by EOS, the terminal action of the MDP.
  A program longer than `max_len` is cut at `max_len` tokens with no EOS: its episode ended at the length limit.
- Decoding stops at the first EOS.
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


def decode_program(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    ids = list(ids)
    eos = eos_id(tokenizer)
    if eos in ids:
        ids = ids[: ids.index(eos)]
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
