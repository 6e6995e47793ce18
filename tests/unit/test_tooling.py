"""The build's own promises: generated code is fresh, protos pass buf lint, breaking checks run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
