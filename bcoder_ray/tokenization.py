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

__all__ = ["decode_program", "encode_program", "encode_prompt", "eos_id", "load_tokenizer", "pad_id",
           "tokenizer_fingerprint"]


def load_tokenizer(path: str):
    """The tokenizer at `path`: a local folder, a hub name, or a URI (copied to this node first)."""
    from transformers import AutoTokenizer

    from bcoder_ray.shared_storage import local_dir

    return AutoTokenizer.from_pretrained(local_dir(str(path), "model.tokenizer"))
