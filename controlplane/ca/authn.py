"""Who is on the other end of a gRPC stream: the bearer token of its `authorization`
metadata, verified — a Meshline bootstrap token (directory mode, HMAC with the CA
directory's token key) or a Kubernetes service-account token (TokenReview with audience
`meshline` through the official client, cached until the token expires). Does network I/O
(TokenReview, in a thread). Token values never appear in results, errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from controlplane.ca import CAError, tokens
from controlplane.ca.identity import AuthResult, Identity

log = logging.getLogger(__name__)

AUDIENCE = "meshline"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying (only to bound a cache entry of a
    token the API server has just verified)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (ValueError, binascii.Error):
        return None


NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""TokenReview `user.extra` key naming the node of the pod a bound token belongs to."""


class TokenReviewer:
    """Kubernetes TokenReview (audiences `["meshline"]`), cached per token (by hash) for at
    most `max_cache_s` and never past the token's expiry; refusals are cached briefly. `authenticate` runs the blocking
    client in a thread."""

    def __init__(self, api_client: Any, audiences: Sequence[str] = (AUDIENCE,), *,
                 clock: Callable[[], float] = time.time, max_cache_s: float = 20.0,
                 negative_cache_s: float = 5.0, timeout_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.api_client = api_client
        self.audiences = tuple(audiences)
        self.clock = clock
        self.max_cache_s = max_cache_s
        self.negative_cache_s = negative_cache_s
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[AuthResult, float]] = {}
        self._lock = threading.Lock()
        self.reviews = 0  # API calls made (for tests and metrics)

    def review(self, token: str) -> AuthResult:
        """One TokenReview (blocking)."""
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(self.audiences)}}
        self.reviews += 1
        try:
            resp = k8s.AuthenticationV1Api(self.api_client).create_token_review(
                body, _preload_content=False, _request_timeout=self.timeout_s)
            doc = json.loads(resp.data)
        except ApiException as exc:  # never str(exc): the body may echo the token
            return AuthResult(None, f"TokenReview failed: HTTP {exc.status} {exc.reason}", presented=True,
                              unavailable=exc.status is None or exc.status >= 500 or exc.status == 429)
        except Exception as exc:
            return AuthResult(None, f"TokenReview failed: {type(exc).__name__}", presented=True, unavailable=True)
        status = doc.get("status") if isinstance(doc, dict) else None
        status = status if isinstance(status, dict) else {}
        if not status.get("authenticated"):
            why = status.get("error") or "not authenticated"
            return AuthResult(None, f"TokenReview: {str(why)[:200]}", presented=True)
        audiences = status.get("audiences") or []
        if not any(a in audiences for a in self.audiences):
            return AuthResult(None, f"TokenReview: token not valid for audience {self.audiences[0]!r}", presented=True)
        user = status.get("user") if isinstance(status.get("user"), dict) else {}
        username = str((user or {}).get("username") or "")
        extra = (user or {}).get("extra") if isinstance((user or {}).get("extra"), dict) else {}
        nodes = (extra or {}).get(NODE_NAME_EXTRA) or []
        node = str(nodes[0]) if isinstance(nodes, list) and nodes else None
        try:
            return AuthResult(Identity.from_username(username), presented=True, node=node)
        except CAError as exc:
            return AuthResult(None, f"TokenReview: {exc}", presented=True)

    def _lookup(self, digest: bytes) -> AuthResult | None:
        with self._lock:
            hit = self._cache.get(digest)
            if hit is None:
                return None
            if self.clock() >= hit[1]:
                del self._cache[digest]
                return None
            return hit[0]

    def _store(self, digest: bytes, token: str, result: AuthResult) -> None:
        now = self.clock()
        if result.identity is not None:
            exp = _jwt_expiry(token)
            until = min(exp, now + self.max_cache_s) if exp is not None else now + 60.0
        elif result.unavailable:
            return
        else:
            until = now + self.negative_cache_s
        with self._lock:
            if len(self._cache) >= self.max_entries:
                for k in [k for k, (_, t) in self._cache.items() if t <= now] or list(self._cache)[:1]:
                    del self._cache[k]
            self._cache[digest] = (result, until)

    async def authenticate(self, token: str) -> AuthResult:
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._lookup(digest)
        if hit is not None:
            return hit
        result = await asyncio.to_thread(self.review, token)
        self._store(digest, token, result)
        return result


class Authenticator:
    """Verifies a stream's bearer token: Meshline tokens (`mlt1.`) with the key from
    `token_key()` (None: bootstrap tokens disabled), anything else with `reviewer`
    (None: Kubernetes tokens not accepted)."""

    def __init__(self, token_key: Callable[[], bytes | None], reviewer: TokenReviewer | None = None,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self._token_key = token_key
        self.reviewer = reviewer
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> AuthResult:
        token = bearer_token(metadata)
        if token is None:
            return AuthResult(None, "no bearer token")
        if tokens.is_meshline_token(token):
            key = self._token_key()
            if key is None:
                return AuthResult(None, "Meshline bootstrap tokens are not accepted here", presented=True)
            try:
                identity, expires, node = tokens.verify_claims(key, token, self._clock())
            except CAError as exc:
                return AuthResult(None, f"invalid token: {exc}", presented=True)
            return AuthResult(identity, presented=True, node=node, expires_at=expires.timestamp())
        if self.reviewer is None:
            return AuthResult(None, "invalid token: not a Meshline bootstrap token (and no Kubernetes "
                                    "TokenReview in this mode)", presented=True)
        result = await self.reviewer.authenticate(token)
        if result.identity is not None and result.expires_at is None:
            exp = _jwt_expiry(token)  # (the API server has verified the token: its exp is real)
            if exp is not None:
                result = dataclasses.replace(result, expires_at=exp)
        return result
