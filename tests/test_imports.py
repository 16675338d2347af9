"""Import rules between the stages of the data flow, checked on the code itself (every import statement, also those
inside functions) and in a fresh interpreter:

- the training core (job specs, model, trainer, runner, checkpoints, data, plugin contract, check_plugin) never
  imports Ray: it runs in `l2cluster train`, in a gang's rank and in a plugin author's own tests alike;
- the results code (store, aggregation, report, export, progress) imports neither torch nor Ray: `results`,
  `report` and `export` start in a fraction of a second and run where neither is installed; nor does the
  scheduler, a pure plan unit-tested without Ray;
- the built-in plugins import l2cluster only through `l2cluster.plugin`, the one public API for plugin authors.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "l2cluster"

CORE = ["model", "trainer", "hooks", "nonfinite", "graphs", "skipping",
        "runner", "checkpoint", "data", "plugin", "testing", "registry", "packing", "states",
        "process", "config", "spec_errors", "loading", "sweep", "spec", "ids", "records"]
RESULTS = ["store", "aggregate", "report", "export", "progress", "states", "packing", "limits", "log", "scheduler",
           "ids", "records"]


def imports_of(path: Path) -> set[str]:
    """Every module an `import` or `from … import` in the file names (relative imports resolved in l2cluster)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(f"l2cluster.{node.module or ''}".rstrip(".") if node.level else node.module)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("name", CORE)
def test_the_training_core_never_imports_ray(name):
    assert "ray" not in {_top(m) for m in imports_of(PACKAGE / f"{name}.py")}


@pytest.mark.parametrize("name", RESULTS)
def test_the_results_code_imports_neither_torch_nor_ray(name):
    tops = {_top(m) for m in imports_of(PACKAGE / f"{name}.py")}
    assert not tops & {"torch", "torchvision", "ray"}, tops


def test_the_rules_hold_for_everything_the_modules_import_in_turn():
    """What the static check cannot see: a module that imports another that imports Ray (or torch)."""
    code = ("import sys, importlib\n"
            f"for m in {RESULTS!r}: importlib.import_module('l2cluster.' + m)\n"
            "results = sorted(m for m in ('torch', 'ray') if m in sys.modules)\n"
            f"for m in {CORE!r}: importlib.import_module('l2cluster.' + m)\n"
            "core = sorted(m for m in ('ray',) if m in sys.modules)\n"
            "print(results, core)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[] []", out.stdout


def test_built_in_plugins_use_only_the_plugin_api():
    plugins = sorted((ROOT / "plugins").glob("*.py"))
    assert len(plugins) >= 9
    for path in plugins:
        ours = {m for m in imports_of(path) if _top(m) == "l2cluster"}
        assert ours <= {"l2cluster.plugin"}, (path.name, ours)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """A control: an import hidden in a function body is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import ray.util\n    from torch import nn\n")
    assert {_top(m) for m in imports_of(source)} == {"ray", "torch"}
