#!/usr/bin/env python3
"""Validates the Kubernetes manifests without a cluster.

Each overlay is rendered with kustomize (`kubectl kustomize`), then every resource is checked:
- built-in kinds against the Kubernetes OpenAPI schemas shipped by the `kubernetes-validate`
  package, strictly (an unknown or misspelt field is an error), for the oldest and newest
  Kubernetes versions we support;
- KEDA's ScaledObject and the Prometheus operator's ServiceMonitor against the structural
  schemas of their CRDs (deploy/schemas/), made strict the same way;
- the things no schema knows: selectors that match the pods, probes on /ready and /health, a
  grace period that covers the preStop hook plus the request timeout, a GPU limit in the GPU
  variant, and autoscaler queries that use metrics the server really exports.

`--self-test` also breaks a rendered manifest in several ways and fails unless each break is
caught, so a validator that passes everything cannot go unnoticed.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSIONS = ["1.29", "1.37"]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com-v1-servicemonitor.json",
}


def strict(schema):
    """Rejects unknown fields wherever the CRD lists its fields and does not keep unknown ones
    (the API server would silently prune them: a typo would pass unnoticed)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version, kind):
    schema = json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = strict(schema)
    # The API server fills these in; the CRD's schema leaves them out.
    for field in ("apiVersion", "kind", "metadata"):
        schema.setdefault("properties", {}).setdefault(field, {"type": "object" if field == "metadata" else "string"})
    return jsonschema.Draft7Validator(schema)


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def schema_errors(resource):
    key = (resource.get("apiVersion"), resource.get("kind"))
    name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    errors = []
    if key in CRD_SCHEMAS:
        for e in crd_validator(*key).iter_errors(resource):
            path = ".".join(str(p) for p in e.absolute_path)
            errors.append(f"{name}: {path}: {e.message}")
        return errors
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name} (Kubernetes {version}): {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema for {key[0]} {key[1]} in Kubernetes {version}")
    return errors


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def seconds(value):
    return float(value)


def exported_metrics():
    names = set()
    for source in (ROOT / "server" / "src").rglob("*.rs"):
        names.update(re.findall(r'"(rl4pix_[a-z_]+)"', source.read_text()))
    return names


def consistency_errors(overlay, resources):
    errors = []
    by_kind = {}
    for r in resources:
        by_kind.setdefault(r["kind"], []).append(r)
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "ServiceMonitor"]:
        if len(by_kind.get(kind, [])) != 1:
            errors.append(f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if errors:
        return errors
    deployment = by_kind["Deployment"][0]
    service = by_kind["Service"][0]
    pdb = by_kind["PodDisruptionBudget"][0]
    scaled = by_kind["ScaledObject"][0]
    monitor = by_kind["ServiceMonitor"][0]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    if not matches(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("Deployment selector does not match its pod labels")
    if not matches(service["spec"].get("selector", {}), pod_labels):
        errors.append("Service selector does not match the pods")
    if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("PodDisruptionBudget selector does not match the pods")
    if not matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
        errors.append("ServiceMonitor selector does not match the Service")
    service_ports = {p.get("name") for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports:
            errors.append(f"ServiceMonitor scrapes port {endpoint.get('port')!r}, the Service has {sorted(service_ports)}")
        if endpoint.get("path") != "/metrics":
            errors.append("ServiceMonitor must scrape /metrics")
    target = scaled["spec"]["scaleTargetRef"]
    if (target.get("kind"), target.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        errors.append("ScaledObject does not scale the Deployment")
    if scaled["spec"].get("minReplicaCount", 0) < 2:
        errors.append("ScaledObject minReplicaCount below 2 lets a disruption leave no replica")
    known = exported_metrics()
    for trigger in scaled["spec"]["triggers"]:
        query = trigger["metadata"].get("query", "")
        used = set(re.findall(r"rl4pix_[a-z_]+", query))
        if not used:
            errors.append("ScaledObject query uses no rl4pix metric")
        for metric in sorted(used - known):
            errors.append(f"ScaledObject query uses {metric}, which the server does not export")
        namespace = deployment["metadata"].get("namespace")
        for ns in re.findall(r'namespace="([^"]*)"', query):
            if ns != namespace:
                errors.append(f"ScaledObject query selects namespace {ns!r}, the pods run in {namespace!r}")
        threshold = float(trigger["metadata"].get("threshold", "0"))
        if threshold <= 0:
            errors.append("ScaledObject threshold must be positive")
    containers = pod["spec"]["containers"]
    server = next((c for c in containers if c["name"] == "server"), None)
    if server is None:
        return errors + ["no container named server"]
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    port_names = {p.get("name"): p.get("containerPort") for p in server.get("ports", [])}
    if str(port_names.get("http")) != env.get("RL4PIX_PORT"):
        errors.append("container port `http` differs from RL4PIX_PORT")
    if server.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
        errors.append("readiness probe must be GET /ready")
    if server.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
        errors.append("liveness probe must be GET /health")
    pre_stop = server.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) != 2 or command[0] != "sleep":
        errors.append("preStop must be `sleep N` (lets endpoint removal reach every proxy before SIGTERM)")
        pre_stop_s = 0.0
    else:
        pre_stop_s = seconds(command[1])
    timeout_s = seconds(env.get("RL4PIX_REQUEST_TIMEOUT_S") or 300)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < pre_stop_s + timeout_s:
        errors.append(
            f"terminationGracePeriodSeconds {grace} < preStop {pre_stop_s:g} s + request timeout {timeout_s:g} s: SIGKILL could cut admitted edits"
        )
    strategy = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    if strategy.get("maxUnavailable") not in (0, "0", "0%"):
        errors.append("rolling update must keep maxUnavailable 0")
    limits = server.get("resources", {}).get("limits", {})
    wants_gpu = (env.get("RL4PIX_DEVICE") or "cpu").startswith("cuda")
    has_gpu = int(limits.get("nvidia.com/gpu", 0)) > 0
    if overlay == "gpu" and not (wants_gpu and has_gpu):
        errors.append("the GPU variant needs RL4PIX_DEVICE=cuda:N and an nvidia.com/gpu limit")
    if overlay != "gpu" and (wants_gpu or has_gpu):
        errors.append("a CPU variant asks for a GPU")
    if "memory" not in limits or "memory" not in server.get("resources", {}).get("requests", {}):
        errors.append("the server needs memory requests and limits")
    return errors


def check(overlay, resources):
    errors = []
    for r in resources:
        errors += schema_errors(r)
    errors += consistency_errors(overlay, resources)
    return errors


def self_test(resources):
    """Each break must be caught; returns the breaks that were not."""

    def server_of(rs):
        d = next(r for r in rs if r["kind"] == "Deployment")
        return d, d["spec"]["template"]["spec"]["containers"][0]

    def typo_field(rs):
        _, c = server_of(rs)
        c["readinessProbe"]["httpGet"]["paht"] = c["readinessProbe"]["httpGet"].pop("path")

    def wrong_type(rs):
        d, _ = server_of(rs)
        d["spec"]["replicas"] = "two"

    def crd_typo(rs):
        so = next(r for r in rs if r["kind"] == "ScaledObject")
        so["spec"]["pollingIntervall"] = so["spec"].pop("pollingInterval")

    def monitor_typo(rs):
        sm = next(r for r in rs if r["kind"] == "ServiceMonitor")
        sm["spec"]["endpoints"][0]["intervall"] = "15s"

    def short_grace(rs):
        d, _ = server_of(rs)
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    def unknown_metric(rs):
        so = next(r for r in rs if r["kind"] == "ScaledObject")
        so["spec"]["triggers"][0]["metadata"]["query"] = "sum(rl4pix_queue_length)"

    def selector_miss(rs):
        s = next(r for r in rs if r["kind"] == "Service")
        s["spec"]["selector"] = {"app.kubernetes.io/name": "other"}

    def no_gpu(rs):
        _, c = server_of(rs)
        c["resources"]["limits"].pop("nvidia.com/gpu", None)

    missed = []
    for brk in [typo_field, wrong_type, crd_typo, monitor_typo, short_grace, unknown_metric, selector_miss, no_gpu]:
        broken = copy.deepcopy(resources)
        brk(broken)
        errors = check("gpu", broken)
        if not errors:
            missed.append(brk.__name__)
        elif "--verbose" in sys.argv:
            print(f"     {brk.__name__}: {errors[0]}")
    return missed


def main():
    failed = False
    rendered = {}
    for overlay in OVERLAYS:
        resources = render(overlay)
        rendered[overlay] = resources
        errors = check(overlay, resources)
        kinds = ", ".join(sorted(r["kind"] for r in resources))
        if errors:
            failed = True
            print(f"FAIL {overlay}: {len(errors)} problem(s)")
            for e in errors:
                print(f"  {e}")
        else:
            print(f"ok   {overlay}: {len(resources)} resources valid ({kinds}); Kubernetes {' and '.join(KUBERNETES_VERSIONS)}")
    if "--self-test" in sys.argv:
        missed = self_test(rendered["gpu"])
        if missed:
            failed = True
            print(f"FAIL self-test: these broken manifests passed: {', '.join(missed)}")
        else:
            print("ok   self-test: 8 deliberately broken manifests were all refused")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
