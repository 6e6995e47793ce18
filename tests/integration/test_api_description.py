"""The API's description: gen/openapi.json (from the protos, by `make gen`) is a valid OpenAPI 3.1
document naming every public route with its schemas, the error body and the bearer scheme; the
gateway serves it and the reference page without a token; the page renders in a real headless
browser (Debian's chromium), with a screenshot in test-output/ for a person to look at."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from typing import Any

import pytest
from google.api import annotations_pb2
from openapi_spec_validator import validate

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from tests.support.gateway import Gateway, request_json
from tests.support.stack import ROOT

OPENAPI = ROOT / "gen" / "openapi.json"
API_REFERENCE = ROOT / "gen" / "api-reference.html"
OUTPUT_DIR = ROOT / "test-output" / "api-description"
CHROMIUM_TIMEOUT_S = 60
# As the machine notes say: without these, chromium tries the network at start and waits for it.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def document() -> Any:
    return json.loads(OPENAPI.read_text())


def annotated_routes() -> dict[str, tuple[str, str]]:
    """operationId -> (verb, path) of every method with an HTTP annotation, read from the protos."""
    routes = {}
    for file, service_name in ((booking_pb2.DESCRIPTOR, "BookingService"), (credit_pb2.DESCRIPTOR, "CreditService")):
        for method in file.services_by_name[service_name].methods:
            options = method.GetOptions()
            if options.HasExtension(annotations_pb2.http):
                rule = options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                routes[f"{service_name}_{method.name}"] = (verb, getattr(rule, verb))
    return routes


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    spec = document()

    validate(spec)

    assert spec["openapi"].startswith("3.1")


def test_the_openapi_document_names_every_public_route_and_nothing_else() -> None:
    spec = document()
    described = {
        operation["operationId"]: (verb, path)
        for path, item in spec["paths"].items()
        for verb, operation in item.items()
    }

    assert described == annotated_routes()
    assert "ReserveCredits" not in json.dumps(spec["paths"])  # internal RPCs stay out


def test_every_operation_has_its_schemas_errors_and_description() -> None:
    spec = document()
    schemas = spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for verb, operation in item.items():
            where = f"{verb} {path}"
            assert operation["description"].strip(), where
            content = operation["responses"]["200"]["content"]
            if "application/json" in content:
                ok = content["application/json"]["schema"]
                assert ok["$ref"].rsplit("/", 1)[1] in schemas, where
            else:  # a body of its own content type (google.api.HttpBody): its own credential, no token
                assert content == {"*/*": {"schema": {"type": "string", "format": "binary"}}}, where
                assert operation["security"] == [], where
            assert operation["responses"]["default"] == {"$ref": "#/components/responses/Error"}, where
            for parameter in operation.get("parameters", []):
                assert parameter["description"].strip(), (where, parameter["name"])
            if verb in ("post", "put", "patch"):
                assert operation["requestBody"]["content"]["application/json"]["schema"], where
    # The error body: google.rpc.Status whose details are ErrorInfo or BadRequest.
    status = schemas["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}
    detail_types = {option["allOf"][1]["$ref"] for option in status["properties"]["details"]["items"]["oneOf"]}
    assert detail_types == {"#/components/schemas/google.rpc.ErrorInfo", "#/components/schemas/google.rpc.BadRequest"}
    bearer = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == ("http", "bearer", "JWT")
    assert spec["security"] == [{"bearerAuth": []}]


def test_descriptions_come_from_the_proto_comments() -> None:
    spec = document()
    booking = spec["components"]["schemas"]["booking.v1.Booking"]
    create = spec["paths"]["/v1/bookings"]["post"]

    assert booking["description"] == "A booked session."
    assert booking["properties"]["booking_id"]["description"] == "A UUID; also the id of its credit reservation."
    assert create["summary"].startswith("Books a session")
    # The proto3 JSON mapping as the transcoder prints it: int64 as a string, enums by name.
    assert "string" in booking["properties"]["credit_cost"]["type"]
    assert "BOOKING_STATUS_CONFIRMED" in spec["components"]["schemas"]["booking.v1.BookingStatus"]["enum"]


# --- served by the gateway -----------------------------------------------------------------------


@pytest.fixture
def gateway(api_gateway: Gateway) -> Gateway:
    return api_gateway


async def test_the_gateway_serves_the_description_and_the_page_without_a_token(gateway: Gateway) -> None:
    description = await request_json("GET", f"{gateway.url}/openapi.json", headers={"authorization": ""})
    page = await request_json("GET", f"{gateway.url}/docs", headers={"authorization": ""})
    not_a_get = await request_json("POST", f"{gateway.url}/openapi.json", {}, headers={"authorization": ""})

    assert description.status == 200
    assert description.content_type.startswith("application/json")
    assert description.json() == document()
    assert page.status == 200
    assert page.content_type.startswith("text/html")
    assert page.text == API_REFERENCE.read_text()
    # Nothing may load from elsewhere, and no script runs.
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert not_a_get.status == 404


def test_the_reference_page_loads_nothing_from_elsewhere() -> None:
    page = API_REFERENCE.read_text()

    # (Addresses may appear in text, from the comments of the google.rpc protos; never as a link
    # the browser follows or a resource it loads.)
    assert "<script" not in page
    assert " src=" not in page
    assert 'href="http' not in page
    assert "url(" not in page
    assert "@import" not in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    return found


def run_chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
            check=False,
        )


async def test_the_reference_page_renders_in_a_headless_browser(gateway: Gateway) -> None:
    chromium()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    screenshot = OUTPUT_DIR / "docs.png"
    screenshot.unlink(missing_ok=True)
    url = f"{gateway.url}/docs"

    dom = await asyncio.to_thread(run_chromium, "--dump-dom", url)
    shot = await asyncio.to_thread(run_chromium, "--window-size=1280,900", f"--screenshot={screenshot}", url)

    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Therapy booking API" in dom.stdout
    for operation_id in annotated_routes():
        assert f'id="{operation_id}"' in dom.stdout, operation_id
    assert shot.returncode == 0, shot.stderr[-2000:]
    # A real picture of the page: a PNG of the window's size, not a blank one.
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1280
    assert len(data) > 50_000, f"{screenshot} looks blank ({len(data)} bytes)"


def test_the_screenshot_folder_is_not_committed() -> None:
    assert "/test-output/" in (ROOT / ".gitignore").read_text().splitlines()
