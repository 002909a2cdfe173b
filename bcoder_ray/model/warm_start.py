"""A tiny code LM and its tokenizer, trained from scratch on a suite's human solutions (cross-entropy warm start).

This is θ_ckpt of the embedded default: with no checkpoint given, the run trains one itself.

    train = load_suite("embedded", "train")
    path = warm_start(train[576:], WarmStartConfig(), cache_root="runs/.cache/warm_start")
    model = GPT2LMHeadModel.from_pretrained(path); tokenizer = AutoTokenizer.from_pretrained(path)

`warm_start` learns from exactly the problems it is given. The run gives it the train problems the RL loop does
not roll out on (train[suite.max_train_problems:]), so the loop samples problems whose solutions the warm start
never imitated (experiments/calibrate_embedded.py applies the same rule, `--rl-problems`).

1. A byte-level BPE tokenizer (`tokenizers`) is trained on the training prompts and references, with an EOS
   and a PAD special token, and wrapped as a `transformers.PreTrainedTokenizerFast`. With the default
   pretokenizer "digits" only numbers are cut out before merging, so merges span spaces: the templated
   statements and programs take about half the tokens of GPT-2's word-level cut ("gpt2"), which halves the
   cost of training and of every later forward pass, while a constant is the same token in statement and code.
2. A tiny GPT-2 (`GPT2LMHeadModel` from a `GPT2Config`) is built from the config's sizes.
3. It is trained on prompt_ids + program_ids, the ids made by `bcoder_ray.model.tokenization` exactly as sampling,
   the buffer and the learner make them. The loss is the cross-entropy of the program tokens (eq. 1 on human
   programs) plus `prompt_loss_weight` times the language-model loss of the prompt tokens: the prompts repeat
   the function name (statement, then asserts), so they teach the copying of names a program needs; set it to 0
   for a loss on program tokens only. The number of steps and the seed are fixed, so a run is reproducible (on
   a fixed thread count).
4. Model and tokenizer are saved with `save_pretrained` into `cache_root/warm-<key>`, where the key hashes the
   config (less `num_threads`), the training data and `WARM_START_VERSION`. The folder is written under a
   temporary name and renamed when complete, so a second call with the same config and data returns the
   cached path at once, and an interrupted run leaves no half-written checkpoint behind. `warm_start.json` in
   the folder records the config, the key, the data hash, the number of examples, the final loss and the time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bcoder_ray.model.tokenization import encode_program, encode_prompt, pad_id
from envs.problem import Problem

WARM_START_VERSION = 2  # bump when the procedure changes, so old cache entries are not reused
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
RECORD_FILE = "warm_start.json"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that decides the warm-start model; all fields but `num_threads` enter the cache key."""

    vocab_size: int = 1536
    pretokenizer: str = "digits"  # how text is cut before BPE merges (see PRETOKENIZERS)
    activation: str = "gelu_pytorch_tanh"  # GPT-2's tanh GELU as one fused kernel ("gelu_new": the same, unfused)
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    max_prompt_len: int = 192  # must match the run's prompt truncation (bcoder_ray.model.tokenization)
    max_program_len: int = 128  # must match the run's program length limit
    steps: int = 900
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.01
    prompt_loss_weight: float = 0.5  # LM loss on prompt tokens, relative to the program loss (0: programs only)
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int | None = None  # torch threads; None: every core this process may use

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("pretokenizer", "activation"):
                continue
            if f.name in ("dropout", "min_lr_ratio", "weight_decay", "prompt_loss_weight"):
                if not 0 <= value <= 1:
                    raise ValueError(f"WarmStartConfig.{f.name} must be in [0, 1], got {value}")
            elif f.name not in ("seed", "num_threads", "warmup_steps") and not value > 0:
                raise ValueError(f"WarmStartConfig.{f.name} must be positive, got {value}")
        if self.pretokenizer not in PRETOKENIZERS:
            raise ValueError(f"WarmStartConfig.pretokenizer must be one of {sorted(PRETOKENIZERS)}, "
                             f"got {self.pretokenizer!r}")
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:
            raise ValueError(f"WarmStartConfig.activation must be a transformers activation, got {self.activation!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"WarmStartConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    def key_fields(self) -> dict:
        d = asdict(self)
        d.pop("num_threads")
        return d


def training_pairs(problems: Sequence[Problem]) -> list[tuple[str, str]]:
    """(prompt, human program) for every reference solution of every problem, in order."""
    return [(p.prompt, ref) for p in problems for ref in p.references]


def data_hash(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for prompt, program in pairs:
        for text in (prompt, program):
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()


def cache_key(cfg: WarmStartConfig, pairs: Sequence[tuple[str, str]]) -> str:
    blob = json.dumps({"version": WARM_START_VERSION, "config": cfg.key_fields(), "data": data_hash(pairs)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def cached_path(problems: Sequence[Problem], cfg: WarmStartConfig, cache_root: str | Path) -> Path:
    """Where `warm_start` puts (or finds) the model for these problems and this config."""
    return Path(cache_root) / f"warm-{cache_key(cfg, training_pairs(problems))}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / RECORD_FILE).is_file()


PRETOKENIZERS = {
    # GPT-2's: words, numbers and punctuation runs are cut apart, so a merge never spans a space
    "gpt2": "GPT-2's byte-level regex (a token never spans a word boundary)",
    # only runs of digits are cut out: every number is its own token(s), so a constant in a statement and the
    # same constant in code are the same token; everything else may merge across spaces, so the templated
    # statements and code take about half the tokens of "gpt2" (faster training and sampling)
    "digits": "numbers cut out, merges across spaces elsewhere",
}


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d+"), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"unknown pretokenizer {kind!r}; known: {sorted(PRETOKENIZERS)}")


def train_tokenizer(texts: Sequence[str], vocab_size: int, pretokenizer: str = "gpt2") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (lossless on any text) with EOS and PAD special tokens; `pretokenizer` (a key
    of PRETOKENIZERS) decides where text is cut before merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer(pretokenizer)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def build_model(cfg: WarmStartConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.max_prompt_len + cfg.max_program_len, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, activation_function=cfg.activation, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def encode_pairs(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], max_prompt_len: int,
                 max_program_len: int) -> list[tuple[list[int], list[int]]]:
    return [(encode_prompt(tokenizer, prompt, max_prompt_len), encode_program(tokenizer, program, max_program_len))
            for prompt, program in pairs]


def batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, seed: int
            ) -> Iterator[list[tuple[list[int], list[int]]]]:
    """Endless shuffled batches; examples of similar length are batched together to waste less padding."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    chunk = batch_size * 16
    while True:
        rng.shuffle(order)
        epoch: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
            epoch.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
        rng.shuffle(epoch)
        for idx in epoch:
            yield [examples[i] for i in idx]


def collate(batch: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+program. `labels` are the program tokens (IGNORE_INDEX elsewhere), `prompt_labels`
    the prompt tokens (IGNORE_INDEX elsewhere)."""
    width = max(len(p) + len(q) for p, q in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    prompt_labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, program) in enumerate(batch):
        n, m = len(prompt), len(program)
        input_ids[row, : n + m] = torch.tensor(prompt + program)
        attention_mask[row, : n + m] = 1
        labels[row, n: n + m] = torch.tensor(program)
        prompt_labels[row, :n] = torch.tensor(prompt)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_labels": prompt_labels}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX (0 where none)."""
    shifted = labels[:, 1:]
    if not (shifted != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def warm_start_loss(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor], prompt_loss_weight: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, program loss): cross-entropy on the program tokens (eq. 1 on human programs), plus
    `prompt_loss_weight` times the language-model loss on the prompt tokens (each a mean over its own tokens,
    as `token_cross_entropy` computes it; here from one log-softmax over the logits)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    program_labels, prompt_labels = batch["labels"][:, 1:], batch["prompt_labels"][:, 1:]
    is_program = program_labels != IGNORE_INDEX
    is_prompt = prompt_labels != IGNORE_INDEX
    targets = torch.where(is_program, program_labels, prompt_labels if prompt_loss_weight > 0 else IGNORE_INDEX)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                                  reduction="none").view_as(targets)
    program_loss = (per_token * is_program).sum() / is_program.sum().clamp(min=1)
    if prompt_loss_weight == 0:
        return program_loss, program_loss
    prompt_loss = (per_token * is_prompt).sum() / is_prompt.sum().clamp(min=1)
    return program_loss + prompt_loss_weight * prompt_loss, program_loss


def learning_rate(cfg: WarmStartConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(model: GPT2LMHeadModel, examples: Sequence[tuple[list[int], list[int]]], cfg: WarmStartConfig,
                pad: int, progress: bool = True, callback: Callable[[int, GPT2LMHeadModel], None] | None = None
                ) -> list[float]:
    """Exactly cfg.steps optimizer steps; returns the program-token loss of every step. `callback(step, model)`
    runs after each step (calibration curves)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    stream = batches(examples, cfg.batch_size, cfg.seed)
    bar = tqdm(range(cfg.steps), desc="warm start", disable=not progress, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss, program_loss = warm_start_loss(model, collate(next(stream), pad), cfg.prompt_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(program_loss.item())
        if callback is not None:
            callback(step, model)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def warm_start(problems: list[Problem], cfg: WarmStartConfig, cache_root: str | Path, progress: bool = True) -> Path:
    """Train (or find cached) the warm-start LM and tokenizer for `problems`; returns their folder."""
    pairs = training_pairs(problems)
    if not pairs:
        raise ValueError("warm_start: the problems carry no reference solutions to train on")
    cache_root = Path(cache_root)
    final = cache_root / f"warm-{cache_key(cfg, pairs)}"
    if is_complete(final):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or _available_cores())
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = train_tokenizer([text for pair in pairs for text in pair], cfg.vocab_size, cfg.pretokenizer)
        examples = encode_pairs(tokenizer, pairs, cfg.max_prompt_len, cfg.max_program_len)
        model = build_model(cfg, tokenizer)
        train_started, cpu_started = time.time(), time.process_time()
        losses = train_model(model, examples, cfg, pad_id(tokenizer), progress=progress)
        train_wall, train_cpu = time.time() - train_started, time.process_time() - cpu_started
    finally:
        torch.set_num_threads(threads_before)
    tail = losses[-50:]
    record = {"key": final.name.removeprefix("warm-"), "version": WARM_START_VERSION, "config": asdict(cfg),
              "data_hash": data_hash(pairs), "examples": len(examples), "parameters": model.num_parameters(),
              "final_loss": sum(tail) / len(tail), "wall_time_s": round(time.time() - started, 1),
              "train_loop_s": round(train_wall, 1), "steps_per_s": round(cfg.steps / train_wall, 3),
              "train_cpu_s": round(train_cpu, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
              "torch": torch.__version__, "threads": cfg.num_threads or _available_cores()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_root))
    try:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # not a concurrent run that finished first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
