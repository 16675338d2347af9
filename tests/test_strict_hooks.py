"""Strict hook names: every public method of a plugin must be a hook. A misspelt hook would never be called and a
plugin would silently train without it; the registry refuses it, suggests the hook meant, and says that helpers
are `_private`."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from l2cluster.cli import main
from l2cluster.plugin import HOOK_ARGS, PluginError, Regularizer, hook
from l2cluster.registry import Registry, load_registry


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = 0.1


class Misspelt(Regularizer):
    name = "misspelt"
    Config = _Cfg

    def penalty(self, params, hp):
        return hp.strength * params["layers.0.weight"].flatten(1).pow(2).sum(1)

    def aftr_step(self, params):  # meant: after_step
        pass


def test_a_misspelt_hook_beside_a_real_one_is_refused_naming_the_hook_meant():
    with pytest.raises(PluginError) as info:
        Registry().register(Misspelt, "test")
    e = info.value
    assert (e.plugin, e.hook, e.argument) == ("misspelt", "aftr_step", None)
    assert str(e) == (f"plugin 'misspelt', hook 'aftr_step': is not a hook; did you mean 'after_step'? Hooks are "
                      f"{', '.join(HOOK_ARGS)}; name helper methods with a leading underscore")


class PublicHelper(Regularizer):
    name = "public_helper"
    Config = _Cfg

    def penalty(self, params, hp):
        return hp.strength * self.weights_norm(params)

    @staticmethod
    def weights_norm(params):
        return params["layers.0.weight"].flatten(1).pow(2).sum(1)


class PrivateHelper(PublicHelper):
    name = "private_helper"
    weights_norm = None  # the parent's public helper, gone: this class names its helper with a leading underscore

    def penalty(self, params, hp):
        return hp.strength * self._weights_norm(params) * self._scale()

    @staticmethod
    def _weights_norm(params):
        return params["layers.0.weight"].flatten(1).pow(2).sum(1)

    @classmethod
    def _scale(cls):
        return 1.0


def test_a_public_helper_is_refused_and_a_private_one_accepted():
    with pytest.raises(PluginError, match=r"plugin 'public_helper', hook 'weights_norm': is not a hook; hooks are "
                                          r".*; name helper methods with a leading underscore"):
        Registry().register(PublicHelper, "test")
    info = Registry().register(PrivateHelper, "test")
    assert list(info.hooks) == ["penalty"]
    params = {"layers.0.weight": torch.ones(2, 3, 4, dtype=torch.float64)}
    assert info.hooks["penalty"](params=params, hp=_Cfg(), epoch=1, step=0).tolist() == pytest.approx([1.2, 1.2])


def test_an_inherited_public_helper_and_a_marked_private_non_hook_are_refused():
    class Child(PublicHelper):
        name = "child"

    with pytest.raises(PluginError, match="hook 'weights_norm': is not a hook"):
        Registry().register(Child, "test")

    class Marked(Regularizer):
        name = "marked"
        Config = _Cfg

        @hook
        def _on_gradient(self, params):
            pass

        def penalty(self, params):
            return 0

    with pytest.raises(PluginError, match="hook '_on_gradient': is not a hook; did you mean 'on_gradients'"):
        Registry().register(Marked, "test")


def test_nested_classes_and_plain_attributes_are_not_methods():
    class WithExtras(Regularizer):
        name = "with_extras"
        Config = _Cfg
        scale = 2.0

        class Failure(RuntimeError):
            pass

        def after_step(self, params):
            pass

    assert list(Registry().register(WithExtras, "test").hooks) == ["after_step"]


def test_the_refusal_shows_in_the_plugin_listing(tmp_path, capsys):
    (tmp_path / "typo.py").write_text(textwrap.dedent("""
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class Typo(Regularizer):
            name = "typo"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def penalty(self, params):
                return 0

            def aftr_step(self, params):
                pass
    """))
    reg = load_registry([tmp_path], use_entry_points=False)
    assert "typo" not in reg.names
    (problem,) = reg.problems
    assert problem.status == "refused" and "did you mean 'after_step'?" in problem.reason
    assert main(["--plugin-dir", str(tmp_path), "plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"typo\s+directory .*typo\.py\s+-\s+refused: plugin 'typo', hook 'aftr_step': is not a hook; "
                     r"did you mean 'after_step'\?", out), out


def test_the_builtins_register_under_the_strict_rule():
    reg = load_registry(use_entry_points=False)
    assert reg.problems == []
    assert {"l2", "dropout", "grad_clip", "decoupled_decay"} <= set(reg.names)
