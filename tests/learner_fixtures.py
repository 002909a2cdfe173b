"""Tiny checkpoints for the learner-core tests (helper module, not a test file): built from configs, saved locally."""

from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          T5Config, T5ForConditionalGeneration)

KINDS = ("decoder-only", "encoder-decoder")
# the causal families users fine-tune now (rotary positions, grouped-query attention, RMSNorm, SwiGLU; Qwen2 with
# biased q/k/v and tied embeddings, Llama untied), as tiny random-weight stand-ins beside GPT-2 and T5
FAMILIES = KINDS + ("qwen2", "llama")
EOS = 1
PAD = 0


def tiny_checkpoint(kind: str, directory: str, *, vocab_size: int = 48, seed: int = 0, eos: int = EOS,
                    pad: int = PAD, dropout: float = 0.0) -> str:
    """A 2-layer GPT-2 (decoder-only), T5 (encoder-decoder), Qwen2 or Llama with d_model 32, random weights, and
    `dropout` (default none; the attention dropout of Qwen2 / Llama)."""
    torch.manual_seed(seed)
    if kind == "decoder-only":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=eos, eos_token_id=eos, resid_pdrop=dropout, embd_pdrop=dropout,
                            attn_pdrop=dropout, initializer_range=0.2)
        model = GPT2LMHeadModel(config)
    elif kind == "encoder-decoder":
        config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          dropout_rate=dropout, decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos,
                          initializer_factor=1.5)
        model = T5ForConditionalGeneration(config)
    elif kind in ("qwen2", "llama"):
        family = {"qwen2": (Qwen2Config, Qwen2ForCausalLM, True), "llama": (LlamaConfig, LlamaForCausalLM, False)}
        config_cls, model_cls, tied = family[kind]
        config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=tied,
                            attention_dropout=dropout, initializer_range=0.2)
        model = model_cls(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    return directory


def perturb(params, scale: float = 0.05, seed: int = 1) -> None:
    """Move the given parameters off their initial values (stands in for a trained network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 0.1))


def example_rows(n: int = 4) -> list[dict]:
    """The first `n` of four buffer-like rows (human and generated, every reward, with and without EOS)."""
    rows = [{"prompt_ids": [5, 6, 7], "program_ids": [8, 9, 10, 11, EOS], "reward": 1.0, "is_human": True},
            {"prompt_ids": [12, 13, 14, 15, 16], "program_ids": [17, EOS], "reward": -0.3, "is_human": False},
            {"prompt_ids": [18], "program_ids": [19, 20, 21], "reward": -1.0, "is_human": False},
            {"prompt_ids": [22, 23], "program_ids": [24, 25, 26, EOS], "reward": -0.6, "is_human": True}]
    return rows[:n]


def direct_logits(policy, row: dict) -> torch.Tensor:
    """The logits [T, V] of each program token of one unpadded row, from the HF model's own forward (independent
    of PolicyLM.states and the fused logit statistics): the reference the policy losses are checked against."""
    prompt, program = torch.tensor([row["prompt_ids"]]), torch.tensor([row["program_ids"]])
    with torch.no_grad():
        if not policy.lm.config.is_encoder_decoder:
            return policy.lm(input_ids=torch.cat([prompt, program[:, :-1]], 1)).logits[0, prompt.shape[1] - 1:]
        start = torch.tensor([[policy.lm.config.decoder_start_token_id]])
        return policy.lm(input_ids=prompt, decoder_input_ids=torch.cat([start, program[:, :-1]], 1)).logits[0]


def tiny_context(root):
    """A RunContext over a tiny decoder-only checkpoint and a BPE tokenizer trained on one program, under `root`."""
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.model.warm_start import train_tokenizer

    ckpt = tiny_checkpoint("decoder-only", str(root / "ckpt"))
    train_tokenizer(["def f(x):\n    return x\n"] * 20, 60).save_pretrained(str(root / "tok"))
    return RunContext(theta_ckpt=ckpt, tokenizer_path=str(root / "tok"), source_len=16, target_len=16)


def tiny_run_folders(root, problems, names=("bcoder", "coderl")) -> dict:
    """θ_ckpt (a tiny GPT-2 with a BPE tokenizer trained on `problems`' prompts and first references) and a run
    folder of the ci_tiny config per algorithm in `names`: `bcoder` with θ and φ moved off their initialisation (a
    trained stand-in), `coderl` with a fresh critic, any other with no checkpoint of its own. Returns {"ckpt",
    "tokenizer", name: run folder}."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from bcoder_ray.algorithms.coderl.critic import Critic
    from bcoder_ray.config import load_config
    from bcoder_ray.loop.run_folder import CONFIG_FILE, RunState
    from bcoder_ray.model.warm_start import train_tokenizer

    tokenizer = train_tokenizer([p.prompt + p.references[0] for p in problems], vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ckpt = str(root / "ckpt")
    GPT2LMHeadModel(config).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    states = {}
    if "bcoder" in names:
        trained = QModel.create(ckpt, parts=("phi", "theta"))
        perturb(trained.freeze_for_stage("theta"), scale=0.5, seed=7)
        perturb(trained.freeze_for_stage("phi"), scale=0.5, seed=8)
        trained.freeze_for_stage("none")
        trained.save_theta(str(root / "theta"), tokenizer)
        trained.save_phi(str(root / "phi"), tokenizer)
        states["bcoder"] = {"theta": str(root / "theta"), "phi": str(root / "phi")}
    if "coderl" in names:
        Critic.create(ckpt, seed=2).save(str(root / "critic"))
        states["coderl"] = {"critic": str(root / "critic")}
    runs = {}
    for name in names:
        folder = root / f"run_{name}"
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(load_config("ci_tiny", ["--algorithm.name", name]).to_yaml())
        RunState(theta_ckpt=ckpt, algorithm=states.get(name, {}), policy=ckpt, policy_version="1").save(folder)
        runs[name] = str(folder)
    return {"ckpt": ckpt, "tokenizer": tokenizer, **runs}
