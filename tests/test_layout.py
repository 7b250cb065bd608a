"""The package layout: each package imports only the floors below it, and no module circles back.

Read from the source (every `import` statement, including those inside functions), so a lazy
import cannot hide an upward dependency.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hiera_jax")
# A package may import its own modules and the packages of lower floors.
FLOORS = {"models": 0, "weights": 1, "families": 2, "inference": 3, "training": 3, "hf": 4}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")]
                out[rel.replace(os.sep, ".").removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("hiera_jax.")}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else None


def test_packages_import_only_downward():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        own = _package(module)
        if own not in FLOORS:
            continue  # hiera_jax/__init__.py, the predict alias and convert.py sit on top
        for target in _imports(path, module):
            other = _package(target)
            if other is None or other == own:
                continue
            if other not in FLOORS or FLOORS[other] >= FLOORS[own]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_circle_back():
    modules = _modules()
    graph = {
        m: {t for t in _imports(p, m) if t in modules and t != m and not t.endswith("__init__")}
        for m, p in modules.items()
    }
    graph = {m: {t for t in targets if t in graph} for m, targets in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen and nxt not in FLOORS_PACKAGES:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    FLOORS_PACKAGES = {f"hiera_jax.{p}" for p in FLOORS} | {"hiera_jax"}
    circles = [
        f"{a} <-> {b}"
        for a in graph
        for b in graph[a]
        if a not in FLOORS_PACKAGES and b not in FLOORS_PACKAGES and reaches(b, a, set())
    ]
    assert not circles, circles
    # The split that ended the old hub <-> io circle: the hub writes directories, loading uses both.
    assert "hiera_jax.weights.loading" not in graph["hiera_jax.weights.hub"]
    assert "hiera_jax.weights.hub" not in graph["hiera_jax.weights.directory"]


def test_docs_layout_names_every_module():
    """The layout block of docs/layout.md names every module of the package, and no module that
    is gone."""
    import re

    page = os.path.join(os.path.dirname(ROOT), "docs", "layout.md")
    with open(page) as f:
        block = f.read().split("# Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"([a-z_0-9]+)\.py", block))
    modules = {
        m.rsplit(".", 1)[-1] for m, path in _modules().items() if not path.endswith("__init__.py")
    }
    assert not modules - named, f"docs/layout.md does not name {sorted(modules - named)}"
    package_part = block.split("\nconvert/", 1)[0]  # the hiera_jax/ lines
    gone = set(re.findall(r"^ +([a-z_0-9]+)\.py", package_part, re.M)) - modules - {"__init__"}
    assert not gone, f"docs/layout.md names modules that are not there: {sorted(gone)}"


def test_family_modules_are_reached_through_the_registry_only():
    """Training, inference, the Hugging Face layer and the top level make no family decision of
    their own: only `hiera_jax.families` (and the families' files) import HieraDet's modules."""
    modules = _modules()
    family_modules = {m for m in modules if m.rsplit(".", 1)[-1].startswith("hieradet")}
    wrong = []
    for module, path in modules.items():
        if module.startswith("hiera_jax.families") or module in family_modules:
            continue
        if _package(module) in (None, "models", "weights") and module != "hiera_jax":
            continue  # the lower floors: the families' own files and what they share
        wrong += [f"{module} imports {t}" for t in _imports(path, module) if t in family_modules]
    assert not wrong, wrong
