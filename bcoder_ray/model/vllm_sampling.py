"""Rollout sampling with vLLM, for decoder-only policies on GPU actors (`rollout.engine: vllm`).

    engine = VLLMEngine(policy_dir, tokenizer_dir, dtype="bfloat16", seed=0, options=LoadOptions())
    programs, logprobs = engine.sample(prompt_ids, n=8, max_new_tokens=512, stop_ids=(eos, eot),
                                       temperature=0.6, top_p=0.95, seed=17)

Q-sampling is sampling from ℓ_θ (`bcoder_ray.model.sampling`: temperature and top-p are invariant to Q_θ/α's per-state
shift), and every algorithm publishes its policy as a plain Hugging Face LM folder, so an inference engine can
draw the rollouts. The contract is `bcoder_ray.model.sampling.sample_programs`'s: per prompt, `n` token-id programs,
each ending at its first stop id (included), at the token that completes its first stop string (vLLM's `stop`,
checked again with `tokenization.StopStrings`), or cut at `max_new_tokens`, with each token's log-probability under
the distribution it was drawn from (vLLM's `logprobs_mode="processed_logprobs"`: after temperature and top-p).

vLLM is an optional dependency with its own CUDA build of torch; it is imported only when this engine is built.
Encoder-decoder models (CodeT5) are refused: vLLM's engine serves decoder-only ones. Not run here (no GPU, no
vLLM): the tests drive this module up to the engine's calls with a stand-in module.
"""

from __future__ import annotations

import gc
import importlib
from typing import Any, Sequence

from transformers import AutoConfig

from bcoder_ray.model.lm import ENCODER_DECODER, LoadOptions, lm_kind
from bcoder_ray.model.tokenization import StopStrings

ENGINES = ("torch", "vllm")


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise RuntimeError("rollout.engine is vllm but vllm is not installed on this node: pip install "
                           "'bcoder-ray[vllm]' on the GPU nodes (or set rollout.engine: torch)") from err


class VLLMEngine:
    """One `vllm.LLM` serving the policy at `path` with the tokenizer at `tokenizer` (folders on this node or hub
    names: `load_sampler` copies a URI once)."""

    def __init__(self, path: str, tokenizer: str, *, dtype: str, seed: int, options: LoadOptions,
                 gpu_memory_utilization: float = 0.85):
        path, tokenizer = str(path), str(tokenizer)
        config = AutoConfig.from_pretrained(path, **options.config_kwargs())
        if lm_kind(config) == ENCODER_DECODER:
            raise ValueError(f"{path}: rollout.engine vllm serves decoder-only models; this is an encoder-decoder "
                             f"({config.model_type}): use rollout.engine torch")
        self.vllm = import_vllm()
        self.llm = self.vllm.LLM(model=path, tokenizer=tokenizer, dtype=dtype, seed=seed,
                                 revision=options.revision, trust_remote_code=options.trust_remote_code,
                                 gpu_memory_utilization=gpu_memory_utilization,
                                 logprobs_mode="processed_logprobs")

    def sample(self, prompts: Sequence[Sequence[int]], n: int, *, max_new_tokens: int, stop_ids: Sequence[int],
               temperature: float, top_p: float, seed: int, stop_strings: StopStrings | None = None
               ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """(programs, log-probabilities), per prompt `n` of each (prompt-major, like `sample_programs`)."""
        strings = list(stop_strings.strings) if stop_strings is not None else []
        params = self.vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                          stop_token_ids=list(stop_ids), stop=strings,
                                          include_stop_str_in_output=True, seed=seed, logprobs=0,
                                          detokenize=bool(strings))  # vLLM matches stop strings on its text
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        programs, logprobs = [], []
        for request in outputs:
            pairs = [completion(out, stop_ids, max_new_tokens, stop_strings) for out in request.outputs]
            if len(pairs) != n:
                raise RuntimeError(f"vLLM returned {len(pairs)} completions for a prompt, asked for {n}")
            programs.append([ids for ids, _ in pairs])
            logprobs.append([lps for _, lps in pairs])
        return programs, logprobs

    def close(self) -> None:
        """Release the engine (its GPU memory) before another policy's is built."""
        del self.llm
        gc.collect()


def completion(out: Any, stop_ids: Sequence[int], max_new_tokens: int, stop_strings: StopStrings | None = None
               ) -> tuple[list[int], list[float]]:
    """One vLLM `CompletionOutput` as (token ids, log-probabilities): cut after its first stop id or after the
    token that completes its first stop string, whichever comes first (the torch sampler's convention). A
    completion that vLLM says stopped but whose tokens hold neither cannot be aligned with a terminal action:
    refused."""
    ids = [int(t) for t in out.token_ids]
    if out.logprobs is None or len(out.logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {len(ids)} tokens with "
                           f"{'no' if out.logprobs is None else len(out.logprobs)} log-probabilities")
    lps = [float(step[t].logprob) for step, t in zip(out.logprobs, ids)]
    stop = set(int(s) for s in stop_ids)
    ends = [next((i for i, t in enumerate(ids) if t in stop), None),
            stop_strings.end(ids) if stop_strings is not None else None]
    end = min((e for e in ends if e is not None), default=None)
    if end is not None:
        return ids[:end + 1], lps[:end + 1]
    if out.finish_reason == "stop":
        strings = list(stop_strings.strings) if stop_strings is not None else []
        raise RuntimeError(f"vLLM stopped a completion (stop_reason={out.stop_reason!r}) whose tokens hold none "
                           f"of the stop ids {sorted(stop)} and complete none of the stop strings {strings}: its "
                           f"terminal action and log-probability are unknown")
    if len(ids) > max_new_tokens:
        raise RuntimeError(f"vLLM returned {len(ids)} tokens, more than max_new_tokens={max_new_tokens}")
    return ids, lps
