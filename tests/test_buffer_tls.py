"""A TLS misconfiguration fails fast: a client given a CA for a plaintext server, a CA that did
not sign the server's certificate, or a host name the certificate does not list raises
`TLSHandshakeError` naming the target and the likely cause within a few attempts, instead of
retrying UNAVAILABLE for its whole budget; a server that is down is still retried. Attempts
are counted at the client's RPC callables (a retry loop past `MAX_ATTEMPTS` is cut short)."""

import pytest

from clawjax.buffer import BufferClient, BufferServer, BufferUnavailableError, TLSHandshakeError
from clawjax.buffer import handshake
from test_buffer_auth import _make_cert_with_cryptography, _make_cert_with_openssl

MAX_ATTEMPTS = 12


class _StillRetrying(Exception):
    pass


def _counting(client: BufferClient) -> dict:
    """Wraps `client`'s Stats, Lease and Stream callables: counts their attempts and stops the
    call after `MAX_ATTEMPTS`; backoff shortened (the count matters, not the time)."""
    count = {"attempts": 0}

    def wrap(method):
        def call(*args, **kwargs):
            count["attempts"] += 1
            if count["attempts"] > MAX_ATTEMPTS:
                raise _StillRetrying(f"still retrying after {MAX_ATTEMPTS} attempts")
            return method(*args, **kwargs)
        return call

    client._lease_raw = wrap(client._lease_raw)
    client._stream_raw = wrap(client._stream_raw)
    stub = client._stub

    class Stub:
        def __getattr__(self, name):
            return wrap(getattr(stub, name)) if name == "Stats" else getattr(stub, name)

    client._stub = Stub()
    client._backoff = lambda attempt: 0.02
    return count


def _self_signed(directory):
    """A self-signed certificate for 127.0.0.1 / localhost (as test_buffer_auth makes them):
    (cert path, key path)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _make_cert_with_cryptography(cert, key)
    except ImportError:
        _make_cert_with_openssl(cert, key)
    return cert, key


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second self-signed certificate: a CA that did not sign the server's certificate."""
    return _self_signed(tmp_path_factory.mktemp("other-ca"))[0]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tls_files):
    cert, key = tls_files
    with BufferServer(tmp_path_factory.mktemp("tls-buf"), tls_cert=cert, tls_key=key) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    with BufferServer(tmp_path_factory.mktemp("plain-buf")) as server:
        yield server


def _fails_fast(address: str, cause: str, **kw) -> None:
    with BufferClient(address, retry_budget_s=600, **kw) as client:
        count = _counting(client)
        for call in (client.stats, lambda: client.lease(1)):
            count["attempts"] = 0
            with pytest.raises(TLSHandshakeError) as info:
                call()
            assert count["attempts"] <= handshake.VAGUE_ATTEMPTS
            message = str(info.value)
            assert f"TLS handshake with {address} failed" in message, message
            assert cause in message, message
            assert info.value.code == "UNAVAILABLE"


def test_a_client_with_a_ca_facing_a_plaintext_server_fails_fast(plain_server, tls_files):
    _fails_fast(plain_server.address, "the server does not speak TLS", tls_ca=tls_files[0])


def test_a_certificate_the_ca_did_not_sign_fails_fast(tls_server, other_ca):
    _fails_fast(tls_server.address, "not signed by the CA given as tls_ca", tls_ca=other_ca)


def test_a_host_name_the_certificate_does_not_list_fails_fast(tls_server, tls_files):
    _fails_fast(tls_server.address, "does not name the host", tls_ca=tls_files[0],
                tls_server_name="not-in-the-certificate.example")


def test_a_streaming_client_with_a_misconfigured_ca_fails_fast(tls_server, other_ca):
    with BufferClient(tls_server.address, tls_ca=other_ca, retry_budget_s=600) as client:
        count = _counting(client)
        with pytest.raises(TLSHandshakeError, match="not signed by the CA"):
            next(client.stream(max_in_flight=1))
        assert count["attempts"] <= handshake.VAGUE_ATTEMPTS


def test_a_tls_client_facing_no_server_is_still_retried(tls_files):
    """Connection refused is not a handshake failure: retried past any few attempts, and
    still `BufferUnavailableError` once the budget is spent."""
    with BufferClient("127.0.0.1:1", tls_ca=tls_files[0], retry_budget_s=600) as client:
        count = _counting(client)
        with pytest.raises(_StillRetrying):
            client.stats()
        assert count["attempts"] == MAX_ATTEMPTS + 1
    with BufferClient("127.0.0.1:1", tls_ca=tls_files[0], retry_budget_s=0.3) as client:
        with pytest.raises(BufferUnavailableError) as info:
            client.stats()
        assert not isinstance(info.value, TLSHandshakeError)


def test_a_correctly_configured_tls_client_works(tls_server, tls_files):
    with BufferClient(f"localhost:{tls_server.port}", tls_ca=tls_files[0]) as client:
        assert client.stats()["queued"] == 0


@pytest.mark.parametrize("details, definite", [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
     "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
     "OPENSSL_internal:WRONG_VERSION_NUMBER", True),
    ("... SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
     "self signed certificate", True),
    ("... Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification "
     "Check failed.", True),
    ("... Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SYSCALL", False),
])
def test_handshake_failures_are_classified_and_vague_ones_retried_a_few_times(details, definite):
    cause, found_definite = handshake.tls_failure(details)
    assert cause and found_definite == definite
    first = handshake.give_up_on_tls(details, 0)
    assert (first is not None) == definite
    assert handshake.give_up_on_tls(details, handshake.VAGUE_ATTEMPTS - 1) == cause


@pytest.mark.parametrize("details", [
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to "
    "connect to remote host: Connection refused",
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:5: Socket closed",
    "", None])
def test_a_server_that_is_down_is_not_a_tls_failure(details):
    assert handshake.tls_failure(details) is None
    assert handshake.give_up_on_tls(details or "", 99) is None
