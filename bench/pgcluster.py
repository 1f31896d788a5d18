"""A throwaway PostgreSQL cluster in a temp dir, for the bench and the tests.

It needs Debian's ``postgresql`` package (the server binaries under
/usr/lib/postgresql/*/bin) and root, to run the server as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "PostgreSQL's server is not installed (apt-get install -y postgresql)"
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "starting PostgreSQL here needs root (to run it as the postgres user)"
    return None


class Cluster:
    """``Cluster()`` starts it on 127.0.0.1 with trust auth; ``database(name)`` makes a
    database and returns its URL; ``stop()`` stops it and removes its files."""

    def __init__(self) -> None:
        self.bin = str(Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1]).parent)
        self.data = tempfile.mkdtemp(prefix="kmrun-pg-")
        shutil.chown(self.data, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as_postgres(f"{self.bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
        self.start()

    def start(self) -> None:
        self._as_postgres(f"{self.bin}/pg_ctl", "-D", self.data, "-l", f"{self.data}/server.log", "-w", "start",
                          "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=300")

    def halt(self) -> None:
        """Stop the server (fast: open connections are cut), keeping its data; ``start`` again."""
        self._as_postgres(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def database(self, name: str) -> str:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q", "-c",
                        f"create database {name}"], check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def through_socket(self, url: str) -> str:
        """The same database through the server's Unix socket: reachable from another
        network namespace, where 127.0.0.1 is that namespace's own loopback."""
        return url.replace(f"@127.0.0.1:{self.port}/", "@/") + f"?host={self.data}&port={self.port}"

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.data, ignore_errors=True)

    @staticmethod
    def _as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, text=True)
