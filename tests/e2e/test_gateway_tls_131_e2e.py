"""Istio 1.31's Gateway server TLS fields through a real gateway Envoy (issue 16), with the
setup of tests/e2e/test_gateway_e2e.py (`meshline serve` on a directory, a gateway Envoy from
`meshline bootstrap --mode gateway`, curl as the outside client):

- `caCertCredentialName`: clients of a MUTUAL server are verified with the CA of that Secret
  (here a Secret holding only `ca.crt`), which "takes precedence over CA certificates in the
  Secret referenced with credentialName": a certificate of that CA gets through; one of
  credentialName's own CA, of another CA, or none does not.
- `insecureSkipVerify` (Istio: "the proxy will try to validate the certificate, but even if
  the validation fails, it will allow the connection through"): a client certificate of an
  unknown CA is let through; a client without a certificate still fails MUTUAL's handshake.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.localrun import free_port
from tests.e2e.test_gateway_e2e import BACKEND_PORT as GATEWAY_E2E_BACKEND_PORT
from tests.e2e.test_gateway_e2e import Env, body_of, eventually, issue, make_ca, status_of
from tests.meshgen import Backend, service_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
BACKEND = "127.0.0.151"
BACKEND_PORT = 19151


class Env131(Env):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.skip = free_port()
        client_ca = make_ca("client-ca-only")
        self.ca_only = client_ca
        self.write("10-web.yaml", service_yaml("web", "shop", BACKEND_PORT, [Backend(BACKEND)]))
        self.write("21-client-ca.yaml", yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "client-ca", "namespace": "ingress"},
            "stringData": {"ca.crt": client_ca[0].cert}}))
        gateway = (self.mesh / "30-gateway.yaml").read_text().replace(
            f"port: {{number: {GATEWAY_E2E_BACKEND_PORT}}}", f"port: {{number: {BACKEND_PORT}}}")
        # the MUTUAL server: secure-cert's own CA is replaced by client-ca's (caCertCredentialName)
        gateway = gateway.replace("tls: {mode: MUTUAL, credentialName: secure-cert}",
                                  "tls: {mode: MUTUAL, credentialName: secure-cert, caCertCredentialName: client-ca}")
        assert "caCertCredentialName" in gateway and f"port: {{number: {BACKEND_PORT}}}" in gateway
        gateway = gateway.replace(f"  - port: {{number: {self.http}, name: http, protocol: HTTP}}",
                                  f"""  - port: {{number: {self.skip}, name: https-skip, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [secure.example.com]
    tls: {{mode: MUTUAL, credentialName: secure-cert, insecureSkipVerify: true}}
  - port: {{number: {self.http}, name: http, protocol: HTTP}}""")
        assert "insecureSkipVerify" in gateway
        self.write("30-gateway.yaml", gateway)
        pem = issue(client_ca, "client.example.com", client=True)
        (self.tmp / "ca-only-client.pem").write_text(pem.cert)
        (self.tmp / "ca-only-client-key.pem").write_text(pem.key)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env131]:
    e = Env131(tmp_path_factory.mktemp("gateway131"))
    try:
        e.start(backend=f"web={BACKEND}:{BACKEND_PORT}")
        e.admin = e.gateway("ingressgateway", identity=True)
        yield e
    finally:
        e.close()


def _passes(env: Env131, port: int, cert: str | None) -> bool:
    code, out = env.curl("secure.example.com", port, cert=cert)
    return code == 0 and status_of(out) == 200 and body_of(out)["backend"] == "web"


def test_ca_cert_credential_name_verifies_clients_with_that_secrets_ca(env: Env131) -> None:
    eventually(lambda: _passes(env, env.mtls, "ca-only-client"))
    # "client" is signed by the CA in Secret secure-cert, which caCertCredentialName overrides
    assert not _passes(env, env.mtls, "client")
    assert not _passes(env, env.mtls, "rogue-client")
    assert not _passes(env, env.mtls, None)


def test_insecure_skip_verify_lets_unverified_client_certificates_through(env: Env131) -> None:
    eventually(lambda: _passes(env, env.skip, "client"))
    # the rogue CA's certificate fails verification and is let through all the same
    assert _passes(env, env.skip, "rogue-client")
    # MUTUAL still asks for a certificate: none, no handshake
    assert not _passes(env, env.skip, None)
