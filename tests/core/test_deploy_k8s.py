"""deploy/k8s/ validated offline: built-in kinds against the Kubernetes 1.37 schemas
(`kubernetes-validate`, strict), the InferencePool and RayService custom resources against
the fields of their published v1 APIs (pod templates inside them against Kubernetes' own
PodTemplate schema), and the settings they pass to loraplex against `ServerSettings`."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loraplex.runtime.serve.settings import ServerSettings, load_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.37.0"
CUSTOM = {"InferencePool", "RayService"}

# inference.networking.k8s.io/v1 InferencePool: the spec fields of the API reference.
_LABELS = {"type": "object", "additionalProperties": {
    "type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}
INFERENCE_POOL = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "additionalProperties": False,
                             "properties": {"matchLabels": _LABELS}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                    "type": "object", "required": ["number"], "additionalProperties": False,
                    "properties": {"number": {"type": "integer", "minimum": 1,
                                              "maximum": 65535}}}},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string"}, "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "port": {"type": "object", "required": ["number"],
                                 "properties": {"number": {"type": "integer", "minimum": 1,
                                                           "maximum": 65535}}},
                        "failureMode": {"enum": ["FailOpen", "FailClose"]}}}}}}}

# ray.io/v1 RayService: the structure KubeRay's CRD requires of the fields used here.
_GROUP = {"type": "object", "required": ["rayStartParams", "template"], "properties": {
    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
    "template": {"type": "object"}}}
RAY_SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "spec": {"type": "object", "required": ["serveConfigV2", "rayClusterConfig"],
                 "properties": {
                     "serveConfigV2": {"type": "string"},
                     "rayClusterConfig": {
                         "type": "object", "required": ["headGroupSpec"], "properties": {
                             "rayVersion": {"type": "string"},
                             "authOptions": {
                                 "type": "object", "additionalProperties": False,
                                 "properties": {"mode": {"enum": ["disabled", "token"]},
                                                "secretName": {"type": "string"},
                                                "enableK8sTokenAuth": {"type": "boolean"}}},
                             "headGroupSpec": _GROUP,
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "allOf": [_GROUP, {"required": ["groupName"], "properties": {
                                     "groupName": {"type": "string"},
                                     "replicas": {"type": "integer", "minimum": 0},
                                     "minReplicas": {"type": "integer", "minimum": 0},
                                     "maxReplicas": {"type": "integer", "minimum": 0}}}]}}}}}}}}


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _pod_template(template: dict) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": "t"}, "template": template},
                                 VERSION, strict=True)


def _validate(doc: dict) -> None:
    kind = doc["kind"]
    if kind == "InferencePool":
        jsonschema.validate(doc, INFERENCE_POOL)
    elif kind == "RayService":
        jsonschema.validate(doc, RAY_SERVICE)
        cluster = doc["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            _pod_template(group["template"])
    else:
        kubernetes_validate.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize(("name", "doc"), _docs(), ids=lambda v: v if isinstance(v, str) else
                         f"{v['kind']}/{v['metadata']['name']}")
def test_manifest_is_valid(name: str, doc: dict) -> None:
    _validate(doc)


def test_the_set_is_complete_and_the_validators_are_not_vacuous() -> None:
    kinds = {d["kind"] for _, d in _docs()}
    assert {"Deployment", "Service", "PodDisruptionBudget", *CUSTOM} <= kinds
    broken = {
        "Deployment": lambda d: d["spec"].__setitem__("replicas", "four"),
        "InferencePool": lambda d: d["spec"].pop("targetPorts"),
        "RayService": lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "spec"]["containers"][0].__setitem__("ports", [{"containerPort": "grpc"}]),
    }
    for kind, breaks in broken.items():
        doc = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == kind))
        breaks(doc)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            _validate(doc)


def _cluster() -> dict[str, dict]:
    return {d["kind"]: d for name, d in _docs() if name == "cluster.yaml"}


def test_replicas_drain_before_they_are_killed_and_selectors_match() -> None:
    c = _cluster()
    pod = c["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        sel = c[kind]["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        assert sel.items() <= labels.items(), kind
    assert c["Service"]["spec"]["clusterIP"] == "None", "headless: routers see every pod"
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = float(env["LORAPLEX_GRACE_S"]) + float(env["LORAPLEX_DRAIN_DELAY_S"]) + pre_stop
    assert pod["spec"]["terminationGracePeriodSeconds"] > budget
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port


def test_loraplex_settings_in_the_manifests_are_real_settings(monkeypatch, tmp_path) -> None:
    (container,) = _cluster()["Deployment"]["spec"]["template"]["spec"]["containers"]
    fields = set(ServerSettings.model_fields)
    for e in container["env"]:
        if e["name"].startswith("LORAPLEX_"):
            assert e["name"].removeprefix("LORAPLEX_").lower() in fields, e["name"]
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
    settings = load_settings({"base": tmp_path})
    assert settings.prefetch_aliases == ["prod"] and settings.blob_dir.startswith("s3://")
    monkeypatch.undo()

    ray_service = next(d for _, d in _docs() if d["kind"] == "RayService")
    (application,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    ray_settings = load_settings(application["args"])
    assert ray_settings.replicas == 4 and json.dumps(ray_settings.prefetch_aliases) == '["prod"]'


def test_rays_ports_are_locked_by_token_and_network_policy() -> None:
    """Ray runs whatever code reaches its ports: token authentication is on (with a Ray
    that has it), and a NetworkPolicy lets only the Ray pods themselves reach them (the
    operator only the dashboard port), while loraplex's gRPC port stays open."""
    docs = {d["kind"]: d for name, d in _docs() if name == "rayservice.yaml"}
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)
    policy = docs["NetworkPolicy"]["spec"]
    labels = policy["podSelector"]["matchLabels"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert labels.items() <= group["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    open_ports = set()
    for rule in policy["ingress"]:
        peers = rule.get("from")
        ports = {p["port"] for p in rule.get("ports", [])}
        if peers is None:  # from anywhere: only loraplex's own API
            open_ports |= ports
        elif any(p.get("podSelector", {}).get("matchLabels") == labels for p in peers):
            assert "namespaceSelector" not in peers[0]  # the cluster's own pods
        else:
            assert ports == {8265}, rule  # the operator: the dashboard (Serve config) only
    assert open_ports == {50051}
