"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, serve on 127.0.0.1 only.

`postgres_server()` finds Debian's server binaries (`initdb`, `pg_ctl`), creates a cluster in a new
temporary folder, starts it on a free port with its unix socket inside that folder, creates one
database and yields its SQLAlchemy URL (`postgresql+psycopg://weightsmith@127.0.0.1:PORT/weightsmith`),
then stops the server and removes the folder. PostgreSQL refuses to run as root, so under root the
binaries run as an unprivileged account (`postgres` when it exists, else `nobody`) that owns the folder.
Without `initdb` the caller's test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

SUPERUSER = "weightsmith"
DATABASE = "weightsmith"
COMMAND_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 30
START_ATTEMPTS = 3

# A test server holds nothing worth keeping: no durability, small memory.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
}


def find_bin_dir() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: PATH first, then Debian's /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        folder = Path(on_path).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    return Path(versions[0]).parent if versions else None


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/VERSION/bin/initdb: the numeric parts of VERSION."""
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as_prefix() -> tuple[list[str], tuple[int, int] | None]:
    """How to run the server binaries: as ourselves, or, under root, as an unprivileged account.

    Returns the command prefix and the (uid, gid) that must own the server's folder (None: ourselves).
    """
    if os.geteuid() != 0:
        return [], None
    account = _unprivileged_account()
    owner = (account.pw_uid, account.pw_gid)
    if shutil.which("runuser"):
        return ["runuser", "-u", account.pw_name, "--"], owner
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"], owner
    raise RuntimeError("running as root and neither runuser nor setpriv is on PATH: PostgreSQL refuses to run as root")


def _unprivileged_account() -> pwd.struct_passwd:
    """The `postgres` account Debian's package creates, else `nobody`."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables, which would point the binaries at another server."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class _Server:
    """One cluster in one folder; `start`, `create_database` and `stop` drive it through pg_ctl."""

    def __init__(self, bin_dir: Path, root: Path, prefix: list[str], owner: tuple[int, int] | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.prefix = prefix
        self.owner = owner
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.logfile = root / "server.log"
        self.port = 0

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one server binary (as the server's account) in the server's folder; raise with its output."""
        command = [*self.prefix, str(self.bin_dir / tool), *args]
        done = subprocess.run(
            command, cwd=self.root, env=_clean_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done

    def init(self) -> None:
        """initdb with a trusted superuser; the server is reachable from this machine only."""
        self.run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                 "--locale=C", "--no-sync")
        self.sockets.mkdir(mode=0o700)
        self.give(self.sockets)

    def give(self, path: Path) -> None:
        """Hand a path we created to the server's account (when it is not us)."""
        if self.owner is not None:
            os.chown(path, *self.owner)

    def start(self) -> None:
        """pg_ctl start on a free port; retried on a new port when another process took the first."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            self._write_settings()
            try:
                self.run("pg_ctl", "start", "-w", "-t", str(CONNECT_TIMEOUT_S), "-D", str(self.data),
                         "-l", str(self.logfile))
                return
            except RuntimeError:
                if attempt == START_ATTEMPTS:
                    raise RuntimeError(f"pg_ctl start failed; server log:\n{self.log_tail()}") from None
                log.warning("PostgreSQL did not start on port %d, trying another", self.port)

    def _write_settings(self) -> None:
        """The settings of this run, in postgresql.auto.conf (read after postgresql.conf)."""
        settings = {**SERVER_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.sockets}'"}
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        settings_file = self.data / "postgresql.auto.conf"
        settings_file.write_text(text)
        self.give(settings_file)

    def create_database(self, name: str) -> None:
        """CREATE DATABASE through psycopg, retried until the server accepts connections."""
        import psycopg

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                                     autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f'CREATE DATABASE "{name}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """pg_ctl stop -m fast; -m immediate when fast shutdown does not finish."""
        try:
            self.run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))
        except (RuntimeError, subprocess.TimeoutExpired):
            log.warning("fast shutdown failed, stopping immediately")
            self.run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data))

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log, for error messages."""
        if not self.logfile.exists():
            return "(no server log)"
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])

    def is_running(self) -> bool:
        """Whether a postmaster holds this cluster's data folder."""
        return (self.data / "postmaster.pid").exists()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway PostgreSQL server and yield `postgresql+psycopg://USER@127.0.0.1:PORT/DB`.

    Skips the calling test when `initdb` is not installed or psycopg is missing.
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("initdb not on PATH (Debian package postgresql): no PostgreSQL server to test against")
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[search]')")
    prefix, owner = _run_as_prefix()
    # The default temporary folder (not pytest's per-user one, which only root may enter): the server's
    # account must reach its own folder.
    root = Path(tempfile.mkdtemp(prefix="weightsmith-pg-"))
    server = _Server(bin_dir, root, prefix, owner)
    started = time.monotonic()
    try:
        server.give(root)
        server.init()
        server.start()
        server.create_database(DATABASE)
        log.info("PostgreSQL %s ready on 127.0.0.1:%d in %.1f s", bin_dir, server.port, time.monotonic() - started)
        yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{server.port}/{DATABASE}"
    finally:
        try:
            if server.is_running():
                server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
