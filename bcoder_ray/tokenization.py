"""How prompts and programs become token ids: see `envs.tokenization`, where the conventions live so that the
gymnasium env (which may not import `bcoder_ray`) shares them. Re-exported here for the learning system."""

from envs.tokenization import (  # noqa: F401
    decode_program,
    encode_program,
    encode_prompt,
    eos_id,
    pad_id,
    tokenizer_fingerprint,
)

__all__ = ["decode_program", "encode_program", "encode_prompt", "eos_id", "pad_id", "tokenizer_fingerprint"]
