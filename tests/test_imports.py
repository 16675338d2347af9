"""Import rules between the subpackages, checked on the code itself (every import statement, also those inside
functions) and in a fresh interpreter:

- `l2cluster.training` (the core that trains a stack), `l2cluster.spec`, the plugin contract (`plugin`,
  `registry`, `testing`) and the shared modules never import Ray: they run in `l2cluster train`, in a gang's
  rank and in a plugin author's own tests alike;
- `l2cluster.results` (store, aggregation, report, export, progress) and the shared modules import neither
  torch nor Ray: `results`, `report` and `export` start in a fraction of a second and run where neither is
  installed; nor does the cluster's scheduler, a pure plan unit-tested without Ray;
- the data flow points one way: spec → training → cluster, with results beside them; no subpackage imports one
  that comes after it (the allowed edges are in LAYERS);
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

SHARED = ["errors", "states", "ids", "records", "packing", "limits", "log"]  # the vocabulary every stage uses
PLUGIN_API = ["plugin", "registry", "testing"]
# What each part of the package may import of l2cluster (besides itself and the shared modules).
LAYERS = {
    "spec": {"registry", "plugin"},
    "training": {"spec", "plugin", "registry"},
    "results": set(),
    "cluster": {"spec", "training", "results", "plugin", "registry"},
    "plugin": set(),
    "registry": {"plugin", "plugins"},  # l2cluster.plugins: the built-in regularizers
    "testing": {"spec", "training", "plugin", "registry"},
}


def modules(part: str) -> list[Path]:
    """The files of a subpackage (l2cluster/<part>/*.py) or the one module l2cluster/<part>.py."""
    folder = PACKAGE / part
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{part}.py"]


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an `import` or `from … import` in the file names (relative imports resolved in l2cluster);
    `from l2cluster.x import y` counts as l2cluster.x.y too, since y may be a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = f"l2cluster.{node.module or ''}".rstrip(".") if node.level else node.module or ""
            found.add(module)
            if module.startswith("l2cluster"):
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _part(module: str) -> str | None:
    """Which part of l2cluster a module name falls in: a subpackage or a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "l2cluster" else None


NO_RAY = [p for part in ["training", "spec", *PLUGIN_API, *SHARED] for p in modules(part)]
NO_TORCH_NOR_RAY = [p for part in ["results", *SHARED] for p in modules(part)] + [PACKAGE / "cluster" / "scheduler.py"]


def test_every_module_falls_under_a_rule():
    """A new module must be placed: in a subpackage, or named here as shared, plugin API or entry point."""
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top <= {*SHARED, *PLUGIN_API, "api", "cli", "__main__"}, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "spec", "training", "cluster", "results"}


@pytest.mark.parametrize("path", NO_RAY, ids=dotted)
def test_the_training_core_and_specs_never_import_ray(path):
    assert "ray" not in {_top(m) for m in imports_of(path)}


@pytest.mark.parametrize("path", NO_TORCH_NOR_RAY, ids=dotted)
def test_the_results_code_imports_neither_torch_nor_ray(path):
    tops = {_top(m) for m in imports_of(path)}
    assert not tops & {"torch", "torchvision", "ray"}, tops


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_the_data_flow_points_one_way(part):
    allowed = LAYERS[part] | {part, *SHARED, None}
    for path in modules(part):
        used = {_part(m) for m in imports_of(path) if _top(m) == "l2cluster"} - {""}
        assert used <= allowed, (dotted(path), sorted(used - allowed))


def test_the_rules_hold_for_everything_the_modules_import_in_turn():
    """What the static check cannot see: a module that imports another that imports Ray (or torch)."""
    code = ("import sys, importlib\n"
            f"for m in {[dotted(p) for p in NO_TORCH_NOR_RAY]!r}: importlib.import_module(m)\n"
            "results = sorted(m for m in ('torch', 'ray') if m in sys.modules)\n"
            f"for m in {[dotted(p) for p in NO_RAY]!r}: importlib.import_module(m)\n"
            "core = sorted(m for m in ('ray',) if m in sys.modules)\n"
            "print(results, core)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[] []", out.stdout


def test_built_in_plugins_use_only_the_plugin_api():
    plugins = sorted((ROOT / "plugins").glob("*.py"))
    assert len(plugins) >= 9
    for path in plugins:
        ours = {m for m in imports_of(path) if _top(m) == "l2cluster"} - {"l2cluster"}
        assert ours <= {"l2cluster.plugin"} | {f"l2cluster.plugin.{n}" for n in _names(path)}, (path.name, ours)


def _names(path: Path) -> set[str]:
    return {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
            for a in node.names}


def test_the_check_sees_imports_inside_functions(tmp_path):
    """A control: an import hidden in a function body is found, and so is an edge against the data flow."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import ray.util\n    from torch import nn\n"
                      "    from l2cluster.cluster import gang\n")
    found = imports_of(source)
    assert {_top(m) for m in found} == {"ray", "torch", "l2cluster"}
    assert "cluster" in {_part(m) for m in found} and "cluster" not in LAYERS["training"]
