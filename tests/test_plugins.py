"""The plugin contract: discovery from built-ins, directories and entry points; refusal of broken plugins
with errors that name plugin, hook and argument; the CLI listing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from support import registry

from l2cluster.cli import main
from l2cluster.plugin import PluginError, Regularizer
from l2cluster.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parents[1]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = 0.1


def _plugin(name="good", config=_Cfg, **methods):
    attrs = {"name": name, **({"Config": config} if config is not None else {}), **methods}
    return type("P", (Regularizer,), attrs)


def test_builtins_load_with_their_hooks():
    reg = registry()
    hooks = {p.name: sorted(p.hooks) for p in reg.all() if p.status == "ok"}
    assert hooks == {"decoupled_decay": ["before_step"], "dropout": ["on_activation"],
                     "grad_clip": ["on_gradients"], "l2": ["penalty"], "l1": ["penalty"],
                     "label_smoothing": ["example_penalty"], "mixup": ["on_batch"],
                     "ema": ["after_step", "eval_params", "init_state"], "max_norm": ["after_step"]}
    assert reg.problems == []


@pytest.mark.parametrize("plugin, match", [
    (_plugin(on_gradient=lambda self, params: None),
     r"plugin 'good', hook 'on_gradient': is not a hook; did you mean 'on_gradients'\?"),
    (_plugin(penalty=lambda self, params, weights: None), r"hook 'penalty', argument 'weights'"),
    (_plugin(after_step=lambda self, *args: None), r"hook 'after_step', argument 'args'"),
    (_plugin(config=None, penalty=lambda self, params: None), r"has no `Config`"),
    (_plugin(config=dict, penalty=lambda self, params: None), r"`Config` must be a pydantic BaseModel"),
    (_plugin(config=type("Loose", (BaseModel,), {"__annotations__": {"x": int}}), penalty=lambda self, params: None),
     r"must refuse unknown fields"),
    (_plugin(), r"implements no hook"),
    (_plugin(name="Bad Name", penalty=lambda self, params: None), r"lower-case identifier"),
])
def test_broken_plugins_are_refused_with_a_precise_reason(plugin, match):
    with pytest.raises(PluginError, match=match):
        Registry().register(plugin, "test")


def test_duplicate_name_is_refused_naming_the_first_origin():
    reg = Registry()
    reg.register(_plugin(penalty=lambda self, params: None), "first place")
    with pytest.raises(PluginError, match="already registered from first place"):
        reg.register(_plugin(penalty=lambda self, params: None), "second place")


def test_plugin_directory_broken_files_are_listed_and_the_rest_load(tmp_path, capsys):
    (tmp_path / "good_one.py").write_text(textwrap.dedent("""
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class Shrink(Regularizer):
            name = "shrink"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")
                factor: float = 0.5

            def after_step(self, params, hp):
                pass
    """))
    (tmp_path / "broken_import.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "bad_hook.py").write_text(textwrap.dedent("""
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class Typo(Regularizer):
            name = "typo"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def after_step(self, params, learning_rate):
                pass
    """))
    reg = load_registry([tmp_path], use_entry_points=False)
    assert "shrink" in reg.names and {"l2", "dropout", "grad_clip", "decoupled_decay"} <= set(reg.names)
    problems = {p.name: p for p in reg.problems}
    assert problems["broken_import"].status == "unavailable"
    assert "No module named 'not_a_module_anywhere'" in problems["broken_import"].reason
    assert problems["typo"].status == "refused" and "argument 'learning_rate'" in problems["typo"].reason

    assert main(["--plugin-dir", str(tmp_path), "plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"shrink\s+directory .*good_one.py\s+after_step\s+ok", out)
    assert re.search(r"broken_import\s+directory .*unavailable: import failed", out)
    assert re.search(r"typo\s+.*refused: plugin 'typo', hook 'after_step', argument 'learning_rate'", out)


def test_plugins_show_prints_the_config_with_field_docs(capsys):
    assert main(["plugins", "show", "grad_clip"]) == 0
    out = capsys.readouterr().out
    assert "max_norm: float (default 1.0)" in out
    assert "the largest gradient norm allowed, per model" in out
    assert main(["plugins", "show", "nope"]) == 2
    assert "no plugin named 'nope'" in capsys.readouterr().err


def _guide_blocks() -> dict[str, str]:
    """The author's guide in docs/plugins.md: code blocks whose first line names their file."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    blocks = {}
    for _lang, body in re.findall(r"```(python|toml)\n(.*?)```", text, flags=re.S):
        first = body.splitlines()[0]
        m = re.match(r"#\s*(\S+\.(?:py|toml))$", first)
        if m:
            blocks[m.group(1)] = body
    return blocks


def test_plugin_guide_package_installs_passes_its_own_tests_and_trains(tmp_path, tiny_mnist_dir):
    """The author's guide, as a user follows it: the package's files from docs/plugins.md, installed with pip, its own
    test (check_plugin, with two gloo ranks) run with pytest, then listed and trained by the CLI."""
    blocks = _guide_blocks()
    files = ("pyproject.toml", "l2cluster_noise.py", "tests/test_noise.py")
    assert set(files) <= set(blocks), sorted(blocks)
    pkg = tmp_path / "l2cluster-input-noise"
    (pkg / "tests").mkdir(parents=True)
    for name in files:
        (pkg / name).write_text(blocks[name])
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_noise.py"],
                         cwd=pkg, env=env, capture_output=True, text=True)
    assert own.returncode == 0 and "1 passed" in own.stdout, own.stdout + own.stderr
    listing = subprocess.run([sys.executable, "-m", "l2cluster.cli", "plugins", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert re.search(r"input_noise\s+entry point l2cluster_noise:InputNoise \(package l2cluster-input-noise\)"
                     r"\s+on_batch\s+ok", listing), listing

    spec = tmp_path / "noise.yaml"
    spec.write_text(textwrap.dedent("""
        name: noise-demo
        model: {hidden_sizes: [16]}
        data: {batch_size: 50, val_size: 100}
        optimizer: {name: adam, lr: 0.01}
        epochs: 1
        regularizers: [{name: input_noise, sigma: 0.2}]
    """))
    run = subprocess.run([sys.executable, "-m", "l2cluster.cli", "train", str(spec), "--data-dir", str(tiny_mnist_dir),
                          "--device", "cpu"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert re.search(r"succeeded\s+[01]\.\d+\s+[01]\.\d+", run.stdout), run.stdout


def test_a_plugin_whose_constructor_raises_is_refused_not_fatal():
    def __init__(self):
        raise RuntimeError("needs a GPU license")

    with pytest.raises(PluginError, match="could not be instantiated without arguments: RuntimeError: needs a GPU"):
        Registry().register(_plugin(__init__=__init__, penalty=lambda self, params: None), "test")
