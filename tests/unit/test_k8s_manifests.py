"""deploy/k8s, checked without a cluster: every overlay (and example) is rendered with ``kubectl kustomize``,
then

* every standard object is validated against the Kubernetes 1.30 schema, strictly (an unknown field
  fails), with ``kubernetes-validate`` (it ships its schemas: no network);
* every KEDA ScaledObject / TriggerAuthentication and Prometheus Operator PodMonitor is validated against
  the openAPIV3Schema of its CRD, vendored verbatim in deploy/k8s/schemas/ (the header names the upstream
  file; its git blob hash is checked here), with ``jsonschema``; made strict the same way (an unknown field
  fails, as the API server's strict field validation does), and with the CRD's one CEL rule checked here;
* what the manifests must mean for mgpu holds: the mgpu command lines parse and their settings load with
  mgpu's own CLI and settings classes; the workers get more time than their drain grace; probes hit
  /ready and /health on the ports the settings open; each ScaledObject watches exactly the streams of its
  Deployment's model (``common.keys``) in group ``keys.GROUP``, in lag mode with activation at 0, with
  targets equal to the worker's slots, and may go to zero; the gpu overlay asks for nvidia.com/gpu;
* the negative cases fail: the checks bite.

kubectl missing: the rendering tests skip and say so; the others still run.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.keys import GROUP, LANES, Keys
from common.settings import GatewaySettings, MgpuSettings, WorkerSettings, env_name
from gateway.routes import router
from ops.cli import COMMANDS, parse_command

Doc = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "sim")
TARGETS = {
    "base": K8S / "base",
    **{o: K8S / "overlays" / o for o in OVERLAYS},
    "example-redis-sentinel": K8S / "examples" / "redis-sentinel",
    "example-redis-cluster": K8S / "examples" / "redis-cluster",
    "example-second-model": K8S / "examples" / "second-model",
}
KUBE_VERSION = "1.30"
CRD_FILES = ("keda.sh_scaledobjects.yaml", "keda.sh_triggerauthentications.yaml",
             "monitoring.coreos.com_podmonitors.yaml")
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "mgpu.json"
DASHBOARD_COPY = K8S / "base" / "dashboards" / "mgpu.json"

# KEDA v2.20.2's Redis scalers read these names (pkg/scalers/redis_streams_scaler.go, redis_scaler.go, the
# `keda:"name=..."` tags).  KEDA ignores any other name, so a misspelt one would silently change the mode
# (no lagCount: pending mode, which never scales from zero): a name outside these fails here.
REDIS_CONNECTION = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                    "sentinelUsername", "sentinelPassword", "sentinelMaster"}
STREAMS_METADATA = {"stream", "consumerGroup", "lagCount", "pendingEntriesCount", "streamLength",
                    "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl", *REDIS_CONNECTION}
REDIS_AUTH_PARAMS = {"tls", "cert", "Cert", "key", "keyPassword", "ca", *REDIS_CONNECTION}
STREAMS_TRIGGERS = {"redis-streams", "redis-sentinel-streams", "redis-cluster-streams"}

KUBECTL = shutil.which("kubectl")
if KUBECTL is None and os.environ.get("MGPU_REQUIRE_KUBECTL"):  # CI (.ci/run): render or fail, never skip
    raise RuntimeError("MGPU_REQUIRE_KUBECTL is set but kubectl is not on PATH: deploy/k8s cannot be rendered")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (on PATH): deploy/k8s is "
                                   "rendered with `kubectl kustomize`, so its checks cannot run here")


# ----------------------------------------------------------------------------- rendering and schemas


@cache
def _rendered(target: str) -> tuple[Doc, ...]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(TARGETS[target])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {TARGETS[target].relative_to(ROOT)}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str) -> list[Doc]:
    """The objects of ``target``, rendered once per session; a copy, free to change."""
    return copy.deepcopy(list(_rendered(target)))


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields: ``additionalProperties: false`` wherever an object lists
    its properties and neither allows a map nor preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _vendored(name: str) -> tuple[str, str]:
    """A vendored CRD file's upstream text (without the header comment) and the git blob it names."""
    lines = (K8S / "schemas" / name).read_text().split("\n")
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))  # the header: the leading comments
    m = re.search(r"git blob ([0-9a-f]{40})", "\n".join(lines[:n]))
    assert m, f"deploy/k8s/schemas/{name}: its header must name the upstream git blob"
    return "\n".join(lines[n:]), m.group(1)


@cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of every served version of the vendored CRDs."""
    out = {}
    for name in CRD_FILES:
        crd = yaml.safe_load(_vendored(name)[0])
        for v in crd["spec"]["versions"]:
            if v.get("served", True):
                api = f"{crd['spec']['group']}/{v['name']}"
                out[(api, crd["spec"]["names"]["kind"])] = _strict(v["schema"]["openAPIV3Schema"])
    return out


def schema_errors(doc: Doc) -> list[str]:
    """What is wrong with ``doc`` against its schema (Kubernetes' own, or its vendored CRD's)."""
    kind = (doc.get("apiVersion", ""), doc.get("kind", ""))
    where = f"{kind[1]}/{doc.get('metadata', {}).get('name')}"
    if kind in crd_schemas():
        validator = jsonschema.Draft7Validator(crd_schemas()[kind])
        errors = [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        spec = doc.get("spec", {})
        if kind[1] == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            errors.append(f"{where}: minReplicaCount must be less than or equal to maxReplicaCount")  # CEL rule
        return errors
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: no schema: {e.message}"]
    return []


# ----------------------------------------------------------------------------- what the manifests mean


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"no single {kind}/{name} among {[d['metadata']['name'] for d in of_kind(docs, kind)]}"
    return found[0]


def mgpu_container(deployment: Doc) -> Doc:
    """The Deployment's one container, which runs the mgpu image."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1 and containers[0]["image"].split(":")[0].endswith("mgpu"), containers
    container: Doc = containers[0]
    return container


REDIS_URL = "redis://:placeholder@redis.example:6379/0"
SENTINEL_URL = "redis+sentinel://:placeholder@sentinel-a.example:26379,sentinel-b.example:26379/mymaster/0"


def _placeholder(var: Doc, url: str) -> str:
    """A stand-in for a value Kubernetes fills in at run time (a Secret's, the pod's name)."""
    ref = var["valueFrom"]
    if "secretKeyRef" in ref:
        return url if ref["secretKeyRef"]["key"] == "url" else "p" * 32
    return "mgpu-worker-0123456789-abcde"


def settings_of(deployment: Doc, url: str = REDIS_URL) -> tuple[str, MgpuSettings]:
    """The mgpu subcommand the Deployment runs and its settings, loaded by mgpu's own parser from the
    container's arguments and environment (Secret values, ``url`` the Redis URL, and the pod name stood in
    for)."""
    c = mgpu_container(deployment)
    env = {v["name"]: v["value"] if "value" in v else _placeholder(v, url) for v in c.get("env", [])}
    ns, s = parse_command(list(c["args"]), env)
    return ns.cmd, s


def _port(container: Doc, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name_or_number in ports, f"no container port named {name_or_number!r}: {ports}"
    return int(ports[name_or_number])


def slug(model: str) -> str:
    """A model name as a Kubernetes name part: lower case, anything else than [a-z0-9-] a dash."""
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


def scaledobject_problems(so: Doc, docs: list[Doc]) -> list[str]:
    """Why ``so`` does not scale its model's workers as mgpu needs (empty: it does)."""
    p: list[str] = []
    spec, name = so["spec"], so["metadata"]["name"]
    target = spec.get("scaleTargetRef", {})
    deployments = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == target.get("name")]
    if target.get("kind", "Deployment") != "Deployment" or len(deployments) != 1:
        return [f"{name}: scaleTargetRef {target} is not one Deployment of this rendering"]
    cmd, s = settings_of(deployments[0])
    if cmd != "worker" or not isinstance(s, WorkerSettings):
        return [f"{name}: scales `mgpu {cmd}`, not workers"]
    triggers = spec.get("triggers", [])
    # on a Redis Cluster the streams carry hash tags (common/keys.py): KEDA's cluster scaler reads those
    keys = Keys(s.namespace, cluster={t.get("type") for t in triggers} == {"redis-cluster-streams"})
    slots = str(s.slots)
    if name != f"mgpu-worker-{slug(s.model)}":
        p.append(f"{name}: a model's ScaledObject is named mgpu-worker-{slug(s.model)}")
    if spec.get("minReplicaCount") != 0:
        p.append(f"{name}: minReplicaCount {spec.get('minReplicaCount')}, not 0")
    types = {t.get("type") for t in triggers}
    if len(types) != 1 or not types <= STREAMS_TRIGGERS:
        p.append(f"{name}: trigger types {sorted(map(str, types))}: one of {sorted(STREAMS_TRIGGERS)}, all alike")
    lag = [t["metadata"] for t in triggers if "lagCount" in t.get("metadata", {})]
    pending = [t["metadata"] for t in triggers if "lagCount" not in t.get("metadata", {})]
    if sorted(m.get("stream", "") for m in lag) != sorted(keys.lanes(s.model)):
        p.append(f"{name}: lag triggers on {sorted(m.get('stream', '') for m in lag)}, not the model's "
                 f"stream and lanes {keys.lanes(s.model)}")
    if sorted(m.get("stream", "") for m in pending) != sorted(keys.lanes(s.model)):
        p.append(f"{name}: pending triggers on {sorted(m.get('stream', '') for m in pending)}, not "
                 f"{keys.lanes(s.model)}")
    for t in triggers:
        m, tn = t.get("metadata", {}), t.get("name", "?")
        if set(m) - STREAMS_METADATA:
            p.append(f"{name}/{tn}: metadata KEDA does not read: {sorted(set(m) - STREAMS_METADATA)}")
        if m.get("consumerGroup") != GROUP:
            p.append(f"{name}/{tn}: consumerGroup {m.get('consumerGroup')!r}, not {GROUP!r}")
        if m.get("activationLagCount") != "0":
            p.append(f"{name}/{tn}: activationLagCount {m.get('activationLagCount')!r}, not '0'")
        if "lagCount" in m and (m["lagCount"] != slots or "pendingEntriesCount" in m):
            p.append(f"{name}/{tn}: lagCount {m['lagCount']!r}: the worker's slots, {slots}, and nothing else")
        if "lagCount" not in m and m.get("pendingEntriesCount") != slots:
            p.append(f"{name}/{tn}: pendingEntriesCount {m.get('pendingEntriesCount')!r}, not the slots {slots}")
        auth = t.get("authenticationRef", {}).get("name")
        if auth not in {d["metadata"]["name"] for d in of_kind(docs, "TriggerAuthentication")}:
            p.append(f"{name}/{tn}: authenticationRef {auth!r} is not a TriggerAuthentication of this rendering")
    return p


def worker_problems(deployment: Doc) -> list[str]:
    """Why a worker Deployment would lose work or not be watched (empty: it is fine)."""
    name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
    c = mgpu_container(deployment)
    _, s = settings_of(deployment)
    assert isinstance(s, WorkerSettings)
    p = []
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not grace > s.drain_grace_s:
        p.append(f"{name}: terminationGracePeriodSeconds {grace} is not above the drain grace {s.drain_grace_s:g}")
    if s.metrics_port == 0 or s.metrics_host in ("127.0.0.1", "localhost", "::1"):
        p.append(f"{name}: metrics on {s.metrics_host}:{s.metrics_port}: neither the kubelet nor Prometheus "
                 "reaches it")
    live = c.get("livenessProbe", {}).get("httpGet", {})
    if live.get("path") != "/health" or _port(c, live.get("port", 0)) != s.metrics_port:
        p.append(f"{name}: livenessProbe {live}: /health on the metrics port {s.metrics_port}")
    if _port(c, "metrics") != s.metrics_port:
        p.append(f"{name}: container port 'metrics' is not MGPU_METRICS_PORT {s.metrics_port}")
    labels = deployment["spec"]["selector"]["matchLabels"]
    if labels.get("mgpu/model") != slug(s.model):
        p.append(f"{name}: selector label mgpu/model {labels.get('mgpu/model')!r}, not {slug(s.model)!r}")
    return p


def gateway_problems(deployment: Doc) -> list[str]:
    name, c = deployment["metadata"]["name"], mgpu_container(deployment)
    _, s = settings_of(deployment)
    assert isinstance(s, GatewaySettings)
    s.check_exposure()
    p = []
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or _port(c, get.get("port", 0)) != s.probe_port:
            p.append(f"{name}: {probe} {get}: {path} on the probe port {s.probe_port}")
    if _port(c, "http") != s.port:
        p.append(f"{name}: container port 'http' is not MGPU_PORT {s.port}")
    if s.auth != "keys":
        p.append(f"{name}: auth {s.auth}: a gateway in a cluster checks API keys")
    return p


# ----------------------------------------------------------------------------- tests: files


def test_the_dashboard_copy_is_ops_grafanas_byte_for_byte() -> None:
    assert DASHBOARD_COPY.read_bytes() == DASHBOARD.read_bytes(), (
        f"{DASHBOARD_COPY.relative_to(ROOT)} differs from {DASHBOARD.relative_to(ROOT)}: "
        f"cp {DASHBOARD.relative_to(ROOT)} {DASHBOARD_COPY.relative_to(ROOT)}")


@pytest.mark.parametrize("name", CRD_FILES)
def test_vendored_crds_are_the_upstream_files(name: str) -> None:
    body, blob = _vendored(name)
    data = body.encode()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{name} was edited"
    assert yaml.safe_load(body)["kind"] == "CustomResourceDefinition"


def test_the_example_secrets_validate_and_hold_every_key_the_manifests_read() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "secrets.example.yaml").read_text()) if d]
    assert [e for d in docs for e in schema_errors(d)] == []
    keys = {(d["metadata"]["name"], k) for d in docs for k in d["stringData"]}
    if KUBECTL is not None:
        for o in OVERLAYS:
            docs = render(o)
            used = {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                    for d in of_kind(docs, "Deployment") for v in mgpu_container(d).get("env", [])
                    if "secretKeyRef" in v.get("valueFrom", {})}
            used |= {(r["name"], r["key"]) for t in of_kind(docs, "TriggerAuthentication")
                     for r in t["spec"]["secretTargetRef"]}
            assert used <= keys, f"{o}: read but not in the example: {sorted(used - keys)}"


# ----------------------------------------------------------------------------- tests: rendered


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest) -> str:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (on PATH): deploy/k8s is rendered with `kubectl kustomize`")
    return str(request.param)


def test_every_object_validates_against_its_schema(target: str) -> None:
    docs = render(target)
    assert docs
    assert [e for d in docs for e in schema_errors(d)] == []
    assert {d["metadata"].get("namespace") for d in docs} == {"mgpu"}  # the Secrets' and KEDA's namespace


def test_mgpu_commands_parse_and_their_settings_load(target: str) -> None:
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and yaml.safe_load(entrypoint.group(1))[-1] == "mgpu"  # args are mgpu's arguments
    for d in of_kind(render(target), "Deployment"):
        c = mgpu_container(d)
        assert "command" not in c, "keep the image's entrypoint (tini, which hands SIGTERM on)"
        cmd, _ = settings_of(d)  # loads: the values are valid settings
        known = {env_name(f) for f in COMMANDS[cmd].settings.model_fields}
        unknown = {v["name"] for v in c["env"] if v["name"].startswith("MGPU_")} - known
        assert not unknown, f"{d['metadata']['name']}: not settings of mgpu {cmd}: {sorted(unknown)}"
        assert "replicas" not in d["spec"], "an autoscaler owns replicas: a value would reset it on each apply"
        problems = {"gateway": gateway_problems, "worker": worker_problems}[cmd](d)
        assert problems == [], shlex.join(c["args"])


def test_gateway_service_pdb_and_hpa(target: str) -> None:
    docs = render(target)
    (gw,) = [d for d in of_kind(docs, "Deployment") if settings_of(d)[0] == "gateway"]
    pods = gw["spec"]["template"]["metadata"]["labels"]
    svc = named(docs, "Service", "mgpu-gateway")
    assert svc["spec"]["selector"].items() <= pods.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http"}  # the API, not the probe listener
    pdb = named(docs, "PodDisruptionBudget", "mgpu-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods.items()
    hpa = named(docs, "HorizontalPodAutoscaler", "mgpu-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": gw["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert mgpu_container(gw)["resources"]["requests"]["cpu"]  # what the CPU utilization is of
    assert {r.path for r in router.routes} >= {"/health", "/ready"}  # type: ignore[attr-defined]


def test_each_model_has_a_scaledobject_on_its_streams(target: str) -> None:
    docs = render(target)
    workers = [d for d in of_kind(docs, "Deployment") if settings_of(d)[0] == "worker"]
    sos = of_kind(docs, "ScaledObject")
    assert sorted(so["spec"]["scaleTargetRef"]["name"] for so in sos) == sorted(
        w["metadata"]["name"] for w in workers), "one ScaledObject per worker Deployment"
    for so in sos:
        assert scaledobject_problems(so, docs) == []
        assert len(so["spec"]["triggers"]) == 2 * LANES
        w = named(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        _, s = settings_of(w)
        assert isinstance(s, WorkerSettings)
        lane0 = [t for t in so["spec"]["triggers"] if t["name"] == "lag-lane-0"]
        cluster = lane0[0]["type"] == "redis-cluster-streams"
        assert lane0[0]["metadata"]["stream"] == Keys(s.namespace, cluster=cluster).stream(s.model)
    for ta in of_kind(docs, "TriggerAuthentication"):
        params = {r["parameter"] for r in ta["spec"]["secretTargetRef"]}
        assert params <= REDIS_AUTH_PARAMS and "password" in params and len(params & {"address", "addresses"}) == 1
        urls = {v["valueFrom"]["secretKeyRef"]["name"] for d in of_kind(docs, "Deployment")
                for v in mgpu_container(d)["env"] if v["name"] == "MGPU_REDIS_URL"}
        assert {r["name"] for r in ta["spec"]["secretTargetRef"]} == urls  # the Redis mgpu itself uses


def test_podmonitors_scrape_every_mgpu_pod_as_ops_prometheus_names_it(target: str) -> None:
    docs = render(target)
    prom = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"]: c for c in prom["scrape_configs"]}
    scraped: dict[str, str] = {}
    for pm in of_kind(docs, "PodMonitor"):
        (ep,) = pm["spec"]["podMetricsEndpoints"]
        (job,) = [r["replacement"] for r in ep["relabelings"] if r.get("targetLabel") == "job"]
        assert job in jobs and ep["path"] == "/metrics"
        for d in of_kind(docs, "Deployment"):
            if pm["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items():
                cmd, s = settings_of(d)
                port = s.probe_port if isinstance(s, GatewaySettings) else getattr(s, "metrics_port", None)
                assert _port(mgpu_container(d), ep["port"]) == port, f"{pm['metadata']['name']} on {cmd}"
                scraped[d["metadata"]["name"]] = job
    assert set(scraped) == {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert set(scraped.values()) == set(jobs)


def test_the_dashboard_configmap_is_the_dashboard(target: str) -> None:
    cm = named(render(target), "ConfigMap", "mgpu-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {"mgpu.json": DASHBOARD.read_text()}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_runs_its_engine_where_it_should(overlay: str) -> None:
    docs = render(overlay)
    workers = [d for d in of_kind(docs, "Deployment") if settings_of(d)[0] == "worker"]
    assert len(workers) == 1
    w = workers[0]
    _, s = settings_of(w)
    assert isinstance(s, WorkerSettings)
    c = mgpu_container(w)
    gpus = {k: str(c["resources"].get(k, {}).get("nvidia.com/gpu", "")) for k in ("requests", "limits")}
    image_tag = c["image"].rsplit(":", 1)[-1]
    if overlay == "gpu":
        assert s.engine == "vllm" and image_tag == "gpu" and s.gpu == 0
        assert gpus == {"requests": "1", "limits": "1"}, "one GPU per worker, requested and limited"
        assert any(t.get("key") == "nvidia.com/gpu" for t in w["spec"]["template"]["spec"].get("tolerations", []))
    else:
        assert gpus == {"requests": "", "limits": ""} and s.gpu is None
        assert s.engine == ("sim" if overlay == "sim" else "vllm") and image_tag == "cpu"
    if overlay == "cpu":
        assert s.vllm_enforce_eager
    gw = [d for d in of_kind(docs, "Deployment") if settings_of(d)[0] == "gateway"]
    assert mgpu_container(gw[0])["image"] == "mgpu:cpu"  # the gateway needs no CUDA


@needs_kubectl
def test_the_sentinel_component_switches_every_trigger() -> None:
    docs = render("example-redis-sentinel")
    (so,) = of_kind(docs, "ScaledObject")
    assert {t["type"] for t in so["spec"]["triggers"]} == {"redis-sentinel-streams"}
    (ta,) = of_kind(docs, "TriggerAuthentication")
    assert "sentinelMaster" in {r["parameter"] for r in ta["spec"]["secretTargetRef"]}
    assert {t["type"] for t in of_kind(render("sim"), "ScaledObject")[0]["spec"]["triggers"]} == {"redis-streams"}
    for d in of_kind(docs, "Deployment"):  # mgpu takes the Sentinel URL the component's Secret holds
        settings_of(d, url=SENTINEL_URL)


@needs_kubectl
def test_the_cluster_component_switches_every_trigger_to_the_tagged_streams() -> None:
    docs = render("example-redis-cluster")
    (so,) = of_kind(docs, "ScaledObject")
    assert {t["type"] for t in so["spec"]["triggers"]} == {"redis-cluster-streams"}
    (ta,) = of_kind(docs, "TriggerAuthentication")
    assert {r["parameter"]: r["key"] for r in ta["spec"]["secretTargetRef"]} == {"addresses": "addresses",
                                                                                  "password": "password"}
    for d in of_kind(docs, "Deployment"):  # mgpu takes the Cluster URL the component's Secret holds
        cmd, s = settings_of(d, url="redis+cluster://:placeholder@node-a.example:6379,node-b.example:6379")
        assert s.keys.cluster  # type: ignore[attr-defined]
        if cmd == "worker":
            assert isinstance(s, WorkerSettings)
            want = s.keys.lanes(s.model)
            assert sorted(t["metadata"]["stream"] for t in so["spec"]["triggers"]) == sorted(want * 2)
            assert all("{" + s.model + "}" in x for x in want)
    assert scaledobject_problems(so, docs) == []


@needs_kubectl
def test_a_second_model_gets_its_own_workers_and_streams() -> None:
    docs = render("example-second-model")
    models = {}
    for so in of_kind(docs, "ScaledObject"):
        _, s = settings_of(named(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"]))
        assert isinstance(s, WorkerSettings)
        models[s.model] = {t["metadata"]["stream"] for t in so["spec"]["triggers"]}
    assert set(models) == {"SmolLM2-135M-Instruct", "sim-large"}
    assert not models["SmolLM2-135M-Instruct"] & models["sim-large"]
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in of_kind(docs, "Deployment")]
    assert len(set(selectors)) == len(selectors), "two Deployments must not select each other's pods"


# ----------------------------------------------------------------------------- tests: the checks bite


def _mutations() -> Iterator[tuple[str, str, Callable[[Doc], None]]]:
    def at(doc: Doc, path: str) -> tuple[Any, Any]:
        """The node holding the last step of a dotted path (numbers index lists), and that step."""
        *parents, last = (int(p) if p.isdigit() else p for p in path.split("."))
        node: Any = doc
        for p in parents:
            node = node[p]
        return node, last

    def setter(path: str, value: Any) -> Callable[[Doc], None]:
        def mutate(doc: Doc) -> None:
            node, last = at(doc, path)
            node[last] = value
        return mutate

    def drop(path: str) -> Callable[[Doc], None]:
        def mutate(doc: Doc) -> None:
            node, last = at(doc, path)
            del node[last]
        return mutate

    yield "Deployment", "replicas as a string", setter("spec.replicas", "two")
    yield "Deployment", "an unknown field", setter("spec.template.spec.containers.0.livenessProbe.httpGett", {})
    yield "Deployment", "a port number as a string", setter("spec.template.spec.containers.0.ports.0.containerPort",
                                                            "8000")
    yield "HorizontalPodAutoscaler", "autoscaling/v1 fields in v2", setter("spec.targetCPUUtilizationPercentage", 70)
    yield "Service", "a port as a list", setter("spec.ports.0.port", [8000])
    yield "ScaledObject", "no scaleTargetRef", drop("spec.scaleTargetRef")
    yield "ScaledObject", "a metadata value not a string", setter("spec.triggers.0.metadata.lagCount", 32)
    yield "ScaledObject", "a trigger without a type", drop("spec.triggers.0.type")
    yield "ScaledObject", "an unknown spec field", setter("spec.minReplicas", 0)
    yield "ScaledObject", "minReplicaCount above maxReplicaCount", setter("spec.minReplicaCount", 9)
    yield "TriggerAuthentication", "secretTargetRef without its key", drop("spec.secretTargetRef.0.key")
    yield "PodMonitor", "no selector", drop("spec.selector")
    yield "PodMonitor", "an unknown endpoint field", setter("spec.podMetricsEndpoints.0.prot", "metrics")


MUTATIONS = list(_mutations())


@needs_kubectl
@pytest.mark.parametrize(("kind", "what", "mutate"), MUTATIONS, ids=[f"{k}: {w}" for k, w, _ in MUTATIONS])
def test_schema_validation_refuses(kind: str, what: str, mutate: Callable[[Doc], None]) -> None:
    doc = of_kind(render("gpu"), kind)[0]
    assert schema_errors(doc) == []
    mutate(doc)
    assert schema_errors(doc), f"{kind} with {what} passed validation"


def _trigger_mutations() -> Iterator[tuple[str, Callable[[Doc], None]]]:
    def each(f: Callable[[Doc], None]) -> Callable[[Doc], None]:
        def mutate(so: Doc) -> None:
            for t in so["spec"]["triggers"]:
                f(t)
        return mutate

    def first(f: Callable[[Doc], None]) -> Callable[[Doc], None]:
        return lambda so: f(so["spec"]["triggers"][0])

    yield "an unknown trigger type", first(lambda t: t.update(type="redis-streamz"))
    yield "a misspelt metadata name", first(lambda t: t["metadata"].update(lagcount=t["metadata"].pop("lagCount")))
    yield "another model's stream", first(lambda t: t["metadata"].update(stream="mgpu:q:other"))
    yield "a lane left out", lambda so: so["spec"].update(triggers=so["spec"]["triggers"][1:])
    yield "another consumer group", each(lambda t: t["metadata"].update(consumerGroup="readers"))
    yield "activation above 0", first(lambda t: t["metadata"].update(activationLagCount="1"))
    yield "a target that is not the slots", first(lambda t: t["metadata"].update(lagCount="5"))
    yield "never to zero", lambda so: so["spec"].update(minReplicaCount=1)
    yield "another Deployment", lambda so: so["spec"]["scaleTargetRef"].update(name="mgpu-gateway")
    yield "no TriggerAuthentication", each(lambda t: t["authenticationRef"].update(name="nope"))


TRIGGER_MUTATIONS = list(_trigger_mutations())


@needs_kubectl
@pytest.mark.parametrize(("what", "mutate"), TRIGGER_MUTATIONS, ids=[w for w, _ in TRIGGER_MUTATIONS])
def test_the_scaledobject_check_refuses(what: str, mutate: Callable[[Doc], None]) -> None:
    docs = render("sim")
    (so,) = of_kind(docs, "ScaledObject")
    assert scaledobject_problems(so, docs) == []
    mutate(so)
    assert scaledobject_problems(so, docs), f"a ScaledObject with {what} passed"


@needs_kubectl
def test_the_worker_check_refuses_a_grace_period_within_the_drain() -> None:
    docs = render("gpu")
    w = named(docs, "Deployment", "mgpu-worker")
    assert worker_problems(w) == []
    w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60  # = MGPU_DRAIN_GRACE_S: no time to stop
    assert any("terminationGracePeriodSeconds" in p for p in worker_problems(w))
    for v in mgpu_container(w)["env"]:
        if v["name"] == "MGPU_DRAIN_GRACE_S":
            v["value"] = "30"
    assert worker_problems(w) == []  # read from the rendered environment, not assumed


@needs_kubectl
def test_the_gateway_check_refuses_probes_on_the_wrong_path_or_port() -> None:
    gw = named(render("cpu"), "Deployment", "mgpu-gateway")
    assert gateway_problems(gw) == []
    c = gw["spec"]["template"]["spec"]["containers"][0]
    c["readinessProbe"]["httpGet"]["path"] = "/health"
    assert gateway_problems(gw)
    c["readinessProbe"]["httpGet"]["path"] = "/ready"
    c["livenessProbe"]["httpGet"]["port"] = "http"  # the API port, which a flood can starve
    assert gateway_problems(gw)
