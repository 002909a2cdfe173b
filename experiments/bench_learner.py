"""Benchmark of the learner core against plain LM baselines, measured side by side in one run (CPU by default).

Prints, per model kind:
- ``theta_step_vs_ce``: a stage-θ step (eq. 17, cached targets) / a plain cross-entropy step of the same model
  (``transformers`` forward with labels). Goal ≤ 1.15.
- ``phi_step_vs_ce``: a stage-φ step (eq. 12, cached A_ckpt) / the same cross-entropy step (φ's decoder with an LM
  head is that model). Goal ≤ 1.05.
- ``qsample_vs_generate``: Q-sampling tokens/s / ``model.generate`` tokens/s, same prompts and settings.
  Goal ≥ 0.95.
- ``rank_vs_sample``: the ranking pass's time per candidate / the sampling time per candidate.
- ``stop_string_check_vs_none``: Q-sampling time with a stop string checked after every token (one that never
  occurs, so both sides draw the same tokens; a word-level tokenizer over the vocabulary decodes the window) /
  without. The price of `model.stop_strings`.
- ``dropout_free_vs_same_forward``: a stage-θ step whose TD targets come from a second no-grad forward without
  dropout (the default, `dropout_free_targets`) / one that reads them from the training forward. Both models have
  transformers' default dropout 0.1.
- ``targets_vs_forward``: rows/s of the cached-target computation (θ_ckpt and φ, `compute_frozen_targets`) / rows/s
  of a plain no-grad forward of the same two networks over the same rows. Goal ≥ 0.8.
- ``peak_mb``: the peak memory of each part (CUDA: `torch.cuda.max_memory_allocated`, reset per part; CPU: the
  process's resident high-water mark after the part, which only grows, so a part's figure includes those before).
Both sides of each ratio train the same parameters and freeze the same parts (the shared encoder of an
encoder-decoder); each side has its own AdamW. Timings alternate A, B, A, B … and the ratio is of the medians, so
load from other processes hits both sides alike. The last line is ``theta_step_vs_ce: X``, the worst (largest)
over the kinds run.

    python experiments/bench_learner.py                       # small random GPT-2 and T5, built from configs
    python experiments/bench_learner.py --checkpoint PATH     # a local checkpoint instead
    python experiments/bench_learner.py --checkpoint smollm2-135m-instruct --repeats 3   # the real model (issue 27)

``--checkpoint`` takes whatever `model.checkpoint` takes (a folder, a GGUF file, a packaged name).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from bcoder_ray.model.batch import Batch, collate
from bcoder_ray.algorithms.bcoder.losses import phi_loss, theta_loss
from bcoder_ray.algorithms.bcoder.q_model import ENCODER_DECODER, QModel, lm_kind, positions_from_mask
from bcoder_ray.algorithms.bcoder.ranking import token_scores
from bcoder_ray.model.sampling import sample_programs
from bcoder_ray.model.tokenization import StopStrings
from bcoder_ray.algorithms.bcoder.targets import TARGET_COLUMNS, compute_frozen_targets
from bcoder_ray.model.gguf import resolve_checkpoint

EOS, PAD = 1, 0


def build_small(kind: str, directory: str, vocab: int, d_model: int, layers: int) -> str:
    torch.manual_seed(0)
    if kind == ENCODER_DECODER:
        config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_layers=layers,
                          num_heads=4, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
        model = T5ForConditionalGeneration(config)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=layers, n_head=4, n_positions=1024,
                            bos_token_id=EOS, eos_token_id=EOS)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    return directory


def make_examples(n: int, prompt_len: int, program_len: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        p = torch.randint(2, vocab, (prompt_len - (i % 3) * 4,), generator=g).tolist()
        w = torch.randint(2, vocab, (program_len - (i % 4) * 8 - 1,), generator=g).tolist() + [EOS]
        examples.append({"prompt_ids": p, "program_ids": w, "reward": [1.0, -0.3, -0.6, -1.0][i % 4],
                         "is_human": i % 2 == 0})
    return examples


def ce_step(model: QModel, batch: Batch, optimiser: torch.optim.Optimizer) -> None:
    """The plain baseline: transformers' forward with labels (mean CE over program tokens), encoder frozen."""
    lm = model.theta.lm
    optimiser.zero_grad(set_to_none=True)
    if model.kind == ENCODER_DECODER:
        encoded = model.encode(batch)
        labels = batch.program_ids.masked_fill(batch.program_mask == 0, -100)
        loss = lm(encoder_outputs=(encoded.hidden,), attention_mask=batch.prompt_mask, labels=labels).loss
    else:
        ids = torch.cat([batch.prompt_ids, batch.program_ids], 1)
        mask = torch.cat([batch.prompt_mask, batch.program_mask], 1)
        # logits only where the program's tokens are predicted (as the learner does): a fair baseline
        logits = lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                    position_ids=positions_from_mask(mask[:, :-1]), logits_to_keep=batch.program_ids.shape[1]).logits
        labels = batch.program_ids.masked_fill(batch.program_mask == 0, -100)
        loss = F.cross_entropy(logits.transpose(1, 2), labels)
    loss.backward()
    optimiser.step()


def learner_step(loss_fn: Callable, model: QModel, batch: Batch, optimiser: torch.optim.Optimizer) -> None:
    optimiser.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model, batch)
    loss.backward()
    optimiser.step()


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of a and of b, alternating, after one warm-up call each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def generate_reference(lm, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                       top_p: float, seed: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width).unsqueeze(0) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                          top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=PAD,
                          eos_token_id=EOS)
    out = out[:, 1:] if lm.config.is_encoder_decoder else out[:, width:]
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out.tolist()]


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ids 0 … vocab-1 ("t0 t1 …"): decoding costs what a real tokenizer's does."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", pad_token=f"t{PAD}", unk_token="t2")


def peak_mb(reset: bool = False) -> float:
    """The peak memory so far (see the module docstring), in MiB; `reset` starts a new CUDA window."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plain_forward(model: QModel, batch: Batch) -> None:
    """What the target computation cannot do with less: θ_ckpt's and φ's bodies over the rows, no grad."""
    with torch.no_grad():
        encoded = model.encode(batch)
        model.ckpt_logits(batch, encoded)
        model.phi_raw_values(batch, encoded)


def cached_targets_batch(frozen: QModel, examples: list[dict], device: str | None = None) -> Batch:
    """`examples` collated with their cached targets (θ_ckpt's and φ's, by `frozen`) as per-token columns, as a
    learner reads them from the buffer."""
    rows = compute_frozen_targets(frozen, collate(examples, PAD))  # on the frozen networks' device
    batch = collate([{**ex, **row} for ex, row in zip(examples, rows)], PAD, token_columns=TARGET_COLUMNS)
    return batch.to(device) if device else batch


def theta_learner(checkpoint: str, device: str | None = None
                  ) -> tuple[QModel, torch.optim.Optimizer, torch.optim.Optimizer]:
    """Stage θ's model (θ alone, its stage's parameters trainable, train mode) and two AdamW over them: one for
    the θ steps, one for the CE steps it is compared with."""
    model = QModel.create(checkpoint, parts=("theta",), device=device)
    params = model.freeze_for_stage("theta")
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-5), torch.optim.AdamW(params, lr=1e-5)


def bench_kind(checkpoint: str, args) -> dict[str, float]:
    config = AutoConfig.from_pretrained(checkpoint)
    kind, vocab = lm_kind(config), int(config.vocab_size)
    examples = make_examples(args.batch, args.prompt_len, args.program_len, vocab, seed=0)
    results: dict = {"peak_mb": {}}
    peak_mb(reset=True)

    frozen = QModel.create(checkpoint, parts=("ckpt", "phi"))              # the cache writer
    plain = collate(examples, PAD)
    batch = cached_targets_batch(frozen, examples)
    t_targets, t_forward = side_by_side(lambda: compute_frozen_targets(frozen, plain),
                                        lambda: plain_forward(frozen, plain), args.repeats)
    results["targets_vs_forward"] = t_forward / t_targets  # rows/s over rows/s: the same rows on both sides
    results["peak_mb"]["targets"] = peak_mb(reset=True)
    del frozen

    theta_model, opt_q, opt_ce = theta_learner(checkpoint)                 # stage θ holds θ alone
    t_theta, t_ce = side_by_side(
        lambda: learner_step(lambda m, b: theta_loss(m, b, gamma=0.999), theta_model, batch, opt_q),
        lambda: ce_step(theta_model, batch, opt_ce), args.repeats)
    results["theta_step_vs_ce"] = t_theta / t_ce
    # the cost of dropout-free TD targets (the configs' default): a second, no-grad forward of θ
    t_free, t_same = side_by_side(
        lambda: learner_step(lambda m, b: theta_loss(m, b, gamma=0.999, dropout_free_targets=True), theta_model,
                             batch, opt_q),
        lambda: learner_step(lambda m, b: theta_loss(m, b, gamma=0.999, dropout_free_targets=False), theta_model,
                             batch, opt_q), args.repeats)
    results["dropout_free_vs_same_forward"] = t_free / t_same
    results["peak_mb"]["theta"] = peak_mb(reset=True)

    phi_model = QModel.create(checkpoint, parts=("phi",))                 # stage φ holds φ alone
    phi_params = phi_model.freeze_for_stage("phi")
    phi_model.train()
    opt_phi = torch.optim.AdamW(phi_params, lr=1e-5)
    t_phi, t_ce2 = side_by_side(
        lambda: learner_step(lambda m, b: phi_loss(m, b, gamma=0.999), phi_model, batch, opt_phi),
        lambda: ce_step(theta_model, batch, opt_ce), args.repeats)
    results["phi_step_vs_ce"] = t_phi / t_ce2
    results["peak_mb"]["phi"] = peak_mb(reset=True)
    del phi_model, opt_phi

    theta_model.freeze_for_stage("none")
    theta_model.eval()
    prompts = [ex["prompt_ids"] for ex in examples[: args.prompts]]
    settings = dict(max_new_tokens=args.new_tokens, temperature=0.6, top_p=0.95, seed=0)
    produced: dict[str, list] = {}

    def ours():
        produced["ours"] = [w for per in sample_programs(theta_model.theta, prompts, args.samples, eos_id=EOS, pad_id=PAD,
                                                         **settings) for w in per]

    def theirs():
        produced["theirs"] = generate_reference(theta_model.theta.lm, prompts, args.samples, **settings)

    t_ours, t_theirs = side_by_side(ours, theirs, args.repeats)
    tokens_ours = sum(len(w) for w in produced["ours"])
    tokens_theirs = sum(len(w) for w in produced["theirs"])
    results["qsample_vs_generate"] = (tokens_ours / t_ours) / (tokens_theirs / t_theirs)
    results["same_tokens_as_generate"] = float(produced["ours"] == produced["theirs"])
    results["qsample_tokens_per_s"] = tokens_ours / t_ours

    stops = StopStrings(word_tokenizer(vocab), ("```",))

    def checked():
        produced["checked"] = [w for per in sample_programs(theta_model.theta, prompts, args.samples, eos_id=EOS,
                                                            pad_id=PAD, stop_strings=stops, **settings) for w in per]

    t_checked, t_plain = side_by_side(checked, ours, args.repeats)
    assert produced["checked"] == produced["ours"], "a stop string that never occurs changed the samples"
    results["stop_string_check_vs_none"] = t_checked / t_plain
    results["peak_mb"]["sampling"] = peak_mb(reset=True)
    del theta_model, opt_q, opt_ce

    ranker = QModel.create(checkpoint, parts=("phi", "theta"))            # ranking holds θ and φ
    candidates = produced["ours"]
    candidate_prompts = [p for p in prompts for _ in range(args.samples)]
    start = time.perf_counter()
    for _ in range(2):
        token_scores(ranker, candidate_prompts, candidates, gamma=0.999, pad_id=PAD, batch_size=len(candidates))
    t_rank = (time.perf_counter() - start) / 2
    results["rank_vs_sample"] = (t_rank / len(candidates)) / (t_ours / len(candidates))
    results["peak_mb"]["ranking"] = peak_mb(reset=True)
    results["kind"] = kind
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a local checkpoint (default: small random GPT-2 and T5)")
    parser.add_argument("--kinds", default="encoder-decoder,decoder-only")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--program-len", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoints = []
    if args.checkpoint:
        checkpoints.append(resolve_checkpoint(args.checkpoint, log=print))
    else:
        for kind in args.kinds.split(","):
            checkpoints.append(build_small(kind, tempfile.mkdtemp(prefix="bench_learner_"), args.vocab,
                                           args.d_model, args.layers))
    worst = 0.0
    for checkpoint in checkpoints:
        r = bench_kind(checkpoint, args)
        print(f"[{r['kind']}] theta_step_vs_ce={r['theta_step_vs_ce']:.3f} (goal <= 1.15)  "
              f"phi_step_vs_ce={r['phi_step_vs_ce']:.3f} (goal <= 1.05)  "
              f"dropout_free_vs_same_forward={r['dropout_free_vs_same_forward']:.3f} (the θ step's cost of "
              f"targets without dropout)  "
              f"qsample_vs_generate={r['qsample_vs_generate']:.3f} (goal >= 0.95; same tokens: "
              f"{bool(r['same_tokens_as_generate'])}; {r['qsample_tokens_per_s']:.0f} tok/s)  "
              f"stop_string_check_vs_none={r['stop_string_check_vs_none']:.3f} (sampling with a stop string "
              f"checked)  "
              f"rank_vs_sample={r['rank_vs_sample']:.3f} (ranking time per candidate / sampling time per candidate)  "
              f"targets_vs_forward={r['targets_vs_forward']:.3f} (goal >= 0.8)  "
              f"peak_mb={ {k: round(v) for k, v in r['peak_mb'].items()} }", flush=True)
        worst = max(worst, r["theta_step_vs_ce"])
    print(f"theta_step_vs_ce: {worst:.3f}")


if __name__ == "__main__":
    main()
