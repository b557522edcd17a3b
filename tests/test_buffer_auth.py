"""Bearer-token auth (wrong / missing token → UNAUTHENTICATED, no data), TLS with a certificate
made here, and the no-token server's refusal to bind a non-loopback address."""

import datetime
import ipaddress
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawjax.buffer import (AuthenticationError, BufferClient, BufferServer,
                            BufferUnavailableError, InsecureBindError)
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import Sample

TOKEN = "s3cret-token-for-tests"


def _sample(sid):
    return Sample(sid, [1, 2, 3, 4], 2, rollout_logp=[-0.1, -0.2])


def _make_cert_with_cryptography(cert_path, key_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clawjax-buffer-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _make_cert_with_openssl(cert_path, key_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key_path), "-out",
                    str(cert_path), "-days", "1", "-subj", "/CN=clawjax-buffer-test", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost: (cert path, key path), made with the
    `cryptography` package, or the openssl CLI where that is not installed."""
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    try:
        _make_cert_with_cryptography(cert_path, key_path)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.fail("neither the cryptography package nor the openssl CLI is available")
        _make_cert_with_openssl(cert_path, key_path)
    return cert_path, key_path


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_wrong_or_missing_token_is_unauthenticated_and_gets_no_data(tmp_path, token_file):
    with ServerProcess(str(tmp_path / "buf"), "--token-file", str(token_file)) as proc:
        with BufferClient(proc.address, token=TOKEN) as good:
            assert good.push([_sample("secret-1")]) == (1, 0)
            for token in ("wrong", None, TOKEN + "x", TOKEN[:-1]):
                with BufferClient(proc.address, token=token) as bad:
                    with pytest.raises(AuthenticationError) as info:
                        bad.lease(10, timeout_s=0.1)
                    assert info.value.code == "UNAUTHENTICATED"
                    with pytest.raises(AuthenticationError):
                        bad.push([_sample("intruder")])
                    with pytest.raises(AuthenticationError):
                        list(bad.stream(max_in_flight=1, max_samples=1))
                    with pytest.raises(AuthenticationError):
                        bad.stats()
            stats = good.stats()
            assert (stats["queued"], stats["leased"], stats["pushed_total"]) == (1, 0, 1)
            # the health service is behind the token as well
            stub = health_pb2_grpc.HealthStub(good._channel)
            with pytest.raises(grpc.RpcError) as rpc:
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Check(health_pb2.HealthCheckRequest(service="clawjax.buffer.RolloutBuffer"),
                               timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert [s.sample_id for s in good.lease(10, timeout_s=5)] == ["secret-1"]


def test_token_over_tls_with_a_certificate_made_here(tmp_path, token_file, tls_files):
    cert, key = tls_files
    with ServerProcess(str(tmp_path / "buf"), "--token-file", str(token_file),
                       "--tls-cert", str(cert), "--tls-key", str(key)) as proc:
        with BufferClient(proc.address, token=TOKEN, tls_ca=cert) as c:
            assert c.push([_sample("tls-1")]) == (1, 0)
            assert [s.sample_id for s in c.lease(5, timeout_s=5)] == ["tls-1"]
        with BufferClient(proc.address, token="wrong", tls_ca=cert) as c:
            with pytest.raises(AuthenticationError):
                c.stats()
        with BufferClient(proc.address, token=TOKEN, retry_budget_s=0.5) as plain:
            with pytest.raises(BufferUnavailableError):   # plaintext client vs TLS server
                plain.stats()
        with BufferClient(f"localhost:{proc.port}", token=TOKEN, tls_ca=cert) as by_name:
            assert by_name.stats()["leased"] == 1


def test_no_token_server_refuses_a_non_loopback_bind(tmp_path):
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(InsecureBindError, match="loopback"):
            BufferServer(tmp_path / "x", host=host)
    result = subprocess.run(
        [sys.executable, "-m", "clawjax.buffer", "serve", "--port", "0", "--dir",
         str(tmp_path / "y"), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "loopback" in result.stderr
    assert "listening" not in result.stdout


def test_in_process_server_with_token_binds_and_checks(tmp_path):
    server = BufferServer(tmp_path, host="127.0.0.1", token=TOKEN)
    port = server.start()
    try:
        with BufferClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            assert c.push([_sample("inproc")]).accepted == 1
        with BufferClient(f"127.0.0.1:{port}") as c, pytest.raises(AuthenticationError):
            c.lease(1)
    finally:
        server.stop()
