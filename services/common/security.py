"""Transport security and token auth, the same for every service and for each of its outgoing calls.

One `SecurityConfig` (nested in `ServerConfig`, so every role has `--server-tls-*` and
`--server-auth-token-file`) says both how the server listens and how the process dials its peers:

    server side                                   client side (gateway -> workers, prefill -> decode,
                                                  decode -> sample, `generate --target`)
    tls_cert_file + tls_key_file: serve TLS       tls_ca_file: dial TLS, verify the peer against it;
    tls_ca_file + tls_require_client_cert: mTLS   tls_cert_file + tls_key_file: the client cert for mTLS
    auth_token_file: every RPC but health must    auth_token_file: every call carries
      carry `authorization: Bearer <token>`,        `authorization: Bearer <token>`
      else UNAUTHENTICATED

Health stays open, so probes (Kubernetes, `stageserve up`) need no token. Files are read when a
server or channel is made, never at import; the config itself does no I/O.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from stageserve.common.errors import InvalidArgumentError
from stageserve.common.interceptors import rewrap

AUTH_KEY = "authorization"
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"  # probes carry no token


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, mTLS and bearer-token settings of one process (its server and its outgoing channels)."""

    tls_cert_file: str | None = field(
        default=None, metadata={"help": "PEM certificate this process presents (server cert; client cert for mTLS)"}
    )
    tls_key_file: str | None = field(default=None, metadata={"help": "PEM private key of tls_cert_file"})
    tls_ca_file: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle: outgoing calls use TLS and verify peers against it; with "
                  "tls_require_client_cert the server verifies clients against it"},
    )
    tls_require_client_cert: bool = field(
        default=False, metadata={"help": "mTLS: refuse clients without a certificate signed by tls_ca_file"}
    )
    tls_server_name: str | None = field(
        default=None, metadata={"help": "name to verify in peers' certificates instead of the dialled host"}
    )
    auth_token_file: str | None = field(
        default=None, metadata={"help": "file holding a bearer token required on every RPC and sent on every call"}
    )

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise InvalidArgumentError("tls_key_file", "tls_cert_file and tls_key_file go together")
        if self.tls_require_client_cert and (self.tls_ca_file is None or self.tls_cert_file is None):
            raise InvalidArgumentError("tls_require_client_cert", "needs tls_cert_file, tls_key_file and tls_ca_file")

    @property
    def serves_tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def dials_tls(self) -> bool:
        return self.tls_ca_file is not None


def _read(path: str | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(name, f"cannot read {path}: {exc}") from exc


def read_token(security: SecurityConfig) -> str | None:
    raw = _read(security.auth_token_file, "auth_token_file")
    if raw is None:
        return None
    token = raw.decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise InvalidArgumentError("auth_token_file", "must hold one non-empty token without spaces")
    return token


# ---- server side ----------------------------------------------------------------------------------


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for `add_secure_port`, or None for a plaintext port."""
    if not security.serves_tls:
        return None
    key, cert = _read(security.tls_key_file, "tls_key_file"), _read(security.tls_cert_file, "tls_cert_file")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(security.tls_ca_file, "tls_ca_file") if security.tls_require_client_cert else None,
        require_client_auth=security.tls_require_client_cert,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any RPC (health aside) without `authorization: Bearer <token>`.

    Runs outermost, before the error interceptor: a refused call never reaches a handler."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_METHODS_PREFIX):
            return True
        for key, value in details.invocation_metadata or ():
            if key == AUTH_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler

        async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return rewrap(handler, lambda behavior, streams_out: refuse)


def server_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    token = read_token(security)
    return [AuthInterceptor(token)] if token else []


# ---- client side ----------------------------------------------------------------------------------


def _with_token(details: Any, token: str) -> Any:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTH_KEY]
    metadata.append((AUTH_KEY, f"Bearer {token}"))
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else _replace_details(details, metadata)


def _replace_details(details: Any, metadata: list) -> Any:
    """grpc.aio's ClientCallDetails is a namedtuple; the sync one is a plain class we rebuild."""
    return _SyncDetails(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _Token:
    def __init__(self, token: str):
        self.token = token


class _AioTokenUU(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _AioTokenUS(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _AioTokenSU(_Token, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _AioTokenSS(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def _aio_token_interceptors(token: str) -> list:
    """One interceptor per call shape: grpc.aio files each interceptor under the first shape it
    implements only, so a single class implementing all four would cover unary-unary calls alone."""
    return [_AioTokenUU(token), _AioTokenUS(token), _AioTokenSU(token), _AioTokenSS(token)]


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str):
        self.token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.token), request_iterator)


def channel_credentials(security: SecurityConfig) -> grpc.ChannelCredentials | None:
    if not security.dials_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.tls_ca_file, "tls_ca_file"),
        private_key=_read(security.tls_key_file, "tls_key_file"),
        certificate_chain=_read(security.tls_cert_file, "tls_cert_file"),
    )


def _channel_options(security: SecurityConfig, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    options = list(options)
    if security.tls_server_name:
        options.append(("grpc.ssl_target_name_override", security.tls_server_name))
    return options


def aio_channel(address: str, security: SecurityConfig | None = None, options: Sequence = ()) -> grpc.aio.Channel:
    """An asyncio channel to `address` that dials TLS and carries the token as `security` says."""
    security = security or SecurityConfig()
    token = read_token(security)
    interceptors = _aio_token_interceptors(token) if token else None
    credentials = channel_credentials(security)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=_channel_options(security, options),
                                   interceptors=interceptors)


def sync_channel(address: str, security: SecurityConfig | None = None, options: Sequence = ()) -> grpc.Channel:
    """A blocking channel to `address` (decode's remote sampler), secured like `aio_channel`."""
    security = security or SecurityConfig()
    credentials = channel_credentials(security)
    if credentials is None:
        channel = grpc.insecure_channel(address, options=list(options))
    else:
        channel = grpc.secure_channel(address, credentials, options=_channel_options(security, options))
    token = read_token(security)
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel
