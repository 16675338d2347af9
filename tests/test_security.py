"""A job spec cannot make l2cluster import code or touch files: validating and expanding hostile specs opens no file,
imports no module and runs nothing (checked with Python's audit hooks); YAML is read with a safe loader only;
experiment names are safe path components; the store is created readable by its owner only."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support import registry

from l2cluster.cli import main
from l2cluster.results.store import Store
from l2cluster.spec import SpecError, _SpecLoader, expand, parse_spec, read_spec_file, safe_component, spec_models

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "optimizer": {"name": "adam"}}

# -- what Python itself reports: files opened, modules imported, code run, processes started -----------------
_EVENTS: list[tuple[str, tuple]] | None = None
_WATCHED = ("open", "import", "exec", "compile", "os.", "subprocess.", "socket.", "shutil.", "ctypes.",
            "pickle.find_class", "marshal.", "glob.", "pathlib.")


def _hook(event: str, args: tuple) -> None:
    if _EVENTS is not None and event.startswith(_WATCHED):
        _EVENTS.append((event, args))


sys.addaudithook(_hook)  # cannot be removed; records only inside `audited()`


@contextlib.contextmanager
def audited():
    global _EVENTS
    _EVENTS = events = []
    try:
        yield events
    finally:
        _EVENTS = None


HOSTILE = [
    {**BASE, "regularizers": [{"name": "../../etc/passwd"}]},
    {**BASE, "regularizers": [{"name": "os.system"}]},
    {**BASE, "regularizers": [{"name": "l2cluster.plugins.l2"}]},
    {**BASE, "regularizers": [{"name": "/tmp/evil.py"}]},
    {**BASE, "regularizers": [{"name": "__import__('os').system('true')"}]},
    {**BASE, "regularizers": [{"name": "l2", "path": "/etc/passwd"}]},
    {**BASE, "name": "../../etc"},
    {**BASE, "name": "/etc/passwd"},
    {**BASE, "data": {"path": "/etc/passwd"}},
    {**BASE, "data_dir": "/etc"},
    {**BASE, "plugin_dir": "/tmp"},
    {**BASE, "plugin_dirs": ["/tmp"]},
    {**BASE, "store": "/etc/shadow"},
    {**BASE, "checkpoint_dir": "/"},
    {**BASE, "import": "os"},
    {**BASE, "sweep": {"grid": {"data.path": ["/etc/passwd"]}}},
    {**BASE, "sweep": {"grid": {"regularizers": [[{"name": "os.path"}]]}}},
    {**BASE, "sweep": {"variants": [{"label": "x", "set": {"plugin_dir": "/tmp"}}]}},
    {**BASE, "sweep": {"grid": {"../../etc/passwd": [1]}}},
    {**BASE, "optimizer": {"name": "torch.optim.SGD"}},
    {**BASE, "schedule": {"name": "os.system"}},
    {**BASE, "model": {"activation": "__import__('os')"}},
]


def test_hostile_specs_are_refused_without_opening_importing_or_running_anything():
    reg = registry()
    expand(parse_spec({**BASE, "regularizers": [{"name": "l2"}], "sweep": {"grid": {"optimizer.lr": [0.1]}}}, reg),
           reg)  # warm up: every lazy import of validation happens here, not below
    for data in HOSTILE:
        with audited() as events, pytest.raises(SpecError) as refused:
            expand(parse_spec(data, reg, source="hostile"), reg)
        assert events == [], (data, events)
        assert "Traceback" not in refused.value.render()


def test_the_audit_sees_what_it_should():  # the check above can fail: an open and an import are recorded
    with audited() as events:
        open(__file__).close()  # noqa: SIM115
        import json.tool  # noqa: F401
    assert {e for e, _ in events} >= {"open", "import"}


def test_a_spec_file_is_the_only_file_read_and_python_tags_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    (tmp_path / "warm.yaml").write_text("name: t\n")
    read_spec_file(tmp_path / "warm.yaml")  # the codec's lazy import happens here
    for tag in (f"!!python/object/apply:os.system ['touch {sentinel}']", "!!python/name:os.system",
                "!!python/module:os", f"!!python/object/new:subprocess.Popen [['touch', '{sentinel}']]"):
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"name: t\noptimizer: {{name: adam}}\ndescription: {tag}\n")
        with audited() as events, pytest.raises(SpecError) as refused:
            read_spec_file(spec)
        assert "could not determine a constructor for the tag" in refused.value.render()
        assert [(e, str(a[0])) for e, a in events] == [("open", str(spec))], events
    assert not sentinel.exists()


def test_a_billion_laughs_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: t\noptimizer: {name: adam}\n" + "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="more than 1,000,000 values"):
        read_spec_file(bomb)
    assert time.perf_counter() - t0 < 10
    shared: object = ["lol"] * 10
    for _ in range(9):
        shared = [shared] * 10  # 10^10 values in a few objects: what a client could send without a file
    with pytest.raises(SpecError, match="more than 1,000,000 values"):
        parse_spec({**BASE, "sweep": {"grid": {"optimizer.lr": shared}}}, registry())


def _calls(path: Path, module: str, functions: set[str]) -> list[ast.Call]:
    """Every call of module.function (e.g. yaml.load) in a source file."""
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr in functions
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


SOURCES = [*ROOT.glob("l2cluster/**/*.py"), *ROOT.glob("plugins/*.py"), *ROOT.glob("bench/*.py")]


def test_yaml_is_only_ever_read_with_a_safe_loader():
    assert issubclass(_SpecLoader, yaml.SafeLoader)
    loads = 0
    for path in SOURCES:
        assert not _calls(path, "yaml", {"unsafe_load", "full_load", "load_all", "unsafe_load_all"}), path
        assert not re.search(r"(Full|Unsafe)Loader|yaml\.Loader\b", path.read_text()), path
        for call in _calls(path, "yaml", {"load"}):
            loaders = [k.value.id for k in call.keywords if k.arg == "Loader" and isinstance(k.value, ast.Name)]
            assert loaders == ["_SpecLoader"], (path, ast.unparse(call))
            loads += 1
    assert loads == 1  # read_spec_file; everything else uses yaml.safe_load


def test_checkpoints_are_never_unpickled_as_code():
    for path in SOURCES:
        for call in _calls(path, "torch", {"load"}):
            weights_only = [k.value.value for k in call.keywords
                            if k.arg == "weights_only" and isinstance(k.value, ast.Constant)]
            assert weights_only == [True], (path, ast.unparse(call))
        assert not _calls(path, "pickle", {"load", "loads"}), path


def test_the_spec_schema_has_no_path_import_or_plugin_location_fields():
    schema = spec_models(registry()).experiment.model_json_schema()
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert {"optimizer", "regularizers", "sweep"} <= names
    suspicious = [n for n in names if re.search(r"path|dir|file|import|module|plugin|url|store|command", n)]
    assert suspicious == []


@pytest.mark.parametrize("text", ["", ".", "..", "../x", "a/b", "/abs", "-rf", ".hidden", "a\x00b", "a\nb",
                                  "x" * 129, "naïve", "a b", "~", "a\\b"])
def test_safe_component_refuses_anything_that_is_not_one_plain_name(text):
    with pytest.raises(ValueError, match="is not a safe path component"):
        safe_component(text)


def test_safe_component_accepts_names_and_ids_unchanged():
    for text in ("quickstart", "my-study.v2", "A_1", "quickstart-0a1b2c3d", "0123456789abcdef", "x" * 128):
        assert safe_component(text) == text
    with pytest.raises(ValueError):
        safe_component(None)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=80) | st.sampled_from(["..", ".", "../../etc", "a/../../b", "-x", "CON", "a" * 64]))
def test_every_accepted_experiment_name_is_a_safe_directory_name(name, tmp_path_factory):
    try:
        spec = parse_spec({**BASE, "name": name}, registry())
    except SpecError as e:
        assert [i.path for i in e.issues] == ["name"]
        return
    root = tmp_path_factory.getbasetemp().resolve()
    assert safe_component(spec.name) == name
    assert (root / name).resolve().parent == root
    assert safe_component(f"{name}-0a1b2c3d") == f"{name}-0a1b2c3d"  # the experiment id


def test_a_bad_name_says_what_a_good_one_looks_like(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: ../../etc\noptimizer: {name: adam}\n")
    assert main(["validate", str(spec)]) == 2
    assert "'../../etc' is not a valid experiment name: use 1-64 letters, digits, '.', '_' or '-', starting with " \
           "a letter or digit" in capsys.readouterr().err


def test_the_store_and_its_journal_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = Store(tmp_path / "store.db")
        store.add_experiment("e-1", "e", {}, [])
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert files == {"store.db": 0o600, "store.db-wal": 0o600, "store.db-shm": 0o600}
