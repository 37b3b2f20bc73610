"""`Cluster` and `stageserve serve` with real child processes on ephemeral ports (stateless services only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.cluster import supervisor
from stageserve.cluster.supervisor import Cluster, ClusterError, ServiceSpec, process_group_members, run_until_signal
from stageserve.v1 import draft_pb2, draft_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Lines:
    """A thread-safe text sink standing in for stdout."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        with self._lock:
            return "".join(self._parts).splitlines()


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def assert_gone(pids: list[int], within_s: float = 0.0) -> None:
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == []
    for pid in pids:  # nothing they started survives them either
        assert process_group_members(pid) == []
        assert children_of(pid) == []


def health(address: str, name: str, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
    return reply.status


def stateless_specs(**tokenizer) -> list[ServiceSpec]:
    return [ServiceSpec("tokenizer-0", "tokenizer", **tokenizer), ServiceSpec("draft-0", "draft")]


def test_cluster_serves_prefixes_logs_and_stops_every_child():
    output = Lines()
    cluster = Cluster(stateless_specs(), startup_timeout_s=120, grace_s=5, output=output)
    try:
        cluster.start()
        cluster.wait_ready()
        pids = [cluster.pid(name) for name in cluster.names]
        assert all(alive(p) for p in pids)
        assert len({cluster.address(n) for n in cluster.names}) == 2
        assert health(cluster.address("tokenizer-0"), "stageserve.v1.Tokenizer") == SERVING
        assert health(cluster.address("draft-0"), "stageserve.v1.Draft") == SERVING
        with grpc.insecure_channel(cluster.address("tokenizer-0")) as channel:
            ids = tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(tokenizer_pb2.TokenizeRequest(text="hi"), timeout=10)
        assert len(ids.token_ids) >= 1
        with grpc.insecure_channel(cluster.address("draft-0")) as channel:
            stub = draft_pb2_grpc.DraftStub(channel)
            proposal = stub.Propose(draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[1, 2, 3, 1, 2], k=2), timeout=10)
        assert list(proposal.token_ids) == [3, 1]
    finally:
        cluster.stop()
    assert_gone(pids)

    lines = output.lines()
    assert lines and all(line.startswith(("[tokenizer-0] ", "[draft-0] ")) for line in lines), lines
    for name, port in ((n, cluster.address(n).rsplit(":", 1)[1]) for n in cluster.names):
        # The child's own log line (which names the replica), then the supervisor's readiness note.
        assert any(line.startswith(f"[{name}] ") and f" {name} " in line and "serving on" in line for line in lines)
        assert f"[{name}] ready on 127.0.0.1:{port}" in lines
        assert any(line.startswith(f"[{name}] ") and "stopping gracefully" in line for line in lines)
    assert cluster.log_lines("draft-0")[-1].rstrip().endswith("draft stopped")
    cluster.stop()  # a second stop is harmless


def test_a_service_that_fails_at_startup_is_named_with_its_last_log_lines():
    output = Lines()
    started = time.monotonic()
    with Cluster(stateless_specs(args=("--model-path", "/nonexistent/model.gguf")), output=output) as cluster:
        with pytest.raises(ClusterError) as info:
            cluster.start()
            cluster.wait_ready()
        pids = [cluster.pid(n) for n in cluster.names]
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert message.startswith("tokenizer-0 (tokenizer) exited with code 1 before it was ready")
    assert "/nonexistent/model.gguf: no such file or directory" in message
    assert_gone(pids)


def test_a_service_that_is_not_ready_in_time_is_named():
    # Python's start-up alone takes longer than this, so the tokenizer cannot be ready yet.
    with Cluster([ServiceSpec("tokenizer-0", "tokenizer")], startup_timeout_s=0.3) as cluster:
        cluster.start()
        with pytest.raises(ClusterError, match=r"^tokenizer-0 not ready within 0.3s .*\ntokenizer-0 \(running\)"):
            cluster.wait_ready()
        pid = cluster.pid("tokenizer-0")
    assert_gone([pid])


def test_a_fixed_port_in_use_is_refused_before_launching():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with Cluster([ServiceSpec("draft-0", "draft", port=port)]) as cluster:
            with pytest.raises(ClusterError, match=f"draft-0 cannot start: port {port} on 127.0.0.1 is already in use"):
                cluster.start()
            assert cluster.pid("draft-0") is None


def test_a_picked_port_taken_before_the_child_binds_it_is_picked_again(monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        real_pick = supervisor.pick_free_port
        picks = iter([taken])
        monkeypatch.setattr(supervisor, "pick_free_port", lambda host, used=(): next(picks, None) or real_pick(host, used))
        output = Lines()
        with Cluster([ServiceSpec("draft-0", "draft")], startup_timeout_s=60, output=output) as cluster:
            cluster.start()
            cluster.wait_ready()
            assert cluster.address("draft-0") != f"127.0.0.1:{taken}"
    assert f"[draft-0] port {taken} was taken; relaunching on another" in output.lines()


def test_the_given_config_values_reach_the_child():
    output = Lines()
    spec = ServiceSpec("draft-0", "draft", config_values={"max_n": 2, "server": {"grace_s": 0.5}})
    with Cluster([spec], output=output) as cluster:
        cluster.start()
        cluster.wait_ready()
        with grpc.insecure_channel(cluster.address("draft-0")) as channel:
            stub = draft_pb2_grpc.DraftStub(channel)
            # With max_n 2 the 3-gram [1, 2, 3] is not matched; the 2-gram [2, 3] is, at its first place.
            proposal = stub.Propose(draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[2, 3, 9, 1, 2, 3], k=1))
        assert list(proposal.token_ids) == [9]
    with pytest.raises(ClusterError):
        with Cluster([ServiceSpec("draft-0", "draft", config_values={"max_m": 2})]) as cluster:
            cluster.start()
            cluster.wait_ready()
    assert "max_m: unknown config option" in "".join(cluster.log_lines("draft-0"))


def test_run_until_signal_stops_everything_on_sigterm():
    output = Lines()
    cluster = Cluster(stateless_specs(), output=output)
    status = run_until_signal(cluster, on_ready=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert status == 0
    assert_gone([cluster.pid(n) for n in cluster.names])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_run_until_signal_stops_everything_when_a_service_dies(capsys):
    cluster = Cluster(stateless_specs(), output=Lines())
    status = run_until_signal(cluster, on_ready=lambda: os.kill(cluster.pid("draft-0"), signal.SIGKILL))
    assert status == 1
    assert "draft-0 (exit code -9)" in capsys.readouterr().err
    assert_gone([cluster.pid(n) for n in cluster.names])


SUPERVISOR = textwrap.dedent(
    """
    import json, sys, time
    from stageserve.cluster.supervisor import Cluster, ServiceSpec
    cluster = Cluster([ServiceSpec("draft-0", "draft"), ServiceSpec("draft-1", "draft")], output=sys.stderr)
    cluster.start()
    cluster.wait_ready()
    print(json.dumps([cluster.pid(n) for n in cluster.names]), flush=True)
    time.sleep(600)
    """
)


def test_children_stop_by_themselves_when_the_supervisor_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    assert_gone(pids, within_s=10)


def serve_process(*argv: str) -> tuple[subprocess.Popen, str]:
    """`stageserve serve ...` on a free port; returns it once it logs that it serves, and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stageserve.cli", "serve", *argv, "--server-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stderr:
        if "serving on " in line:
            return process, line.split("serving on ")[1].split()[0]
    raise AssertionError(f"exited with {process.wait()} before serving")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_fails_health_then_stops_and_exits_0_on_a_signal(signum):
    process, address = serve_process("draft", "--log-name", "draft-x", "--server-grace-s", "1")
    try:
        with grpc.insecure_channel(address) as channel:
            updates = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="stageserve.v1.Draft"), timeout=20
            )
            assert next(updates).status == SERVING
            process.send_signal(signum)
            assert next(updates).status == NOT_SERVING  # before the server goes away
        assert process.wait(timeout=20) == 0
        rest = process.stderr.read()
    finally:
        process.kill()
    assert f"INFO draft-x stageserve.cluster.serve: {signal.Signals(signum).name} received: stopping gracefully" in rest
    assert "draft stopped" in rest


def test_serve_rejects_a_bad_flag_naming_it():
    result = subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "serve", "draft", "--max-history", "1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "max_history: must be >= 32" in result.stderr


def test_every_flag_up_passes_is_one_its_role_accepts():
    from stageserve.cluster.plan import ClusterConfig, plan_services
    from stageserve.cluster.serve import build_parser
    from stageserve.cluster.supervisor import role_flags
    from stageserve.common.config import dataclass_from_args
    from stageserve.common.roles import get_role

    config = ClusterConfig(model="model.gguf", prefill_replicas=2, decode_replicas=2, sampler="remote")
    for i, spec in enumerate(plan_services(config)):  # the real role configs decide the optional flags
        role = get_role(spec.role)
        argv = role_flags(spec, "127.0.0.1", 40000 + i, lambda name: f"{name}.test:1")
        built = dataclass_from_args(role.config_class(), build_parser(role, role.config_class()).parse_args(argv))
        assert built.server.port == 40000 + i
        if role.model_field is not None:
            assert getattr(built, role.model_field) == "model.gguf"
        if spec.role == "decode":
            assert built.sample_address == "sample-0.test:1"
    assert built.decode_addresses == ("decode-0.test:1", "decode-1.test:1")  # the gateway comes last
    assert built.prefill_addresses == ("prefill-0.test:1", "prefill-1.test:1")
