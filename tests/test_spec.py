"""Job specs: every shipped spec validates, bad specs are refused with the field and the fix (exit 2, no
traceback), and sweeps expand to the right jobs with stable ids."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import yaml
from support import InfGradients, config, registry, registry_with, run_cli

from l2cluster.cli import main
from l2cluster.registry import Registry
from l2cluster.spec import SpecError, count_jobs, expand, load_spec, parse_spec
from l2cluster.spec.config import TrainConfig, spec_models

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.y*ml")) + sorted((ROOT / "jobs").glob("*.json"))

BASE = {"name": "t", "optimizer": {"name": "adam", "lr": 1e-3}}


def refused(data: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec = parse_spec(data, registry())
        expand(spec, registry())
    return info.value


def test_shipped_specs_exist():
    assert {p.name for p in JOB_FILES} >= {"quickstart.yaml", "reference.yaml", "compare_regularizers.yaml"}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert expand(load_spec(path, registry()), registry())


def test_reference_spec_is_the_article_setup_without_its_traps():
    spec = load_spec(ROOT / "jobs" / "reference.yaml", registry())
    assert spec.model.hidden_sizes == [512, 256, 128]
    assert (spec.optimizer.name, spec.optimizer.lr, spec.optimizer.weight_decay) == ("adamw", 1e-3, 0.0)
    regs = {r.name: r for r in spec.regularizers}
    assert regs["l2"].strength == 1e-3 and regs["dropout"].p == 0.2
    assert (spec.data.batch_size, spec.epochs, spec.sweep.seeds) == (64, 10, [0, 1, 2])


def test_compare_regularizers_covers_all_four_builtins():
    jobs = expand(load_spec(ROOT / "jobs" / "compare_regularizers.yaml", registry()), registry())
    used = {r.name for j in jobs for r in j.config.regularizers}
    assert used == {"l2", "decoupled_decay", "dropout", "grad_clip"}
    assert len(jobs) == 3 * (1 + 4 * 4)


@pytest.mark.parametrize("data, path, words", [
    ({**BASE, "optimiser": {}}, "optimiser", "unknown field"),
    ({**BASE, "epochs": "ten"}, "epochs", "valid integer"),
    ({**BASE, "epochs": 0}, "epochs", "greater than or equal to 1"),
    ({"name": "t"}, "optimizer", "required field is missing"),
    ({**BASE, "optimizer": {"name": "rmsprop"}}, "optimizer", "does not match any of the expected tags"),
    ({**BASE, "optimizer": {"name": "adamw", "lr": -1}}, "optimizer.lr", "greater than 0"),
    ({**BASE, "regularizers": [{"name": "l3"}]}, "regularizers[0]", "'l2'"),
    ({**BASE, "regularizers": [{"name": "l2", "strenght": 1}]}, "regularizers[0].strenght", "unknown field"),
    ({**BASE, "regularizers": [{"name": "dropout", "p": 1.5}]}, "regularizers[0].p", "[0, 1)"),
    ({**BASE, "name": "../etc"}, "name", "is not a valid experiment name: use 1-64 letters"),
    ({**BASE, "optimizer": {"name": "sgd", "nesterov": True}}, "optimizer", "needs momentum > 0"),
    ({**BASE, "optimizer": {"name": "adamw", "weight_decay": 0.01}, "regularizers": [{"name": "l2"}]},
     "", "decays the weights twice"),
    ({**BASE, "sweep": {"grid": {"optimizer.lr": []}}}, "sweep.grid.optimizer.lr", "has no values"),
    ({**BASE, "sweep": {"seeds": [1, 1]}}, "sweep.seeds", "distinct"),
    ({**BASE, "sweep": {"grid": {"regularizers.l2.strength": [1e-3]}}}, "sweep.grid.regularizers.l2.strength",
     "no entry named 'l2'"),
    ({**BASE, "sweep": {"grid": {"optimizer.lrr": [1e-3]}}}, "optimizer.lrr", "unknown field"),
    ({**BASE, "sweep": {"grid": {"optimizer.lr": [1e-3, -1.0]}}}, "optimizer.lr", "with optimizer.lr=-1.0"),
    ({**BASE, "sweep": {"grid": {"seed": [1, 2]}}}, "sweep.grid.seed", "sweep.seeds"),
    ({**BASE, "scaling": {"num_workers": 2, "gpus_per_worker": 0.5}}, "scaling", "NCCL refuses"),
])
def test_bad_specs_name_the_field_and_the_fix(data, path, words):
    err = refused(data)
    assert any(i.path == path and words in i.message for i in err.issues), err.render()


def test_sweep_expands_variants_grid_and_seeds_with_stable_ids():
    data = {**BASE, "sweep": {
        "seeds": [0, 1, 2],
        "grid": {"optimizer.lr": [1e-3, 2e-3]},
        "variants": [
            {"label": "none", "set": {"regularizers": []}},
            {"label": "l2", "set": {"regularizers": [{"name": "l2"}]},
             "grid": {"regularizers.l2.strength": [1e-4, 1e-3]}},
        ]}}
    spec = parse_spec(data, registry())
    jobs = expand(spec, registry())
    assert count_jobs(spec) == len(jobs) == (2 + 2 * 2) * 3
    assert len({j.id for j in jobs}) == len(jobs)
    assert [j.id for j in expand(parse_spec(data, registry()), registry())] == [j.id for j in jobs]
    l2_jobs = [j for j in jobs if j.label == "l2"]
    assert {(j.config.optimizer.lr, j.config.regularizers[0].strength) for j in l2_jobs} == {
        (a, b) for a in (1e-3, 2e-3) for b in (1e-4, 1e-3)}
    # Jobs that differ only by seed share a group; a changed setting changes every id.
    assert len({j.group for j in jobs}) == 6
    other = expand(parse_spec({**data, "epochs": 3}, registry()), registry())
    assert not {j.id for j in other} & {j.id for j in jobs}
    # TF32 changes the numbers a GPU computes: it is part of the identity too.
    tf32 = expand(parse_spec({**data, "model": {"tf32": True}}, registry()), registry())
    assert all(j.config.model.tf32 for j in tf32) and not any(j.config.model.tf32 for j in jobs)
    assert not {j.id for j in tf32} & {j.id for j in jobs}


def test_list_entries_by_index_and_duplicates_run_once():
    data = {**BASE, "regularizers": [{"name": "dropout", "p": 0.1}],
            "sweep": {"grid": {"regularizers.0.p": [0.1, 0.2, 0.1]}}}
    jobs = expand(parse_spec(data, registry()), registry())
    assert sorted(j.config.regularizers[0].p for j in jobs) == [0.1, 0.2]


def test_job_cap_is_enforced_before_expanding():
    lrs = [i * 1e-4 + 1e-4 for i in range(200)]
    data = {**BASE, "sweep": {"seeds": list(range(100)), "grid": {"optimizer.lr": lrs}}}
    spec = parse_spec(data, registry())
    with pytest.raises(SpecError, match="expands to 20000 jobs, more than the limit of 10000"):
        expand(spec, registry())
    assert len(expand(spec, registry(), max_jobs=20000)) == 20000


def test_adamw_never_gets_the_library_default_decay():
    cfg = config(optimizer={"name": "adamw", "lr": 1e-3})
    assert cfg.optimizer.weight_decay == 0.0
    import torch

    opt = cfg.optimizer.build([torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_cli_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "epochs": -3, "regularizers": [{"name": "nope"}]}))
    run = run_cli("validate", str(bad), cwd=ROOT)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "epochs\n    Input should be greater than or equal to 1" in run.stderr
    assert "regularizers[0]" in run.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: t\noptimizer: {name: adam\n  lr: [1, 2\n")
    run = run_cli("validate", str(broken), cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "not valid YAML" in run.stderr and "line " in run.stderr

    run = run_cli("validate", str(tmp_path / "missing.yaml"), cwd=ROOT)
    assert run.returncode == 2 and "cannot read the file" in run.stderr


def test_schema_includes_every_plugin_config(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    defs = schema["$defs"]
    assert {"L2Config", "DecoupledDecayConfig", "DropoutConfig", "GradClipConfig"} <= set(defs)
    assert "added to each model's loss" in defs["L2Config"]["properties"]["strength"]["description"]
    assert defs["AdamWConfig"]["properties"]["weight_decay"]["default"] == 0.0


def test_job_ids_of_earlier_stores_stay_the_same_and_how_a_job_runs_is_not_part_of_them():
    """Ids are what a store reuses results by: fields added since (model.tf32 at its default, scaling.pack) must
    not change them, and neither may max_attempts or the packing opt-out."""
    import hashlib
    import json

    (job,) = expand(parse_spec(BASE, registry()), registry())
    before = job.config.model_dump(mode="json")
    del before["max_attempts"], before["model"]["tf32"], before["scaling"]["pack"]  # a config as earlier versions had
    digest = hashlib.sha256(json.dumps({"experiment": BASE["name"], "config": before}, sort_keys=True,
                                       separators=(",", ":")).encode()).hexdigest()[:16]
    assert job.id == digest
    for change in ({"max_attempts": 9}, {"scaling": {"pack": False}}):
        (other,) = expand(parse_spec({**BASE, **change}, registry()), registry())
        assert other.id == job.id and other.group == job.group, change
    (tf32,) = expand(parse_spec({**BASE, "model": {"tf32": True}}, registry()), registry())
    assert tf32.id != job.id


def test_a_jobs_config_is_a_train_config_whose_regularizers_are_the_registrys_plugin_configs():
    (job,) = expand(parse_spec({**BASE, "regularizers": [{"name": "l2"}]}, registry()), registry())
    assert isinstance(job.config, TrainConfig) and type(job.config) is not TrainConfig
    assert type(job.config) is spec_models(registry()).train
    assert job.config.regularizers[0] == registry().get("l2").config_model(name="l2")
    assert set(TrainConfig.model_fields) == set(spec_models(registry()).train.model_fields)


def test_the_spec_models_are_built_once_per_registry_and_again_when_a_plugin_is_added():
    """They are cached by registry, not stored on it; registering a plugin later makes its name valid."""
    reg = registry_with()
    first = spec_models(reg)
    assert spec_models(reg) is first
    assert not hasattr(reg, "spec_models")
    with pytest.raises(SpecError, match="inf_gradients"):
        parse_spec({**BASE, "regularizers": [{"name": "inf_gradients"}]}, reg)
    reg.register(InfGradients, "test")
    assert spec_models(reg) is not first
    assert parse_spec({**BASE, "regularizers": [{"name": "inf_gradients"}]}, reg).regularizers[0].when == 0
    other = Registry()
    assert spec_models(other) is not spec_models(reg)
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None  # the cache does not keep a registry alive


def test_a_regularizer_with_no_plugins_loaded_is_a_spec_error_not_a_crash():
    with pytest.raises(SpecError, match="no regularizer plugin is loaded, so 'l2' cannot be used"):
        parse_spec({"name": "t", "optimizer": {"name": "adam"}, "regularizers": [{"name": "l2"}]}, Registry())
    parse_spec({"name": "t", "optimizer": {"name": "adam"}}, Registry())  # no regularizers: fine
