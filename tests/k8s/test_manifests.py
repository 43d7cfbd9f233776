"""k8s/ renders (base and both overlays, the way `kustomize build` would) into resources the
Kubernetes schema accepts (kubernetes-validate, schemas shipped in the package), and every
service is deployable the way a retailer's cluster needs: probes, requests and limits, a
PodDisruptionBudget, an autoscaler, headless Services for per-call gRPC balancing, network
policies that expose only the gateway; prod on Cassandra and Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.k8s.render import render

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBERNETES = "1.30.0"
SERVICES = ("ledger", "rules", "fraud", "gateway")
TARGETS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_rendered_resource_validates_against_the_kubernetes_schema(target: str) -> None:
    docs = render(TARGETS[target])
    assert len(docs) > 20
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_broken_resource_is_refused() -> None:
    deployment = _by(render(TARGETS["base"]), "Deployment")["ledger"]
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_service_has_probes_limits_a_pdb_and_an_autoscaler(target: str) -> None:
    docs = render(TARGETS[target])
    deployments, pdbs, hpas = (
        _by(docs, "Deployment"),
        _by(docs, "PodDisruptionBudget"),
        _by(docs, "HorizontalPodAutoscaler"),
    )
    assert set(SERVICES) <= set(deployments)
    for name in SERVICES:
        pod = deployments[name]["spec"]["template"]
        for container in pod["spec"]["containers"]:
            assert {"readinessProbe", "livenessProbe"} <= set(container), f"{name} lacks probes"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        selector = deployments[name]["spec"]["selector"]["matchLabels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == selector
        assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    for name in ("ledger", "rules", "fraud"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"], f"{name} is probed on gRPC health"


def test_grpc_services_are_headless_and_only_the_gateway_is_reachable_from_outside() -> None:
    docs = render(TARGETS["prod"])
    services = _by(docs, "Service")
    assert all(services[n]["spec"]["clusterIP"] == "None" for n in ("ledger", "rules", "fraud", "redis"))
    assert services["gateway"]["spec"]["type"] == "LoadBalancer"
    policies = _by(docs, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    open_to_all = [p for p in policies.values() if any("from" not in rule for rule in p["spec"].get("ingress", []))]
    assert [p["spec"]["podSelector"] for p in open_to_all] == [{"matchLabels": {"app.kubernetes.io/name": "gateway"}}]


def test_prod_runs_on_cassandra_and_kafka_and_dev_on_the_embedded_defaults() -> None:
    prod = _by(render(TARGETS["prod"]), "ConfigMap")["pointmesh-config"]["data"]
    assert (prod["POINTMESH_STORE"], prod["POINTMESH_EVENT_BUS"]) == ("cassandra", "kafka")
    assert prod["POINTMESH_REDIS_URL"].startswith("redis://")  # merged, not replaced
    assert "ledger-migrate" in _by(render(TARGETS["prod"]), "Job")
    dev = render(TARGETS["dev"])
    assert _by(dev, "ConfigMap")["pointmesh-config"]["data"]["POINTMESH_STORE"] == "sqlite"
    assert {d["metadata"].get("namespace") for d in dev} == {"pointmesh-dev"}
    assert all(d["spec"]["replicas"] == 1 for d in _by(dev, "Deployment").values())
