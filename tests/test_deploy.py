"""The deploy/ recipes: every manifest parses and has the fields its tool requires, every l2cluster command in
them parses with l2cluster's own CLI, and every image tag, rayVersion and pip pin carries the Ray pinned in
pyproject.toml. The image itself is not built here (no Docker daemon or registry on the test machines): the
Dockerfile's instructions are parsed and checked as text."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement

from l2cluster.cli import build_parser

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pins() -> list[str]:
    """Every version pyproject.toml pins Ray to (dependencies and extras)."""
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        deps += extra
    pins = []
    for dep in map(Requirement, deps):
        if dep.name == "ray":
            (spec,) = dep.specifier  # exactly one specifier, and it must be ==
            assert spec.operator == "==", f"ray must be pinned exactly, not {dep}"
            pins.append(spec.version)
    return pins


RAY = ray_pins()[0]
VERSION = PYPROJECT["project"]["version"]
IMAGE_TAG = f"{VERSION}-ray{RAY}"


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay(kind: str) -> dict:
    (doc,) = [d for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in load_all(p) if d.get("kind") == kind]
    return doc


def parse_l2cluster(command: str):
    """Parse an `l2cluster ...` command line with the real CLI parser (an unknown option fails the test)."""
    words = shlex.split(command)
    assert words[0].endswith("l2cluster"), command
    try:
        return build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"the l2cluster CLI refuses this command: {command}")


def images(node) -> list[str]:
    """Every value of an `image` key, at any depth."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def under(path: str, mounts: list[str]) -> bool:
    return any(PurePosixPath(m) in PurePosixPath(path).parents for m in mounts)


# -- the one source of truth -----------------------------------------------------------------------------------
def test_ray_is_pinned_exactly_and_everywhere_the_same():
    pins = ray_pins()
    assert pins and set(pins) == {RAY}
    assert re.fullmatch(r"\d+\.\d+\.\d+", RAY)


def test_every_image_in_deploy_is_ours_or_rays_at_the_pinned_version():
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in load_all(path):
            for image in images(doc):
                found.append(image)
                name, _, tag = image.rpartition(":")
                if name.endswith("/l2cluster") or name == "l2cluster":
                    assert tag == IMAGE_TAG, f"{path.relative_to(ROOT)}: {image} (make docker tags {IMAGE_TAG})"
                else:
                    assert name == "rayproject/ray" and tag.startswith(f"{RAY}-"), f"{path}: {image}"
    assert len(found) >= 3  # RayCluster head + worker group, ray up


def test_make_docker_builds_the_tag_the_manifests_use():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "docker"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"--build-arg RAY_VERSION={RAY} " in out and f"-t l2cluster:{IMAGE_TAG} " in out
    assert "-f deploy/Dockerfile" in out


# -- Dockerfile ---------------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "dangling line continuation"
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def test_dockerfile_is_cuda_ray_at_the_pin_and_installs_l2cluster():
    steps = dockerfile_instructions(DEPLOY / "Dockerfile")
    known = {"ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "LABEL", "ENTRYPOINT", "CMD", "EXPOSE"}
    assert {i for i, _ in steps} <= known, steps
    first_from = next(n for n, (i, _) in enumerate(steps) if i == "FROM")
    defaults = dict(a.split("=", 1) for i, a in steps[:first_from] if i == "ARG" and "=" in a)
    assert defaults["RAY_VERSION"] == RAY

    (base,) = [substitute(a, defaults) for i, a in steps if i == "FROM"]
    name, tag = base.split(":")
    assert name == "rayproject/ray"
    version, python, flavour = re.fullmatch(r"([\d.]+)-py(\d+)-(gpu|cu\d+)", tag).groups()
    assert version == RAY and flavour  # Ray's CUDA image of the pinned version
    minimum = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()
    assert (int(python[0]), int(python[1:])) >= tuple(map(int, minimum))

    after = steps[first_from + 1:]
    assert ("ARG", "RAY_VERSION") in after  # without it, ${RAY_VERSION} is empty after FROM
    runs = [substitute(a, defaults) for i, a in after if i == "RUN"]
    installs = [shlex.split(r.split("&&")[0]) for r in runs if "pip install" in r]
    assert installs, runs
    (install,) = installs
    assert f"ray[default,client]=={RAY}" in install and "." in install
    assert any(f"ray.__version__ == '{RAY}'" in r for r in runs)

    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    copied = [w for i, a in after if i == "COPY" for w in shlex.split(a) if not w.startswith("--")]
    sources = [s for s in copied if not s.startswith("./") and s != "."]
    for source in sources:
        assert (ROOT / source).exists() and source not in ignored, source
    # What `pip install .` builds from is all in the image.
    packages = ["pyproject.toml", "README.md", *PYPROJECT["tool"]["setuptools"]["package-dir"].values(), "l2cluster"]
    assert set(packages) <= set(sources)


# -- KubeRay --------------------------------------------------------------------------------------------------------
def test_raycluster_has_what_kuberay_requires_with_token_auth_and_gpu_workers():
    rc = kuberay("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"] == {"mode": "token", "secretName": "l2cluster-ray-token"}

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a public LoadBalancer/NodePort
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["name"] and head_container["image"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}

    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and isinstance(group["rayStartParams"], dict)
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    # Every volume a container mounts is declared, and every claim it names exists in storage.yaml.
    claims = {d["metadata"]["name"]: d for d in load_all(DEPLOY / "kuberay" / "storage.yaml")
              if d["kind"] == "PersistentVolumeClaim"}
    for pod in (head["template"]["spec"], group["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
    # SQLite (WAL) needs a block volume of its own; files every pod sees need ReadWriteMany.
    assert claims["l2cluster-store"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims["l2cluster-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_starts_the_daemon_on_the_raycluster_with_the_store_on_the_head_volume():
    job, rc = kuberay("RayJob"), kuberay("RayCluster")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert "rayClusterSpec" not in spec and spec["submissionMode"] in ("HTTPMode", "K8sJobMode")
    args = parse_l2cluster(spec["entrypoint"])
    assert (args.command, args.action) == ("daemon", "start") and args.address
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    store_volumes = {v["name"] for v in head["volumes"]
                     if v.get("persistentVolumeClaim", {}).get("claimName") == "l2cluster-store"}
    mounts = [m["mountPath"] for c in head["containers"] for m in c["volumeMounts"] if m["name"] in store_volumes]
    assert under(args.store, mounts) and under(args.data_dir, mounts)
    # Every rank writes checkpoints: the directory is on the ReadWriteMany claim, mounted in every pod.
    for pod in [head] + [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]:
        shared = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "l2cluster-shared"}
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in shared]
        assert under(args.checkpoint_dir, mounts), pod["containers"][0]["name"]


# -- ray up ------------------------------------------------------------------------------------------------------------
def test_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (path,) = sorted((DEPLOY / "ray-up").glob("*.yaml"))
    config = yaml.safe_load(path.read_text())
    for field in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "docker",
                  "head_start_ray_commands", "worker_start_ray_commands"):
        assert config.get(field), field
    assert config["provider"]["type"] and config["head_node_type"] in config["available_node_types"]
    validate_config(prepare_config(config))  # the schema `ray up` checks before it touches the cloud

    assert any("RAY_AUTH_MODE=token" in option for option in config["docker"]["run_options"])
    assert any(target.endswith("/.ray/auth_token") for target in config["file_mounts"])
    head = " ; ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    (daemon,) = [c for c in config["head_start_ray_commands"] if c.startswith("l2cluster ")]
    args = parse_l2cluster(daemon)
    assert (args.command, args.action) == ("daemon", "start") and args.address
    volumes = [o.split()[1].split(":")[1] for o in config["docker"]["run_options"] if o.startswith("--volume")]
    assert under(args.store, volumes)  # the store outlives the container


# -- on-prem systemd units ---------------------------------------------------------------------------------------
def unit_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None and key and value, f"{path.name}: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_units_have_what_systemd_requires_and_commands_that_parse():
    onprem = DEPLOY / "onprem"
    units = sorted(onprem.glob("*.service"))
    assert {u.name for u in units} == {"ray-head.service", "ray-worker.service", "l2cluster-daemon.service"}
    env = dict(line.split("=", 1) for line in (onprem / "l2cluster.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"]
    for unit in units:
        sections = unit_sections(unit)
        assert {"Unit", "Service", "Install"} <= set(sections), unit.name
        service = dict(sections["Service"])
        assert service["ExecStart"].startswith("/") and service["EnvironmentFile"] == "/etc/l2cluster/l2cluster.env"
        for value in [v for _, v in sections["Service"]]:
            for var in re.findall(r"(?<!\$)\$\{(\w+)\}", value):
                assert var in env, f"{unit.name}: ${{{var}}} is not set in l2cluster.env"
    daemon = dict(unit_sections(onprem / "l2cluster-daemon.service")["Service"])
    args = parse_l2cluster(daemon["ExecStart"])
    assert (args.command, args.action) == ("daemon", "start") and args.address
    assert parse_l2cluster(daemon["ExecStop"]).action == "stop"
    assert "--head" in dict(unit_sections(onprem / "ray-head.service")["Service"])["ExecStart"]


def test_systemd_accepts_the_units(tmp_path):
    """systemd's own checker, on copies whose executables point at this checkout's."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    bin_dir = str(Path(sys.executable).parent)
    for unit in (DEPLOY / "onprem").glob("*.service"):
        text = unit.read_text().replace("/opt/l2cluster/venv/bin", bin_dir)
        text = text.replace("/etc/l2cluster/l2cluster.env", str(DEPLOY / "onprem" / "l2cluster.env"))
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


# -- the README ----------------------------------------------------------------------------------------------------
def test_deploy_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"):
        assert str(path.relative_to(DEPLOY)) in readme, path
