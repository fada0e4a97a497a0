"""DestinationRule `credentialName` secrets per proxy (issue 16), pure: which Secret resources
a sidecar's namespace gets (`translate.secrets.plan_proxy_credentials`), the fail-closed
stand-ins for a missing or unusable Secret, and that Envoy accepts them (`envoy --mode
validate`)."""

from __future__ import annotations

import base64
import subprocess
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.localrun import envoy_binary
from controlplane.translate.secrets import (
    TRUSTS_NOTHING_CA,
    Credential,
    credential_ca_secret,
    credential_secret,
    plan_proxy_credentials,
    withheld_ca_secret,
    withheld_credential_secret,
)
from tests.e2e.test_locality_mutual_e2e import Pki
from tests.test_locality_mutual import mesh_of

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _secret(pki: Pki, ns: str = "ns", key: str | None = None) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in
            (("tls.crt", pki.client_pem), ("tls.key", key or pki.client_key), ("ca.crt", pki.ca_pem))}
    return textwrap.dedent(f"""\
        ---
        apiVersion: v1
        kind: Secret
        type: kubernetes.io/tls
        metadata: {{name: cred, namespace: {ns}}}
        data: {{"tls.crt": {data["tls.crt"]}, "tls.key": {data["tls.key"]}, "ca.crt": {data["ca.crt"]}}}
        """)


DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: ns}
spec:
  host: hello.ns.svc.cluster.local
  trafficPolicy: {tls: {mode: MUTUAL, credentialName: cred}}
"""


def _secrets(mesh: object, ns: str) -> dict[str, secret_pb2.Secret]:
    out = {}
    for spec in plan_proxy_credentials(mesh, ns, SYSTEM_CA):  # type: ignore[arg-type]
        msg = spec.make()
        assert isinstance(msg, secret_pb2.Secret) and msg.name == spec.name
        out[spec.name] = msg
    return out


def test_the_namespaces_secret_is_sent(pki: Pki) -> None:
    mesh, issues = mesh_of(DR + _secret(pki))
    assert not [i for i in issues if "credentialName" in i], issues
    got = _secrets(mesh, "ns")
    assert set(got) == {"kubernetes://cred", "kubernetes://cred-cacert"}
    assert got["kubernetes://cred"].tls_certificate.certificate_chain.inline_bytes == pki.client_pem.encode()
    assert got["kubernetes://cred"].tls_certificate.private_key.inline_bytes == pki.client_key.encode()
    assert got["kubernetes://cred-cacert"].validation_context.trusted_ca.inline_bytes == pki.ca_pem.encode()


@pytest.mark.parametrize("case", ["missing", "other namespace", "unusable"])
def test_no_usable_secret_gives_stand_ins_that_trust_nothing(pki: Pki, case: str) -> None:
    extra = {"missing": "", "other namespace": _secret(pki, ns="elsewhere"),
             "unusable": _secret(pki, key=pki.wrong_key)}[case]
    mesh, issues = mesh_of(DR + extra)
    assert any("DestinationRule/ns/hello" in i and "spec.trafficPolicy.tls.credentialName" in i for i in issues)
    # The rule's namespace never uses another namespace's Secret (a client in "elsewhere" does
    # use the one of its own namespace, as in Istio, so it is checked only when there is none).
    for ns in ("ns",) if case == "other namespace" else ("ns", "elsewhere"):
        got = _secrets(mesh, ns)
        assert set(got) == {"kubernetes://cred", "kubernetes://cred-cacert"}
        cert = got["kubernetes://cred"].tls_certificate
        assert pki.client_pem.encode() not in cert.certificate_chain.inline_bytes
        assert pki.client_key.encode() not in cert.private_key.inline_bytes
        assert pki.wrong_key.encode() not in cert.private_key.inline_bytes
        assert got["kubernetes://cred-cacert"].validation_context.trusted_ca.inline_bytes == TRUSTS_NOTHING_CA.encode()


def test_stand_ins_are_the_same_bytes_every_time_and_prove_nothing() -> None:
    a, b = withheld_credential_secret("x"), withheld_credential_secret("x")
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    leaf = x509.load_pem_x509_certificate(a.tls_certificate.certificate_chain.inline_bytes)
    assert leaf.issuer == leaf.subject  # self-signed: no CA vouches for it
    ca = x509.load_pem_x509_certificate(TRUSTS_NOTHING_CA.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer != ca.subject


def test_each_builder_names_its_secret_as_told_and_builds_the_same_material(pki: Pki) -> None:
    """A gateway's certificateRef is served as `kubernetes-gateway://<ns>/<name>`: the builders
    take that SDS name (default: Istio's `kubernetes://<name>[-cacert]`), so nothing is renamed
    after it was built, and the material is the same under either name (issue 19/20 follow-up)."""
    cred = Credential(pki.client_pem, pki.client_key)
    sds = "kubernetes-gateway://edge/cred"
    pairs = [
        (credential_secret("cred", cred), credential_secret("cred", cred, sds), "kubernetes://cred", sds),
        (withheld_credential_secret("cred"), withheld_credential_secret("cred", sds), "kubernetes://cred", sds),
        (credential_ca_secret("cred", pki.ca_pem, "", SYSTEM_CA),
         credential_ca_secret("cred", pki.ca_pem, "", SYSTEM_CA, f"{sds}-cacert"), "kubernetes://cred-cacert",
         f"{sds}-cacert"),
        (withheld_ca_secret("cred"), withheld_ca_secret("cred", f"{sds}-cacert"), "kubernetes://cred-cacert",
         f"{sds}-cacert"),
    ]
    for default, named, default_name, name in pairs:
        assert (default.name, named.name) == (default_name, name)
        named.name = default.name
        assert named.SerializeToString(deterministic=True) == default.SerializeToString(deterministic=True)


def test_envoy_accepts_the_stand_ins(tmp_path: Path) -> None:
    from google.protobuf import json_format

    secrets = [json_format.MessageToDict(s, preserving_proto_field_name=True)
               for s in (withheld_credential_secret("cred"), withheld_ca_secret("cred"))]
    boot = {
        "static_resources": {
            "secrets": secrets,
            "clusters": [{
                "name": "c", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [{"name": "kubernetes://cred"}],
                        "combined_validation_context": {
                            "default_validation_context": {},
                            "validation_context_sds_secret_config": {"name": "kubernetes://cred-cacert"}}}}},
            }],
        },
    }
    import json

    (tmp_path / "b.json").write_text(json.dumps(boot))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "b.json"), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_kubernetes_informer_keeps_tls_secrets_and_their_tls_keys_only(pki: Pki) -> None:
    from controlplane.sources.kube_informer import CORE_RESOURCES, Informer, to_raw

    secrets = [r for r in CORE_RESOURCES if r.kind == "Secret"]
    assert sorted(r.field_selector for r in secrets) == ["type=Opaque", "type=kubernetes.io/tls"]
    tls, opaque = sorted(secrets, key=lambda r: r.field_selector, reverse=True)

    def item(typ: str, **data: str) -> dict[str, object]:
        return {"metadata": {"name": "s", "namespace": "ns"}, "type": typ,
                "data": {k.replace("_", "."): base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    def kept(res: object, body: dict[str, object]) -> bool:
        inf = Informer(0, None, res, None, lambda b: None)  # type: ignore[arg-type]
        assert inf._keep is not None
        return inf._keep(to_raw(res, body))  # type: ignore[arg-type]

    raw = to_raw(tls, item("kubernetes.io/tls", tls_crt=pki.client_pem, tls_key=pki.client_key, other="x"))
    assert set(raw.body["data"]) == {"tls.crt", "tls.key"}  # nothing else is held in memory
    assert kept(tls, item("kubernetes.io/tls", tls_crt=pki.client_pem, tls_key=pki.client_key))
    assert kept(opaque, item("Opaque", cacert=pki.ca_pem))
    assert not kept(opaque, item("Opaque", password="hunter2"))  # not a credential: dropped
    # A server ignoring the field selector (kmock) still hands over nothing of another type.
    assert not kept(tls, item("Opaque", tls_crt=pki.client_pem, tls_key=pki.client_key))
    assert not kept(opaque, item("kubernetes.io/service-account-token", cert=pki.client_pem))


CLIENT_ELSEWHERE = """---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: elsewhere, annotations: {meshline.io/status: injected}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.9.9}
"""


def test_sidecars_of_another_namespace_without_the_secret_are_warned_about(pki: Pki) -> None:
    _, issues = mesh_of(DR + _secret(pki) + CLIENT_ELSEWHERE)
    (warning,) = [i for i in issues if "credentialName" in i]
    assert "DestinationRule/ns/hello" in warning and "warning:" in warning and "namespace elsewhere" in warning
    # With the Secret in that namespace too, or a rule not exported there: nothing to say.
    _, issues = mesh_of(DR + _secret(pki) + _secret(pki, ns="elsewhere") + CLIENT_ELSEWHERE)
    assert not [i for i in issues if "credentialName" in i], issues
    local = DR.replace("trafficPolicy:", "exportTo: ['.']\n  trafficPolicy:")
    _, issues = mesh_of(local + _secret(pki) + CLIENT_ELSEWHERE)
    assert not [i for i in issues if "credentialName" in i], issues


def test_a_rule_hidden_from_a_namespace_sends_its_sidecars_no_secret(pki: Pki) -> None:
    """A DestinationRule exported only to its own namespace never reaches the clusters of
    another namespace's sidecars, so the Secret of that name in their namespace (a gateway's
    key, say) must not be sent to them either (h8 review, issue 16)."""
    hidden = DR.replace("spec:\n", "spec:\n  exportTo: ['.']\n")
    mesh, _ = mesh_of(hidden + _secret(pki, ns="elsewhere"))
    assert _secrets(mesh, "elsewhere") == {}
    mesh, _ = mesh_of(DR + _secret(pki, ns="elsewhere"))  # exported everywhere: its clusters use it
    assert _secrets(mesh, "elsewhere")["kubernetes://cred"].tls_certificate.private_key.inline_bytes == (
        pki.client_key.encode())
