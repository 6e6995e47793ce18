"""The build's own promises: generated code is fresh, protos pass buf lint, breaking checks run;
and the operators' token command signs tokens the services accept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service_kit.auth import AuthSettings, TokenVerifier, private_pem, public_pem

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_generated_code_is_fresh() -> None:
    result = run(sys.executable, "scripts/generate_protos.py", "--check")
    assert result.returncode == 0, result.stderr
    assert "fresh" in result.stdout


def test_protos_pass_buf_lint() -> None:
    result = run(str(BIN / "buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_style_violation(tmp_path: Path) -> None:
    # The check is only worth something if it can fail: a copy of the protos with an enum whose
    # zero value is not *_UNSPECIFIED must be refused.
    (tmp_path / "protos" / "sample" / "v1").mkdir(parents=True)
    (tmp_path / "protos" / "sample" / "v1" / "sample.proto").write_text(
        'syntax = "proto3";\npackage sample.v1;\nenum Colour { RED = 0; }\n'
    )
    (tmp_path / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\nlint:\n  use: [STANDARD]\n")
    result = subprocess.run(
        [str(BIN / "buf"), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "UNSPECIFIED" in result.stdout + result.stderr


def test_buf_breaking_script_runs() -> None:
    result = run(sys.executable, "scripts/buf_breaking.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf breaking" in result.stdout


def test_the_token_command_signs_what_the_services_verify(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing-key.pem"
    key_file.write_bytes(private_pem(key))
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack",
            "token",
            "--key-file",
            str(key_file),
            "--roles",
            "admin,service",
            "--subject",
            "ops-test",
            "--ttl-s",
            "60",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert minted.returncode == 0, minted.stderr
    settings = AuthSettings.from_environment(
        {"AUTH_JWT_PUBLIC_KEYS": public_pem(key), "AUTH_JWT_ISSUER": "therapy-booking-dev"}
    )
    principal = TokenVerifier(settings).verify(minted.stdout.strip())
    assert principal.subject == "ops-test" and principal.roles == {"admin", "service"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--roles", "root"], "--roles"),
        (["--ttl-s", "999999"], "--ttl-s"),
        (["--key-file", "/nonexistent/key.pem"], "--key-file"),
    ],
)
def test_the_token_command_refuses_bad_arguments_clearly(arguments: list[str], message: str, tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key_file.write_bytes(private_pem(Ed25519PrivateKey.generate()))
    refused = subprocess.run(
        [sys.executable, "-m", "devstack", "token", "--key-file", str(key_file), *arguments],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert refused.returncode == 2 and message in refused.stderr and not refused.stdout, refused
    assert "Traceback" not in refused.stderr
