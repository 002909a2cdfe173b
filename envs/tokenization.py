"""How prompts and programs become token ids, the same way for sampling, the buffer, the learner and the env.

It lives in `envs` because the gymnasium env needs it and `envs` never imports `bcoder_ray`;
`bcoder_ray.model.tokenization` re-exports it.

- A prompt is `tokenizer(text)` with the tokenizer's own special tokens, truncated from the left to keep its
  last `max_len` tokens (the end of a prompt, where the answer starts, matters most). With the chat template on
  (`TextFormat.chat_template`, for instruct models) the text is one user turn of the tokenizer's template with the
  generation prompt after it, tokenized as the template spells it (its own BOS, none added); a long prompt loses
  the start of its text, never a part of the template.
- A response prefix (`TextFormat.response_prefix`, e.g. "```python\n" for an instruct model that answers in a
  fenced block) is text the answer starts with, written into the prompt after the template's generation prompt
  (after the text of a plain prompt): the program is what follows it, so its closing fence can be a stop string.
- A program is `tokenizer(text, add_special_tokens=False)` followed by EOS, the terminal action of the MDP.
  A program longer than `max_len` is cut at `max_len` tokens with no EOS: its episode ended at the length limit.
- The ids that end a program (`stop_ids`) are EOS and any others the model's generation config names (an
  instruct model's end-of-turn token, e.g. Llama 3's `<|eot_id|>`): a sampled program ends at the first of them,
  and decoding stops there. Encoded programs end with EOS itself.
- Stop strings (`TextFormat.stop_strings`, e.g. an instruct model's closing fence "```" or MBPP's "[DONE]") end a
  sampled program too: its episode ends at the token whose text completes the first of them (`StopStrings`), the
  stored ids keep that token (the terminal action), and the program's text is cut where the stop string begins.
- The rows' `tokenizer_hash` (`tokenizer_fingerprint`) covers the tokenizer and a non-default `TextFormat`, so
  rows of a chat-prompted run and of a plain one never share prompts or targets in one buffer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

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


@dataclass(frozen=True)
class TextFormat:
    """How a run's text meets its tokenizer beyond the tokenizer itself (`model.chat_template`,
    `model.stop_strings`); the default is the plain format of a base code LM."""

    chat_template: bool = False
    """Wrap each prompt as one user turn of the tokenizer's chat template, with the generation prompt."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sampled program besides the stop ids (the text is cut where one begins)."""
    response_prefix: str = ""
    """Text the answer starts with, part of the prompt (an opening fence "```python\n": the program is the code)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        bad = [s for s in self.stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")

    def as_dict(self) -> dict[str, Any]:
        out = {"chat_template": self.chat_template, "stop_strings": list(self.stop_strings)}
        if self.response_prefix:  # only when set: the fingerprints of runs without one stay as they were
            out["response_prefix"] = self.response_prefix
        return out

    def identity(self) -> str:
        """"" for the default format (so existing fingerprints stay as they were), else its canonical JSON."""
        if self == TextFormat():
            return ""
        return json.dumps(self.as_dict(), sort_keys=True, ensure_ascii=False)

    def stops(self, tokenizer: PreTrainedTokenizerBase) -> "StopStrings | None":
        return StopStrings(tokenizer, self.stop_strings) if self.stop_strings else None

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
        """`text` as a prompt of this format (`encode_prompt`)."""
        return encode_prompt(tokenizer, text, max_len, self.chat_template, self.response_prefix)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int, chat_template: bool = False,
                  response_prefix: str = "") -> list[int]:
    if chat_template:
        return encode_chat_prompt(tokenizer, text, max_len, response_prefix)
    ids = tokenizer(text + response_prefix, add_special_tokens=True)["input_ids"]
    return list(ids[-max_len:])  # the left cut keeps the prefix, the end of the prompt


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """ValueError naming the tokenizer when it has no chat template to wrap prompts in."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"model.chat_template is on but the tokenizer {name!r} has no chat template "
                         f"(chat_template in its tokenizer_config.json); turn it off for a base model")


def _chat_ids(tokenizer: PreTrainedTokenizerBase, content: str, response_prefix: str = "") -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + response_prefix
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own BOS


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int, response_prefix: str = ""
                       ) -> list[int]:
    """`text` as one user turn of the tokenizer's chat template with the generation prompt (and `response_prefix`
    after it), at most `max_len` tokens: a longer prompt keeps the template and prefix whole and the end of its
    text."""
    require_chat_template(tokenizer)
    ids = _chat_ids(tokenizer, text, response_prefix)
    if len(ids) <= max_len:
        return ids
    content = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    template = len(ids) - len(content)  # the template's own tokens stay; the text's first ones go
    keep = max_len - template
    while keep > 0:
        ids = _chat_ids(tokenizer, tokenizer.decode(content[-keep:], skip_special_tokens=False,
                                                    clean_up_tokenization_spaces=False), response_prefix)
        if len(ids) <= max_len:
            return ids
        keep -= len(ids) - max_len  # tokens may merge differently at the cut: shorten by the excess, again
    raise ValueError(f"the chat template takes about {template} tokens, leaving none of the prompt length "
                     f"{max_len} (model.source_len) for the prompt's text: raise it")


def encode_program(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) >= max_len:
        return ids[:max_len]
    return ids + [eos_id(tokenizer)]


def program_end(ids: Sequence[int], stop: Sequence[int]) -> int | None:
    """The index of the first stop id in `ids` (None: the program has none, it was cut at the length limit)."""
    stop = set(stop)
    return next((i for i, t in enumerate(ids) if t in stop), None)


def decode_program(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stop: Sequence[int] | None = None,
                   stop_strings: Sequence[str] = ()) -> str:
    """The program's text, up to its first stop id (`stop`, default EOS alone) and then up to where its first
    stop string begins."""
    ids = list(ids)
    end = program_end(ids, stop if stop is not None else (eos_id(tokenizer),))
    if end is not None:
        ids = ids[:end]
    return cut_at_stop_string(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                              stop_strings)


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the earliest start of any of `stop_strings` (all of it when none occurs)."""
    starts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[:min(starts)] if starts else text


@dataclass(frozen=True)
class StopStrings:
    """Where stop strings end a program's token ids: at the first token whose text completes one of `strings`.

    Only the last `window` tokens are decoded at each step: a stop string of b UTF-8 bytes lies within its last b
    tokens (each covers at least one of its bytes), and one token more keeps it clear of the window's first
    token, whose decoding may differ from the same token's mid-text (a SentencePiece leading space)."""

    tokenizer: Any
    strings: tuple[str, ...]

    def __post_init__(self) -> None:
        TextFormat(stop_strings=self.strings)  # the same check
        object.__setattr__(self, "strings", tuple(self.strings))

    @property
    def window(self) -> int:
        return max(len(s.encode("utf-8")) for s in self.strings) + 1

    def completed(self, ids: Sequence[int]) -> bool:
        """Whether the text of the last tokens of `ids` holds a stop string (checked after each new token, it
        is true first at the token that completes one)."""
        text = self.tokenizer.decode(list(ids[-self.window:]), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        return any(s in text for s in self.strings)

    def end(self, ids: Sequence[int]) -> int | None:
        """The index of the token that completes the first stop string in `ids` (None: none does)."""
        ids = list(ids)
        return next((t for t in range(len(ids)) if self.completed(ids[:t + 1])), None)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, text_format: TextFormat | None = None) -> str:
    """A hash of what the tokenizer maps (its vocabulary, merges and special tokens), not of its name, and of a
    non-default `text_format` (with its chat template's text when that is on)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        h.update(type(tokenizer).__name__.encode("utf-8"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    if text_format is not None and text_format.identity():
        h.update(text_format.identity().encode("utf-8"))
        if text_format.chat_template:
            h.update(str(getattr(tokenizer, "chat_template", None)).encode("utf-8"))
    return h.hexdigest()[:16]
