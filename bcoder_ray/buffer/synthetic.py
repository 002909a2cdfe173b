"""Synthetic buffer rows and prompts for tests and benchmarks (columnar, built from numpy: fast at 1M rows).

Token counts are log-normal around `mean_tokens`, capped at `max_tokens` (Appendix H: 512 target tokens);
program text is ~4 characters per token of plausible Python; outcomes and rewards agree (eq. 2).
`synthetic_targets` makes B-Coder-like cached targets for written rows (target_actions, A_ckpt ≤ 0 with zeros
where the sampled token is the greedy one, V_φ), to hand to `ReplayBuffer.write_targets`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from envs.problem import program_hash
from envs.result import OUTCOMES, REWARD, Outcome

SNIPPETS = (
    "n = int(input())\n", "a = list(map(int, input().split()))\n", "for i in range(n):\n",
    "    if a[i] % 2 == 0:\n", "        ans += a[i]\n", "print(ans)\n", "def solve(s):\n",
    "    return sorted(set(s))\n", "while l < r:\n", "    m = (l + r) // 2\n", "import sys\n",
    "dp = [0] * (n + 1)\n", "    dp[i] = max(dp[i - 1], dp[i - 2] + a[i])\n", "res = []\n",
)
GENERATED_OUTCOME_P = (0.1, 0.4, 0.3, 0.2)  # passed, failed, runtime_error, compile_error (OUTCOMES order)


def list_array(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def synthetic_rows(rng: np.random.Generator, n: int, *, start: int = 0, suite: str = "apps",
                   source: str = "generated", iteration: int = 0, n_problems: int = 100,
                   tokenizer_hash: str = "synthetic-tok", mean_tokens: float = 250.0, max_tokens: int = 512, vocab: int = 32100,
                   split: str = "train") -> pa.Table:
    """`n` buffer rows (program_hash included, as actors have it from the executor)."""
    sigma = 0.55
    lengths = np.clip(rng.lognormal(np.log(mean_tokens) - sigma ** 2 / 2, sigma, n), 2, max_tokens).astype(np.int32)
    total = int(lengths.sum())
    ids = rng.integers(0, vocab, total, dtype=np.int32)
    chunks = rng.integers(0, len(SNIPPETS), (n, 8))
    programs = ["".join(SNIPPETS[j] for j in chunks[i]) * max(1, int(lengths[i]) // 40) + f"# {start + i}\n"
                for i in range(n)]
    o = np.zeros(n, np.int64) if source == "human" else rng.choice(len(OUTCOMES), n, p=GENERATED_OUTCOME_P)
    outcomes = np.array(OUTCOMES)[o]
    problems = rng.integers(0, n_problems, n)
    cols = {
        "tests_hash": pa.array([f"{suite}-{p}-tests" for p in problems]),
        "suite": pa.array([suite] * n), "split": pa.array([split] * n),
        "problem_id": pa.array([str(p) for p in problems]),
        "source": pa.array([source] * n),
        "iteration": pa.array(np.full(n, iteration, np.int32)),
        "policy_version": pa.array([f"v{iteration}"] * n), "actor": pa.array([f"actor-{start % 7}"] * n),
        "sampling": pa.array(["{}" if source == "human" else '{"temperature":0.6,"top_p":0.95}'] * n),
        "program": pa.array(programs),
        "program_hash": pa.array([program_hash(p) for p in programs]),
        "program_ids": list_array(lengths, ids, pa.int32()),
        "tokenizer_hash": pa.array([tokenizer_hash] * n),
        "outcome": pa.array(outcomes),
        "reward": pa.array([REWARD[Outcome(x)] for x in outcomes], pa.float64()),
        "tests_passed": pa.array(np.where(o == 0, 10, 3).astype(np.int32)),
        "tests_total": pa.array(np.full(n, 10, np.int32)),
        "timeout": pa.array(np.zeros(n, bool)), "exec_time": pa.array(rng.random(n)),
    }
    return pa.table(cols)


def synthetic_targets(rng: np.random.Generator, program_ids: pa.ChunkedArray | pa.ListArray,
                      vocab: int = 32100) -> pa.Table:
    """Per-token targets for rows with these `program_ids`: target_actions, a_ckpt, v_phi."""
    if isinstance(program_ids, pa.ChunkedArray):
        program_ids = program_ids.combine_chunks()
    lengths = pc.list_value_length(program_ids).to_numpy()
    ids = program_ids.flatten().to_numpy()
    total = len(ids)
    greedy = rng.random(total) < 0.6  # the sampled token is often θ_ckpt's greedy one: A_ckpt = 0 there
    return pa.table({
        "target_actions": list_array(lengths, np.where(greedy, ids, rng.integers(0, vocab, total, dtype=np.int32)),
                                     pa.int32()),
        "a_ckpt": list_array(lengths, np.where(greedy, 0.0, -3 * np.abs(rng.standard_normal(total))).astype(
            np.float32), pa.float32()),
        "v_phi": list_array(lengths, (rng.random(total) * 2 - 1).astype(np.float32), pa.float32()),
    })


def synthetic_prompts(rng: np.random.Generator, n_problems: int, *, suite: str = "apps",
                      tokenizer_hash: str = "synthetic-tok", mean_tokens: int = 350, max_tokens: int = 600,
                      vocab: int = 32100) -> pa.Table:
    """One prompt row per problem id 0..n_problems-1 (Appendix H: at most 600 source tokens)."""
    lengths = np.clip(rng.normal(mean_tokens, mean_tokens / 3, n_problems), 4, max_tokens).astype(np.int32)
    return pa.table({
        "suite": pa.array([suite] * n_problems), "problem_id": pa.array([str(p) for p in range(n_problems)]),
        "tokenizer_hash": pa.array([tokenizer_hash] * n_problems),
        "prompt": pa.array([f"{suite} problem {p}" for p in range(n_problems)]),
        "prompt_ids": list_array(lengths, rng.integers(0, vocab, int(lengths.sum()), dtype=np.int32), pa.int32()),
    })
