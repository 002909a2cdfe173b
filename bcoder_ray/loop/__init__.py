"""The Ray wiring of a run: the driver (the recipe), rollout actors, the learner (one Ray Train loop for any
stage), target filling, the Ray session, the schedule check, the storage probe, the run folder and its table,
metric sinks. The only layer that starts Ray work."""
