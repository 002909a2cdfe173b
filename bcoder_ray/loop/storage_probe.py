"""Before any work on a cluster of more than one node: every node must see the run's shared locations.

    check_every_node_sees({"run.storage_uri": "s3://bucket/runs/r1", "buffer.uri": "/mnt/nfs/buffer"})
    check_every_node_sees({}, folders={"model.checkpoint": "s3://bucket/runs/r1/models/theta_ckpt"})

For each location the driver writes a probe file (`<location>/.bcoder-probe/<token>.txt`); one task pinned to
each alive node (`NodeAffinitySchedulingStrategy`, hard) reads every probe back and checks every folder exists.
A node that cannot (a path only the driver's machine has, an endpoint a node cannot reach, missing credentials;
or, in processes started with `BCODER_REQUIRE_URIS=1`, any plain path) makes the check raise a `ConfigError`
naming the node, the key and what to set. On one node there is nothing to check.
"""

from __future__ import annotations

import uuid

from bcoder_ray.config import ConfigError
from bcoder_ray.util.storage import is_dir, join_uri, read_text, require_shared, resolve, write_text

PROBE_DIR = ".bcoder-probe"


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def read_probes(probes: list[tuple[str, str, str | None, str | None]]) -> list[str]:
    """On one node: for each (key, location, probe file or None, expected text), a message when the node cannot
    read the probe (or, without a probe file, does not see the location as a folder). Empty: all seen."""
    problems = []
    for key, location, probe, expected in probes:
        try:
            require_shared(location, key)
            if probe is None:
                if not is_dir(location):
                    problems.append(f"{key}: {location!r} is not a folder there")
            elif read_text(probe) != expected:
                problems.append(f"{key}: {location!r} holds another probe file there (another filesystem?)")
        except Exception as e:  # noqa: BLE001 - whatever stops a node reading it is the finding
            problems.append(f"{key}: {location!r} cannot be read there ({type(e).__name__}: {e})")
    return problems


def check_every_node_sees(locations: dict[str, str], folders: dict[str, str] | None = None, *,
                          timeout_s: float = 300.0) -> None:
    """Raise ConfigError unless every alive node reads a probe file the driver writes into each of `locations`
    ({config key: local path or URI}) and sees each of `folders` ({config key: a folder, e.g. θ_ckpt})."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probes, written = [], []
    try:
        for key, location in locations.items():
            probe = join_uri(location, PROBE_DIR, f"{token}.txt")
            try:
                write_text(probe, f"{token} {key}")
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"{key}: the driver cannot write a probe file under {location!r} "
                                  f"({type(e).__name__}: {e})") from None
            written.append(probe)
            probes.append((key, location, probe, f"{token} {key}"))
        probes += [(key, folder, None, None) for key, folder in (folders or {}).items()]
        task = ray.remote(num_cpus=0, max_retries=0)(read_probes)
        refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})":
                task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(probes) for n in nodes}
        failures = []
        for node, ref in refs.items():
            try:
                failures += [f"node {node}: {p}" for p in ray.get(ref, timeout=timeout_s)]
            except Exception as e:  # noqa: BLE001 - a node that cannot run the probe cannot run the stages either
                failures.append(f"node {node}: the probe task failed ({type(e).__name__}: {e})")
    finally:
        for probe in written:
            fs, path = resolve(probe)
            try:
                fs.delete_file(path)
            except OSError:
                pass
    if failures:
        raise ConfigError(f"{len(nodes)} nodes, and not every one sees the run's shared locations:\n  "
                          + "\n  ".join(failures)
                          + "\nSet run.storage_uri (and buffer.uri, model.checkpoint) to a URI every node reaches "
                            "(s3://bucket/prefix, gs://...) or a filesystem every node mounts.")
