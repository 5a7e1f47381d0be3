"""Deployment files: compose against the Compose schema, k8s manifests against the Kubernetes schemas,
the Dockerfile's essentials, and the dashboard's queries naming metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_compose_file_is_valid_and_wires_prometheus_and_grafana():
    jsonschema = pytest.importorskip("jsonschema")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    assert set(compose["services"]) == {"mixserve", "postgres", "prometheus", "grafana"}
    for service in compose["services"].values():  # every mounted file exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose.get("volumes", {}) or (DEPLOY / source).exists(), source
    # The replicas keep their admin state in the compose PostgreSQL, which they wait for.
    mixserve = compose["services"]["mixserve"]
    assert (
        mixserve["environment"]["MIXSERVE_STATE"].startswith("postgresql+psycopg://")
        and "@postgres:5432/" in mixserve["environment"]["MIXSERVE_STATE"]
    )
    assert mixserve["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pgdata" in compose["volumes"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["mixserve:8000"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus" and ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_a_broken_compose_file_is_rejected():
    jsonschema = pytest.importorskip("jsonschema")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["mixserve"]["ports"] = "8000"  # must be a list
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(compose)


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "configmap.yaml", "secret.yaml", "postgres.yaml"])
def test_kubernetes_manifests_validate(name):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        kv.validate(doc, "1.37.0", strict=True)


def test_kubernetes_deployment_probes_pins_token_and_gpu():
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["env"][0] == {"name": "MIXSERVE_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mixserve-admin",
                                                                                          "key": "token"}}}  # fmt: skip
    assert "--pin-file" in c["args"] and "/etc/mixserve/mixes.yaml" in c["args"]
    state = {e["name"]: e for e in c["env"]}["MIXSERVE_STATE"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "secret.yaml").read_text())}
    assert secrets[state["name"]]["stringData"][state["key"]].startswith("postgresql+psycopg://")
    drain = float(c["args"][c["args"].index("--drain-seconds") + 1])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    pins = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]["mixes.yaml"]
    from merging.spec import parse_mix

    for spec in yaml.safe_load(pins).values():
        parse_mix(spec)  # the pinned mixes are valid specs
    monitor = yaml.safe_load((DEPLOY / "k8s" / "podmonitor.yaml").read_text())
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_dockerfile_is_multistage_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") >= 2 and "AS build" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "ARG TORCH_INDEX_URL" in text and "torch==2.13.0" in text
    assert 'mixserve", "serve"' in text


def test_dashboard_matches_its_generator_and_queries_exported_metrics():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = json.loads((DEPLOY / "grafana" / "mixserve.json").read_text())
    assert committed == module.build(), "run: python deploy/grafana/dashboard.py"
    exported = set(
        re.findall(r"\"(mixserve_\w+)\"", (ROOT / "server" / "metrics.py").read_text().replace('p + "', '"mixserve_'))
    )
    for panel in committed["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"mixserve_\w+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert base in exported, f"{panel['title']}: {name} is not exported"
