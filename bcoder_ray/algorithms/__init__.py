"""Algorithms as plug-ins on the shared loop (`base.Algorithm`), registered by name (`registry`).

Importing this package registers the project's own: `bcoder` (the default), `bcoder_optimality` and
`dueling_dqn` (B-Coder's Figure 1 ablations), `coderl`, `ppo` and `grpo`, `rest_em`, and `sft`.
One folder per family holds its plug-in (`algorithm`) and the math it uses beside it:
- `bcoder`: `q_model`, `losses`, `targets`, `ranking`;
- `coderl`: `critic`, `losses`, `critic_sampling`, `inference` (Critic Sampling at evaluation);
- `policy_gradient` (`ppo`, `grpo`): `config`, `losses`;
- `rest_em`: `losses`;
- `sft` (supervised and rejection-sampling fine-tuning): its plug-in only.
What several families share sits at this level: `lm_policy` (the LM-policy plug-ins: `ppo`, `grpo`, `rest_em`,
`sft`) and `common` (the policy's teacher-forced forward, PPO's value head, the per-program reductions, the CE).
A family folder imports no other family's. No Ray in this package.
"""

from bcoder_ray.algorithms.bcoder import algorithm as bcoder
from bcoder_ray.algorithms.coderl import algorithm as coderl
from bcoder_ray.algorithms.policy_gradient import algorithm as policy_gradient
from bcoder_ray.algorithms.rest_em import algorithm as rest_em
from bcoder_ray.algorithms.sft import algorithm as sft
from bcoder_ray.algorithms.registry import (algorithm_class, algorithm_names, import_modules, load_prefix_value,
                                            load_ranker, make_algorithm, parse_algorithm_config, register_algorithm)

for _cls in (bcoder.BCoder, bcoder.BCoderOptimality, bcoder.DuelingDQN, coderl.CodeRL, policy_gradient.PPO,
             policy_gradient.GRPO, rest_em.RestEM, sft.SFT):
    register_algorithm(_cls)

__all__ = ["algorithm_class", "algorithm_names", "import_modules", "load_prefix_value", "load_ranker",
           "make_algorithm", "parse_algorithm_config", "register_algorithm"]
