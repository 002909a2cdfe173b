"""Algorithms as plug-ins on the shared loop (`base.Algorithm`), registered by name (`registry`).

Importing this package registers the project's own: `bcoder` (the default), `bcoder_optimality` and
`dueling_dqn` (B-Coder's Figure 1 ablations). The math each uses sits beside it: `q_model`, `losses`, `targets`,
`ranking` (B-Coder). No Ray in this package.
"""

from bcoder_ray.algorithms import bcoder, coderl
from bcoder_ray.algorithms.registry import (algorithm_class, algorithm_names, import_modules, load_ranker,
                                            make_algorithm, parse_algorithm_config, register_algorithm)

for _cls in (bcoder.BCoder, bcoder.BCoderOptimality, bcoder.DuelingDQN, coderl.CodeRL):
    register_algorithm(_cls)

__all__ = ["algorithm_class", "algorithm_names", "import_modules", "load_ranker", "make_algorithm",
           "parse_algorithm_config", "register_algorithm"]
