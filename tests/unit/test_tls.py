"""gRPC and HTTP over TLS from a cert/key pair (what ``kvtide serve --tls-cert/--tls-key``
passes): a client that trusts the certificate gets answers, a plaintext client or one that
does not trust it does not. A replica-less gateway suffices: Tokenize and /v1/models never
reach a replica."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import grpc
import httpx
import pytest

from kvtide.cluster.client import KvtideClient
from kvtide.cluster.frontend.grpc_server import start_grpc_server
from kvtide.cluster.frontend.http_server import HttpServer
from tests.unit.frontend_fakes import KEY
from tests.unit.frontend_fakes import make_gateway as _gateway

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def cert_and_key(tmp_path_factory) -> tuple[bytes, bytes]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes()


def test_grpc_over_tls_serves_trusting_clients_only(cert_and_key):
    cert, key = cert_and_key
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start_grpc_server(_gateway(), "127.0.0.1", 0, cert, key))
    try:
        target = f"127.0.0.1:{server.port}"

        def tokenize(**kwargs) -> list[int]:
            with KvtideClient(target, api_key=KEY, timeout_s=10, **kwargs) as client:
                return loop.run_until_complete(asyncio.to_thread(client.tokenize, "hello tide"))

        assert tokenize(root_certificates=cert) == [1, 3]
        with pytest.raises(grpc.RpcError) as info:
            tokenize()  # plaintext against a TLS port
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run_until_complete(server.stop(0))
        loop.close()


def test_http_over_tls_serves_trusting_clients_only(cert_and_key, tmp_path):
    """The HTTP server exactly as ``kvtide serve --tls-cert/--tls-key`` starts it (``HttpServer.start``)."""
    cert, key = cert_and_key
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)

    async def go() -> None:
        server = await HttpServer.start(_gateway(), "127.0.0.1", 0, tmp_path / "cert.pem", tmp_path / "key.pem", 1.0)
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(verify=ssl.create_default_context(cadata=cert.decode())) as client:
                r = await client.get(f"https://127.0.0.1:{server.port}/v1/models", headers=headers)
                assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
            async with httpx.AsyncClient() as client:  # does not trust the self-signed certificate
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.get(f"https://127.0.0.1:{server.port}/health")
                with pytest.raises(httpx.HTTPError):  # plaintext against the TLS port
                    await client.get(f"http://127.0.0.1:{server.port}/health")
        finally:
            await server.stop()

    asyncio.run(go())
