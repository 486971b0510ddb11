"""A real, throwaway PostgreSQL server for the tests: `with PostgresServer() as server: ...`.

It runs the installed server binaries (`initdb`, `postgres`, `pg_ctl`: on PATH, or Debian's
/usr/lib/postgresql/<version>/bin; `.ci/run` installs Debian's `postgresql` package when they
are missing) on a cluster made in a temporary directory: trust authentication, listening on a
free port of 127.0.0.1 only, its unix socket in that directory. PostgreSQL refuses to run as
root, so when the tests do, the server runs as an existing unprivileged user (`postgres`, else
`nobody`), who owns the directory.

The server is this process's child and is told to shut down when this process dies (the
kernel's parent-death signal), so even a killed test run leaves no server behind (and the next
run removes the directory it left). Stopping checks that no process is left in the data
directory, then removes it.

Durability settings are off (fsync, full-page writes): the tests kill clients, never this
server, and a throwaway cluster does not need to survive a power cut.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from ecomsearch.pids import process_alive
from ecomsearch.server.launcher import free_port
from ecomsearch.server.processes import die_with_parent

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found on PATH or under "
    "/usr/lib/postgresql/*/bin; `.ci/run` installs Debian's `postgresql` package "
    "(apt-get install postgresql)"
)
UNPRIVILEGED_USERS = ("postgres", "nobody")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
DIRECTORY_PREFIX = "ecomsearch-pg-"
START_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it


class PostgresNotInstalledError(RuntimeError):
    """The server binaries are not installed."""


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: _version_key(d.parent.name),
        reverse=True,
    )
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresNotInstalledError(INSTALL_HINT)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _server_user() -> pwd.struct_passwd | None:
    """Whom to run the server as: None (this process's user) unless that is root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(f"running as root and none of the users {UNPRIVILEGED_USERS} exists")


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is `directory` or inside it: every
    PostgreSQL process works in its data directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(int(entry.name))
    return found


def remove_abandoned_directories() -> None:
    """Removes the directories of servers whose test process was killed (its server died with
    it, but nothing could remove the directory): the owner's pid is in the name."""
    for directory in Path(tempfile.gettempdir()).glob(f"{DIRECTORY_PREFIX}*-*"):
        owner = directory.name.removeprefix(DIRECTORY_PREFIX).split("-", 1)[0]
        if (
            owner.isdigit()
            and not process_alive(int(owner))
            and not processes_in(directory.resolve())
        ):
            shutil.rmtree(directory, ignore_errors=True)


class PostgresServer:
    """A PostgreSQL server in a temporary directory, for the length of a `with` block."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self._user = _server_user()
        self.user = self._user.pw_name if self._user else pwd.getpwuid(os.geteuid()).pw_name
        self.root: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """The URL of the server's `postgres` database, as its superuser (no password)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        assert self.port is not None, "the server is not started"
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def _run_as_server_user(self) -> dict:
        """Popen arguments that run a command as the server's user, in its own environment."""
        environment = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "LC_ALL": "C",
            "HOME": str(self.root),
        }
        arguments: dict = {"env": environment, "cwd": self.root}
        if self._user is not None:
            arguments.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return arguments

    def start(self) -> PostgresServer:
        # Not under pytest's tmp_path: its directories are private to root, and the server's
        # user must reach this one.
        remove_abandoned_directories()
        self.root = Path(tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-"))
        try:
            if self._user is not None:
                os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            self._initdb()
            for attempt in range(START_ATTEMPTS):
                if self._launch():
                    return self
                if attempt == START_ATTEMPTS - 1:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                self.user,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **self._run_as_server_user(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _launch(self) -> bool:
        """Starts the server on a fresh free port; True once it accepts connections, False if it
        exited first (most likely the port was taken meanwhile)."""
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            if self._user is not None:
                os.chown(self.log_path, self._user.pw_uid, self._user.pw_gid)
            # postgres itself rather than `pg_ctl start`, so the server is this process's child
            # and gets the parent-death signal: SIGQUIT is PostgreSQL's immediate shutdown.
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=100",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=lambda: die_with_parent(signal.SIGQUIT),
                **self._run_as_server_user(),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._accepts_connections():
                return True
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not accept connections:\n{self._log_tail()}")

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (named `name`, or a fresh name); returns its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def stop(self) -> None:
        """Stops the server (immediate shutdown), checks nothing is left running in its data
        directory, and removes the directory."""
        if self.root is None:
            return
        try:
            if self._process is not None:
                subprocess.run(
                    [
                        str(self.bin_dir / "pg_ctl"),
                        "stop",
                        "--pgdata",
                        str(self.data_dir),
                        "--mode",
                        "immediate",
                        "--wait",
                        "--timeout",
                        str(int(STOP_TIMEOUT_S)),
                    ],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=STOP_TIMEOUT_S + 5,
                    **self._run_as_server_user(),
                )
                try:
                    self._process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
                self._process = None
            # An immediate shutdown SIGQUITs the backends; they may take a moment to exit after
            # the postmaster has. Only what is still there after that is a survivor.
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while (
                left := [pid for pid in processes_in(self.root.resolve()) if process_alive(pid)]
            ) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if left:
                raise RuntimeError(f"PostgreSQL processes {left} outlived the server's stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
