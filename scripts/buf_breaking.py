"""Run `buf breaking` against the previous commit, or against main when on another branch.

buf's registry is offline here, so the comparison uses the local git history. A fresh clone
with a single commit (or no history) has nothing to compare against and says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"


def git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def main() -> int:
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    against = None
    if branch not in (None, "main", "HEAD"):
        against = git("merge-base", "HEAD", "main")
    if against is None:
        against = git("rev-parse", "--verify", "--quiet", "HEAD~1")
    if against is None:
        print("buf breaking: no earlier commit to compare against; skipped")
        return 0
    has_protos = git("ls-tree", "-d", against, "protos")
    if not has_protos:
        print(f"buf breaking: {against[:12]} has no protos/; nothing to compare")
        return 0
    command = [str(BUF), "breaking", "--against", f".git#ref={against}"]
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode == 0:
        print(f"buf breaking: no breaking change against {against[:12]}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
