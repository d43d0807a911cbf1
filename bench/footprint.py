"""Benchmark 3: what a deployment installs.

Fresh virtual environments under /tmp, each given one set of requirements by pip (from the
package registry, through pip's cache): ``requirements.txt`` (what the function deploys),
``msgraph-sdk`` alone, and ``requirements.txt`` plus ``msgraph-sdk`` (what the function would
deploy if it were built on the SDK). Reported: bytes and files under site-packages beyond an
empty environment's (pip and setuptools), and the distributions installed.

The environments are kept under /tmp/bench-venvs for the cold-start benchmark, which runs each
function in the environment of its own deployment; pass --clean to remove them afterwards.

    python -m bench footprint [--clean]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

from bench._common import ROOT, ratio, table, write_result

VENVS = Path(tempfile.gettempdir()) / "bench-venvs"
SETS: dict[str, list[str]] = {
    "empty": [],
    "function": ["-r", str(ROOT / "requirements.txt")],
    "msgraph-sdk": ["-r", str(ROOT / "bench" / "requirements.txt")],
    "function + msgraph-sdk": ["-r", str(ROOT / "requirements.txt"), "-r", str(ROOT / "bench" / "requirements.txt")],
}


def venv_dir(name: str) -> Path:
    return VENVS / name.replace(" + ", "-plus-").replace(" ", "-")


def python_of(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def build(name: str) -> float:
    """A new environment with the named set installed; returns the seconds pip took."""
    path = venv_dir(name)
    shutil.rmtree(path, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    started = time.perf_counter()
    if SETS[name]:
        done = subprocess.run(
            [str(python_of(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *SETS[name]],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pip could not install {name}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def ensure(name: str) -> Path:
    """The environment's python, building the environment if it is not there yet."""
    if not python_of(name).exists():
        build(name)
    return python_of(name)


def site_packages(name: str) -> Path:
    found = list((venv_dir(name) / "lib").glob("python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def measure(name: str) -> dict[str, Any]:
    files = size = blocks = 0
    for root, _, names in os.walk(site_packages(name)):
        for file in names:
            stat = os.lstat(os.path.join(root, file))
            files += 1
            size += stat.st_size
            blocks += stat.st_blocks * 512
    listed = subprocess.run(
        [str(python_of(name)), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {"bytes": size, "disk_bytes": blocks, "files": files, "distributions": sorted(listed)}


def run(clean: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {"pip_seconds": {}}
    measured = {}
    for name in SETS:
        results["pip_seconds"][name] = round(build(name), 1)
        measured[name] = measure(name)
        print(f"  {name}: installed", file=sys.stderr, flush=True)
    empty = measured.pop("empty")
    rows = []
    for name, m in measured.items():
        extra = sorted(set(m["distributions"]) - set(empty["distributions"]))
        summary = {
            "mb": round((m["bytes"] - empty["bytes"]) / 1e6, 1),
            "disk_mb": round((m["disk_bytes"] - empty["disk_bytes"]) / 1e6, 1),
            "files": m["files"] - empty["files"],
            "distributions": len(extra),
            "installed": extra,
        }
        results[name] = summary
        rows.append([name, summary["mb"], summary["disk_mb"], summary["files"], summary["distributions"]])
    print(table(("requirements", "site-packages MB", "on disk MB", "files", "distributions"), rows))
    ours = results["function"]
    results["ratios_vs_function"] = {
        name: {"mb": ratio(results[name]["mb"], ours["mb"]), "files": ratio(results[name]["files"], ours["files"])}
        for name in ("msgraph-sdk", "function + msgraph-sdk")
    }
    print()
    print(
        table(
            ("÷ function", "MB", "files"),
            [[n, r["mb"], r["files"]] for n, r in results["ratios_vs_function"].items()],
        )
    )
    if clean:
        shutil.rmtree(VENVS, ignore_errors=True)
    path = write_result("footprint", results)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench footprint")
    parser.add_argument("--clean", action="store_true", help="remove the environments under /tmp afterwards")
    args = parser.parse_args(argv)
    run(args.clean)


if __name__ == "__main__":
    main()
