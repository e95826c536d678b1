"""The package's shape, read from its source: no import cycles, small modules and functions,
and a container layer that needs nothing but the standard library.

Every checker takes the package's directory, so each is also run here on a small bad tree
built in tmp_path, to show that it finds what it is meant to find.

A function may run past MAX_FUNCTION_LINES only when its docstring contains LONG_MARKER
followed by the reason, e.g. "Longer than 60 lines: one table of every route, read in one
place."
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import higgs_runpod

PACKAGE = Path(higgs_runpod.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARKER = "Longer than 60 lines:"
CONTAINER = "container"  # the subpackage that runs in the thin image's bare interpreter
# What the container must never pull in (the subprocess refuses every third-party module;
# these are the ones that would hurt most, named in its message).
HEAVY = ("torch", "transformers", "pydantic", "runpod")


# --- reading the tree ----------------------------------------------------------------------


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, function bodies included; not those under `if TYPE_CHECKING:`
    (they never run, so they cannot make an import cycle or pull in a module)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules that module `name` imports, absolute; for `from a import b` that is
    `a.b` when it is a module of the package (`known`), else `a`."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = name.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            found.add(full if full in known else base)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = modules(root)
    known = set(files)
    return {
        name: {target for target in imported_names(name, path, known) if target in known} - {name}
        for name, path in files.items()
    }


# --- the checkers --------------------------------------------------------------------------


def import_cycles(root: Path) -> list[list[str]]:
    """Each cycle of imports among the package's modules, as the path around it."""
    graph = import_graph(root)
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append([*trail[trail.index(name) :], name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def oversized(root: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES, and functions over MAX_FUNCTION_LINES whose docstring
    does not say why (LONG_MARKER)."""
    found = []
    for name, path in modules(root).items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and LONG_MARKER not in (ast.get_docstring(node) or ""):
                found.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    return found


def container_imports(root: Path) -> list[str]:
    """Imports in the container subpackage of anything but the standard library and the
    container's own modules."""
    package = root.name
    allowed = (f"{package}.{CONTAINER}", package)
    found = []
    files = modules(root)
    for name, path in files.items():
        if not name.startswith(f"{package}.{CONTAINER}"):
            continue
        for target in sorted(imported_names(name, path, set(files))):
            top = target.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            if target in allowed or target.startswith(f"{allowed[0]}."):
                continue
            found.append(f"{name} imports {target}")
    return found


# The subprocess's own guard: a finder first on sys.meta_path that refuses every module
# outside the standard library and the container subpackage, so that importing a container
# module fails the moment it (or anything it imports) reaches for torch, pydantic, ...
REFUSER = """
import importlib.abc, sys
PACKAGE, CONTAINER, HEAVY = {package!r}, {container!r}, {heavy!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or name in (PACKAGE, CONTAINER):
            return None
        if name.startswith(CONTAINER + "."):
            return None
        tag = " (heavy)" if top in HEAVY else ""
        raise ModuleNotFoundError(f"refused: {{name}}{{tag}}", name=name)

sys.meta_path.insert(0, Refuse())
for heavy in HEAVY:
    try:
        __import__(heavy)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the guard let {{heavy}} be imported")
for name in {names!r}:
    __import__(name)
print("imported", len({names!r}))
"""


def import_without_third_party(root: Path) -> subprocess.CompletedProcess[str]:
    """Import every container module of the package at `root` in a fresh interpreter where
    nothing outside the standard library can be imported."""
    package = root.name
    container = f"{package}.{CONTAINER}"
    names = sorted(name for name in modules(root) if name.startswith(container))
    script = REFUSER.format(package=package, container=container, heavy=HEAVY, names=names)
    env = {**os.environ, "PYTHONPATH": str(root.parent)}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )


# --- the package itself --------------------------------------------------------------------


def test_no_import_cycles() -> None:
    assert import_cycles(PACKAGE) == []


def test_modules_and_functions_are_small() -> None:
    assert oversized(PACKAGE) == []


def test_container_imports_only_the_standard_library() -> None:
    assert container_imports(PACKAGE) == []


def test_container_modules_import_with_torch_unavailable() -> None:
    done = import_without_third_party(PACKAGE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported ")
    assert int(done.stdout.split()[1]) >= 4  # the package, bootstrap, health, manifest, ...


# --- each checker finds what it should, on a bad tree --------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    """A package `bad` under `root` holding `files` (relative path -> source)."""
    package = root / "bad"
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for directory in [package, *(path for path in package.rglob("*") if path.is_dir())]:
        (directory / "__init__.py").touch()
    return package


def test_cycles_are_found_through_function_level_and_relative_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "a.py": "from bad.sub import b\n",
            "sub/b.py": "def late():\n    from .. import c\n",
            "c.py": "import bad.a\n",
            "d.py": "import bad.a\n",
            "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bad.e\n",
            "e.py": "import bad.typed\n",
        },
    )
    assert import_cycles(root) == [["bad.a", "bad.sub.b", "bad.c", "bad.a"]]


def test_no_cycle_in_a_tree_without_one(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a.py": "import bad.b\n", "b.py": "import os\n"})
    assert import_cycles(root) == []


def test_long_modules_and_functions_are_found(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_function = f"def long():\n{body}"
    explained = f'def explained():\n    """{LONG_MARKER} a table read in one place."""\n{body}'
    short = "def short():\n" + "".join(f"    y{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    root = _tree(
        tmp_path,
        {
            "funcs.py": f"{long_function}\n{explained}\n{short}",
            "big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
            "fits.py": "x = 1\n" * MAX_MODULE_LINES,
        },
    )
    assert sorted(oversized(root)) == [
        f"bad.big: {MAX_MODULE_LINES + 1} lines",
        f"bad.funcs.long (line 1): {MAX_FUNCTION_LINES + 1} lines",
    ]


BAD_CONTAINER = {
    "container/health.py": "import json\nfrom bad.container import helper\n",
    "container/helper.py": "def later():\n    import torch\n",
    "container/reach.py": "from bad.weights import lock\n",
    "weights/lock.py": "import os\n",
}


def test_container_imports_outside_the_standard_library_are_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, BAD_CONTAINER)
    assert container_imports(root) == [
        "bad.container.helper imports torch",
        "bad.container.reach imports bad.weights.lock",
    ]


def test_the_subprocess_refuses_torch_and_the_rest_of_the_package(tmp_path: Path) -> None:
    helper = {"container/helper.py": "import torch\n"}
    done = import_without_third_party(_tree(tmp_path / "one", helper))
    assert done.returncode != 0
    assert "refused: torch (heavy)" in done.stderr
    reach = {"container/reach.py": "from bad.weights import lock\n", "weights/lock.py": ""}
    done = import_without_third_party(_tree(tmp_path / "two", reach))
    assert done.returncode != 0
    assert "refused: bad.weights" in done.stderr
    fine = {"container/health.py": "import json\n"}
    assert import_without_third_party(_tree(tmp_path / "three", fine)).returncode == 0
