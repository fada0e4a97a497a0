"""`make run-gateway`: an ingress gateway in front of the sample mesh, with real Envoys.

Starts `meshline serve` on samples/bookinfo + samples/gateway (+ a generated TLS Secret), the
sample backends on 127.0.0.x:9080 and one Envoy started with `meshline bootstrap --mode gateway`
(HTTP on 127.0.0.1:8080, HTTPS for bookinfo.example.com on 127.0.0.1:8443), prints the curl
commands that reach productpage through it, and stops everything on Ctrl-C. `make run` is the
sidecar demo.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from demo import ROOT, bootstrap, control_plane, run_until_stopped

from controlplane.localrun import start_envoy, wait_http, wait_port

HOST = "bookinfo.example.com"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def tls_secret(work: Path) -> Path:
    """A demo CA (written to work/ca.pem for curl) and a certificate for HOST it signed, as the
    kubernetes.io/tls Secret `bookinfo-credential` in a config directory of its own."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("meshline-demo-ca")).issuer_name(_name("meshline-demo-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(HOST)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (work / "ca.pem").write_bytes(ca.public_bytes(pem))
    secrets = work / "secrets"
    secrets.mkdir()
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    (secrets / "bookinfo-credential.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "bookinfo-credential", "namespace": "bookinfo"},
        "stringData": {"tls.crt": cert.public_bytes(pem).decode(), "tls.key": key_pem}}))
    return secrets


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshline-gateway-demo-"))
    secrets = tls_secret(work)
    with control_plane(work, [ROOT / "samples" / "bookinfo", ROOT / "samples" / "gateway", secrets]) as procs:
        boot = bootstrap("--mode", "gateway", "--gateway", "bookinfo-gateway",
                         "--node-id", "ingressgateway-0.bookinfo", "--namespace", "bookinfo",
                         "--workload", "ingressgateway-0", "--service-account", "ingressgateway",
                         "--labels", "istio=ingressgateway",
                         "--ca-dir", str(work / "ca"))  # a bootstrap token: the gateway may receive its certificate
        envoy = start_envoy(boot, work, "gateway", log_level="warning")
        procs.append(envoy)
        wait_http("http://127.0.0.1:15000/ready", proc=envoy)
        wait_port("127.0.0.1", 8080)
        wait_port("127.0.0.1", 8443)
        print(f"""
Meshline is serving an ingress gateway (samples/gateway) in front of the sample mesh.
  control plane: xDS 127.0.0.1:15010, status http://127.0.0.1:15014/v1/proxies
  gateway:       admin http://127.0.0.1:15000, HTTP 127.0.0.1:8080, HTTPS 127.0.0.1:8443
  logs:          {work}

Try:
  # ingress -> productpage over HTTP (the VirtualService bound to bookinfo-gateway)
  curl -s http://127.0.0.1:8080/productpage

  # the same over HTTPS: curl checks the gateway's certificate (Secret bookinfo-credential, over SDS)
  curl -s --cacert {work}/ca.pem --resolve {HOST}:8443:127.0.0.1 https://{HOST}:8443/productpage

  # a path the gateway's VirtualService does not route: 404 at the gateway
  curl -si http://127.0.0.1:8080/admin | head -1

Edit samples/gateway/gateway.yaml while this runs: changes reach the gateway within a second.
Press Ctrl-C to stop.""", flush=True)
        return run_until_stopped(procs, work)


if __name__ == "__main__":
    sys.exit(main())
