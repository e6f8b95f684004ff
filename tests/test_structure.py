"""The package's shape: `plan` and `--help` start without MindSpore, no import cycles, short functions.

Pure Python (ast and subprocesses); nothing here imports MindSpore.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bit_transfer"


# ---------------------------------------------------------------- commands that must start fast
@pytest.mark.parametrize("argv", [
    ["plan", "recipes/cifar10.yaml", "--set", "data.size=50000", "--set", "data.image_size=32x32"],
    ["--help"],
    ["fit", "--help"],
], ids=["plan", "help", "fit-help"])
def test_command_never_imports_mindspore(argv):
    code = (
        "import sys\n"
        "from bit_transfer import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), f'exit code {e.code}'\n"
        "print('mindspore imported:', 'mindspore' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "mindspore imported: False", out.stdout[-2000:]


# ---------------------------------------------------------------- the import graph
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.Module, deferred: bool):
    """The import statements of a module. Without `deferred`: those that run when the module is
    imported (module level, also inside top-level if/try/with and class bodies), not inside functions
    nor under `if TYPE_CHECKING:`. With `deferred`: every import statement anywhere."""
    if deferred:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def imported_modules(name: str, deferred: bool = False) -> set[str]:
    """The bit_transfer modules `name` imports; `from P import x` counts as P.x when x is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path)), deferred):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        for target in targets:
            while target and target not in MODULES:  # import bit_transfer.x.y.z: the deepest module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_module_finder_sees_the_package():
    """Guards the tests below against finding nothing: known edges are found, function-level ones only
    with deferred imports."""
    assert {"bit_transfer.cli", "bit_transfer.data", "bit_transfer.data.pipeline", "bit_transfer.models"} <= set(MODULES)
    assert "bit_transfer.data.measure" in imported_modules("bit_transfer.data")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    everything = {m: imported_modules(m, deferred=True) for m in MODULES}
    at_import = {m: imported_modules(m) for m in MODULES}
    assert sum(map(len, everything.values())) > sum(map(len, at_import.values())) > 0


def test_no_import_cycle_at_import_time():
    graph = {m: imported_modules(m) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Pairs of modules that import each other when deferred (function-level) imports are counted too,
# each with why it is tolerated. The test fails if a new pair appears or a listed one is gone
# (then delete it here).
# None today (cli <-> fewshot, the former one, went when fewshot's CLI moved into cli.py).
MUTUAL_IMPORTS_ALLOWED: dict[frozenset, str] = {
}


def test_no_two_modules_import_each_other_even_deferred():
    graph = {m: imported_modules(m, deferred=True) for m in MODULES}
    pairs = {frozenset((a, b)) for a in graph for b in graph[a] if a in graph.get(b, ())}
    new = sorted(" <-> ".join(sorted(p)) for p in pairs - set(MUTUAL_IMPORTS_ALLOWED))
    assert not new, f"modules importing each other (directly or in a function): {new}"
    gone = sorted(" <-> ".join(sorted(p)) for p in set(MUTUAL_IMPORTS_ALLOWED) - pairs)
    assert not gone, f"no longer import each other, remove from MUTUAL_IMPORTS_ALLOWED: {gone}"
    assert frozenset(("bit_transfer.cli", "bit_transfer.commands.fewshot.sweep")) not in pairs


# ---------------------------------------------------------------- function length
MAX_LINES = 100
# Functions longer than MAX_LINES today, at their current length: they may only shrink
# (shrink the number here with them; delete the entry once under MAX_LINES).
LONG_FUNCTIONS_ALLOWED: dict[str, int] = {}  # none today; an entry may only shrink


def function_lengths() -> dict[str, tuple[int, str]]:
    """{"bit_transfer/x.py::Outer.inner": (lines, "bit_transfer/x.py:LINE")} for every function."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = f"{prefix}.{child.name}" if prefix else child.name
                    if not isinstance(child, ast.ClassDef):
                        found[f"{rel}::{qual}"] = (child.end_lineno - child.lineno + 1, f"{rel}:{child.lineno}")
                    visit(child, qual)
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text(), str(path)), "")
    return found


def test_no_function_is_longer_than_100_lines():
    lengths = function_lengths()
    assert len(lengths) > 100 and "bit_transfer/cli.py::main" in lengths
    too_long = []
    for name, (lines, where) in sorted(lengths.items()):
        limit = LONG_FUNCTIONS_ALLOWED.get(name, MAX_LINES)
        if lines > limit:
            allowed = f" (allowed {limit}, may only shrink)" if name in LONG_FUNCTIONS_ALLOWED else ""
            too_long.append(f"{where} {name.split('::')[1]}: {lines} lines{allowed}")
    assert not too_long, f"functions over {MAX_LINES} lines: " + "; ".join(too_long)
    stale = sorted(n for n in LONG_FUNCTIONS_ALLOWED if n not in lengths or lengths[n][0] <= MAX_LINES)
    assert not stale, f"no longer over {MAX_LINES} lines (or gone), remove from LONG_FUNCTIONS_ALLOWED: {stale}"
