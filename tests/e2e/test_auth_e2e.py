"""Admin credentials, roles, the Allocator token, TLS and mutual TLS, pseudonymised user ids and
request ids in the logs, and what the public responses hold (nothing internal)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from e2e_support import START_TIMEOUT_S, bearer, spawn, wait_serving, write_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 10.0
READ_ONLY = "read-only-token-0123456789"
ADMIN = "admin-token-0123456789abcdef"
DATA_PROTECTION = "data-protection-token-0123456789"
ALLOCATOR = "allocator-token-0123456789abc"
SECRET = "pseudonym-secret-for-this-test"


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def experiment(key: str) -> pb.Experiment:
    return pb.Experiment(
        id=key,
        name=key,
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
    )


@pytest.fixture
def tokens_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "auth.yaml",
        auth={
            "read_only_tokens": [READ_ONLY],
            "admin_tokens": [ADMIN],
            "data_protection_tokens": [DATA_PROTECTION],
            "pseudonym_secret": SECRET,
        },
        log_level="DEBUG",
    )


def test_admin_needs_a_token_with_the_right_role(start_server: Any, tokens_config: Path) -> None:
    server = start_server(extra_args=("--config", str(tokens_config)))
    admin: pb_grpc.AdminStub = server.admin
    create = pb.CreateExperimentRequest(experiment=experiment("auth-exp"))
    get = pb.GetExperimentRequest(experiment_id="auth-exp")

    def create_with(*metadata: tuple[str, str]) -> grpc.StatusCode:
        return code_of(
            lambda: admin.CreateExperiment(create, metadata=metadata, timeout=RPC_TIMEOUT_S)
        )

    def get_with(*metadata: tuple[str, str]) -> grpc.StatusCode:
        return code_of(lambda: admin.GetExperiment(get, metadata=metadata, timeout=RPC_TIMEOUT_S))

    # Missing, malformed or unknown credentials: UNAUTHENTICATED, whatever the RPC.
    assert create_with() == grpc.StatusCode.UNAUTHENTICATED
    assert get_with() == grpc.StatusCode.UNAUTHENTICATED
    assert create_with(("authorization", ADMIN)) == grpc.StatusCode.UNAUTHENTICATED
    assert create_with(*bearer(ADMIN[:-1])) == grpc.StatusCode.UNAUTHENTICATED
    assert create_with(*bearer(ADMIN + "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert get_with(*bearer("")) == grpc.StatusCode.UNAUTHENTICATED
    # Known tokens without the role: PERMISSION_DENIED.
    assert create_with(*bearer(READ_ONLY)) == grpc.StatusCode.PERMISSION_DENIED
    assert create_with(*bearer(DATA_PROTECTION)) == grpc.StatusCode.PERMISSION_DENIED
    assert get_with(*bearer(DATA_PROTECTION)) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was created by the refused calls.
    assert get_with(*bearer(READ_ONLY)) == grpc.StatusCode.NOT_FOUND
    # The admin token mutates; read-only and admin tokens read.
    assert create_with(*bearer(ADMIN)) == grpc.StatusCode.OK
    assert get_with(*bearer(READ_ONLY)) == grpc.StatusCode.OK
    assert get_with(*bearer(ADMIN)) == grpc.StatusCode.OK
    listed = admin.ListExperiments(
        pb.ListExperimentsRequest(), metadata=bearer(READ_ONLY), timeout=RPC_TIMEOUT_S
    )
    assert [e.id for e in listed.experiments] == ["auth-exp"]
    # The Allocator stays open (no allocator tokens configured); health is always open.
    allocator: pb_grpc.AllocatorStub = server.allocator
    reply = allocator.Allocate(
        pb.AllocateRequest(experiment_id="auth-exp", user_id="u1"), timeout=RPC_TIMEOUT_S
    )
    assert reply.variant_id in {"A", "B"}
    health = server.health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_allocator_token_when_configured(start_server: Any, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "alloc.yaml",
        auth={"admin_tokens": [ADMIN], "allocator_tokens": [ALLOCATOR]},
    )
    server = start_server(extra_args=("--config", str(config)))
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(experiment=experiment("tok-exp")),
        metadata=bearer(ADMIN),
        timeout=RPC_TIMEOUT_S,
    )
    allocator: pb_grpc.AllocatorStub = server.allocator
    request = pb.AllocateRequest(experiment_id="tok-exp", user_id="u1")
    assert code_of(lambda: allocator.Allocate(request, timeout=RPC_TIMEOUT_S)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    # An admin token is not an allocator token.
    assert (
        code_of(lambda: allocator.Allocate(request, metadata=bearer(ADMIN), timeout=RPC_TIMEOUT_S))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    reply = allocator.Allocate(request, metadata=bearer(ALLOCATOR), timeout=RPC_TIMEOUT_S)
    assert reply.variant_id in {"A", "B"}


def test_user_ids_are_pseudonymised_and_request_ids_logged(
    start_server: Any, tokens_config: Path
) -> None:
    server = start_server(extra_args=("--config", str(tokens_config)))
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(experiment=experiment("log-exp")),
        metadata=bearer(ADMIN),
        timeout=RPC_TIMEOUT_S,
    )
    user = "alice@example.com"
    reply, call = server.allocator.Allocate.with_call(
        pb.AllocateRequest(experiment_id="log-exp", user_id=user),
        metadata=(("x-request-id", "req-0042"),),
        timeout=RPC_TIMEOUT_S,
    )
    assert reply.variant_id in {"A", "B"}
    assert ("x-request-id", "req-0042") in tuple(call.trailing_metadata())
    assert server.stop() == 0
    text = server.stderr()
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    expected = hmac.new(SECRET.encode(), user.encode(), hashlib.sha256).hexdigest()[:24]
    rpc_lines = [e for e in entries if e.get("msg") == "rpc" and e.get("method") == "Allocate"]
    assert rpc_lines, "no debug line for the Allocate RPC"
    assert rpc_lines[0]["user"] == expected
    assert rpc_lines[0]["request_id"] == "req-0042"
    # Not the user id, nor a bare (unkeyed) hash of it, anywhere in the logs.
    assert user not in text
    assert hashlib.sha256(user.encode()).hexdigest()[:24] not in text
    assert ADMIN not in text and READ_ONLY not in text


def test_allocator_responses_hold_no_internal_state() -> None:
    """The public answers carry no posterior parameters, scores, centroids or embeddings."""
    forbidden = ("alpha", "beta", "score", "centroid", "embedding", "posterior", "sample")
    allocator = pb.DESCRIPTOR.services_by_name["Allocator"]
    seen: set[str] = set()

    def fields(message: object, path: str) -> Iterator[str]:
        if path in seen:
            return
        seen.add(path)
        for f in message.fields:
            yield f"{path}.{f.name}"
            if f.message_type is not None:
                yield from fields(f.message_type, f"{path}.{f.name}")

    names = [n for m in allocator.methods for n in fields(m.output_type, m.output_type.name)]
    assert names
    offending = [n for n in names if any(word in n.rsplit(".", 1)[-1] for word in forbidden)]
    assert offending == []


# TLS ----------------------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes | Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made here."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test-ca", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("127.0.0.1", server_key, (ca.subject, ca_key), server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("client", client_key, (ca.subject, ca_key))
    pem = serialization.Encoding.PEM
    out: dict[str, bytes | Path] = {
        "ca": ca.public_bytes(pem),
        "client_cert": client.public_bytes(pem),
        "client_key": _pem(client_key),
    }
    for name, data in (
        ("ca.pem", ca.public_bytes(pem)),
        ("server.pem", server.public_bytes(pem)),
        ("server.key", _pem(server_key)),
    ):
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    """Start a server from a config file; returns its port (read from the log)."""
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(config: Path) -> int:
        log = tmp_path / f"tls-{len(processes)}.log"
        process = spawn(("--in-memory", "--config", str(config)), log)
        processes.append((process, log))
        return wait_serving(process, log, time.monotonic() + START_TIMEOUT_S)

    yield start
    for process, log in processes:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text(errors="replace")


def _health(channel: grpc.Channel) -> grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    return code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0))


def test_tls_and_mutual_tls(
    tls_server: Callable[[Path], int], pki: dict[str, bytes | Path], tmp_path: Path
) -> None:
    tls = {"enabled": True, "cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"])}
    ca = pki["ca"]
    assert isinstance(ca, bytes)
    client_cert, client_key = pki["client_cert"], pki["client_key"]
    assert isinstance(client_cert, bytes) and isinstance(client_key, bytes)

    port = tls_server(write_config(tmp_path / "tls.yaml", tls=tls))
    target = f"127.0.0.1:{port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        assert _health(channel) == grpc.StatusCode.OK
    with grpc.insecure_channel(target) as channel:
        assert _health(channel) == grpc.StatusCode.UNAVAILABLE

    mtls = {**tls, "client_ca_file": str(pki["ca.pem"])}
    port = tls_server(write_config(tmp_path / "mtls.yaml", tls=mtls))
    target = f"127.0.0.1:{port}"
    with_cert = grpc.ssl_channel_credentials(ca, client_key, client_cert)
    with grpc.secure_channel(target, with_cert) as channel:
        assert _health(channel) == grpc.StatusCode.OK
        created = pb_grpc.AdminStub(channel).CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment("mtls-exp")), timeout=RPC_TIMEOUT_S
        )
        assert created.id == "mtls-exp"
    # A client without a certificate is turned away at the handshake.
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        assert _health(channel) == grpc.StatusCode.UNAVAILABLE
