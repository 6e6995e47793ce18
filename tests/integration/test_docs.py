"""The documentation cannot drift from what the code serves.

- It stands alone: no link leaves the repository, and every relative link names a file that exists.
- docs/http-api.md's route table is exactly the routes the protos' `google.api.http` annotations
  give the gateway, both ways.
- Every documented `curl` to the gateway uses a method and path that the gateway routes, and
  carries a bearer token (without one it would answer 401); every documented `grpcurl` call names
  an RPC the services serve.
- The two commands that `make run` prints do book a session over HTTP: tests/integration/
  test_devstack.py runs them exactly as printed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HTTP_API = ROOT / "docs" / "http-api.md"
SERVICES = {
    "booking.v1.BookingService": booking_pb2.DESCRIPTOR.services_by_name["BookingService"],
    "credit.v1.CreditService": credit_pb2.DESCRIPTOR.services_by_name["CreditService"],
}
OPEN_SERVICES = {"grpc.health.v1.Health"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def routes() -> set[tuple[str, str, str]]:
    """(HTTP method, path template, Service.Rpc) of every annotated RPC."""
    found = set()
    for name, service in SERVICES.items():
        method: descriptor.MethodDescriptor
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            verb = rule.WhichOneof("pattern")
            # `{therapist.therapist_id}` reads as `{therapist_id}` in the docs: the field's own name.
            template = re.sub(r"\{\w+\.(\w+)\}", r"{\1}", getattr(rule, verb))
            found.add((verb.upper(), template, f"{name.rsplit('.', 1)[1]}.{method.name}"))
    return found


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in listed.splitlines() if not line.endswith((".binpb", ".png"))]


def test_nothing_in_the_repository_points_outside_it() -> None:
    outside = "../" + "shared"  # spelt in two parts, so that this file is not its own offender
    offenders = [
        str(path.relative_to(ROOT))
        for path in tracked_text_files()
        if path.is_file() and outside in path.read_text(errors="replace")
    ]
    assert offenders == []


@pytest.mark.parametrize("page", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_names_a_file_of_the_repository(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


def documented_routes() -> set[tuple[str, str, str]]:
    table = set()
    for line in HTTP_API.read_text().splitlines():
        match = re.match(r"\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)`[^|]* \| (\w+\.\w+) \|", line)
        if match:
            verb, path, rpc = match.groups()
            # The table shows query parameters as a reader would send them; the route is the path.
            table.add((verb, re.split(r"[?\[]", path, maxsplit=1)[0], rpc))
    return table


def test_the_route_table_is_the_gateways_routes() -> None:
    served = routes()
    assert len(served) >= 20
    assert documented_routes() == served


def template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/?]+" if part.startswith("{") else re.escape(part) for part in parts) + r"(\?.*)?")


def curl_calls(text: str) -> list[tuple[str, str, str]]:
    """(method, path, whole command) of each curl to the gateway, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    calls = []
    for line in joined.splitlines():
        command = line.strip()
        if not command.startswith(("curl ", "T=$(curl", "S=$(curl", "B=$(curl")) or "application/grpc" in command:
            continue
        if "-X OPTIONS" in command:
            continue  # a browser's CORS preflight: it never carries credentials (test_gateway_edge.py)
        url = re.search(r"(?:\$GW|http://127\.0\.0\.1:8080)(/[^\s'\"]*)", command)
        if url is None:
            continue
        verb = re.search(r"-X (GET|POST|PUT|PATCH|DELETE)", command)
        calls.append((verb[1] if verb else "GET", url[1], command))
    return calls


def test_every_documented_curl_is_routed_and_carries_a_token() -> None:
    templates = [(verb, template_regex(path)) for verb, path, _ in routes()]
    calls = [call for page in DOCS for call in curl_calls(page.read_text())]
    assert len(calls) >= 25, "the extraction found too few curl commands: it is broken"
    for verb, path, command in calls:
        concrete = re.sub(r"\$\{?(\w+)\}?", "x", path).replace("<event id>", "x").rstrip("\"'")
        assert any(v == verb and pattern.fullmatch(concrete) for v, pattern in templates), (
            f"no route for {verb} {path}: {command}"
        )
        if "/v1/calendar-feeds/" in path and path.endswith("/calendar.ics"):
            continue  # a calendar feed carries its own credential, its token, in the URL
        assert re.search(r"-H ['\"]Authorization: Bearer", command, re.IGNORECASE), f"no token: {command}"


def test_every_documented_grpcurl_names_a_served_rpc() -> None:
    named = set()
    for page in DOCS:
        text = re.sub(r"\\\n\s*", " ", page.read_text())
        for line in text.splitlines():
            if "grpcurl" in line or "$G" in line:
                named.update(re.findall(r"\b((?:booking|credit|grpc\.health)\.v1\.\w+)/(\w+)", line))
    assert len(named) >= 10, "the extraction found too few grpcurl calls: it is broken"
    for service, rpc in named:
        if service in OPEN_SERVICES:
            assert rpc in {"Check", "Watch"}
            continue
        assert service in SERVICES, service
        assert rpc in SERVICES[service].methods_by_name, f"{service}/{rpc} is not served"


def test_the_extraction_can_fail() -> None:
    assert curl_calls("curl -s $GW/v1/nothing-here") == [("GET", "/v1/nothing-here", "curl -s $GW/v1/nothing-here")]
    templates = [template_regex(path) for _, path, _ in routes()]
    assert not any(pattern.fullmatch("/v1/nothing-here") for pattern in templates)
