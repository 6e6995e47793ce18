"""What an operator loads beside the services: monitors, alerts, the dashboard, backups, and a
gateway whose readiness follows its upstreams.

- Each overlay, rendered by the real kustomize, holds the ServiceMonitors, the gateway's
  PodMonitor, the PrometheusRule, the dashboard ConfigMap, the backup configuration and the
  ScheduledBackups. These are custom resources: Kubernetes' schemas (kubernetes-validate,
  tests/integration/test_deploy.py) do not know them, and no registry this project installs from
  ships their CRDs' schemas, so their fields are checked against the ones the CRDs define that
  this deployment uses, and their references (ports, Services, clusters, Secrets) are resolved.
- The alerting rules pass `promtool check rules` and `promtool test rules` (Debian's `prometheus`
  package; .ci/run installs it; skipped with the reason where it is missing), name only metrics
  that something exports, and link runbook sections that exist.
- The dashboard queries only metrics that the services export (read from their real registries)
  or that the named exporters do.
- The Kubernetes gateway config, run by the real Envoy against real services: `/ready` is 200
  while both services are up and 503 once one is down; `/stats/prometheus` is served, the rest of
  the admin is not.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from booking_service.metrics import BookingMetrics
from credit_service.metrics import CreditMetrics
from devstack import gateway
from service_kit.metrics import GrpcMetrics, PoolCollector, PoolUsage, new_registry, register_process_collectors
from tests.integration.test_deploy import OVERLAYS, find, of_kind, only_container, pod_spec, render
from tests.support.gateway import running_gateway
from tests.support.processes import running_stack, wait_for
from tests.support.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "k8s" / "base" / "monitoring"
OPERATIONS = ROOT / "docs" / "operations.md"
DEPLOY_README = ROOT / "deploy" / "README.md"
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: it comes from Debian's `prometheus` package (apt-get install prometheus); "
    ".ci/run installs it",
)
PLUGIN = "barman-cloud.cloudnative-pg.io"
# Metrics that other exporters provide, by the prefix of each: kube-state-metrics, CloudNativePG's
# instance exporter, Envoy. Every other metric a rule or a panel names must be the services' own.
EXTERNAL_METRICS = {
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_deployment_spec_replicas": "kube-state-metrics",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "cnpg_pg_replication_lag": "CloudNativePG",
    "cnpg_pg_stat_archiver_failed_count": "CloudNativePG",
    "cnpg_pg_stat_archiver_seconds_since_last_archival": "CloudNativePG",
}
# The fields of the custom resources' specs that the CRDs define and this deployment may use.
SERVICE_MONITOR_FIELDS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}
POD_MONITOR_FIELDS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
RULE_FIELDS = {"alert", "record", "expr", "for", "labels", "annotations"}
OBJECT_STORE_FIELDS = {"retentionPolicy", "configuration", "instanceSidecarConfiguration"}
SCHEDULED_BACKUP_FIELDS = {
    "schedule", "immediate", "backupOwnerReference", "cluster", "method", "pluginConfiguration", "suspend", "target",
}  # fmt: skip
Manifest = dict[str, Any]


def rule_spec() -> Manifest:
    manifest: Manifest = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return manifest


def rules() -> Iterator[Manifest]:
    for group in rule_spec()["spec"]["groups"]:
        yield from group["rules"]


# --- rendered by each overlay ---


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_carries_monitors_rules_dashboard_and_backups(overlay: str) -> None:
    objects = render(overlay)
    for name in ("credit", "booking"):
        monitor = find(objects, "ServiceMonitor", name)
        assert set(monitor["spec"]) <= SERVICE_MONITOR_FIELDS
        service = find(objects, "Service", name)
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert set(endpoint) <= ENDPOINT_FIELDS
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    pod_monitor = find(objects, "PodMonitor", "gateway")
    assert set(pod_monitor["spec"]) <= POD_MONITOR_FIELDS
    deployment = find(objects, "Deployment", "gateway")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(deployment).items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ports = {port["name"]: port["containerPort"] for port in only_container(deployment)["ports"]}
    assert (endpoint["port"], endpoint["path"]) == ("ops", gateway.STATS_PATH)
    assert ports["ops"] == 9902
    # Not on the public Service: only the monitoring namespace may reach it (NetworkPolicy).
    assert [port["port"] for port in find(objects, "Service", "gateway")["spec"]["ports"]] == [8080]
    policy = find(objects, "NetworkPolicy", "gateway")
    (monitoring_rule,) = [rule for rule in policy["spec"]["ingress"] if rule.get("from")]
    assert monitoring_rule["ports"] == [{"port": 9902, "protocol": "TCP"}]
    assert monitoring_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]

    rule = find(objects, "PrometheusRule", "therapy-booking")
    assert rule["spec"] == rule_spec()["spec"]
    for item in rules():
        assert set(item) <= RULE_FIELDS
    (dashboard,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].startswith("therapy-booking-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["therapy-booking.json"]) == json.loads(
        (MONITORING / "dashboard.json").read_text()
    )

    for name in ("credit", "booking"):
        cluster = find(objects, "Cluster", f"{name}-db")
        assert cluster["spec"]["monitoring"] == {"enablePodMonitor": True}
        (plugin,) = cluster["spec"]["plugins"]
        assert plugin["name"] == PLUGIN and plugin["isWALArchiver"] is True
        store = find(objects, "ObjectStore", plugin["parameters"]["barmanObjectName"])
        assert store["apiVersion"] == "barmancloud.cnpg.io/v1"
        assert set(store["spec"]) <= OBJECT_STORE_FIELDS
        assert re.fullmatch(r"[0-9]+[dwm]", store["spec"]["retentionPolicy"])
        configuration = store["spec"]["configuration"]
        assert configuration["destinationPath"].endswith(f"/{name}-db")
        for credential in configuration["s3Credentials"].values():
            assert_documented_secret(credential["name"], credential["key"])
        (backup,) = [b for b in of_kind(objects, "ScheduledBackup") if b["spec"]["cluster"]["name"] == f"{name}-db"]
        assert set(backup["spec"]) <= SCHEDULED_BACKUP_FIELDS
        assert (backup["spec"]["method"], backup["spec"]["pluginConfiguration"]["name"]) == ("plugin", PLUGIN)
        # CloudNativePG's schedules have six fields, seconds first: five would be every minute.
        assert len(backup["spec"]["schedule"].split()) == 6
        assert backup["spec"]["immediate"] is True


def pod_spec_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_spec(deployment)["containers"]
    return labels


def assert_documented_secret(name: str, key: str) -> None:
    readme = DEPLOY_README.read_text()
    command = re.search(rf"kubectl -n \$NS create secret generic {name}((?:\s+(?:\\\s+)?--from-\S+)+)", readme)
    assert command is not None, f"deploy/README.md has no `kubectl -n $NS create secret generic {name}` command"
    assert f"--from-literal={key}=" in command[1] or f"--from-file={key}=" in command[1], f"{name}: {key} not made"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_readiness_probe_is_the_ops_listener(overlay: str) -> None:
    container = only_container(find(render(overlay), "Deployment", "gateway"))
    assert container["readinessProbe"]["httpGet"] == {"port": "ops", "path": gateway.READY_PATH}
    # Alive while its services are down: restarting Envoy would not bring them back.
    assert "tcpSocket" in container["livenessProbe"] and "tcpSocket" in container["startupProbe"]


# --- the alerting rules ---


@NEEDS_PROMTOOL
def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()["spec"]))
    shutil.copy(MONITORING / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in check.stdout
    test = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts-test.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert test.returncode == 0, test.stdout + test.stderr


@NEEDS_PROMTOOL
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    # A rule whose threshold moved must fail its unit test: the tests pin the behaviour.
    spec = rule_spec()["spec"]
    for group in spec["groups"]:
        for item in group["rules"]:
            if item.get("alert") == "ReservationStuck":
                item["expr"] = item["expr"].replace("> 600", "> 6000")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(MONITORING / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    assert PROMTOOL is not None
    test = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts-test.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert test.returncode != 0 and "ReservationStuck" in test.stdout + test.stderr


def test_every_alert_has_a_severity_and_a_runbook_section_that_exists() -> None:
    headings = [line for line in OPERATIONS.read_text().splitlines() if re.match(r"#{2,6} ", line)]
    anchors = {heading_anchor(line) for line in headings}
    alerts = [item for item in rules() if "alert" in item]
    assert len(alerts) >= 13
    for item in alerts:
        assert item["labels"]["severity"] in {"page", "ticket"}, item["alert"]
        page, _, anchor = item["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, (item["alert"], anchor)
        # The alert table of docs/operations.md lists it.
        assert f"`{item['alert']}`" in OPERATIONS.read_text(), item["alert"]


def heading_anchor(line: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = line.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


# --- every metric named is exported by someone ---


def exported_metric_names() -> set[str]:
    """The sample names the two services expose, from their real registries (as the runtime
    builds them), whatever their labels."""
    registry: CollectorRegistry = new_registry()
    GrpcMetrics(registry)
    register_process_collectors(registry)
    registry.register(PoolCollector("booking", lambda: PoolUsage(in_use=0, idle=0, max_size=1)))
    BookingMetrics(registry)
    CreditMetrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
            "info": ("_info",),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


_FUNCTIONS_AND_KEYWORDS = frozenset(
    {
        "sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "by", "without",
        "on", "ignoring", "and", "or", "unless", "time", "abs", "bool", "group_left", "group_right",
    }
)  # fmt: skip


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, grouping removed)."""
    text = re.sub(r"\{[^}]*\}", " ", expression)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r'"[^"]*"', " ", text)
    return {
        token
        for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text)
        if token not in _FUNCTIONS_AND_KEYWORDS and not token.startswith("$")
    }


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    ours = exported_metric_names()
    assert {"grpc_server_handled_total", "process_cpu_seconds_total", "booking_batch_size_sum"} <= ours
    expressions = [item["expr"] for item in rules()] + dashboard_expressions()
    named = set().union(*(metric_names(expression) for expression in expressions))
    assert named, "no metric found: the extraction is broken"
    unknown = named - ours - set(EXTERNAL_METRICS)
    assert not unknown, f"named but exported by nobody: {sorted(unknown)}"
    # The dashboard shows what the issue asks of it, from the services' own metrics.
    dashboard_names = set().union(*(metric_names(expression) for expression in dashboard_expressions()))
    for wanted in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "booking_bookings_total",
        "credit_reservations",
        "booking_outbox_depth",
        "booking_outbox_dead_letters",
        "db_pool_connections",
        "booking_reconciler_actions_total",
    ):
        assert wanted in dashboard_names, wanted


def test_metric_name_extraction() -> None:
    assert metric_names('max by (service) (a_b{state="in_use"} / ignoring(state) c_d) > 0.9') == {"a_b", "c_d"}
    assert metric_names("sum(rate(x_total[$__rate_interval]))") == {"x_total"}


# --- the gateway's readiness, with the real Envoy ---


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310  # our loopback URL
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, repr(error)


@pytest.mark.timeout(120)
async def test_gateway_readiness_follows_its_upstreams(postgres_server_url: str, tmp_path: Path) -> None:
    async with (
        running_stack(postgres_server_url, tmp_path / "stack") as stack,
        running_gateway(
            tmp_path / "gateway",
            booking_upstream=stack.bookings[0].address,
            credit_upstream=stack.credit.address,
            ops_port=free_port(),
            upstream_health_interval_s=1,
        ) as gw,
    ):
        ops = f"http://127.0.0.1:{gw.settings.ops_port}"

        async def ready_is(status: int) -> bool | None:
            code, _ = await asyncio_http(f"{ops}{gateway.READY_PATH}")
            return True if code == status else None

        await wait_for(lambda: ready_is(200), timeout_s=20, what="/ready 200 with both services up")
        code, stats = await asyncio_http(f"{ops}{gateway.STATS_PATH}")
        assert code == 200 and "envoy_cluster_health_check_healthy" in stats, stats[:500]
        for path in ("/quitquitquit", "/config_dump", "/stats"):
            assert (await asyncio_http(f"{ops}{path}"))[0] == 404, path

        assert await stack.stop(stack.credit) == 0
        await wait_for(lambda: ready_is(503), timeout_s=20, what="/ready 503 once credit is down")
        await stack.start(stack.credit)
        await wait_for(lambda: ready_is(200), timeout_s=20, what="/ready 200 once credit is back")


async def asyncio_http(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_status, url)
