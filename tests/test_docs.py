"""The documentation points at things that exist.

Sources read: every docstring (any string statement: module, class, function and attribute docstrings) of the
.py files under bcoder_ray/, envs/ and experiments/, and the whole text of README.md and docs/*.md. Checked:

- every dotted name `bcoder_ray.X...` or `envs.X...` resolves: the longest prefix that imports is a module, and
  the rest are attributes reachable from it (a dataclass or pydantic field, an annotated class attribute or one
  set on `self` in the class's code count too);
- every repository path (`bcoder_ray/...`, `envs/...`, `experiments/...`, `tests/...`, `docs/...`) exists;
- every relative Markdown link in README.md and docs/*.md points to an existing file (anchors not checked);
- nothing points outside the repository (`../shared/...`): what the code needs from elsewhere is written
  into docs/;
- the README stays short (15,000 bytes) and links every docs page.

Nothing here starts Ray or runs a model; resolving names imports the modules named (torch and Ray import, a
few seconds). Each failure lists every offender as `file:line: what`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("bcoder_ray", "envs", "experiments")
PATH_ROOTS = ("bcoder_ray", "envs", "experiments", "tests", "docs")
README_LIMIT = 15_000  # bytes, as `wc -c README.md` counts them

# `bcoder_ray.loop.driver`, `envs.execute.Executor`: not inside a longer name (`foo.envs.x`, `my_envs.x`, a path)
DOTTED = re.compile(r"(?<![\w./-])(?:bcoder_ray|envs)(?:\.[A-Za-z_]\w*)+")
# `bcoder_ray/loop/driver.py`, `envs/data/mbpp`, `docs/bcoder.md`: not the tail of a longer path or a URL
REPO_PATH = re.compile(r"(?<![\w./~:-])(?:%s)/[\w./*-]*" % "|".join(PATH_ROOTS))
# any path climbing out of where it is written: `../shared/docs/bcoder.md`, `../../x`
UP_PATH = re.compile(r"(?<![\w/.])(?:\.\./)+[\w.*-][\w./*-]*")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


# ---------------------------------------------------------------------------------------------- the sources
@dataclasses.dataclass(frozen=True)
class Text:
    path: Path  # the file it comes from
    line: int  # the file's line of the text's first line
    text: str

    def where(self, offset: int) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line + self.text.count(chr(10), 0, offset)}"


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def docstrings(path: Path) -> list[Text]:
    """Every string statement of a Python file (docstrings of modules, classes, functions and attributes)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append(Text(path, node.lineno, node.value.value))
    return out


@lru_cache(maxsize=None)
def sources() -> tuple[Text, ...]:
    out = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            out += docstrings(path)
    out += [Text(path, 1, path.read_text(encoding="utf-8")) for path in markdown_files()]
    return tuple(out)


def report(offenders: list[str], what: str) -> str:
    return f"{len(offenders)} {what}:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------- dotted names
def has_attribute(obj: object, name: str) -> bool:
    if hasattr(obj, name):
        return True
    if not inspect.isclass(obj):
        return False
    # fields without a class-level value: dataclass and pydantic fields, annotations (ClassVar without a value)
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return True
    if name in getattr(obj, "model_fields", {}):
        return True
    for klass in inspect.getmro(obj):
        if name in getattr(klass, "__annotations__", {}):
            return True
        try:  # an attribute set in the class's own code (`self.config = config`)
            if re.search(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]*)?=[^=]", inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            pass
    return False


@lru_cache(maxsize=None)
def unresolved(name: str) -> str | None:
    """None when `name` resolves; else why not."""
    parts = name.split(".")
    module = None
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        try:
            module = importlib.import_module(prefix)
            break
        except ModuleNotFoundError as e:
            if e.name is None or not (prefix == e.name or prefix.startswith(e.name + ".")):
                return f"importing {prefix} failed: {e}"  # a module that exists but imports a missing one
        except Exception as e:  # noqa: BLE001 - any failure to import is worth naming
            return f"importing {prefix} failed: {type(e).__name__}: {e}"
    if module is None:
        return "no such module"
    obj = module
    for j, attribute in enumerate(parts[i:], start=i):
        if not has_attribute(obj, attribute):
            return f"{'.'.join(parts[:j])} has no {attribute!r}"
        obj = getattr(obj, attribute, None)
    return None


def test_dotted_names_resolve():
    offenders = []
    for src in sources():
        for m in DOTTED.finditer(src.text):
            why = unresolved(m.group(0))
            if why is not None:
                offenders.append(f"{src.where(m.start())}: {m.group(0)} ({why})")
    assert not offenders, report(offenders, "dotted names that do not resolve")


# ---------------------------------------------------------------------------------------------- paths
def path_exists(relative: str) -> bool:
    relative = relative.rstrip(".,;:-")
    if "*" in relative:
        return any(REPO.glob(relative))
    return (REPO / relative).exists()


def test_repository_paths_exist():
    offenders = []
    for src in sources():
        for m in REPO_PATH.finditer(src.text):
            if not path_exists(m.group(0)):
                offenders.append(f"{src.where(m.start())}: {m.group(0).rstrip('.,;:-')}")
    assert not offenders, report(offenders, "repository paths that do not exist")


def inside_repository(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO)


def test_nothing_points_outside_the_repository():
    """A `../` path is read from the Markdown file's folder, and from the repository root in a docstring (where
    the code's own comments put it): it must stay inside the repository and exist. The machine's shared notes
    (`../shared/...`, `/work/shared/...`) are named outright: the repository carries its own docs/."""
    offenders = []
    for src in sources():
        base = src.path.parent if src.path.suffix == ".md" else REPO
        for m in UP_PATH.finditer(src.text):
            target = base / m.group(0).rstrip(".,;:-")
            if not inside_repository(target) or not target.exists() or "/shared/" in f"/{m.group(0)}":
                offenders.append(f"{src.where(m.start())}: {m.group(0)}")
        for m in re.finditer(r"/work/shared\S*", src.text):
            offenders.append(f"{src.where(m.start())}: {m.group(0)}")
    assert not offenders, report(offenders, "references outside the repository")


def markdown_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image; fenced code blocks are not Markdown and are skipped."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += [(number, m.group(1)) for m in MD_LINK.finditer(line)]
    return out


def test_markdown_links_resolve():
    offenders = []
    for path in markdown_files():
        for number, target in markdown_links(path):
            if URL.match(target) or target.startswith("#"):
                continue
            file = target.split("#", 1)[0]
            resolved = path.parent / file
            if not resolved.exists() or not inside_repository(resolved):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {target}")
    assert not offenders, report(offenders, "relative links to no file in the repository")


# ---------------------------------------------------------------------------------------------- the README
def test_readme_is_short_and_links_every_page():
    readme = REPO / "README.md"
    size = len(readme.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"
    linked = {(readme.parent / target.split("#", 1)[0]).resolve() for _, target in markdown_links(readme)}
    missing = [str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# ---------------------------------------------------------------------------------------------- the checker
def test_the_checks_catch_dead_references():
    """The patterns find what they must, and a dead name, path or link is reported (not silently skipped)."""
    text = ("see `bcoder_ray.loop.driver.Run` and bcoder_ray.policy, `envs/no_such.py`, "
            "../shared/docs/bcoder.md and [x](docs/none.md)")
    assert [m.group(0) for m in DOTTED.finditer(text)] == ["bcoder_ray.loop.driver.Run", "bcoder_ray.policy"]
    assert unresolved("bcoder_ray.loop.driver.Run") is None
    assert unresolved("bcoder_ray.policy") is not None
    assert unresolved("bcoder_ray.algorithms.base.StagePlan.name") is None  # a dataclass field without default
    assert unresolved("bcoder_ray.algorithms.base.StagePlan.nonsense") is not None
    assert [m.group(0) for m in REPO_PATH.finditer(text)] == ["envs/no_such.py", "docs/none.md"]
    assert not path_exists("envs/no_such.py") and path_exists("envs/data/mbpp")
    assert [m.group(0) for m in UP_PATH.finditer(text)] == ["../shared/docs/bcoder.md"]
    assert [m.group(1) for m in MD_LINK.finditer(text)] == ["docs/none.md"]
