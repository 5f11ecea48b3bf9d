"""No import cycles inside atesd_mc (including atesd_mc.kernels, which lives in kernels/).

The graph is built by parsing the source with `ast`, never by importing it, so a cycle hidden
behind a lazy import inside a function, or behind a module __getattr__ that imports on demand,
still shows up: every `import` / `from ... import` statement anywhere in a file counts, whether
at module level, inside a function, or under `if TYPE_CHECKING:` (a typing-only import still
couples the two modules both ways, which is what this test is meant to keep out).

How an import becomes an edge (the conventions the checker and its own tests fix):

* `import atesd_mc.a.b` and `from atesd_mc.a.b import x` give an edge to atesd_mc.a.b only.
  Python also runs the parent packages' __init__ first, but counting that would make every
  sibling import inside a package look like a cycle with the package __init__ that re-exports
  it; so a package's __init__ importing its own submodules (`from .controller import X` in
  atesd_mc/exposure/__init__.py) is an ordinary edge package -> submodule, and it is a cycle
  only if that submodule imports the package itself back (`from atesd_mc.exposure import X`).
* `from atesd_mc.pkg import name` gives an edge to atesd_mc.pkg.name when that is a module, else
  to atesd_mc.pkg (the name is then an attribute defined or re-exported by the package).
* Relative imports resolve against the importing module's package (for an __init__, the
  package itself), exactly as Python resolves them.
* A module importing itself is not a cycle and is ignored.
"""
from __future__ import annotations

import ast
import os
from collections import deque

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package name -> source folder, as setup.py's package_dir maps them
PACKAGE_DIRS = {"atesd_mc": os.path.join(REPO, "atesd_mc"),
                "atesd_mc.kernels": os.path.join(REPO, "kernels")}
ROOT = "atesd_mc"


# ---------------------------------------------------------------------------------------------
# Building the graph


def discover_modules(package_dirs: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Module name -> (source file, is a package __init__) for every .py under the folders."""
    modules: dict[str, tuple[str, bool]] = {}
    for package, folder in package_dirs.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, folder)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                is_init = name == "__init__.py"
                module = prefix if is_init else f"{prefix}.{name[:-3]}"
                modules[module] = (os.path.join(dirpath, name), is_init)
    return modules


def _from_base(node: ast.ImportFrom, module: str, is_init: bool) -> str:
    """The absolute module named by `from <base> import ...` written in `module`."""
    if node.level == 0:
        return node.module or ""
    package = module if is_init else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _known_prefix(name: str, modules) -> str | None:
    """The longest prefix of dotted `name` that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_targets(source: str, module: str, is_init: bool, modules) -> set[str]:
    """Our modules that `module`'s source imports anywhere (module level, functions, classes)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_init)
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        targets.update(t for t in (_known_prefix(n, modules) for n in names) if t)
    targets.discard(module)
    return targets


def import_graph(package_dirs: dict[str, str]) -> dict[str, set[str]]:
    modules = discover_modules(package_dirs)
    graph = {}
    for module, (path, is_init) in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[module] = import_targets(f.read(), module, is_init, modules)
    return graph


# ---------------------------------------------------------------------------------------------
# Finding cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); every component, singletons too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_path(graph, start: str, goal: str, within: set[str]) -> list[str]:
    """Breadth-first path start -> goal using only nodes of `within` (it exists inside an SCC)."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in sorted(graph[node] & within):
            if child not in previous:
                previous[child] = node
                queue.append(child)
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every edge a -> b that lies on a cycle, the shortest cycle through it, each listed
    once (rotated to start at its smallest module) as [a, ..., a]. Fixing every reported cycle
    leaves no edge on a cycle, so the list is empty exactly when the graph is acyclic."""
    cycles: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue  # self-imports are dropped when the graph is built
        for a in sorted(component):
            for b in sorted(graph[a] & component):
                loop = [a] + _shortest_path(graph, b, a, component)[:-1]
                start = loop.index(min(loop))
                rotated = loop[start:] + loop[:start]
                cycles.add(tuple(rotated + [rotated[0]]))
    return [list(c) for c in sorted(cycles)]


def describe(cycle: list[str]) -> str:
    short = [m[len(ROOT) + 1:] if m.startswith(ROOT + ".") else m for m in cycle]
    return " -> ".join(short)


# ---------------------------------------------------------------------------------------------
# Tests


def test_atesd_mc_has_no_import_cycles():
    graph = import_graph(PACKAGE_DIRS)
    # the walk must have found the package, its subpackages and the kernels mapped from kernels/
    for module in ("atesd_mc.trainer", "atesd_mc.exposure.controller", "atesd_mc.kernels",
                   "atesd_mc.kernels.masked_reference", "atesd_mc.model.qwen3"):
        assert module in graph, f"{module} not discovered"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in atesd_mc:\n  " + "\n  ".join(map(describe, cycles))


def test_find_cycles_on_a_synthetic_graph():
    graph = {"p.a": {"p.b"}, "p.b": {"p.a", "p.c"}, "p.c": set(), "p.d": {"p.c"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]
    # two cycles sharing a module are both reported, not one hidden behind the other
    graph = {"x": {"y", "z"}, "y": {"x"}, "z": {"x"}}
    assert find_cycles(graph) == [["x", "y", "x"], ["x", "z", "x"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def _write_package(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_lazy_cycle_in_a_real_package(tmp_path):
    """Through the whole parse: a cycle closed by an import inside a function, spelled as
    `from pkg import module`, is found; the package __init__ re-exporting a submodule that
    imports a sibling is not a cycle."""
    _write_package(tmp_path / "pkg", {
        "__init__.py": "from .sub.a import A\n",
        "sub/__init__.py": "",
        "sub/a.py": "from .b import helper\nclass A: ...\n",
        "sub/b.py": "def helper():\n    from pkg.sub import a\n    return a.A\n",
        "c.py": "import os\nfrom . import sub\n",
    })
    graph = import_graph({"pkg": str(tmp_path / "pkg")})
    assert graph["pkg"] == {"pkg.sub.a"}
    assert graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert graph["pkg.c"] == {"pkg.sub"}
    assert find_cycles(graph) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]]
    assert describe(["atesd_mc.config", "atesd_mc.config_io", "atesd_mc.config"]) == \
        "config -> config_io -> config"

    # importing the package itself back from a submodule it re-exports is a cycle
    (tmp_path / "pkg" / "sub" / "b.py").write_text("import pkg\n")
    assert find_cycles(import_graph({"pkg": str(tmp_path / "pkg")})) == [
        ["pkg", "pkg.sub.a", "pkg.sub.b", "pkg"]]
