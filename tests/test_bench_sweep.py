"""bench/sweep_throughput.py compares like with like: the spec it gives l2cluster is valid and describes the same
sweep, model and objective as its Ray Tune loops. Nothing here is timed; the benchmark itself needs Ray Tune,
these checks do not."""

from __future__ import annotations

from pathlib import Path

import yaml
from support import load_script, registry

from l2cluster.cli import main
from l2cluster.spec import expand, parse_spec
from l2cluster.training.model import StackedMLP

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sweep_throughput.py"


def load_bench():
    return load_script(BENCH, "sweep_throughput")


def test_the_spec_it_writes_validates_and_matches_the_tune_sweep(tmp_path, capsys):
    bench = load_bench()
    args = bench.build_parser().parse_args(
        ["--seeds", "0,1", "--strengths", "0,1e-3,1e-2", "--hidden", "32,16", "--train-size", "500", "--epochs", "2"]
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(bench.sweep_spec(args), sort_keys=False))
    assert main(["validate", str(path)]) == 0
    assert "6 job(s)" in capsys.readouterr().out

    jobs = expand(parse_spec(yaml.safe_load(path.read_text()), registry()), registry())
    configs = [job.config.model_dump() for job in jobs]
    # One job per (strength, seed), as Tune's grid_search over both makes one trial per pair.
    assert sorted((c["regularizers"][0]["strength"], c["seed"]) for c in configs) == sorted(
        (s, seed) for s in (0.0, 1e-3, 1e-2) for seed in (0, 1)
    )
    for c in configs:
        l2, dropout = c["regularizers"]
        assert l2 == {"name": "l2", "strength": l2["strength"], "exclude_bias_and_1d": False}  # biases too
        assert dropout == {"name": "dropout", "p": bench.DROPOUT}
        assert c["model"]["hidden_sizes"] == [32, 16]
        opt = c["optimizer"]
        assert (opt["name"], opt["lr"], opt["weight_decay"]) == ("adamw", bench.LR, 0.0)
        assert c["data"] == {"batch_size": bench.BATCH, "val_size": bench.VAL_SIZE, "train_size": 500,
                             "split_seed": bench.SPLIT_SEED}
        assert c["epochs"] == 2 and c["schedule"]["name"] == "constant"
        assert c["scaling"]["num_workers"] == 1 and c["scaling"]["cpus_per_worker"] == 1


def test_the_tune_model_has_l2clusters_layers():
    bench = load_bench()
    # nn.Linear stores weights [out, in]; l2cluster's stacked layers [K, in, out].
    tune_shapes = [tuple(reversed(p.shape)) for p in bench.mlp([32, 16]).parameters()]
    ours = [tuple(p.shape[1:]) for p in StackedMLP(1, [32, 16]).parameters()]
    assert tune_shapes == ours
    dropouts = [m for m in bench.mlp([32, 16]).modules() if isinstance(m, bench.nn.Dropout)]
    assert [m.p for m in dropouts] == [bench.DROPOUT] * 2
