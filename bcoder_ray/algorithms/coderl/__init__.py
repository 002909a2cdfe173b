"""CodeRL (`algorithm`): the critic (`critic`), the actor's losses (`losses`), Critic Sampling (`critic_sampling`)
and its inference path (`inference`)."""
