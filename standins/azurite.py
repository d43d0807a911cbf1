"""Azurite's Table service on a free loopback port, for the tests and benchmarks of the shared budget.

Azurite is Microsoft's storage emulator; the project pins it in ``package.json`` and ``make setup``
installs it with ``npm ci``. This only starts ``node_modules/.bin/azurite-table`` in memory, waits
until it answers, and stops it. Missing ``node_modules`` is an error that says to run ``make setup``,
never a reason to skip.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from upgrade_handler.settings import DEVELOPMENT_STORAGE

ROOT = Path(__file__).resolve().parent.parent
EXECUTABLE = ROOT / "node_modules" / ".bin" / "azurite-table"
#: The development account's key, as Azurite's README publishes it (also in ``UseDevelopmentStorage=true``).
ACCOUNT_KEY = next(p.split("=", 1)[1] for p in DEVELOPMENT_STORAGE.split(";") if p.startswith("AccountKey="))


class AzuriteMissing(RuntimeError):
    """``node_modules`` has no Azurite: the project's test equipment is not installed."""


def connection_string(port: int, host: str = "127.0.0.1") -> str:
    """A storage connection string for Azurite's development account at ``host:port``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://{host}:{port}/devstoreaccount1;"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Azurite:
    """``azurite-table`` in memory on 127.0.0.1; usable as a context manager.

    ``connection_string`` reaches it. :meth:`stop` and :meth:`start` again keep the port, so a
    benchmark can take the store away for a while and bring it back (empty: it keeps nothing).
    """

    def __init__(self, port: int | None = None) -> None:
        if not EXECUTABLE.exists():
            raise AzuriteMissing(f"{EXECUTABLE} is missing: run `make setup` (it runs `npm ci`) to install Azurite")
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> Self:
        command = [
            str(EXECUTABLE),
            *("--tableHost", "127.0.0.1", "--tablePort", str(self.port)),
            *("--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--silent"),
        ]
        self._process = subprocess.Popen(  # noqa: S603  # our own pinned executable, no shell
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                assert self._process.stderr is not None
                error = self._process.stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"azurite-table exited with {self._process.returncode}: {error}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"azurite-table did not answer on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
