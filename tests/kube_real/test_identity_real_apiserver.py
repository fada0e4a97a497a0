"""TokenReview of real projected service-account tokens (TokenRequest API, audience
`meshline`) and the CA root Secret, against a real kube-apiserver. Does I/O: the
session's API server, a gRPC control plane on a free port.

What a user would notice: a pod's projected token authenticates its proxy as
`spiffe://cluster.local/ns/<ns>/sa/<sa>` and gets that identity's certificate; a token
for another audience, a forged one, or one whose pod was deleted is refused.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from controlplane.ca.authn import Authenticator, TokenReviewer
from controlplane.ca.identity import Identity
from controlplane.ca.kuberoot import SECRET_NAME, SECRET_NAMESPACE, RootSecretSync
from tests.identityharness import ControlPlane, spiffe_uris, subscribe_secrets
from tests.kube.objects import pod
from tests.kube_real.cluster import RealKube

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]

SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@pytest.fixture(scope="module")
def shop(real_kube: RealKube) -> str:
    ns = f"tokens-{int(time.time()) % 100000}"
    real_kube.namespace(ns, service_accounts=("cart",))
    real_kube.pod(pod("cart-1", "10.2.0.11", "cart", ns), "10.2.0.11")
    return ns


async def test_real_projected_token_is_reviewed_for_audience_meshline(real_kube: RealKube, shop: str) -> None:
    kube = real_kube
    token = kube.token(shop, "cart", ["meshline"], seconds=600, pod="cart-1")
    claims = _claims(token)
    assert claims["aud"] == ["meshline"] and claims["sub"] == f"system:serviceaccount:{shop}:cart"
    reviewer = TokenReviewer(kube.api)
    authn = Authenticator(lambda: None, reviewer)
    res = await authn.authenticate([("authorization", f"Bearer {token}")])
    assert res.identity == Identity(shop, "cart"), res.reason
    assert res.node is None  # the pod is bound to no node: there is no kubelet here
    for _ in range(3):  # cached until the token expires: no more reviews
        assert (await authn.authenticate([("authorization", f"Bearer {token}")])).identity == Identity(shop, "cart")
    assert reviewer.reviews == 1

    # The API server's own audience is not Meshline's: refused, and the refusal names the audience.
    kube_token = kube.token(shop, "cart", ["https://kubernetes.default.svc.cluster.local"], pod="cart-1")
    res = await TokenReviewer(kube.api).authenticate(kube_token)
    assert res.identity is None and res.presented and not res.unavailable
    # A token signed by someone else (the payload of a real one, another signature) is refused.
    h, p, _s = token.split(".")
    res = await TokenReviewer(kube.api).authenticate(f"{h}.{p}.{base64.urlsafe_b64encode(b'x' * 256).decode()}")
    assert res.identity is None and not res.unavailable
    assert token not in res.reason


async def test_real_token_of_a_deleted_pod_is_refused(real_kube: RealKube, shop: str) -> None:
    kube = real_kube
    kube.pod(pod("cart-2", "10.2.0.12", "cart", shop), "10.2.0.12")
    token = kube.token(shop, "cart", ["meshline"], seconds=600, pod="cart-2")
    assert (await TokenReviewer(kube.api).authenticate(token)).identity == Identity(shop, "cart")
    k8s.CoreV1Api(kube.api).delete_namespaced_pod("cart-2", shop, grace_period_seconds=0)
    deadline = time.monotonic() + 10
    while kube.get("v1", "Pod", "cart-2", shop) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    # The API server caches a successful token authentication for 10 s
    # (--token-auth success cache), so the refusal can lag the deletion that long.
    deadline = time.monotonic() + 30
    while True:
        res = await TokenReviewer(kube.api).authenticate(token)  # a new reviewer: no cache of ours
        if res.identity is None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.identity is None and res.presented and not res.unavailable, res


async def test_real_projected_token_gets_its_identity_certificate_over_xds(real_kube: RealKube, shop: str,
                                                                           tmp_path: Path) -> None:
    kube = real_kube
    token = kube.token(shop, "cart", ["meshline"], seconds=600, pod="cart-1")
    cp = await ControlPlane(tmp_path, tls=False, reviewer=TokenReviewer(kube.api)).start()
    try:
        c = cp.client("cart-1", shop, "cart", token=token)
        _r, got = await subscribe_secrets(c)
        assert spiffe_uris(got["default"].certs[0]) == [f"spiffe://cluster.local/ns/{shop}/sa/cart"]
        await c.close()
        # The same real token presented by a proxy claiming another namespace is refused.
        kube.namespace(f"{shop}-other", service_accounts=("cart",))
        c2 = cp.client("cart-x", f"{shop}-other", "cart", token=token)
        c2.send_delta(SDS, subscribe=["default"])
        r = await c2.responses.get()
        assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.PERMISSION_DENIED
        await c2.close()
    finally:
        await cp.close()


def test_real_root_secret_written_by_the_leader_adopted_by_a_follower(real_kube: RealKube, tmp_path: Path) -> None:
    kube = real_kube
    kube.namespace(SECRET_NAMESPACE)
    core = k8s.CoreV1Api(kube.api)
    with contextlib.suppress(k8s.ApiException):  # left by replicas of an earlier module
        core.delete_namespaced_secret(SECRET_NAME, SECRET_NAMESPACE)
    try:
        leader = RootSecretSync(kube.api, tmp_path / "a", lambda: True)
        follower = RootSecretSync(kube.api, tmp_path / "b", lambda: False)
        assert follower.sync_once() == "waiting"
        assert leader.sync_once() == "created"
        assert leader.sync_once() == "unchanged"
        assert follower.sync_once() == "adopted"
        assert (tmp_path / "a" / "root-cert.pem").read_bytes() == (tmp_path / "b" / "root-cert.pem").read_bytes()
        secret = core.read_namespaced_secret(SECRET_NAME, SECRET_NAMESPACE)
        assert secret.type == "Opaque" and set(secret.data) >= {"root-cert.pem", "ca-key.pem"}
    finally:
        core.delete_namespaced_secret(SECRET_NAME, SECRET_NAMESPACE)
