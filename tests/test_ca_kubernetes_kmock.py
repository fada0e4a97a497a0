"""Kubernetes mode against the kmock API emulator over real HTTP, through the official
client: service-account tokens verified with TokenReview (audience `meshline`, cached
until the token expires; an xDS stream with a real projected token:
tests/kube_real/test_identity_real_apiserver.py), and the CA root persisted in the Secret
meshline-system/meshline-ca-root by the leader and adopted by followers."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from cryptography import x509
from kmock._internal import parsing
from kubernetes import client as k8s

from controlplane.ca import CertificateAuthority, rotation
from controlplane.ca.authn import Authenticator, TokenReviewer
from controlplane.ca.identity import Identity
from controlplane.ca.kuberoot import SECRET_NAME, SECRET_NAMESPACE, RootSecretSync
from controlplane.ca.service import IdentityService, IdentitySettings
from tests.kube.emulator import VERBS, KubeEnv, kube_emulator

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def jwt(sub: str, exp: float) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64({'sub': sub, 'exp': int(exp)})}.c2lnbmF0dXJl"


class FakeTokenReview:
    """Answers TokenReviews like an API server: known tokens authenticate as their service
    account, for the audiences they were issued with."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}  # token -> (username, audiences)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, req: Any) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
        spec = req.data["spec"]
        known = self.tokens.get(spec["token"])
        status: dict[str, Any] = {"authenticated": False, "error": "token not recognised"}
        if known is not None:
            asked = spec.get("audiences") or []
            matching = [a for a in asked if a in known[1]]
            if matching:
                status = {"authenticated": True, "audiences": matching,
                          "user": {"username": known[0], "groups": ["system:serviceaccounts"]}}
            else:
                status = {"authenticated": False, "error": "token audiences do not match"}
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}


def serve_token_reviews(env: KubeEnv) -> FakeTokenReview:
    """Script TokenReview on kmock (a create-only virtual resource it cannot store)."""
    current = parsing.parse_path
    if not getattr(current, "_meshline_tokenreview", False):
        def parse_path(path: str) -> parsing.ParsedPath:
            if path.rstrip("/") == REVIEW_PATH:
                return parsing.ParsedPath()  # not a stored object: every review is answered afresh
            return current(path)

        parse_path._meshline_tokenreview = True  # type: ignore[attr-defined]
        parsing.parse_path = parse_path
    fake = FakeTokenReview()
    env.emulator[f"post {REVIEW_PATH}"] << fake
    return fake


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEnv]:
    with kube_emulator(tmp_path) as env:
        env.emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS)
        yield env


# --------------------------------------------------------------------------- TokenReview


async def test_token_review_binds_the_service_account_and_is_cached(kube: KubeEnv) -> None:
    fake = serve_token_reviews(kube)
    good = jwt("system:serviceaccount:shop:cart", time.time() + 600)
    other_audience = jwt("system:serviceaccount:shop:cart", time.time() + 600) + "x"
    fake.tokens[good] = ("system:serviceaccount:shop:cart", ("meshline",))
    fake.tokens[other_audience] = ("system:serviceaccount:shop:cart", ("https://kubernetes.default.svc",))
    reviewer = TokenReviewer(kube.api)
    authn = Authenticator(lambda: None, reviewer)

    res = await authn.authenticate([("authorization", f"Bearer {good}")])
    assert res.identity == Identity("shop", "cart")
    for _ in range(3):  # cached: no further API calls
        assert (await authn.authenticate([("authorization", f"Bearer {good}")])).identity == Identity("shop", "cart")
    assert fake.calls == 1

    res = await authn.authenticate([("authorization", f"Bearer {other_audience}")])
    assert res.identity is None and "audience" in res.reason
    res = await authn.authenticate([("authorization", "Bearer unknown.token.value")])
    assert res.identity is None and res.presented and not res.unavailable
    assert "unknown.token.value" not in res.reason


async def test_cache_ends_when_the_token_expires(kube: KubeEnv) -> None:
    fake = serve_token_reviews(kube)
    now = [1000.0]
    tok = jwt("system:serviceaccount:shop:cart", 1010)
    fake.tokens[tok] = ("system:serviceaccount:shop:cart", ("meshline",))
    reviewer = TokenReviewer(kube.api, clock=lambda: now[0])
    assert (await reviewer.authenticate(tok)).identity is not None
    now[0] = 1005
    await reviewer.authenticate(tok)
    assert fake.calls == 1
    now[0] = 1011  # past exp: asked again (and a real API server would now refuse it)
    await reviewer.authenticate(tok)
    assert fake.calls == 2


async def test_api_server_down_is_unavailable_not_a_refusal(kube: KubeEnv) -> None:
    from controlplane.sources.kubernetes import make_api_client

    kube.faults.set_online(False)
    reviewer = TokenReviewer(make_api_client(kube.kubeconfig), timeout_s=2)
    res = await reviewer.authenticate(jwt("system:serviceaccount:shop:cart", time.time() + 60))
    assert res.identity is None and res.unavailable


# --------------------------------------------------------------------------- root Secret


def read_secret(kube: KubeEnv) -> dict[str, bytes]:
    s = k8s.CoreV1Api(kube.api).read_namespaced_secret(SECRET_NAME, SECRET_NAMESPACE, _preload_content=False)
    data = json.loads(s.data)["data"]
    return {k: base64.b64decode(v) for k, v in data.items()}


def test_leader_persists_the_root_and_followers_adopt_it(kube: KubeEnv, tmp_path: Path) -> None:
    leader_dir, follower_dir = tmp_path / "a", tmp_path / "b"
    leader = RootSecretSync(kube.api, leader_dir, lambda: True)
    follower = RootSecretSync(kube.api, follower_dir, lambda: False)
    assert follower.sync_once() == "waiting"
    assert not (follower_dir / "root-cert.pem").exists()
    assert leader.sync_once() == "created"
    stored = read_secret(kube)
    assert stored["root-cert.pem"] == (leader_dir / "root-cert.pem").read_bytes()
    assert stored["ca-key.pem"] == (leader_dir / "ca-key.pem").read_bytes()
    assert leader.sync_once() == "unchanged"
    assert follower.sync_once() == "adopted"
    assert (follower_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    a = CertificateAuthority.load_or_create(leader_dir)
    b = CertificateAuthority.load_or_create(follower_dir)
    assert a.trust_bundle() == b.trust_bundle()
    assert follower.sync_once() == "unchanged"

    # A restarted leader with a fresh local root adopts the persisted one instead of overwriting it.
    fresh_dir = tmp_path / "c"
    CertificateAuthority.load_or_create(fresh_dir)
    assert RootSecretSync(kube.api, fresh_dir, lambda: True).sync_once() == "adopted"
    assert (fresh_dir / "root-cert.pem").read_bytes() == stored["root-cert.pem"]

    # A rotation run on the leader's directory goes to the Secret, then to the followers.
    rotation.rotate_root(leader_dir)
    assert leader.sync_once() == "patched"
    assert len(x509.load_pem_x509_certificates(read_secret(kube)["root-cert.pem"])) == 2
    assert follower.sync_once() == "adopted"
    assert (follower_dir / "ca-key.pem").read_bytes() == (leader_dir / "ca-key.pem").read_bytes()


def test_leader_fills_in_an_empty_secret(kube: KubeEnv, tmp_path: Path) -> None:
    k8s.CoreV1Api(kube.api).create_namespaced_secret(SECRET_NAMESPACE, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME, "namespace": SECRET_NAMESPACE}})
    sync = RootSecretSync(kube.api, tmp_path / "a", lambda: True)
    assert sync.sync_once() == "patched"
    assert set(read_secret(kube)) == {"root-cert.pem", "ca-key.pem"}


async def test_identity_service_waits_for_the_secret_then_serves_certificates(kube: KubeEnv,
                                                                             tmp_path: Path) -> None:
    """A follower replica: no CA until the leader has written the Secret."""

    identity = IdentityService(IdentitySettings(tmp_path / "follower", create=False, bootstrap_tokens=False,
                                                workload_ttl=dt.timedelta(hours=1)))
    identity.start()
    assert not identity.ready and identity.material(Identity("shop", "cart")) is None
    follower = RootSecretSync(kube.api, tmp_path / "follower", lambda: False)
    task = asyncio.create_task(follower.run(identity.reload, interval_s=0.2, fast_interval_s=0.05))
    try:
        await asyncio.sleep(0.3)
        assert not identity.ready
        await asyncio.to_thread(RootSecretSync(kube.api, tmp_path / "leader", lambda: True).sync_once)
        for _ in range(100):
            if identity.ready:
                break
            await asyncio.sleep(0.05)
        assert identity.ready
        assert identity.bundle == (tmp_path / "leader" / "root-cert.pem").read_text()
        assert identity.material(Identity("shop", "cart")) is not None
    finally:
        task.cancel()
