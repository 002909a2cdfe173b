"""Algorithms as plug-ins on the shared loop (`base.Algorithm`), registered by name (`registry`).

Importing this package registers the project's own: `bcoder` (the default), `bcoder_optimality` and
`dueling_dqn` (B-Coder's Figure 1 ablations), `coderl`, `ppo`, `grpo` (`policy_gradient`) and `rest_em`
(`self_training`).
The math each uses sits beside it: `q_model`, `losses`, `targets`, `ranking` (B-Coder); `pg_losses`, `rest_em`,
`critic`, `coderl_losses`, `critic_sampling` (CodeRL); `lm_policy` (the baselines). No Ray in this package.
"""

from bcoder_ray.algorithms.bcoder import algorithm as bcoder
from bcoder_ray.algorithms.coderl import algorithm as coderl
from bcoder_ray.algorithms.policy_gradient import algorithm as policy_gradient
from bcoder_ray.algorithms.rest_em import algorithm as self_training
from bcoder_ray.algorithms.registry import (algorithm_class, algorithm_names, import_modules, load_ranker,
                                            make_algorithm, parse_algorithm_config, register_algorithm)

for _cls in (bcoder.BCoder, bcoder.BCoderOptimality, bcoder.DuelingDQN, coderl.CodeRL, policy_gradient.PPO,
             policy_gradient.GRPO, self_training.RestEM):
    register_algorithm(_cls)

__all__ = ["algorithm_class", "algorithm_names", "import_modules", "load_ranker", "make_algorithm",
           "parse_algorithm_config", "register_algorithm"]
