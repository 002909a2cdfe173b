"""The world the learner acts in: problems and suites, the sandboxed executor with the reward of eq. 2, and the
gymnasium token-level MDP. `envs` never imports `bcoder_ray`."""
