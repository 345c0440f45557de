"""The package's layout: one direction of imports, no circles, and every module importable first.

The import graph is read from the source (every ``import`` and ``from ... import``, at module level
or inside functions, since a lazy import is still a dependency): it must have no cycle, and no module
below the facade may import it (:mod:`derive.api` and the package's ``__init__``; only the command line,
:mod:`derive.cli`, sits above it). Then each module
is imported in a fresh interpreter state (every ``derive`` module dropped from ``sys.modules``
first), so that no module depends on another having been imported before it.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "derive"
FACADE = {"derive", "derive.api"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The derive modules ``name`` imports (a ``from X import y`` of a submodule y counts as X.y)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "derive")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "derive":
                continue
            subs = {f"{module}.{a.name}" for a in node.names} & known
            found.update(subs or {module})
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(g):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a dependency of those modules
    g = {u: {v for v in vs if not (u.startswith(v + ".") and v != "derive")} for u, vs in g.items()}
    cycle = _cycle(g)
    assert cycle is None, " -> ".join(cycle)


def test_no_module_imports_the_facade():
    """Only the command line (derive.cli, above the API) may use the facade."""
    offenders = {u: sorted(vs & FACADE) for u, vs in graph().items()
                 if u not in FACADE and not u.startswith("derive.cli") and vs & FACADE}
    assert not offenders, offenders


@pytest.mark.slow
def test_every_module_imports_first():
    names = sorted(_modules())
    script = (
        "import importlib, json, sys\n"
        f"failed = {{}}\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k == 'derive' or k.startswith('derive.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(failed))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("module", ["derive.core", "derive.rules", "derive.arch", "derive.symbolic"])
def test_lower_layers_do_not_reach_up(module):
    """The lowest layers (parsing, rules, symbolic derivation) import nothing above them."""
    order = ["derive.core", "derive.rules", "derive.arch", "derive.symbolic"]
    allowed = tuple(order[:order.index(module) + 1])
    for u, vs in graph().items():
        if u == module or u.startswith(module + "."):
            above = sorted(v for v in vs if not v.startswith(allowed))
            assert not above, (u, above)


def test_every_public_name_resolves():
    import derive

    for name in derive.__all__:
        assert getattr(derive, name) is not None, name


def test_every_subpackage_is_installed():
    """pyproject.toml lists its packages by hand: a subpackage missing there imports from a checkout
    but not from an installed copy."""
    import tomllib

    root = PACKAGE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(root).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)
