"""A local daemon killed without `daemon stop` (SIGKILL of its host process): every client command answers within
seconds with one line saying what to do and exit code 2, nothing of that daemon's Ray is left running, and
`daemon start` starts a new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import run_cli, wait_for

from l2cluster.cluster.daemon import _alive, session_processes

pytestmark = pytest.mark.slow

# A client command's answer: the start of a Python process, no Ray connection attempt.
ANSWER_S = 10.0


def cli(*args, env, timeout=120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = run_cli(*args, env=env, timeout=timeout)
    return out, time.monotonic() - t0


def start_daemon(env) -> dict:
    out, _ = cli("daemon", "start", "--num-cpus", "1", env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((Path(env["L2CLUSTER_HOME"]) / "daemon.json").read_text())


def kill_host(state: dict) -> None:
    os.kill(state["pid"], signal.SIGKILL)
    wait_for(lambda: not _alive(state["pid"]), "the host process to die", 10)


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "disabled", "L2CLUSTER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"})
    yield env
    # Whatever the test left running: stop it by the state file's PID, never by name.
    subprocess.run([sys.executable, "-m", "l2cluster.cli", "daemon", "stop"], env=env, capture_output=True,
                   timeout=120)


def test_every_client_command_answers_quickly_once_the_daemon_was_killed(env, tmp_path):
    state = start_daemon(env)
    state_file = tmp_path / "home" / "daemon.json"
    stale = state_file.read_text()
    kill_host(state)

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: tiny\nmodel: {hidden_sizes: [8]}\noptimizer: {name: adam, lr: 0.01}\nepochs: 1\n")
    commands = [("daemon", "status"), ("status",), ("status", "tiny"), ("results", "tiny"),
                ("report", "tiny", "-o", str(tmp_path / "report")), ("logs", "0123abcd"), ("cancel", "tiny"),
                ("submit", str(spec)), ("submit", str(spec), "--wait"), ("watch", "tiny"),
                ("export", "tiny", "--format", "csv", "-o", str(tmp_path / "tiny.csv"))]
    for n, command in enumerate(commands):
        state_file.write_text(stale)  # each command meets the dead daemon's state file, as the first one did
        out, took = cli(*command, env=env)
        said = out.stderr.strip()
        assert out.returncode == 2, (command, out.stdout, said)
        assert took < ANSWER_S, (command, took)
        assert "Traceback" not in said and len(said.splitlines()) == 1, (command, said)
        assert f"the local daemon (pid {state['pid']}) is not running" in said, (command, said)
        assert "start it again with `l2cluster daemon start`" in said, (command, said)
        assert not state_file.exists(), command  # the stale state file is gone
        if n == 0:  # the first command cleaned up what the killed host left of its Ray
            assert session_processes(state["session"]) == [], command

    # An address where nothing listens is refused at once, too.
    out, took = cli("status", "--address", "127.0.0.1:1", env=env)
    assert out.returncode == 2 and took < ANSWER_S, (took, out.stderr)
    assert "cannot reach the Ray cluster at 127.0.0.1:1: connection refused" in out.stderr, out.stderr
    out, took = cli("daemon", "status", env={**env, "RAY_ADDRESS": "127.0.0.1:1"})
    assert out.returncode == 2 and took < ANSWER_S and "connection refused" in out.stderr, (took, out.stderr)

    # `daemon stop` after the fact says what happened and succeeds: there is nothing left to stop.
    state_file.write_text(stale)
    out, took = cli("daemon", "stop", env=env)
    assert out.returncode == 0 and took < ANSWER_S, (took, out.stdout, out.stderr)
    assert f"the local daemon (pid {state['pid']}) had already stopped" in out.stdout, out.stdout
    assert not state_file.exists()


def test_daemon_start_replaces_a_killed_daemon_and_cleans_up_after_it(env):
    killed = start_daemon(env)
    kill_host(killed)  # and at once: its agents and workers are still running
    state = start_daemon(env)
    assert state["pid"] != killed["pid"]
    assert session_processes(killed["session"]) == []
    out, _ = cli("daemon", "status", env=env)
    assert out.returncode == 0 and out.stdout.startswith("coordinator up"), out.stdout + out.stderr
    out, _ = cli("daemon", "stop", env=env)
    assert out.returncode == 0 and "local daemon stopped" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: not session_processes(state["session"]), "the new daemon's processes to exit", 30,
             show=lambda: str(session_processes(state["session"])))
