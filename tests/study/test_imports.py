"""The study's modules import on their own, and none imports a module that imports it back
(plots.py and report.py once did, through imports inside functions)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "fused_balance.study"
FOLDER = Path(__file__).resolve().parents[2] / "fused_balance" / "study"
MODULES = sorted(p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__")


def _imported_study_modules(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, anywhere in the file (imports inside
    functions count: a cycle through them still breaks whoever reaches it first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package itself
                base = PACKAGE + ("." + base if base else "")
            # ``from fused_balance.study import run`` imports the module run
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                stem = name[len(PACKAGE) + 1:].split(".")[0]
                if (FOLDER / f"{stem}.py").exists():
                    found.add(stem)
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imported_study_modules(p) - {p.stem} for p in FOLDER.glob("*.py")}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_import_graph_parser_sees_cycles_through_function_level_imports(tmp_path):
    """The checker itself: a two-module cycle through an import inside a function is found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from fused_balance.study.report import X\n")
    assert _imported_study_modules(a) == {"report"}
    assert _cycle({"plots": {"report"}, "report": {"plots"}}) in (["plots", "report", "plots"],
                                                                  ["report", "plots", "report"])
    assert _cycle({"run": {"report"}, "report": {"plots", "stats"}, "plots": {"labels"}}) is None


def test_no_study_module_imports_a_module_that_imports_it_back():
    graph = _graph()
    assert "plots" in graph["report"] and "stats" in graph["report"]  # it sees the real imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("module", MODULES)
def test_each_study_module_imports_in_a_fresh_interpreter(module):
    env = dict(os.environ, PYTHONPATH=str(FOLDER.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
