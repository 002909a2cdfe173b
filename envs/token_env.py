"""Program synthesis as a token-level MDP (B-Coder, section 3; CodeRL), as a gymnasium environment.

- State: the problem's prompt tokens and the program prefix typed so far.
- Action: one token id (`Discrete(vocab)`); the transition appends it to the prefix.
- The episode ends when the action is EOS (or another of `stop_ids`, e.g. an instruct model's end-of-turn token),
  when it completes one of `stop_strings` (the program is then its text before the stop string), or when the
  prefix reaches `max_program_len` tokens. All are terminal
  states of the MDP (`terminated=True`; `info["length_limit"]` tells them apart): the program is executed.
- Reward: 0 on every step but the last; on the last, eq. 2 (+1 passed, -0.3 failed, -0.6 runtime error,
  -1 compile error) of the decoded program on the problem's hidden tests, computed by
  `envs.scoring.score_program`, the same code the rollout workers' batch path runs.

Observation (fixed shapes, padded with the tokenizer's pad id; lengths say how much is real):
    {"prompt_ids": int64[max_prompt_len], "prompt_length": Discrete(max_prompt_len + 1),
     "program_ids": int64[max_program_len], "program_length": Discrete(max_program_len + 1)}
Token ids follow `envs.tokenization` (prompt left-truncated, or one user turn of the tokenizer's chat template with
`chat_template=True`; program = ids + EOS, decoding stops at EOS).

`reset(seed=..., options={"problem_index": i} or {"problem_id": "..."})` picks the problem (uniformly with
`self.np_random` when not given); `info` names it. The terminal `info` carries "outcome", "tests" (per-test
status and error), "program", "error", "timeout" and "length_limit".

    env = gymnasium.make("bcoder/MBPP-v0", max_program_len=256)          # registered in envs/__init__.py
    env = TokenEnv(suite="apps", split="train", suite_options={"source": "path/to/apps"}, tokenizer=tok)
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from envs.problem import Problem
from envs.registry import load_suite
from envs.result import ExecResult
from envs.scoring import BatchExecutor, score_program
from envs.tokenization import TextFormat, decode_program, eos_id, pad_id, stop_ids

INFRA_RERUNS = 2  # re-runs of a program whose run the sandbox itself failed (no verdict)


def default_tokenizer():
    """ByT5's byte-level tokenizer: needs no files and can spell any program."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


class TokenEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # "ansi" returns the prompt and the program so far

    def __init__(self, suite: str | None = None, split: str = "train", *,
                 problems: Sequence[Problem] | None = None, suite_options: dict | None = None,
                 tokenizer: Any = None, max_prompt_len: int = 1024, max_program_len: int = 512,
                 executor: BatchExecutor | None = None, executor_options: dict | None = None,
                 render_mode: str | None = None, extra_stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), chat_template: bool = False, response_prefix: str = ""):
        """`problems` given directly, or loaded with `load_suite(suite, split, **suite_options)`.

        `executor` is shared and left open; without one the env starts an `envs.execute.Executor` with
        `executor_options` (default one worker) on its first terminal step and closes it in `close()`.
        """
        if problems is None:
            if suite is None:
                raise ValueError("TokenEnv needs a suite name or a list of problems")
            problems = load_suite(suite, split, **(suite_options or {}))
        if not problems:
            raise ValueError(f"TokenEnv: suite {suite!r} split {split!r} has no problems")
        if max_prompt_len < 1 or max_program_len < 1:
            raise ValueError("max_prompt_len and max_program_len must be positive")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unsupported render_mode {render_mode!r}")
        self.problems = list(problems)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self.max_prompt_len = max_prompt_len
        self.max_program_len = max_program_len
        self.render_mode = render_mode
        self.eos_id = eos_id(self.tokenizer)
        self.stop_ids = stop_ids(self.tokenizer, extra_stop_ids)  # the actions that end the episode, EOS first
        self.text_format = TextFormat(chat_template=chat_template, stop_strings=tuple(stop_strings),
                                      response_prefix=response_prefix)
        self.stop_strings = self.text_format.stops(self.tokenizer)  # texts that end it too (None: none)
        self.pad_id = pad_id(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self._executor = executor
        self._owns_executor = executor is None
        self._executor_options = dict(executor_options or {"workers": 1})

        high = self.vocab_size - 1
        self.action_space = gym.spaces.Discrete(self.vocab_size)
        self.observation_space = gym.spaces.Dict({
            "prompt_ids": gym.spaces.Box(0, high, shape=(max_prompt_len,), dtype=np.int64),
            "prompt_length": gym.spaces.Discrete(max_prompt_len + 1),
            "program_ids": gym.spaces.Box(0, high, shape=(max_program_len,), dtype=np.int64),
            "program_length": gym.spaces.Discrete(max_program_len + 1),
        })
        self.problem: Problem | None = None
        self._prompt_ids: list[int] = []
        self._program_ids: list[int] = []
        self._done = True
        self._prompt_cache: dict[str, list[int]] = {}

    # -- helpers --------------------------------------------------------------------------------------

    def _padded(self, ids: list[int], length: int) -> np.ndarray:
        out = np.full(length, self.pad_id, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def _observation(self) -> dict[str, Any]:
        return {
            "prompt_ids": self._padded(self._prompt_ids, self.max_prompt_len),
            "prompt_length": np.int64(len(self._prompt_ids)),
            "program_ids": self._padded(self._program_ids, self.max_program_len),
            "program_length": np.int64(len(self._program_ids)),
        }

    def _problem_info(self) -> dict[str, Any]:
        p = self.problem
        return {"suite": p.suite, "split": p.split, "problem_id": p.problem_id, "difficulty": p.difficulty}

    def _select(self, options: dict | None) -> Problem:
        options = options or {}
        if "problem_index" in options:
            return self.problems[int(options["problem_index"])]
        if "problem_id" in options:
            for p in self.problems:
                if p.problem_id == options["problem_id"]:
                    return p
            raise KeyError(f"no problem {options['problem_id']!r} in this env's {len(self.problems)} problems")
        return self.problems[int(self.np_random.integers(len(self.problems)))]

    def _prompt_ids_of(self, problem: Problem) -> list[int]:
        if problem.key not in self._prompt_cache:
            self._prompt_cache[problem.key] = self.text_format.prompt_ids(self.tokenizer, problem.prompt,
                                                                          self.max_prompt_len)
        return self._prompt_cache[problem.key]

    @property
    def executor(self) -> BatchExecutor:
        if self._executor is None:
            from envs.execute import Executor

            executor = Executor(**self._executor_options)
            self._executor = executor.__enter__()
        return self._executor

    @property
    def program(self) -> str:
        """The program the current prefix decodes to."""
        return decode_program(self.tokenizer, self._program_ids, self.stop_ids, self.text_format.stop_strings)

    # -- gymnasium API ----------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.problem = self._select(options)
        self._prompt_ids = self._prompt_ids_of(self.problem)
        self._program_ids = []
        self._done = False
        return self._observation(), self._problem_info()

    def step(self, action):
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not a token id in [0, {self.vocab_size})")
        token = int(action)
        self._program_ids.append(token)
        at_stop = token in self.stop_ids or (self.stop_strings is not None
                                             and self.stop_strings.completed(self._program_ids))
        at_limit = len(self._program_ids) >= self.max_program_len
        info = self._problem_info()
        if not (at_stop or at_limit):
            return self._observation(), 0.0, False, False, info
        self._done = True
        program = self.program
        result: ExecResult = score_program(self.executor, self.problem, program)
        for _ in range(INFRA_RERUNS):  # the sandbox failed (no verdict): run it again
            if not result.is_infra:
                break
            result = score_program(self.executor, self.problem, program)
        if result.is_infra:
            raise RuntimeError(f"{self.problem.key}: the sandbox gave no verdict for the episode's program after "
                               f"{INFRA_RERUNS} re-runs ({result.infra_error}); this is not the program's outcome")
        info.update({
            "program": program,
            "outcome": result.outcome.value,
            "tests": [{"status": t.status, "error": t.error} for t in result.tests],
            "error": result.error,
            "timeout": result.timeout,
            "length_limit": not at_stop,
        })
        return self._observation(), float(result.reward), True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self.problem is None:
            return None
        return f"{self.problem.prompt}{self.program}"

    def close(self) -> None:
        if self._owns_executor and self._executor is not None:
            self._executor.__exit__(None, None, None)
            self._executor = None
        super().close()
