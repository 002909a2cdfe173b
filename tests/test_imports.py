"""The layout's rules, read from the source (module-level and function-local imports alike): no import cycle
between the project's modules; the folders of `bcoder_ray` are layers, each importing only the layers below it
(`LAYERS`, bottom first); `envs` never imports `bcoder_ray`; no Ray inside `bcoder_ray/algorithms`; an algorithm
family's folder imports no other family's."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bcoder_ray", "envs", "experiments")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imported(path: Path, name: str) -> set[str]:
    """Every module name an import statement anywhere in the file refers to (relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges = {}
    for name, path in mods.items():
        targets = {owner(t) for t in imported(path, name)} - {None, name}
        # importing a submodule runs its package's __init__: that edge is implied, not a dependency of ours
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_envs_never_imports_bcoder_ray():
    bad = {m: sorted(t for t in ts if t.startswith("bcoder_ray")) for m, ts in graph().items()
           if m.startswith("envs")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_no_ray_inside_the_algorithms():
    mods = modules()
    bad = {name: sorted(t for t in imported(path, name) if t == "ray" or t.startswith("ray."))
           for name, path in mods.items() if name.startswith("bcoder_ray.algorithms")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


# bcoder_ray's layers, bottom first: a module may import its own layer and those before it (envs: anything may).
LAYERS = ("util", "model", "buffer", "evaluation", "algorithms", "config", "loop", "cli")
FAMILIES = ("bcoder", "coderl", "policy_gradient", "rest_em", "sft")


def layer(module: str) -> str | None:
    """The layer of a bcoder_ray module (`bcoder_ray.configs` is the config's), None for the package itself."""
    parts = module.split(".")
    if parts[0] != "bcoder_ray" or len(parts) == 1:
        return None
    return "config" if parts[1] == "configs" else parts[1]


def layer_violations(edges: dict[str, set[str]]) -> dict[str, list[str]]:
    bad = {}
    for name, targets in edges.items():
        here = layer(name)
        if here is None:
            continue
        allowed = set(LAYERS[: LAYERS.index(here) + 1])
        above = sorted(t for t in targets if t.startswith("bcoder_ray.") and layer(t) not in allowed)
        if above:
            bad[name] = above
    return bad


def test_every_module_sits_in_a_layer():
    strays = sorted(m for m in modules() if layer(m) not in (None, *LAYERS))
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}"


def test_each_layer_imports_only_the_layers_below_it():
    assert layer_violations(graph()) == {}


def test_the_layer_rule_catches_an_upward_import():
    edges = {"bcoder_ray.model.sampling": {"bcoder_ray.algorithms.bcoder.q_model"},
             "bcoder_ray.loop.driver": {"bcoder_ray.model.lm", "bcoder_ray.config"},
             "bcoder_ray.evaluation.metrics": {"bcoder_ray.buffer.schema", "bcoder_ray.loop.run_table"}}
    assert layer_violations(edges) == {"bcoder_ray.model.sampling": ["bcoder_ray.algorithms.bcoder.q_model"],
                                       "bcoder_ray.evaluation.metrics": ["bcoder_ray.loop.run_table"]}


def test_no_family_imports_another_family():
    def family(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if parts[:2] == ["bcoder_ray", "algorithms"] and len(parts) > 3 else None

    bad = {m: sorted(t for t in ts if family(t) not in (None, family(m)))
           for m, ts in graph().items() if family(m)}
    assert {m: ts for m, ts in bad.items() if ts} == {}
    assert {family(m) for m in modules()} - {None} == set(FAMILIES)


def test_the_lower_layers_never_name_an_algorithm_family():
    """model/, buffer/ and evaluation/ serve every algorithm: not even a function-local import of a family."""
    bad = {m: sorted(t for t in ts if t.startswith("bcoder_ray.algorithms"))
           for m, ts in graph().items() if layer(m) in ("util", "model", "buffer", "evaluation")}
    assert {m: ts for m, ts in bad.items() if ts} == {}
