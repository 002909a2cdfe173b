"""How prompts and programs become token ids: see `envs.tokenization`, where the conventions live so that the
gymnasium env (which may not import `bcoder_ray`) shares them. Re-exported here for the learning system."""

from typing import TYPE_CHECKING

from envs.tokenization import (  # noqa: F401
    StopStrings,
    TextFormat,
    decode_program,
    encode_program,
    encode_prompt,
    eos_id,
    pad_id,
    program_end,
    require_chat_template,
    stop_ids,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:  # the annotation only: this module stays light (no torch) for its importers
    from bcoder_ray.model.lm import LoadOptions

__all__ = ["StopStrings", "TextFormat", "decode_program", "encode_program", "encode_prompt", "eos_id",
           "load_tokenizer", "pad_id", "program_end", "require_chat_template", "stop_ids", "tokenizer_fingerprint"]


def load_tokenizer(path: str, *, options: "LoadOptions | None" = None):
    """The tokenizer at `path`: a folder on this node or a hub name (a URI: `bcoder_ray.util.storage.local_dir`
    first, where the load starts, e.g. `RunContext.load_tokenizer`). `options` (`bcoder_ray.model.lm.LoadOptions`):
    its revision and trust_remote_code apply (attn_implementation is a model's)."""
    from transformers import AutoTokenizer

    # no options: still refuse custom code at once (transformers' default would prompt on stdin)
    kwargs = options.config_kwargs() if options is not None else {"trust_remote_code": False}
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
