"""Run a set of stageserve services as child processes on one machine, and take them all down again.

The life of a service in a `Cluster`:
1. start(): launched as `python -m stageserve.cli serve ROLE --server-port P ...` in a new session
   (its own process group), once every service whose address it is given is ready. The supervisor
   picks P by binding port 0, or checks that a fixed port is free. A service that dies before it is
   ready because its picked port was taken meanwhile is relaunched on a fresh port.
2. wait_ready(): ready when `grpc.health.v1.Health/Check` on its readiness name (e.g.
   "stageserve.v1.Decode") answers SERVING. A service that exits first, or is not ready in time, is
   a `ClusterError` that names it and quotes its last log lines.
3. stop(): SIGTERM to every process group (each service drains: NOT_SERVING, then `grace`), SIGKILL
   to whatever is left after the grace period, then reap. Children also stop on their own if the
   supervisor dies without stopping them (`serve --parent-pid`).

Every line a service prints goes to `output` as `[name] line`, and the last few are kept for errors.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common.errors import StageServeError
from stageserve.common.roles import get_role
from stageserve.common.security import SecurityConfig, sync_channel

_POLL_S = 0.2
_HEALTH_RPC_TIMEOUT_S = 1.0
_PORT_ATTEMPTS = 3
_BIND_FAILURE = "cannot listen on"  # what common/server.py says when a port is taken
# gRPC backs off up to 2 minutes between connection attempts; a service that takes a while to bind
# would then be seen ready long after it is. Keep retrying every fraction of a second instead.
_HEALTH_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class ClusterError(StageServeError):
    """A service failed to start, exited, or was not ready in time. The message names it."""


class ClusterInterrupted(ClusterError):
    """`interrupt()` was called (a signal arrived) while the cluster was starting."""


@dataclass(frozen=True)
class ServiceSpec:
    """One service process of a cluster."""

    name: str  # unique in the cluster, e.g. "decode-0": the log prefix and the name in errors
    role: str  # a key of common.roles.ROLES
    port: int = 0  # 0: the supervisor picks a free port
    args: tuple[str, ...] = ()  # more flags for `stageserve serve ROLE`
    config_values: Mapping[str, Any] = field(default_factory=dict)  # passed as the role's --config file
    # (flag, names of services) pairs: e.g. ("--tokenizer-addresses", ("tokenizer-0",)) gives the service
    # those services' addresses, and launches it only once they are ready.
    address_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to the process's environment (e.g. OTEL_*)
    metrics: bool = False  # serve Prometheus metrics on a port the supervisor picks (`metrics_address`)

    @property
    def depends_on(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.address_flags for name in names)


@dataclass
class _Service:
    """A spec and the state of its current process."""

    spec: ServiceSpec
    readiness_name: str
    port: int = 0
    metrics_port: int = 0  # 0: none
    process: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    ready: bool = False
    attempts: int = 0
    bind_failed: bool = False  # the current process said its port was taken

    @property
    def name(self) -> str:
        return self.spec.name

    def tail(self, n: int = 20) -> str:
        return "".join(f"    {line}" for line in list(self.lines)[-n:]) or "    (no output)\n"


def pick_free_port(host: str, taken: Iterable[int] = ()) -> int:
    """A port on `host` that nothing listens on now (the kernel's choice for port 0), not in `taken`."""
    taken = set(taken)
    for _ in range(100):
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
    raise ClusterError(f"no free port found on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether a gRPC server could listen on `host:port` now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # As gRPC does: a port left in TIME_WAIT by the last run is free, one that is bound is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def role_flags(spec: ServiceSpec, host: str, port: int, address_of: Callable[[str], str]) -> list[str]:
    """The flags of `spec`'s role config that its process gets: where to listen, the addresses it is
    given (`address_of(name)`), and `spec.args`."""
    flags = ["--server-host", host, "--server-port", str(port)]
    for flag, names in spec.address_flags:
        flags += [flag, *(address_of(name) for name in names)]
    return flags + list(spec.args)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`, read from /proc (empty where there is no /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses; fields after the last ")" are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp == pgid and state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


class Cluster:
    """Child processes for `specs`, started in order, each on `host` with its own port.

        with Cluster(specs) as cluster:      # leaving the block stops every child
            cluster.start()
            cluster.wait_ready()
            print(cluster.address("gateway"))
    """

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 300.0,
        grace_s: float = 10.0,
        output: TextIO | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ):
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ClusterError(f"service names must be unique; repeated: {', '.join(duplicates)}")
        position = {name: i for i, name in enumerate(names)}
        for spec in specs:
            for dep in spec.depends_on:
                if position.get(dep, len(names)) >= position[spec.name]:
                    raise ClusterError(f"{spec.name} is given the address of {dep!r}, which is not started before it")
        self._services = {spec.name: _Service(spec, get_role(spec.role).readiness_name) for spec in specs}
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self._output = output if output is not None else sys.stdout
        self._python = python
        self._env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self._output_lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._config_dir: str | None = None
        self._deadline: float | None = None  # of the current start()/wait_ready()
        self._timeout_s = startup_timeout_s  # that the deadline was set from
        self._interrupted = threading.Event()
        self._force_kill = threading.Event()

    # -- public ------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._services)

    def address(self, name: str) -> str:
        service = self._service(name)
        if not service.port:
            raise ClusterError(f"{name} has not been started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{service.port}"

    def metrics_address(self, name: str) -> str:
        """host:port of `name`'s Prometheus endpoint (its spec asked for `metrics`)."""
        service = self._service(name)
        if not service.metrics_port:
            raise ClusterError(f"{name} serves no metrics")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{service.metrics_port}"

    def pid(self, name: str) -> int | None:
        process = self._service(name).process
        return process.pid if process is not None else None

    def log_lines(self, name: str) -> list[str]:
        """The last lines `name` printed (without the prefix)."""
        return list(self._service(name).lines)

    def start(self) -> None:
        """Launch every service in order. One that is given others' addresses waits until they are ready,
        so this may block up to the startup timeout; it raises ClusterError if one fails."""
        self._set_deadline(self.startup_timeout_s)
        for service in self._services.values():
            if service.process is not None:
                continue
            self._raise_if_interrupted()
            if service.spec.depends_on:
                self._wait_for([self._services[d] for d in service.spec.depends_on])
            self._launch(service)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every service reports SERVING, or raise ClusterError naming the one that failed."""
        if timeout_s is not None:
            self._set_deadline(timeout_s)
        elif self._deadline is None:
            self._set_deadline(self.startup_timeout_s)
        missing = [s.name for s in self._services.values() if s.process is None]
        if missing:
            raise ClusterError(f"{missing[0]} has not been started; call start() first")
        self._wait_for(list(self._services.values()))

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of every started service whose process has ended."""
        return [
            (s.name, s.process.returncode)
            for s in self._services.values()
            if s.process is not None and s.process.poll() is not None
        ]

    def failure_report(self, name: str) -> str:
        service = self._service(name)
        code = service.process.poll() if service.process is not None else None
        status = "running" if code is None else f"exit code {code}"
        return f"{name} ({status}); its last log lines:\n{service.tail()}"

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child's process group, SIGKILL what is left after `grace_s`, and reap them all.

        Safe to call more than once; `force_kill()` (e.g. from a signal handler) cuts the grace short."""
        grace_s = self.grace_s if grace_s is None else grace_s
        running = [s for s in reversed(self._services.values()) if s.process is not None and s.process.poll() is None]
        for service in running:  # in reverse start order: the gateway first
            self._signal_group(service, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in running:
            while service.process.poll() is None and time.monotonic() < deadline and not self._force_kill.is_set():
                time.sleep(0.05)
        for service in self._services.values():
            if service.process is None:
                continue
            if service.process.poll() is None:
                self._signal_group(service, signal.SIGKILL)
            service.process.wait()
            # Anything the service itself started and left behind in its group.
            for pid in process_group_members(service.process.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for service in self._services.values():
            if service.reader is not None:
                service.reader.join(timeout=2.0)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def interrupt(self) -> None:
        """Make a running `start()` or `wait_ready()` raise ClusterInterrupted soon. Signal-handler safe."""
        self._interrupted.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def force_kill(self) -> None:
        """Cut a running `stop()` short: SIGKILL now instead of waiting out the grace period."""
        self._force_kill.set()

    def announce(self, line: str) -> None:
        """Write `line` to the cluster's output between whole lines of the services' logs."""
        self._write(line if line.endswith("\n") else line + "\n")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- launching ---------------------------------------------------------------------------------

    def _service(self, name: str) -> _Service:
        try:
            return self._services[name]
        except KeyError:
            raise ClusterError(f"no service named {name!r} in this cluster") from None

    def _taken_ports(self) -> set[int]:
        return {p for s in self._services.values() for p in (s.port, s.metrics_port) if p}

    def _launch(self, service: _Service) -> None:
        spec = service.spec
        if spec.port:
            if not port_is_free(self.host, spec.port):
                raise ClusterError(f"{spec.name} cannot start: port {spec.port} on {self.host} is already in use")
            service.port = spec.port
        else:
            service.port = pick_free_port(self.host, self._taken_ports())
        metrics_flags: list[str] = []
        if spec.metrics:
            service.metrics_port = 0
            service.metrics_port = pick_free_port(self.host, self._taken_ports())
            metrics_flags = ["--server-metrics-port", str(service.metrics_port)]
        service.attempts += 1
        service.ready = False
        service.bind_failed = False
        self._close_channel(spec.name)  # a relaunch listens on another port
        command = [
            self._python, "-m", "stageserve.cli", "serve", spec.role,
            "--log-name", spec.name,
            "--parent-pid", str(os.getpid()),
            *self._config_args(spec),
            *role_flags(spec, self.host, service.port, self.address),
            *metrics_flags,
        ]  # fmt: skip
        service.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the group, and Ctrl-C reaches only us
            env={**self._env, **spec.env},
        )
        service.reader = threading.Thread(
            target=self._pump, args=(service, service.process), name=f"log-{spec.name}", daemon=True
        )
        service.reader.start()

    def _config_args(self, spec: ServiceSpec) -> list[str]:
        if not spec.config_values:
            return []
        if self._config_dir is None:
            self._config_dir = tempfile.mkdtemp(prefix="stageserve-cluster-")
        path = Path(self._config_dir) / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump(_plain(spec.config_values), sort_keys=False), encoding="utf-8")
        return ["--config", str(path)]

    def _pump(self, service: _Service, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = _as_terminal_shows(raw)
            if line is not None:
                service.bind_failed = service.bind_failed or _BIND_FAILURE in line
                service.lines.append(line)
                self._write(f"[{service.name}] {line}")

    def _write(self, text: str) -> None:
        with self._output_lock:
            with contextlib.suppress(OSError, ValueError):  # a closed or broken output must not stop draining
                self._output.write(text)
                self._output.flush()

    # -- readiness ---------------------------------------------------------------------------------

    def _wait_for(self, services: list[_Service]) -> None:
        """Wait until `services` are ready, checking every launched one (a crash anywhere ends the wait)."""
        pending = [s for s in services if not s.ready]
        while pending:
            self._raise_if_interrupted()
            for service in self._services.values():
                if service.process is not None and not service.ready:
                    self._check(service)
            pending = [s for s in pending if not s.ready]
            if not pending:
                return
            if self._deadline is not None and time.monotonic() > self._deadline:
                names = ", ".join(s.name for s in pending)
                reports = "\n".join(self.failure_report(s.name) for s in pending)
                raise ClusterError(
                    f"{names} not ready within {self._timeout_s:g}s "
                    f"(no SERVING from health check on its readiness name)\n{reports}"
                )
            time.sleep(_POLL_S)

    def _set_deadline(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s

    def _raise_if_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise ClusterInterrupted("interrupted while starting")

    def _check(self, service: _Service) -> None:
        """Mark `service` ready if it reports SERVING; relaunch or raise if its process has exited."""
        code = service.process.poll()
        if code is not None:
            if service.reader is not None:
                service.reader.join(timeout=2.0)  # its last words are the most useful ones
            if self._port_was_taken(service):
                self._write(f"[{service.name}] port {service.port} was taken; relaunching on another\n")
                self._launch(service)
                return
            raise ClusterError(
                f"{service.name} ({service.spec.role}) exited with code {code} before it was ready; "
                f"its last log lines:\n{service.tail()}"
            )
        if self._health_status(service) == health_pb2.HealthCheckResponse.SERVING:
            service.ready = True
            self._close_channel(service.name)
            self._write(f"[{service.name}] ready on {self.address(service.name)}\n")

    def _port_was_taken(self, service: _Service) -> bool:
        return service.bind_failed and not service.spec.port and service.attempts < _PORT_ATTEMPTS

    def _health_status(self, service: _Service) -> int | None:
        channel = self._channels.get(service.name)
        if channel is None:
            security = _security(service.spec.config_values)  # a TLS service is health-checked over TLS
            channel = sync_channel(self.address(service.name), security, _HEALTH_CHANNEL_OPTIONS)
            self._channels[service.name] = channel
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service.readiness_name), timeout=_HEALTH_RPC_TIMEOUT_S
            )
        except grpc.RpcError:
            return None  # not listening yet, or the name is not registered yet
        return reply.status

    def _close_channel(self, name: str) -> None:
        channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def _signal_group(self, service: _Service, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.process.pid, signum)


def _as_terminal_shows(raw: bytes) -> str | None:
    """A line of output as a terminal would leave it: progress bars redraw with "\\r", so keep only the
    last text after one. None for a line that only cleared itself."""
    segments = raw.rstrip(b"\n").split(b"\r")
    shown = [segment for segment in segments if segment.strip()]
    if not shown and len(segments) > 1:
        return None
    return (shown[-1] if shown else b"").decode("utf-8", errors="replace") + "\n"


def _plain(values: Any) -> Any:
    """Mappings and tuples as the dicts and lists YAML writes."""
    if isinstance(values, Mapping):
        return {str(k): _plain(v) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return [_plain(v) for v in values]
    return values


def run_until_signal(cluster: Cluster, on_ready: Callable[[], None] | None = None) -> int:
    """Start `cluster`, wait until it is ready, then supervise it until SIGINT/SIGTERM or a service exits.

    Returns 0 after a signal, 1 if a service failed. Every child is stopped before this returns; a
    second signal during the stop kills what is left at once. Call it from the main thread.
    """

    def on_signal(signum: int, frame: object) -> None:
        if cluster.interrupted:
            cluster.force_kill()
        else:
            cluster.interrupt()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        cluster.start()
        cluster.wait_ready()
        if on_ready is not None:
            on_ready()
        while not cluster.interrupted:
            exited = cluster.exited()
            if exited:
                name, code = exited[0]
                cluster.interrupt()  # a signal from here on means "kill now"
                cluster.announce(f"error: {name} exited with code {code}; stopping the cluster")
                print(f"error: {cluster.failure_report(name)}", file=sys.stderr)
                status = 1
            time.sleep(_POLL_S)
    except ClusterInterrupted:
        pass
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        cluster.interrupt()
        try:
            cluster.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return status


def _security(config_values: Mapping[str, Any]) -> SecurityConfig:
    """The `server: {security: ...}` table of a role's config, as the service itself will read it."""
    table = (config_values.get("server") or {}).get("security") or {}
    return SecurityConfig(**{key.replace("-", "_"): value for key, value in table.items()})
