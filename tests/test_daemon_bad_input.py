"""Bad input through a real daemon: fuzzed specs sent straight to the coordinator (past the client), a sweep over
the daemon's job cap, refused and broken plugins from a --plugin-dir — each refused or failed with the reason,
every other job finishing, and the coordinator serving the next good submission."""

from __future__ import annotations

import functools
import textwrap

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from spec_fuzz import broken_data_specs, names_field
from support import local_daemon, spec_file

from l2cluster.cli import main
from l2cluster.results.store import Store
from l2cluster.spec import SpecError

pytestmark = pytest.mark.slow  # every test runs on the module's local Ray

MAX_JOBS = 100
TINY = {"model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1}

PLUGINS = {
    "shrink.py": '''
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class Shrink(Regularizer):
            name = "shrink"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")
                factor: float = 0.999

            def after_step(self, params, hp):
                for p in params.values():
                    p.data.mul_(hp.factor.view(-1, *([1] * (p.dim() - 1))))
    ''',
    "nan_penalty.py": '''
        import torch
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class NanPenalty(Regularizer):
            name = "nan_penalty"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def penalty(self, params, step):
                w = params["layers.0.weight"]
                out = 1e-4 * w.flatten(1).pow(2).sum(1)
                return out * float("nan") if step == 2 else out
    ''',
    "raises.py": '''
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class Raises(Regularizer):
            name = "raises"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def after_step(self, step):
                if step == 3:
                    raise RuntimeError("boom at step 3")
    ''',
    "wrong_shape.py": '''
        import torch
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class WrongShape(Regularizer):
            name = "wrong_shape"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def penalty(self, params):
                return torch.zeros(3, 3)
    ''',
    "broken_import.py": "import not_a_module_anywhere\n",
    "bad_signature.py": '''
        from pydantic import BaseModel, ConfigDict
        from l2cluster.plugin import Regularizer

        class BadSignature(Regularizer):
            name = "bad_signature"

            class Config(BaseModel):
                model_config = ConfigDict(extra="forbid")

            def after_step(self, params, learning_rate):
                pass
    ''',
    "not_pydantic.py": '''
        from l2cluster.plugin import Regularizer

        class NotPydantic(Regularizer):
            name = "not_pydantic"

            class Config:
                strength = 0.1

            def penalty(self, params):
                return 0
    ''',
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_mnist_dir):
    """A local Ray with 2 logical CPUs; a coordinator with a plugin directory of good and broken plugins and a job
    cap of 100."""
    plugin_dir = tmp_path_factory.mktemp("plugins")
    for name, code in PLUGINS.items():
        (plugin_dir / name).write_text(textwrap.dedent(code))
    with local_daemon(tmp_path_factory.mktemp("daemon") / "store.db", num_cpus=2, plugin_dirs=[str(plugin_dir)],
                      data_dir=str(tiny_mnist_dir), max_jobs=MAX_JOBS) as c:
        yield c


write_spec = functools.partial(spec_file, base=TINY)  # write_spec(directory, name, **fields)


def submit_direct(cluster, data) -> SpecError | dict:
    """Submit spec data straight to the coordinator actor, as a client that skips all checks would."""
    try:
        return ray.get(cluster["handle"].submit.remote(data, 0, "direct"), timeout=60)
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        assert isinstance(cause, SpecError), f"{type(cause).__name__}: {cause}"
        return cause


def good_run(cluster, tmp_path, capsys, name):
    code = main(["submit", write_spec(tmp_path, name, sweep={"seeds": [0, 1]}), "--wait"])
    out = capsys.readouterr().out
    assert code == 0, out
    experiment = out.splitlines()[0]
    assert [j["state"] for j in ray.get(cluster["handle"].status.remote(experiment))] == ["succeeded"] * 2


_STRANGE = [None, [], "name: x", 42, {1: "x"}, {"name": "t", "optimizer": {"name": "adam"}, "sweep": {"grid": {
    "optimizer.lr": [{1, 2}]}}}]


def _deep(levels: int):
    data: object = 0
    for _ in range(levels):
        data = {"a": data}
    return {"name": "deep", "optimizer": {"name": "adam"}, "description": data}


def test_specs_that_skip_the_client_are_refused_by_the_coordinator_which_keeps_serving(cluster, tmp_path, capsys):
    seen = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=broken_data_specs().filter(lambda c: c.kind != "too_many_jobs"))  # the cap is the daemon's: below
    def refused(case):
        seen.append(case.kind)
        err = submit_direct(cluster, case.data)
        assert isinstance(err, SpecError), f"accepted: {case.describe()}"
        assert any(names_field(err.render(), f) for f in case.fields), f"{case.describe()}\n{err.render()}"

    refused()
    assert len(seen) >= 60
    # (A "billion laughs" of shared lists is refused by the client and by parse_spec — test_security.py — but is
    # not sent here: Ray's argument serialization copies shared values, so it would cost gigabytes in transit.)
    for data in [*_STRANGE, _deep(200)]:
        err = submit_direct(cluster, data)
        assert isinstance(err, SpecError), data
        assert "Traceback" not in err.render()
    assert "nested more than 32 levels deep" in submit_direct(cluster, _deep(200)).render()
    assert ray.get(cluster["handle"].ping.remote())["store"]
    assert Store(cluster["store"]).experiments() == []  # nothing refused left a trace in the store
    good_run(cluster, tmp_path, capsys, "after-the-fuzz")


def test_the_client_refuses_broken_files_before_the_daemon_sees_them(cluster, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: t\noptimizer: {name: adam\n")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"name: t\noptimizer: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    for path, where in ((broken, "line 3, column 1"), (tagged, "line 2, column 12")):
        assert main(["submit", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{where}: not valid YAML" in err and "Traceback" not in err, err
    assert not (tmp_path / "pwned").exists()


def test_a_sweep_over_the_daemons_job_cap_is_refused(cluster, tmp_path, capsys):
    lrs = [round(1e-4 * (i + 1), 6) for i in range(MAX_JOBS + 1)]
    spec = write_spec(tmp_path, "too-many", sweep={"grid": {"optimizer.lr": lrs}})
    assert main(["submit", spec]) == 2
    err = capsys.readouterr().err
    assert f"expands to {MAX_JOBS + 1} jobs, more than the limit of {MAX_JOBS}" in err and "Traceback" not in err
    assert main(["submit", write_spec(tmp_path, "just-enough", sweep={"grid": {"optimizer.lr": lrs[:MAX_JOBS]}})]) == 0
    experiment = capsys.readouterr().out.splitlines()[0]
    assert main(["cancel", experiment]) == 0
    capsys.readouterr()


def test_plugins_refused_at_load_are_refused_with_the_reason(cluster, tmp_path, capsys):
    for plugin, reason in [("bad_signature", "hook 'after_step', argument 'learning_rate': the trainer does not "
                                             "offer this argument"),
                           ("not_pydantic", "`Config` must be a pydantic BaseModel subclass")]:
        spec = write_spec(tmp_path, plugin, regularizers=[{"name": plugin}])
        assert main(["submit", spec]) == 2
        err = capsys.readouterr().err
        assert f"regularizers[0]\n    plugin {plugin!r} is refused: plugin {plugin!r}" in err, err
        assert reason in err and "Traceback" not in err


def test_a_broken_plugin_fails_only_its_own_jobs(cluster, tmp_path, capsys):
    variants = [{"label": name, "set": {"regularizers": regs}} for name, regs in [
        ("l2", [{"name": "l2", "strength": 1e-4}]), ("shrink", [{"name": "shrink"}]),
        ("nan", [{"name": "nan_penalty"}]), ("raises", [{"name": "raises"}]), ("shape", [{"name": "wrong_shape"}]),
    ]]
    spec = write_spec(tmp_path, "broken-plugins", sweep={"variants": variants})
    assert main(["submit", spec, "--wait"]) == 1  # some jobs failed
    experiment = capsys.readouterr().out.splitlines()[0]
    jobs = {j["label"]: j for j in ray.get(cluster["handle"].results.remote(experiment))}
    assert {label: j["state"] for label, j in jobs.items()} == {
        "l2": "succeeded", "shrink": "succeeded", "nan": "failed", "raises": "failed", "shape": "failed"}
    errors = {label: j["result"]["error"] for label, j in jobs.items()}
    assert errors["nan"] == ("plugin 'nan_penalty', hook 'penalty': returned NaN from finite parameters in epoch 1, "
                             "step 3 of the epoch")
    message, *trace = errors["raises"].splitlines()  # the message, then the plugin's traceback
    assert message == "plugin 'raises', hook 'after_step': RuntimeError: boom at step 3"
    assert trace[-1].strip() == 'raise RuntimeError("boom at step 3")'
    assert errors["shape"] == ("plugin 'wrong_shape', hook 'penalty': returned a tensor of shape (3, 3); expected a "
                               "tensor of shape (1,), one per model")
    assert jobs["l2"]["result"]["final"]["test_acc"] > 0.5
    good_run(cluster, tmp_path, capsys, "after-broken-plugins")


def test_the_listing_shows_why_a_plugin_is_not_loaded(cluster, tmp_path, capsys):
    plugin_dir = tmp_path / "p"
    plugin_dir.mkdir()
    for name in ("broken_import.py", "not_pydantic.py"):
        (plugin_dir / name).write_text(textwrap.dedent(PLUGINS[name]))
    assert main(["--plugin-dir", str(plugin_dir), "plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "unavailable: import failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'" in out
    assert "refused: plugin 'not_pydantic': `Config` must be a pydantic BaseModel subclass" in out

