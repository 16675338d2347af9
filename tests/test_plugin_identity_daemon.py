"""Plugin identity on a real local daemon (one Ray start): reused jobs are announced, `--rerun` trains them again,
the per-job table shows errors, and a submission whose plugin code differs from what the daemon loaded is refused
with the fix — as a clean CLI error."""

from __future__ import annotations

import functools
import hashlib
import textwrap

import pytest
from support import local_daemon, spec_file
from test_plugin_identity import RAISES, SHRINK

from l2cluster.cli import main
from l2cluster.results.store import Store

pytestmark = pytest.mark.slow

TINY = {"model": {"hidden_sizes": [16]}, "data": {"batch_size": 50, "val_size": 100},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "scaling": {"pack": False}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_mnist_dir):
    """A local Ray with 2 logical CPUs and a coordinator whose plugin directory holds `shrink` and `raises`."""
    plugin_dir = tmp_path_factory.mktemp("plugins")
    (plugin_dir / "shrink.py").write_text(SHRINK)
    (plugin_dir / "raises.py").write_text(textwrap.dedent(RAISES))
    store = tmp_path_factory.mktemp("daemon") / "store.db"
    with local_daemon(store, num_cpus=2, plugin_dirs=[str(plugin_dir)], data_dir=str(tiny_mnist_dir)) as c:
        yield {**c, "plugin_dir": plugin_dir}


write_spec = functools.partial(spec_file, base=TINY)  # write_spec(directory, name, **fields)


def submit(*args, capsys):
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err


def test_reused_jobs_are_announced_and_rerun_trains_them_again(cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, "reuse", regularizers=[{"name": "shrink"}], sweep={"seeds": [0, 1]})
    plugin_dir = str(cluster["plugin_dir"])
    code, out, err = submit("--plugin-dir", plugin_dir, "submit", spec, "--wait", capsys=capsys)
    assert code == 0, err
    experiment = out.splitlines()[0]
    assert "2 job(s), 2 new" in err and "reused" not in err
    store = Store(cluster["store"])
    first = {r["id"]: (r["finished_at"], store.result(r["id"])) for r in store.jobs(experiment)}
    assert len(first) == 2 and all(r["outcome"] == "succeeded" for _, r in first.values())

    code, out, err = submit("--plugin-dir", plugin_dir, "submit", spec, capsys=capsys)
    assert code == 0 and out.splitlines()[0] == experiment  # same spec, same plugin code: same experiment
    assert "2 of 2 jobs reused from the store (stored results shown; --rerun trains them again)" in err
    assert {r["id"]: r["finished_at"] for r in store.jobs(experiment)} == {j: f for j, (f, _) in first.items()}

    code, out, err = submit("submit", spec, "--rerun", "--wait", capsys=capsys)
    assert code == 0, err
    assert "2 of 2 jobs queued again (--rerun)" in err and "reused" not in err
    for row in store.jobs(experiment):
        finished_before, result_before = first[row["id"]]
        assert row["state"] == "succeeded" and row["attempts"] == 1 and row["finished_at"] > finished_before
        assert [e["detail"] for e in store.events(row["id"])].count("rerun requested") == 1
        assert len(store.epochs(row["id"])) == 1  # the rerun's one epoch, not the first run's beside it
        # Same code, config and seed: the rerun trains the same parameters.
        assert store.result(row["id"])["final"]["param_sum"] == result_before["final"]["param_sum"]

    job = next(iter(first))
    assert main(["logs", job]) == 0
    digest = hashlib.sha256((cluster["plugin_dir"] / "shrink.py").read_bytes()).hexdigest()[:16]
    assert capsys.readouterr().out.splitlines()[1] == f"plugins: shrink sha256:{digest}"  # under the job line


def test_the_per_job_table_shows_each_jobs_error(cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, "errors", regularizers=[{"name": "raises"}])
    code, out, err = submit("submit", spec, "--wait", capsys=capsys)
    assert code == 1, err
    header, _, row = out.splitlines()[1:4]
    assert header.split()[-2:] == ["node", "error"]
    assert " failed " in row and row.endswith("plugin 'raises', hook 'penalty': RuntimeError: the penalty …")
    # `logs` has the whole error with the plugin's traceback: its file and line, nothing of the trainer's frames.
    assert main(["logs", row.split()[0]]) == 0
    logs = capsys.readouterr().out
    trace = logs[logs.index("Traceback (the plugin's frames"):].splitlines()
    source = (cluster["plugin_dir"] / "raises.py").read_text().splitlines()
    line = 1 + next(i for i, x in enumerate(source) if "raise RuntimeError" in x)
    assert trace[1] == f'  File "{cluster["plugin_dir"] / "raises.py"}", line {line}, in penalty'
    assert "trainer.py" not in logs


def test_a_client_with_other_plugin_code_is_refused(cluster, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "shrink.py").write_text(SHRINK + "\n# the client's copy differs\n")
    spec = write_spec(tmp_path, "client", regularizers=[{"name": "shrink"}])
    code, out, err = submit("--plugin-dir", str(other), "submit", spec, capsys=capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("error: plugin 'shrink': this client has version sha256:")
    assert f"({other / 'shrink.py'}) but the daemon loaded sha256:" in err


def test_a_plugin_file_edited_under_the_daemon_is_refused_with_the_restart_command(cluster, tmp_path, capsys):
    path = cluster["plugin_dir"] / "shrink.py"
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    path.write_text(SHRINK + "\n# edited while the daemon runs\n")
    now = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    spec = write_spec(tmp_path, "edited", regularizers=[{"name": "shrink"}])
    code, out, err = submit("submit", spec, capsys=capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip() == (
        f"error: plugin 'shrink': changed since the daemon loaded it (sha256:{loaded} → sha256:{now}, {path}); "
        f"restart the daemon to load it: l2cluster daemon stop && l2cluster daemon start --store {cluster['store']} "
        f"--plugin-dir {cluster['plugin_dir']} (with the other options it was started with; add --address for a "
        "daemon on an existing Ray cluster)")
    # Specs that do not use the changed plugin are still accepted.
    code, out, err = submit("submit", write_spec(tmp_path, "other-plugin", regularizers=[{"name": "l2"}]), "--wait",
                            capsys=capsys)
    assert code == 0, err
