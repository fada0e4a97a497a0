"""Authenticated workload identities, and how one travels with a proxy's `ProxyMeta` to the
snapshot builder. Pure, no I/O.

An `Identity` is what a verified token proves: a (namespace, service account) pair, never
what the node metadata claims. `bind_identity` stamps it on the proxy's meta
(`extra["meshline.io/identity"]`, and the service account replaced by the verified one),
so the proxy's snapshot key and its own layer (which carries its certificate) depend on
it; `identity_of` reads it back.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace

from controlplane.ca import CAError, SpiffeId
from controlplane.model.ir import ProxyMeta

IDENTITY_KEY = "meshline.io/identity"
_SA_USERNAME = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """A verified (namespace, service account)."""

    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        SpiffeId("cluster.local", self.namespace, self.service_account)  # validates both names

    def spiffe(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    @classmethod
    def from_username(cls, username: str) -> Identity:
        """From a Kubernetes user name `system:serviceaccount:<ns>:<sa>`."""
        m = _SA_USERNAME.fullmatch(username)
        if m is None:
            raise CAError(f"{username!r} is not a service account")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of checking a stream's credentials: an identity, or why there is none
    (`reason` never contains the token)."""

    identity: Identity | None
    reason: str = ""
    presented: bool = False  # a token was sent (valid or not)
    unavailable: bool = False  # could not be checked now (e.g. the API server is down): retry later
    node: str | None = None  # the node the credential is bound to (node proxies), when it proves one
    expires_at: float | None = None  # when the credential stops being valid (epoch seconds), if known


NODE_KEY = "meshline.io/node"


def bind_identity(meta: ProxyMeta, identity: Identity, node: str | None = None) -> ProxyMeta:
    """`meta` with the verified identity (and, for a node proxy, the verified node) stamped on."""
    extra = dict(meta.extra)
    extra[IDENTITY_KEY] = str(identity)
    if node is not None:
        extra[NODE_KEY] = node
    return replace(meta, service_account=identity.service_account, extra=tuple(sorted(extra.items())))


def proven_node(meta: ProxyMeta) -> str | None:
    """The node a node proxy's credential proved (None: not proven)."""
    return next((v for k, v in meta.extra if k == NODE_KEY), None)


def identity_of(meta: ProxyMeta) -> Identity | None:
    for key, value in meta.extra:
        if key == IDENTITY_KEY:
            ns, _, sa = value.partition("/")
            return Identity(ns, sa)
    return None


def parse_duration(text: str | float | int) -> dt.timedelta:
    """`90`, `90s`, `15m`, `24h`, `365d` (plain numbers are seconds) -> a positive timedelta."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = _DURATION.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{text!r} is not a duration (e.g. 30s, 15m, 24h, 365d, or seconds)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return dt.timedelta(seconds=seconds)
