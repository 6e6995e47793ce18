"""The Envoy gateway configuration: HTTP/JSON transcoded to gRPC, and native gRPC proxied.

`build_envoy_config` returns the configuration as plain data; `render_envoy_yaml` formats it as
YAML text. `python -m devstack render-envoy` writes the default rendering to
deploy/envoy/envoy.yaml, and a test proves that file is fresh.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.api import annotations_pb2

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2

BOOKING_SERVICE = "booking.v1.BookingService"
CREDIT_SERVICE = "credit.v1.CreditService"
DEFAULT_DESCRIPTOR_PATH = "gen/descriptor.binpb"

_TYPE_PREFIX = "type.googleapis.com/"
_HTTP_CONNECTION_MANAGER = (
    _TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_TRANSCODER = _TYPE_PREFIX + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
_ROUTER = _TYPE_PREFIX + "envoy.extensions.filters.http.router.v3.Router"
_UPSTREAM_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS_CONTEXT = _TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_STDOUT_ACCESS_LOG = _TYPE_PREFIX + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_DOWNSTREAM_CONNECTIONS_MONITOR = "envoy.resource_monitors.global_downstream_max_connections"
_DOWNSTREAM_CONNECTIONS_CONFIG = (
    _TYPE_PREFIX + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
# Envoy's own replies (unknown path, unknown query parameter, backend down, timeout) to JSON
# clients, rendered like the google.rpc.Status JSON that the transcoder gives for gRPC errors, so
# that a client parses every gateway error the same way. HTTP status -> google.rpc.Code.
_LOCAL_REPLY_GRPC_CODES = {400: 3, 404: 5, 413: 8, 429: 8, 503: 14, 504: 4}
# The path as the client sent it. No method: the transcoder has turned every JSON call into a
# gRPC POST by the time the line is written. No %GRPC_STATUS%: for a transcoded call Envoy guesses
# it from the HTTP status (a 404 shows as Unimplemented), which misleads more than it helps.
_ACCESS_LOG_FORMAT = (
    "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% -> %RESPONSE_CODE% (%RESPONSE_CODE_DETAILS%) "
    "%DURATION%ms upstream=%UPSTREAM_CLUSTER%\n"
)


@dataclass(frozen=True)
class UpstreamTls:
    """Mutual TLS from the gateway to the services (docs/security.md): the CA that signed their
    certificates, and the gateway's own certificate and key, as files Envoy reads at start."""

    ca_file: str
    certificate_file: str
    key_file: str
    # The name checked in every service's certificate and sent as SNI. None: each upstream's own
    # host name (`credit`, `booking`: the Services' names, which their certificates carry).
    server_name: str | None = None


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens and where it sends each service's calls.

    `descriptor_path` is resolved by Envoy against its working directory when relative: the
    runner and the documented commands start Envoy from the repository root.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    booking_upstream: str = "127.0.0.1:50051"
    credit_upstream: str = "127.0.0.1:50052"
    descriptor_path: str = DEFAULT_DESCRIPTOR_PATH
    route_timeout_s: int = 15
    upstream_connect_timeout_s: int = 1
    max_downstream_connections: int = 1000
    # None: plaintext HTTP/2 to the services (`make run`, the dev overlay).
    upstream_tls: UpstreamTls | None = None
    # The ops listener (Kubernetes): `/ready` answers 200 only while both services have a healthy
    # endpoint (Envoy's active gRPC health checks), and `/stats/prometheus` is Envoy's own metrics.
    # None: no ops listener and no health checks (`make run`, the tests' gateways).
    ops_port: int | None = None
    ops_host: str = "127.0.0.1"
    upstream_health_interval_s: int = 5

    def __post_init__(self) -> None:
        for port in (self.listen_port, self.admin_port, self.ops_port or 1):
            if not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        assert self.route_timeout_s > 0
        assert self.upstream_connect_timeout_s > 0
        assert self.max_downstream_connections > 0
        split_host_port(self.booking_upstream)
        split_host_port(self.credit_upstream)


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) into its parts; ValueError when it is not one."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host.removeprefix("[").removesuffix("]"), port


def build_envoy_config(settings: GatewaySettings) -> dict[str, object]:
    """The whole Envoy bootstrap: one listener, one cluster per service, admin on loopback (and,
    with `ops_port`, the ops listener and health checks of `add_readiness_and_stats`)."""
    listeners = [_listener(settings)]
    clusters = [
        _cluster("booking", settings.booking_upstream, settings),
        _cluster("credit", settings.credit_upstream, settings),
    ]
    if settings.ops_port is not None:
        add_readiness_and_stats(listeners, clusters, settings)
    return {
        "admin": {"address": _socket_address("127.0.0.1", settings.admin_port)},
        "overload_manager": _overload_manager(settings),
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def render_envoy_yaml(settings: GatewaySettings, header: str = "") -> str:
    """YAML text of `build_envoy_config(settings)`, after `header` turned into comment lines."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + to_yaml(build_envoy_config(settings))


CHECKED_IN_HEADER = """\
Generated by `python -m devstack render-envoy` from devstack/gateway.py: do not edit by hand.
tests/integration/test_devstack.py fails when this file differs from a fresh rendering.
Envoy resolves proto_descriptor (gen/descriptor.binpb) against its working directory, so run it
from the repository root: .venv/bin/envoy -c deploy/envoy/envoy.yaml --disable-hot-restart
Gateway http://127.0.0.1:8080, admin http://127.0.0.1:9901 (loopback only);
booking at 127.0.0.1:50051, credit at 127.0.0.1:50052. `make run` renders its own copy with the
ports it uses into .data/envoy.yaml."""


def render_checked_in_envoy_yaml() -> str:
    """deploy/envoy/envoy.yaml as it must be: the default settings, behind CHECKED_IN_HEADER."""
    return render_envoy_yaml(GatewaySettings(), CHECKED_IN_HEADER)


def _socket_address(host: str, port: int) -> dict[str, object]:
    return {"socket_address": {"address": host, "port_value": port}}


def _overload_manager(settings: GatewaySettings) -> dict[str, object]:
    # A limit on everything: without it Envoy accepts connections until memory runs out (and
    # warns about it at every start).
    return {
        "resource_monitors": [
            {
                "name": _DOWNSTREAM_CONNECTIONS_MONITOR,
                "typed_config": {
                    "@type": _DOWNSTREAM_CONNECTIONS_CONFIG,
                    "max_active_downstream_connections": settings.max_downstream_connections,
                },
            }
        ]
    }


def _listener(settings: GatewaySettings) -> dict[str, object]:
    return {
        "name": "gateway",
        "address": _socket_address(settings.listen_host, settings.listen_port),
        "filter_chains": [{"filters": [_http_connection_manager(settings)]}],
    }


def _http_connection_manager(settings: GatewaySettings) -> dict[str, object]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HTTP_CONNECTION_MANAGER,
            "stat_prefix": "gateway",
            # AUTO: HTTP/1.1 for JSON clients and cleartext HTTP/2 for native gRPC clients.
            "codec_type": "AUTO",
            "access_log": [
                {
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": _STDOUT_ACCESS_LOG,
                        "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
                    },
                }
            ],
            "route_config": _route_config(settings),
            "local_reply_config": {
                "mappers": [_local_reply_mapper(status, code) for status, code in _LOCAL_REPLY_GRPC_CODES.items()]
            },
            # Order matters: the transcoder rewrites a JSON request into a gRPC call before the
            # router picks the cluster by the gRPC path.
            "http_filters": [
                _transcoder(settings),
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
        },
    }


def _route_config(settings: GatewaySettings) -> dict[str, object]:
    timeout = f"{settings.route_timeout_s}s"
    return {
        "name": "gateway",
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                # One exact route per public method: the transcoder rewrites a JSON call's path to
                # the gRPC path, so these match transcoded and native gRPC calls alike. Methods
                # without an HTTP annotation (the credit service's reservation RPCs) are internal:
                # no route, so not even a native gRPC call reaches them through the gateway.
                "routes": [
                    {
                        "match": {"path": path},
                        "route": {"cluster": cluster, "timeout": timeout},
                    }
                    for cluster, path in public_method_paths()
                ]
                + [_not_found_route()],
            }
        ],
    }


def public_method_paths() -> list[tuple[str, str]]:
    """(cluster, gRPC path) of every method with a google.api.http annotation, from gen/."""
    paths = []
    for cluster, file_descriptor, name in (
        ("booking", booking_pb2.DESCRIPTOR, BOOKING_SERVICE),
        ("credit", credit_pb2.DESCRIPTOR, CREDIT_SERVICE),
    ):
        service = file_descriptor.services_by_name[name.rsplit(".", 1)[1]]
        for method in service.methods:
            if method.GetOptions().HasExtension(annotations_pb2.http):
                paths.append((cluster, f"/{name}/{method.name}"))
    return paths


def _not_found_route() -> dict[str, object]:
    return {
        "match": {"prefix": "/"},
        # Rendered as JSON by the local reply mappers; a gRPC client sees UNIMPLEMENTED.
        "direct_response": {"status": 404, "body": {"inline_string": "no API route for this path"}},
    }


def _local_reply_mapper(http_status: int, grpc_code: int) -> dict[str, object]:
    status_filter = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": http_status, "runtime_key": "unused"}}
        }
    }
    # Native gRPC clients keep Envoy's gRPC-shaped local replies (grpc-status, no body). A JSON
    # call carries x-envoy-original-path once transcoded, and its content-type is then gRPC's.
    json_client_filter = {
        "or_filter": {
            "filters": [
                _header_filter(
                    "content-type",
                    {
                        "string_match": {"prefix": "application/grpc"},
                        "invert_match": True,
                        # A plain GET has no content-type: count it as empty, so that the
                        # inverted match accepts it instead of failing.
                        "treat_missing_header_as_empty": True,
                    },
                ),
                _header_filter("x-envoy-original-path", {"present_match": True}),
            ]
        }
    }
    return {
        "filter": {"and_filter": {"filters": [status_filter, json_client_filter]}},
        "body_format_override": {
            "json_format": {"code": grpc_code, "message": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _header_filter(name: str, match: dict[str, object]) -> dict[str, object]:
    return {"header_filter": {"header": {"name": name, **match}}}


def _transcoder(settings: GatewaySettings) -> dict[str, object]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": _TRANSCODER,
            "proto_descriptor": settings.descriptor_path,
            "services": [BOOKING_SERVICE, CREDIT_SERVICE],
            # gRPC errors become HTTP status codes with a google.rpc.Status JSON body.
            "convert_grpc_status": True,
            "print_options": {
                "add_whitespace": False,
                "preserve_proto_field_names": True,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
            },
            "request_validation_options": {
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
            },
        },
    }


def _cluster(name: str, upstream: str, settings: GatewaySettings) -> dict[str, object]:
    host, port = split_host_port(upstream)
    cluster: dict[str, object] = {
        "name": name,
        # STATIC takes only IP addresses; a host name (e.g. a container name) needs DNS.
        "type": "STATIC" if _is_ip_address(host) else "STRICT_DNS",
        "connect_timeout": f"{settings.upstream_connect_timeout_s}s",
        "typed_extension_protocol_options": {
            _UPSTREAM_HTTP_OPTIONS: {
                "@type": _TYPE_PREFIX + _UPSTREAM_HTTP_OPTIONS,
                # gRPC needs HTTP/2 to the backend; Envoy defaults to HTTP/1.1 upstream.
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }
    if settings.upstream_tls is not None:
        cluster["transport_socket"] = _upstream_tls(settings.upstream_tls, settings.upstream_tls.server_name or host)
    return cluster


def _upstream_tls(tls: UpstreamTls, server_name: str) -> dict[str, object]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS_CONTEXT,
            "sni": server_name,
            "common_tls_context": {
                # gRPC servers refuse a TLS connection that did not negotiate HTTP/2 by ALPN.
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": tls.certificate_file},
                        "private_key": {"filename": tls.key_file},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": tls.ca_file},
                    # Envoy checks the chain only unless told which name to expect.
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": server_name}}],
                },
            },
        },
    }


def _is_ip_address(host: str) -> bool:
    return ":" in host or re.fullmatch(r"[0-9.]+", host) is not None


# --- readiness and stats (the Kubernetes gateway): the ops listener and the upstream health checks ---

OPS_LISTENER = "ops"
ADMIN_CLUSTER = "envoy_admin"
READY_PATH = "/ready"
STATS_PATH = "/stats/prometheus"
_HEALTH_CHECK_FILTER = _TYPE_PREFIX + "envoy.extensions.filters.http.health_check.v3.HealthCheck"
_HEALTH_CHECK_TIMEOUT_S = 1
# Per service, the gRPC service name its health reports on (SERVING only while its database is
# reachable and migrated: service_kit/server.py).
_HEALTH_SERVICES = {"booking": BOOKING_SERVICE, "credit": CREDIT_SERVICE}


def add_readiness_and_stats(
    listeners: list[dict[str, object]], clusters: list[dict[str, object]], settings: GatewaySettings
) -> None:
    """Active gRPC health checks of every service cluster, and the ops listener: `/ready` is 503
    unless each service cluster has a healthy endpoint (a readiness probe that takes the gateway
    out of its Service while it could only answer 503), `/stats/prometheus` is the admin's page
    of that name (the admin itself stays on loopback, with its mutating endpoints), anything else
    404."""
    assert settings.ops_port is not None
    for cluster in clusters:
        cluster["health_checks"] = [_health_check(str(cluster["name"]), settings.upstream_health_interval_s)]
    clusters.append(
        {
            "name": ADMIN_CLUSTER,
            "type": "STATIC",
            "connect_timeout": f"{settings.upstream_connect_timeout_s}s",
            "load_assignment": {
                "cluster_name": ADMIN_CLUSTER,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _socket_address("127.0.0.1", settings.admin_port)}}]}
                ],
            },
        }
    )
    listeners.append(
        {
            "name": OPS_LISTENER,
            "address": _socket_address(settings.ops_host, settings.ops_port),
            "filter_chains": [{"filters": [_ops_connection_manager()]}],
        }
    )


def _health_check(cluster: str, interval_s: int) -> dict[str, object]:
    interval = f"{interval_s}s"
    return {
        "timeout": f"{_HEALTH_CHECK_TIMEOUT_S}s",
        "interval": interval,
        # Envoy checks an idle cluster only every 60 s unless told: readiness would lag.
        "no_traffic_interval": interval,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": _HEALTH_SERVICES[cluster]},
    }


def _ops_connection_manager() -> dict[str, object]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HTTP_CONNECTION_MANAGER,
            "stat_prefix": OPS_LISTENER,
            "route_config": {
                "name": OPS_LISTENER,
                "virtual_hosts": [
                    {
                        "name": OPS_LISTENER,
                        "domains": ["*"],
                        "routes": [
                            {"match": {"path": STATS_PATH}, "route": {"cluster": ADMIN_CLUSTER}},
                            {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.health_check",
                    "typed_config": {
                        "@type": _HEALTH_CHECK_FILTER,
                        "pass_through_mode": False,
                        "headers": [{"name": ":path", "string_match": {"exact": READY_PATH}}],
                        # At least one healthy endpoint each (1 % of fewer than 100 endpoints).
                        "cluster_min_healthy_percentages": {name: {"value": 1} for name in _HEALTH_SERVICES},
                    },
                },
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
        },
    }


# A small YAML emitter (no YAML library is a dependency): block style for non-empty mappings and
# sequences, plain scalars only where YAML cannot read them as anything but that string.
_PLAIN_STRING = re.compile(r"[A-Za-z_/.][A-Za-z0-9_./-]*")
_YAML_KEYWORDS = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"})


def to_yaml(document: Mapping[str, object]) -> str:
    return "".join(f"{line}\n" for line in _yaml_lines(document, 0))


def _yaml_lines(value: object, depth: int) -> list[str]:
    if isinstance(value, Mapping):
        return _mapping_lines(value, depth)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return _sequence_lines(value, depth)
    return ["  " * depth + _yaml_inline(value)]


def _mapping_lines(mapping: Mapping[object, object], depth: int) -> list[str]:
    indent = "  " * depth
    lines: list[str] = []
    for key, item in mapping.items():
        assert isinstance(key, str), key
        if _is_block(item):
            lines.append(f"{indent}{_yaml_scalar(key)}:")
            lines.extend(_yaml_lines(item, depth + 1))
        else:
            lines.append(f"{indent}{_yaml_scalar(key)}: {_yaml_inline(item)}")
    return lines


def _sequence_lines(sequence: Sequence[object], depth: int) -> list[str]:
    indent = "  " * depth
    lines: list[str] = []
    for item in sequence:
        if _is_block(item):
            # The item's first line moves up beside the dash; the rest keep the deeper indent.
            first, *rest = _yaml_lines(item, depth + 1)
            lines.append(f"{indent}- {first.lstrip()}")
            lines.extend(rest)
        else:
            lines.append(f"{indent}- {_yaml_inline(item)}")
    return lines


def _is_block(value: object) -> bool:
    if isinstance(value, str):
        return False
    return isinstance(value, Mapping | Sequence) and len(value) > 0


def _yaml_inline(value: object) -> str:
    """A scalar, or an empty mapping or sequence, on the rest of the current line."""
    if isinstance(value, Mapping):
        assert not value
        return "{}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        assert not value
        return "[]"
    return _yaml_scalar(value)


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    assert isinstance(value, str), value
    if _PLAIN_STRING.fullmatch(value) and value.lower() not in _YAML_KEYWORDS:
        return value
    # A JSON string is a valid YAML double-quoted scalar, escapes included.
    return json.dumps(value)
