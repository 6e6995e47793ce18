"""Generate Python code, type stubs, the Envoy descriptor set and the API's description from protos/.

The one command that writes gen/ (`make gen`): the Python modules, descriptor.binpb for Envoy,
and from that descriptor openapi.json (scripts/openapi_document.py) and api-reference.html
(scripts/api_reference.py), which the gateway serves. `--check` generates into a temporary folder
and fails when gen/ differs, so a stale checkout cannot pass CI.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from api_reference import render_reference
from openapi_document import build_document

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
VENDORED_ROOT = ROOT / "third_party" / "googleapis"
GEN_ROOT = ROOT / "gen"
# The client package (clients/python) ships its own copy of the generated Python modules, so that
# it installs alone: the same files as gen/booking and gen/credit, checked fresh alike.
CLIENT_GEN_ROOT = ROOT / "clients" / "python" / "src"
CLIENT_PACKAGES = ("booking", "credit")
DESCRIPTOR_NAME = "descriptor.binpb"
OPENAPI_NAME = "openapi.json"
API_REFERENCE_NAME = "api-reference.html"
# Envoy needs the google.rpc error types in the descriptor set to render errors as JSON bodies.
DESCRIPTOR_EXTRA = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def own_protos() -> list[str]:
    return sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob("*.proto"))


def plugin(name: str) -> str:
    # The plugins live beside the interpreter in the virtual environment.
    path = Path(sys.executable).parent / name
    if not path.exists():
        sys.exit(f"generate: {name} not found beside {sys.executable}; run `make venv` first")
    return f"--plugin={name}={path}"


def protoc(args: list[str]) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{VENDORED_ROOT}", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"generate: protoc failed:\n{result.stderr}")


def generate(out: Path) -> None:
    protos = own_protos()
    # Only our own protos become Python: google.api and google.rpc come from
    # googleapis-common-protos, and generating them again would register their symbols twice.
    protoc(
        [
            plugin("protoc-gen-mypy"),
            plugin("protoc-gen-mypy_grpc"),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ]
    )
    protoc(
        [
            f"--descriptor_set_out={out / DESCRIPTOR_NAME}",
            "--include_imports",
            "--include_source_info",
            *protos,
            *DESCRIPTOR_EXTRA,
        ]
    )
    # gen/ is an import root: `from booking.v1 import booking_pb2` needs real packages.
    for module_folder in sorted({p.parent for p in out.rglob("*.py")}):
        folder = module_folder
        while folder != out:
            (folder / "__init__.py").touch()
            folder = folder.parent
    (out / "py.typed").write_text("")
    for package in CLIENT_PACKAGES:
        (out / package / "py.typed").write_text("")  # typed packages, once installed (the client)
    document = build_document((out / DESCRIPTOR_NAME).read_bytes())
    (out / OPENAPI_NAME).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    (out / API_REFERENCE_NAME).write_text(render_reference(document))


def differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in {left.name}: {n}" for n in comparison.left_only]
    found += [f"only in fresh output: {n}" for n in comparison.right_only]
    found += [f"differs: {n}" for n in comparison.diff_files]
    for name in comparison.common_dirs:
        found += [f"{name}/{line}" for line in differences(left / name, right / name)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is not fresh")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "gen"
        fresh.mkdir()
        generate(fresh)
        if arguments.check:
            stale = differences(GEN_ROOT, fresh) if GEN_ROOT.exists() else ["gen/ is missing"]
            for package in CLIENT_PACKAGES:
                copy = CLIENT_GEN_ROOT / package
                found = differences(copy, fresh / package) if copy.exists() else ["missing"]
                stale += [f"{copy.relative_to(ROOT)}: {line}" for line in found]
            if stale:
                print("gen/ is stale; run `make gen`:\n  " + "\n  ".join(stale), file=sys.stderr)
                return 1
            print("gen/ is fresh")
            return 0
        shutil.rmtree(GEN_ROOT, ignore_errors=True)
        shutil.copytree(fresh, GEN_ROOT)
        for package in CLIENT_PACKAGES:
            shutil.rmtree(CLIENT_GEN_ROOT / package, ignore_errors=True)
            shutil.copytree(fresh / package, CLIENT_GEN_ROOT / package, ignore=shutil.ignore_patterns("__pycache__"))

        print(f"generated {len(own_protos())} protos into {GEN_ROOT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
