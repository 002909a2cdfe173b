"""The algorithm registry: an algorithm is one module plus one `register_algorithm` call.

    from bcoder_ray.algorithms.base import Algorithm, AlgorithmConfig
    from bcoder_ray.algorithms.registry import register_algorithm

    class MyConfig(AlgorithmConfig):
        name: str = "mine"
        lr_scale: float = 1.0
        '''Docstring of the field.'''

    class Mine(Algorithm):
        name = "mine"
        Config = MyConfig
        ...

    register_algorithm(Mine)

The project's own algorithms register when `bcoder_ray.algorithms` is imported; an outside one when its module
is imported: `run.py --import my_package.my_algorithm`, or an entry point in the group `bcoder_ray.algorithms`
(`[options.entry_points] bcoder_ray.algorithms = mine = my_package.my_algorithm`). Ray Train workers and actors
import the same modules by name (`import_modules`) before they look an algorithm up. Like the suite registry
of `envs`, this table is the one piece of process-wide state of the package: it maps names to classes.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Iterable, Mapping

from bcoder_ray.algorithms.base import Algorithm, AlgorithmConfig, PrefixValue, Ranker, RankerRef, RunContext

ENTRY_POINT_GROUP = "bcoder_ray.algorithms"
_ALGORITHMS: dict[str, type[Algorithm]] = {}


class UnknownAlgorithmError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Register `cls` under `cls.name` (re-registering replaces); usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not getattr(cls, "name", None):
        raise TypeError(f"register_algorithm: {cls!r} is not an Algorithm subclass with a name")
    _ALGORITHMS[cls.name] = cls
    return cls


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that register outside algorithms (and the entry points of `ENTRY_POINT_GROUP`)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UnknownAlgorithmError(f"--import {module}: cannot import it ({e})") from e
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _ALGORITHMS:
            ep.load()


def algorithm_names() -> list[str]:
    return sorted(_ALGORITHMS)


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _ALGORITHMS:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; registered: {algorithm_names()} (an outside "
                                    f"algorithm needs --import MODULE)")
    return _ALGORITHMS[name]


def all_stage_names() -> set[str]:
    return {s for cls in _ALGORITHMS.values() for s in cls.stage_names}


def parse_algorithm_config(data: Mapping[str, Any]) -> AlgorithmConfig:
    """The typed config of the algorithm `data["name"]` (pydantic's ValidationError names a bad field)."""
    return algorithm_class(str(data.get("name", ""))).Config.model_validate(dict(data))


def make_algorithm(name: str, config: Mapping[str, Any] | AlgorithmConfig, ctx: RunContext,
                   modules: Iterable[str] = ()) -> Algorithm:
    """An algorithm instance in this process (a Ray Train worker, an actor, the driver), after importing `modules`;
    `config`: its typed config, or a mapping of its fields."""
    import_modules(modules)
    cls = algorithm_class(name)
    cfg = config if isinstance(config, AlgorithmConfig) else cls.Config.model_validate(dict(config))
    return cls(cfg, ctx)


def load_ranker(ref: RankerRef, ctx: RunContext, modules: Iterable[str] = (), device: Any = None) -> Ranker:
    """The ranker `ref` names, loaded in this process (an actor, `experiments/evaluate.py --rank-with`)."""
    return make_algorithm(ref.algorithm, ref.config, ctx, modules).load_ranker(ref.spec, ref.label, device)


def load_prefix_value(ref: RankerRef, ctx: RunContext, modules: Iterable[str] = (),
                      device: Any = None) -> PrefixValue:
    """The value of program prefixes `ref` names (`Algorithm.prefix_value`), loaded in this process."""
    return make_algorithm(ref.algorithm, ref.config, ctx, modules).load_prefix_value(ref.spec, ref.label, device)
