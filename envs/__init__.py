"""The world the learner acts in: problems and suites, the sandboxed executor with the reward of eq. 2, and the
gymnasium token-level MDP. `envs` never imports `bcoder_ray`.

Importing `envs` registers the shipped suites (`envs.registry.suite_names()`) and the gymnasium ids
`bcoder/APPS-v0`, `bcoder/MBPP-v0`, `bcoder/HumanEval-v0` and `bcoder/Embedded-v0` (`envs.token_env.TokenEnv`;
keyword arguments of `gymnasium.make` go to its constructor, e.g. `split`, `suite_options`, `tokenizer`,
`max_prompt_len`, `max_program_len`).
"""

from gymnasium.envs.registration import register as _register_env

from envs import suites  # noqa: F401  (registers the suites)

GYM_IDS = {
    "bcoder/APPS-v0": {"suite": "apps", "split": "train"},
    "bcoder/MBPP-v0": {"suite": "mbpp", "split": "train"},
    "bcoder/HumanEval-v0": {"suite": "humaneval", "split": "test"},
    "bcoder/Embedded-v0": {"suite": "embedded", "split": "train"},
}

for _id, _kwargs in GYM_IDS.items():
    _register_env(id=_id, entry_point="envs.token_env:TokenEnv", kwargs=_kwargs)
