"""k8s/ renders (base and both overlays, the way `kustomize build` would) into resources the
Kubernetes schema accepts (kubernetes-validate, schemas shipped in the package), and every
service is deployable the way a retailer's cluster needs: probes, requests and limits, a
PodDisruptionBudget, an autoscaler where the service can scale, headless Services for per-call
gRPC balancing, network policies that expose only the gateway; prod on Cassandra and Kafka; a
SQLite ledger is one writer on a persistent volume, never two ledgers behind one Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from fraud_svc.app import decision_overrides, offer_catalogue
from fraud_svc.decide import DecisionConfig
from fraud_svc.offers import DEFAULT_CATALOGUE
from pointmesh.config import load_settings
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
        if name == "ledger" and _store(docs) == "sqlite":
            assert name not in hpas, "a SQLite ledger is a single writer: nothing may scale it"
            continue
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    for name in ("ledger", "rules", "fraud"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"], f"{name} is probed on gRPC health"


def _store(docs: list[dict[str, Any]]) -> str:
    return str(_by(docs, "ConfigMap")["pointmesh-config"]["data"]["POINTMESH_STORE"])


@pytest.mark.parametrize("target", ["base", "dev"])
def test_a_sqlite_ledger_is_one_writer_on_a_volume_that_outlives_the_pod(target: str) -> None:
    docs = render(TARGETS[target])
    assert _store(docs) == "sqlite"
    ledger = _by(docs, "Deployment")["ledger"]
    assert ledger["spec"]["replicas"] == 1
    assert ledger["spec"]["strategy"] == {"type": "Recreate"}, "an update must not start a second writer"
    pod = ledger["spec"]["template"]["spec"]
    data = {v["name"]: v for v in pod["volumes"]}["data"]
    claim = _by(docs, "PersistentVolumeClaim")[data["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["data"] == _by(docs, "ConfigMap")["pointmesh-config"]["data"]["POINTMESH_DATA_DIR"]
    assert pod["securityContext"]["fsGroup"] == pod["containers"][0]["securityContext"]["runAsUser"]
    assert not [
        h for h in _by(docs, "HorizontalPodAutoscaler").values() if h["spec"]["scaleTargetRef"]["name"] == "ledger"
    ]


def test_the_cassandra_ledger_is_stateless_and_scales() -> None:
    docs = render(TARGETS["prod"])
    assert _store(docs) == "cassandra"
    ledger = _by(docs, "Deployment")["ledger"]
    assert ledger["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert {v["name"]: v for v in ledger["spec"]["template"]["spec"]["volumes"]}["data"] == {
        "name": "data",
        "emptyDir": {},
    }
    assert "ledger-data" not in _by(docs, "PersistentVolumeClaim")
    assert _by(docs, "HorizontalPodAutoscaler")["ledger"]["spec"]["minReplicas"] == 3
    assert _by(docs, "PodDisruptionBudget")["ledger"]["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "ledger"}},
    }


@pytest.mark.parametrize("target", list(TARGETS))
def test_rules_replicas_follow_one_leader_that_keeps_the_versions_on_a_volume(target: str) -> None:
    docs = render(TARGETS[target])
    follower = _by(docs, "Deployment")["rules"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in follower["env"]}
    assert env["POINTMESH_GAMIFICATION_CONSUMER"] == "false"
    host, port = env["POINTMESH_RULES_LEADER_ADDR"].split(":")
    service = _by(docs, "Service")[host]
    leader = _by(docs, "StatefulSet")[host]
    assert service["spec"]["selector"] == leader["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert leader["spec"]["replicas"] == 1
    assert host not in {h["spec"]["scaleTargetRef"]["name"] for h in _by(docs, "HorizontalPodAutoscaler").values()}
    container = leader["spec"]["template"]["spec"]["containers"][0]
    assert "POINTMESH_RULES_LEADER_ADDR" not in {e["name"] for e in container["env"]}
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
    assert [t["metadata"]["name"] for t in leader["spec"]["volumeClaimTemplates"]] == ["data"]
    assert {m["name"] for m in container["volumeMounts"]} == {"data"}
    assert _by(docs, "PodDisruptionBudget")[host]["spec"]["selector"] == leader["spec"]["selector"]
    mesh = _by(docs, "NetworkPolicy")["services-from-the-mesh"]["spec"]["podSelector"]["matchExpressions"][0]
    assert host in mesh["values"], "the followers, ledger and gateway must reach the leader"


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


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_gateway_replica_must_get_the_one_member_token_secret(target: str) -> None:
    """Left unset, each gateway pod would sign member tokens with a secret of its own: the pod
    refuses to start without it, and the dev overlay ships a dev-only one."""
    docs = render(TARGETS[target])
    (container,) = _by(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env["POINTMESH_MEMBER_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref.get("optional", False)) == (
        "pointmesh-secrets", "POINTMESH_MEMBER_TOKEN_SECRET", False,
    )  # fmt: skip
    if target == "dev":
        secret = _by(docs, "Secret")["pointmesh-secrets"]
        assert len(secret["stringData"]["POINTMESH_MEMBER_TOKEN_SECRET"]) >= 32


@pytest.mark.parametrize("target", list(TARGETS))
def test_fraud_svc_reads_the_fraud_teams_policy_from_a_config_map_that_states_the_defaults(
    target: str, tmp_path: Path
) -> None:
    """The shipped policy is what the team edits: it must load through fraud_svc's own start-up
    checks, reach the pods as the files the settings name, and change nothing until edited."""
    docs = render(TARGETS[target])
    pod = _by(docs, "Deployment")["fraud"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policy = _by(docs, "ConfigMap")[volumes["policy"]["configMap"]["name"]]["data"]
    for file in policy:
        (tmp_path / file).write_text(policy[file])
    decision, offers = env["POINTMESH_FRAUD_DECISION_FILE"], env["POINTMESH_FRAUD_OFFER_CATALOGUE_FILE"]
    assert {Path(decision).parent, Path(offers).parent} == {Path(mounts["policy"])}
    settings = load_settings(
        {},
        data_dir=tmp_path,
        fraud_decision_file=str(tmp_path / Path(decision).name),
        fraud_offer_catalogue_file=str(tmp_path / Path(offers).name),
    )
    assert DecisionConfig.from_mapping(decision_overrides(settings)) == DecisionConfig()
    assert offer_catalogue(settings) == DEFAULT_CATALOGUE
