"""The replay buffer's parts: schema (columns, row building, validation), filters, storage (files, atomic
writes, quarantine, compaction ledger), targets (cached-target sidecars), sampler (ρ_real mixing), ray_data.
The public entry point is `bcoder_ray.replay_buffer.ReplayBuffer`."""
