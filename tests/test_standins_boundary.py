"""The stand-ins are test equipment beside the package: nothing deployed loads or carries them.

(tests/test_imports.py checks the import statements: only the command line's demo names them.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_command_line_does_not_load_the_stand_ins():
    script = (
        "import sys, upgrade_handler.__main__, upgrade_handler.cli.app, upgrade_handler.cli.demo; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'standins'))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_deployment_leaves_the_stand_ins_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # A folder pattern (gitignore syntax) leaves out everything under it, at the root or below.
    folders = [p.strip("/") for p in patterns if p.endswith("/")]
    assert "standins" in folders
    assert not (ROOT / "upgrade_handler" / "standins").exists()
