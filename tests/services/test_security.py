"""TLS, mTLS and bearer-token auth: positive and negative cases against real servers on port 0.

Certificates are made here with `cryptography`: one CA that signs the servers' and clients' certs
(SAN 127.0.0.1 and localhost), and a second, untrusted CA. The draft service (no model) stands in
for "any service" in the unit cases; the last test runs a whole request through a gateway whose
every hop (gateway -> tokenizer/prefill/decode, prefill -> decode PushKV) uses mTLS and the token.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.security import SecurityConfig, aio_channel, sync_channel
from stageserve.common.server import ServerConfig
from stageserve.draft.service import DraftServiceConfig
from stageserve.draft.service import start as start_draft
from stageserve.v1 import draft_pb2, draft_pb2_grpc

TOKEN = "s3cret-token-for-tests"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_ca(path: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, _ = _write(path, key, cert)
    return key, cert, cert_path


def make_leaf(path: Path, cn: str, ca_key, ca_cert) -> tuple[str, str]:
    """A cert for 127.0.0.1/localhost, usable as server and as client cert (no EKU restriction)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(path, key, cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca = make_ca(d / "ca", "stageserve test CA")
    other_key, other_cert, other_ca = make_ca(d / "other-ca", "untrusted CA")
    server_cert, server_key = make_leaf(d / "server", "server", ca_key, ca_cert)
    client_cert, client_key = make_leaf(d / "client", "client", ca_key, ca_cert)
    rogue_cert, rogue_key = make_leaf(d / "rogue", "rogue", other_key, other_cert)
    (d / "token").write_text(TOKEN + "\n")
    (d / "wrong-token").write_text("not-the-token\n")
    return dict(
        ca=ca, other_ca=other_ca, server_cert=server_cert, server_key=server_key, client_cert=client_cert,
        client_key=client_key, rogue_cert=rogue_cert, rogue_key=rogue_key, token=str(d / "token"),
        wrong_token=str(d / "wrong-token"),
    )


def propose_code(address: str, security: SecurityConfig | None) -> grpc.StatusCode:
    """One Propose through a blocking channel secured by `security`; its status code."""
    channel = sync_channel(address, security)
    try:
        draft_pb2_grpc.DraftStub(channel).Propose(draft_pb2.ProposeRequest(seq_id="s", new_token_ids=[1, 2], k=1), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def with_draft(server_security: SecurityConfig, check) -> None:
    """Start a draft service with `server_security`, run `check(address)` off the loop, stop it."""

    async def main():
        handle = await start_draft(DraftServiceConfig(server=ServerConfig(security=server_security)))
        try:
            await asyncio.to_thread(check, handle.address)
        finally:
            await handle.stop(grace=0)

    asyncio.run(main())


def test_token_auth_refuses_a_missing_or_wrong_token_and_leaves_health_open(pki):
    def check(address: str) -> None:
        assert propose_code(address, None) is grpc.StatusCode.UNAUTHENTICATED
        assert propose_code(address, SecurityConfig(auth_token_file=pki["wrong_token"])) is grpc.StatusCode.UNAUTHENTICATED
        assert propose_code(address, SecurityConfig(auth_token_file=pki["token"])) is grpc.StatusCode.OK
        with grpc.insecure_channel(address) as channel:  # probes carry no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    with_draft(SecurityConfig(auth_token_file=pki["token"]), check)


def test_tls_server_is_reached_only_by_clients_that_trust_its_ca(pki):
    server = SecurityConfig(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])

    def check(address: str) -> None:
        assert propose_code(address, SecurityConfig(tls_ca_file=pki["ca"])) is grpc.StatusCode.OK
        assert propose_code(address, None) is grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        assert propose_code(address, SecurityConfig(tls_ca_file=pki["other_ca"])) is grpc.StatusCode.UNAVAILABLE

    with_draft(server, check)


def test_mtls_refuses_clients_without_a_cert_from_the_ca(pki):
    server = SecurityConfig(
        tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_ca_file=pki["ca"],
        tls_require_client_cert=True, auth_token_file=pki["token"],
    )
    good = SecurityConfig(tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"], tls_ca_file=pki["ca"],
                          auth_token_file=pki["token"])

    def check(address: str) -> None:
        assert propose_code(address, good) is grpc.StatusCode.OK
        no_cert = SecurityConfig(tls_ca_file=pki["ca"], auth_token_file=pki["token"])
        assert propose_code(address, no_cert) is grpc.StatusCode.UNAVAILABLE
        rogue = SecurityConfig(tls_cert_file=pki["rogue_cert"], tls_key_file=pki["rogue_key"], tls_ca_file=pki["ca"],
                               auth_token_file=pki["token"])
        assert propose_code(address, rogue) is grpc.StatusCode.UNAVAILABLE
        no_token = SecurityConfig(tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"], tls_ca_file=pki["ca"])
        assert propose_code(address, no_token) is grpc.StatusCode.UNAUTHENTICATED

    with_draft(server, check)


def test_security_config_rejects_half_settings(pki):
    with pytest.raises(InvalidArgumentError, match="tls_key_file"):
        SecurityConfig(tls_cert_file=pki["server_cert"])
    with pytest.raises(InvalidArgumentError, match="tls_require_client_cert"):
        SecurityConfig(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_require_client_cert=True)
    with pytest.raises(InvalidArgumentError, match="auth_token_file"):
        aio_channel("127.0.0.1:1", SecurityConfig(auth_token_file="/no/such/file"))


@pytest.mark.slow
def test_a_request_crosses_every_hop_over_mtls_with_the_token(pki, tokenizer):
    """Gateway, tokenizer, prefill and decode all require mTLS and the token; a client with both gets its
    tokens (so every inter-service call, PushKV included, carried them), a client without the token
    gets UNAUTHENTICATED from the gateway."""
    from stageserve.decode.service import DecodeServiceConfig
    from stageserve.decode.service import start as start_decode
    from stageserve.engine.config import EngineConfig
    from stageserve.gateway.client import GatewayClient
    from stageserve.gateway.config import GatewayServiceConfig
    from stageserve.gateway.service import start as start_gateway
    from stageserve.prefill.service import PrefillServiceConfig
    from stageserve.prefill.service import start as start_prefill
    from stageserve.sample.params import SamplingParams
    from stageserve.tokenizer.service import TokenizerServiceConfig
    from stageserve.tokenizer.service import start as start_tokenizer

    security = SecurityConfig(
        tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_ca_file=pki["ca"],
        tls_require_client_cert=True, auth_token_file=pki["token"],
    )
    server = ServerConfig(security=security)
    engine = EngineConfig(num_blocks=32, device="cpu", dtype="float32")
    client_security = SecurityConfig(tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"],
                                     tls_ca_file=pki["ca"], auth_token_file=pki["token"])

    async def main():
        handles, workers = [], []
        try:
            handles.append(await start_tokenizer(TokenizerServiceConfig(server=server), tokenizer))
            decode, dw = await start_decode(DecodeServiceConfig(model="dummy:tiny", engine=engine, server=server))
            prefill, pw = await start_prefill(PrefillServiceConfig(model="dummy:tiny", engine=engine, server=server))
            handles += [decode, prefill]
            workers += [dw, pw]
            gateway = await start_gateway(GatewayServiceConfig(
                tokenizer_addresses=(handles[0].address,), prefill_addresses=(prefill.address,),
                decode_addresses=(decode.address,), server=server,
            ))
            handles.append(gateway)
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async with GatewayClient(gateway.address, timeout_s=30, security=client_security) as client:
                reply = await client.complete(prompt_token_ids=[1, 2, 3, 4, 5], params=params)
            no_token = SecurityConfig(tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"],
                                      tls_ca_file=pki["ca"])
            async with GatewayClient(gateway.address, timeout_s=30, security=no_token) as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.complete(prompt_token_ids=[1, 2, 3, 4, 5], params=params)
            return reply, refused.value.code()
        finally:
            for handle in reversed(handles):
                await handle.stop(grace=0)
            for worker in workers:
                await worker.stop()

    reply, refused = asyncio.run(main())
    assert len(reply.token_ids) == 4
    assert refused is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_the_supervisor_health_checks_a_tls_service_over_tls(pki):
    """`stageserve up`'s supervisor reads a role's `server.security` table, so a service started with mTLS
    and a token is seen ready (over mTLS; health needs no token) and then serves only secured clients."""
    import io

    from stageserve.cluster.supervisor import Cluster, ServiceSpec

    security = {
        "tls_cert_file": pki["server_cert"], "tls_key_file": pki["server_key"], "tls_ca_file": pki["ca"],
        "tls_require_client_cert": True, "auth_token_file": pki["token"],
    }
    spec = ServiceSpec("draft-0", "draft", config_values={"server": {"security": security}})
    cluster = Cluster([spec], output=io.StringIO(), startup_timeout_s=60, grace_s=5)
    cluster.start()
    try:
        cluster.wait_ready()
        client = SecurityConfig(tls_cert_file=pki["client_cert"], tls_key_file=pki["client_key"],
                                tls_ca_file=pki["ca"], auth_token_file=pki["token"])
        assert propose_code(cluster.address("draft-0"), client) is grpc.StatusCode.OK
        assert propose_code(cluster.address("draft-0"), None) is grpc.StatusCode.UNAVAILABLE
    finally:
        cluster.stop()
