"""The Helm chart, validated offline: rendered by Helm's own engine (helm-python-sdk) for every example and a
matrix of toggles, linted strictly, every manifest checked against the Kubernetes 1.30 and latest schemas
(kubernetes-validate, strict), the security context and Secret handling checked, and the output compared
with golden manifests in tests/golden/helm/.

After an intended chart change, regenerate the golden files and review their diff:

    CONVSTATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_helm_chart.py
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from service.config import ReseedMode, Settings
from tests.conftest import repo_root

CHART = repo_root() / "deploy" / "helm" / "convstate"
GOLDEN = Path(__file__).resolve().parent / "golden" / "helm"
UPDATE_GOLDEN = os.environ.get("CONVSTATE_UPDATE_GOLDEN") == "1"
RELEASE, NAMESPACE = "convstate", "inference"
# The oldest Kubernetes the chart supports and the newest the validator knows.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

MINIMAL: dict[str, Any] = {
    "database": {"existingSecret": "convstate-db"},
    "config": {"backendUrl": "http://vllm.inference.svc:8000"},
}
# Each toggle on its own over MINIMAL; "everything" turns them all on at once.
TOGGLES: dict[str, dict[str, Any]] = {
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 3}},
    "no-pdb-no-migrations": {"podDisruptionBudget": {"enabled": False}, "migrations": {"enabled": False}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "pod-monitor": {"metrics": {"podMonitor": {"enabled": True}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "gateway"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "database": {"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]},
            "backend": {"to": [{"podSelector": {"matchLabels": {"app": "vllm"}}}]},
        }
    },
    "ingress": {"ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["a.example"]}]}},
    "http-route": {
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}], "hostnames": ["a.example"]}
    },
    "reference-backend": {"referenceBackend": {"enabled": True, "config": {"HANDLE_TTL_SECONDS": 60}}},
    "secrets": {
        "secretEnv": [{"name": "CONVSTATE_EXTRA_TOKEN", "secretName": "extra", "secretKey": "token"}],
        "tests": {"apiKeySecret": "convstate-test-key"},
        "extraConfig": {"AUTH": "api_key"},
    },
    "service-account-and-image": {
        "serviceAccount": {"create": False, "name": "shared"},
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "registry"}],
        "podLabels": {"team": "agents"},
        "commonLabels": {"cost-center": "ml"},
    },
    "extra-objects": {
        "extraObjects": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-extra"}},
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-extra-text\n",
        ]
    },
}
# Kinds from CRDs (prometheus-operator, Gateway API): kubernetes-validate has no schema for them, so their
# metadata is validated as ObjectMeta and their spec's keys are checked here.
CRD_SPEC_KEYS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"selector", "namespaceSelector", "endpoints"},
    ("monitoring.coreos.com/v1", "PodMonitor"): {"selector", "namespaceSelector", "podMetricsEndpoints"},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {"parentRefs", "hostnames", "rules"},
}
PODS_OF = {"Deployment": ("spec", "template", "spec"), "Job": ("spec", "template", "spec"), "Pod": ("spec",)}


def merged(base: dict[str, Any], *overlays: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


def _example(path: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(path.read_text())
    return values


EXAMPLES = {f"example-{path.stem}": _example(path) for path in sorted((CHART / "examples").glob("*.yaml"))}
CASES: dict[str, dict[str, Any]] = {
    "minimal": MINIMAL,
    "everything": merged(MINIMAL, *TOGGLES.values()),
    **EXAMPLES,
    **{f"toggle-{name}": merged(MINIMAL, overlay) for name, overlay in TOGGLES.items()},
}
GOLDEN_CASES = ("minimal", "everything", *EXAMPLES)


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@cache
def rendered(case: str) -> dict[str, str]:
    """Template name -> rendered text, as `helm install` would apply it (hooks and tests included)."""
    manifests = _chart().render(values=CASES[case], name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {name: text for name, text in sorted(manifests.items()) if text.strip()}


def documents(case: str) -> list[dict[str, Any]]:
    docs = []
    for name, text in rendered(case).items():
        if name.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    assert docs, f"{case} rendered nothing"
    return docs


def of_kind(case: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents(case) if doc["kind"] == kind]


def pod_specs(case: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in documents(case):
        if doc["kind"] in PODS_OF:
            spec = doc
            for key in PODS_OF[doc["kind"]]:
                spec = spec[key]
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates_strictly(case: str) -> None:
    for doc in documents(case):
        key = (doc["apiVersion"], doc["kind"])
        for version in KUBE_VERSIONS:
            if key in CRD_SPEC_KEYS:
                meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
                kubernetes_validate.validate(meta, version, strict=True)
                assert set(doc["spec"]) <= CRD_SPEC_KEYS[key], (key, sorted(doc["spec"]))
            else:
                kubernetes_validate.validate(doc, version, strict=True)


def test_validation_can_fail() -> None:
    """The validator rejects what the chart must never emit (so a passing run means something)."""
    deployment = copy.deepcopy(of_kind("minimal", "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("case", [*EXAMPLES, "everything"])
def test_lint_strict(case: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is informational (Chart.yaml has no icon: the project publishes none).
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_pods_are_locked_down(case: str) -> None:
    specs = list(pod_specs(case))
    assert specs
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["privileged"] is False and context["runAsNonRoot"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            # The only writable path is an emptyDir at /tmp.
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            assert container["resources"]["limits"]["memory"], where


SECRET_LOOKING = re.compile(
    r"postgres(ql)?(\+asyncpg)?://|password|passwd|BEGIN .*PRIVATE KEY", re.IGNORECASE
)


@pytest.mark.parametrize("case", CASES)
def test_no_secret_value_is_rendered(case: str) -> None:
    assert of_kind(case, "Secret") == []
    for name, text in rendered(case).items():
        assert not SECRET_LOOKING.search(text), name
    values = CASES[case]
    from_secrets = {"CONVSTATE_DATABASE_URL"} | {entry["name"] for entry in values.get("secretEnv", [])}
    for where, spec in pod_specs(case):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                if entry["name"] in from_secrets:
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (where, entry)
    for config_map in of_kind(case, "ConfigMap"):
        assert "CONVSTATE_DATABASE_URL" not in config_map.get("data", {})


@pytest.mark.parametrize(
    ("overlay", "complaint"),
    [
        ({"database": {"existingSecret": ""}}, "/database/existingSecret"),
        ({"database": {"url": "postgresql+asyncpg://u:p@db/x"}}, "additional properties 'url'"),
        (
            {"extraConfig": {"DATABASE_URL": "postgresql+asyncpg://u:p@db/x"}},
            "invalid propertyName 'DATABASE_URL'",
        ),
        ({"config": {"backendUrl": ""}}, "/config/backendUrl"),
        ({"config": {"backendUrl": "http://vllm:8000/v1"}}, "/config/backendUrl"),
        ({"config": {"backendMode": "cache"}}, "/config/backendMode"),
        ({"config": {"workers": 0}}, "/config/workers"),
        ({"replicaCount": "2"}, "/replicaCount"),
        ({"networkPolicy": {"enabled": True}}, "/networkPolicy/ingressFrom"),
        ({"httpRoute": {"enabled": True}}, "/httpRoute/parentRefs"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"config": {"reseed": "rebuild"}}, "/config/reseed"),
        ({"config": {"streamEventsMax": 4}}, "/config/streamEventsMax"),
        # A setting with its own value is set there, never twice in the ConfigMap.
        ({"extraConfig": {"REPLAY_TTL_SECONDS": 60}}, "invalid propertyName 'REPLAY_TTL_SECONDS'"),
    ],
)
def test_schema_rejects_bad_values(overlay: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        _chart().render(values=merged(MINIMAL, overlay), name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(caught.value)


def test_termination_grace_covers_the_drain() -> None:
    defaults = _chart().values
    (deployment,) = of_kind("minimal", "Deployment")
    (config_map,) = of_kind("minimal", "ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    grace = defaults["config"]["shutdownGraceSeconds"]
    assert config_map["data"]["CONVSTATE_SHUTDOWN_GRACE_SECONDS"] == str(grace)
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == pre_stop + grace + defaults["terminationMarginSeconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def _service_settings(config_map: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's settings from a rendered ConfigMap, as the pod's environment gives them."""
    for name in [name for name in os.environ if name.startswith("CONVSTATE_")]:
        monkeypatch.delenv(name)
    for name, value in config_map["data"].items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


# Where the chart's defaults differ from the service's on purpose: a pod listens on every address, is
# pointed at its backend, and keeps a smaller pool (replicas x pool must fit Postgres' max_connections).
CHART_OWN_DEFAULTS = {"host", "backend_url", "db_pool_size", "db_max_overflow"}


def test_config_defaults_are_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    (config_map,) = of_kind("minimal", "ConfigMap")
    chart = _service_settings(config_map, monkeypatch)
    names = {name.removeprefix("CONVSTATE_").lower() for name in config_map["data"]}
    differ = {name for name in names if getattr(chart, name) != Settings.model_fields[name].default}
    assert differ == CHART_OWN_DEFAULTS
    # extraConfig refuses every setting the chart sets itself (a second key would be ambiguous).
    schema: dict[str, Any] = _chart().schema  # type: ignore[assignment]
    refused = schema["properties"]["extraConfig"]["propertyNames"]["not"]["enum"]
    assert set(refused) == {"DATABASE_URL", *(name.upper() for name in names)}


def test_config_values_reach_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {
        "replayMaxBytes": 4 * 1024**3,
        "streamEventsMax": 1_000_000,
        "tokenArtifacts": False,
        "reseed": "render",
        "websocketCachedResponses": 0,
        "replayTtlSeconds": 30 * 86400,
        "opentelemetry": True,
    }
    values = merged(MINIMAL, {"config": config})
    manifests = _chart().render(values=values, name=RELEASE, namespace=NAMESPACE)
    (text,) = [text for name, text in manifests.items() if name.endswith("/configmap.yaml")]
    config_map = yaml.safe_load(text)
    # Large integers as digits, not in the exponent form a float would print in.
    assert config_map["data"]["CONVSTATE_REPLAY_MAX_BYTES"] == "4294967296"
    settings = _service_settings(config_map, monkeypatch)
    assert settings.replay_max_bytes == 4 * 1024**3 and settings.stream_events_max == 1_000_000
    assert settings.token_artifacts is False and settings.reseed is ReseedMode.RENDER
    assert settings.websocket_cached_responses == 0 and settings.replay_ttl_seconds == 30 * 86400
    assert settings.opentelemetry is True


def test_probes_and_ports() -> None:
    (deployment,) = of_kind("minimal", "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["envFrom"] == [{"configMapRef": {"name": "convstate"}}]


def test_migration_job_is_an_idempotent_hook_that_needs_only_the_database_secret() -> None:
    (job,) = of_kind("minimal", "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["convstate", "migrate"]
    # On install it runs before the ConfigMap and ServiceAccount of the release exist.
    assert "envFrom" not in container and "serviceAccountName" not in pod
    assert [entry["name"] for entry in container["env"]] == ["CONVSTATE_DATABASE_URL"]
    assert of_kind("toggle-no-pdb-no-migrations", "Job") == []


def test_helm_test_runs_a_two_turn_conversation() -> None:
    (pod,) = of_kind("minimal", "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    script = container["command"][-1]
    assert "previous_response_id=first.id" in script and "responses.create" in script
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["CONVSTATE_URL"]["value"] == "http://convstate:8000"


def test_examples_point_at_their_backends() -> None:
    def config(case: str) -> dict[str, str]:
        (config_map,) = [doc for doc in of_kind(case, "ConfigMap") if doc["metadata"]["name"] == RELEASE]
        data: dict[str, str] = config_map["data"]
        return data

    assert config("example-vllm-full")["CONVSTATE_BACKEND_MODE"] == "full"
    llm_d = config("example-llm-d-affinity")
    assert llm_d["CONVSTATE_BACKEND_MODE"] == "affinity"
    assert "inference-gateway" in llm_d["CONVSTATE_BACKEND_URL"]
    assert llm_d["CONVSTATE_AUTH"] == "api_key"
    smoke = config("example-reference-smoke")
    assert smoke["CONVSTATE_BACKEND_URL"] == "http://convstate-refbackend:8100"
    services = {doc["metadata"]["name"] for doc in of_kind("example-reference-smoke", "Service")}
    assert services == {"convstate", "convstate-refbackend"}


def test_autoscaling_owns_the_replica_count() -> None:
    (deployment,) = of_kind("toggle-autoscaling", "Deployment")
    assert "replicas" not in deployment["spec"]
    (hpa,) = of_kind("toggle-autoscaling", "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3
    assert of_kind("minimal", "Deployment")[0]["spec"]["replicas"] == 2


def test_network_policy_limits_ingress_and_egress() -> None:
    (policy,) = of_kind("toggle-network-policy", "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = [port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]]
    assert egress_ports == [5432, 8000, 53, 53]
    assert len(policy["spec"]["ingress"]) == 2  # the gateway (+ helm test pod), and metrics scrapers


# Values passed to Kubernetes as they are (toYaml): documented as one row each, not field by field.
VERBATIM = {
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "strategy",
    "migrations.resources",
    "referenceBackend.resources",
}


def _leaves(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in VERBATIM:
            yield from _leaves(value, f"{path}.")
        else:
            yield path


def test_every_value_is_documented() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    missing = [path for path in _leaves(_chart().values) if path not in documented]
    assert missing == []
    schema_top = set(_chart().schema["properties"]) - {"global"}  # type: ignore[index]
    assert schema_top == set(_chart().values)


def _golden_text(case: str) -> str:
    return "".join(f"# Source: {name}\n{text.strip()}\n---\n" for name, text in rendered(case).items())


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_manifests(case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    text = _golden_text(case)
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with CONVSTATE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path.name}: review, then regenerate"
