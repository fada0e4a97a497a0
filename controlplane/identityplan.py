"""The identity planner: which certificates each proxy's own layer carries, when they are
re-planned, and whether proxies hold a trust bundle yet. No I/O of its own: the CA
(`controlplane.ca.service.IdentityService`) issues and keeps the material; the planner
turns it into SDS secrets and tells the runtime when certificates change.

- A sidecar or waypoint with an authenticated identity gets its workload certificate and
  the trust bundle, and the DestinationRule `credentialName` Secrets of its namespace
  (`credential_layer`); an unauthenticated stream gets none.
- A gateway proxy with an authenticated identity also gets the `credentialName` Secrets of
  its Gateway's servers (from its namespace), only when its pod (the identity's namespace and
  service account) carries the Gateway's selector labels (`translate.gateway`).
- A node proxy gets one certificate per identity of the ambient pods on the node its
  credential proves (named by SPIFFE URI), and no other (the CA issues nothing else to it).
- Certificates nobody holds are forgotten; the next half-life wakes the planner to rotate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from controlplane.ca.identity import Identity, identity_of, proven_node
from controlplane.cache.resources import Resource
from controlplane.model.ir import ProxyMeta
from controlplane.model.mesh import Mesh
from controlplane.translate.gateway import gateway_credentials
from controlplane.translate.nodepod import identity_secret, node_identities
from controlplane.translate.plan import SECRET, ResourceSpec
from controlplane.translate.proxy import plan_own
from controlplane.translate.secrets import (
    ROOT_SECRET,
    plan_named_secrets,
    plan_proxy_credentials,
    plan_secrets,
    root_secret,
)
from controlplane.translate.security import SYSTEM_CA_FILE
from controlplane.xds.server import Connection

if TYPE_CHECKING:
    from controlplane.ca.service import IdentityService


def credential_layer(mesh: Mesh, meta: ProxyMeta, ident: Identity) -> list[ResourceSpec]:
    """The `credentialName` Secrets an authenticated proxy receives (its namespace was checked
    against its credential when the stream was accepted):
    - a sidecar or a waypoint: those DestinationRules visible to its namespace name, from its
      own namespace, never another's (Istio's rule for sidecars; a waypoint originates TLS
      to the ServiceEntry hosts it routes to, as a sidecar does);
    - a gateway: its servers' Secrets, if its pod is one the Gateway selects;
    - a node proxy: none (it originates only HBONE)."""
    if meta.mode in ("sidecar", "waypoint"):
        return plan_proxy_credentials(mesh, meta.namespace, SYSTEM_CA_FILE)
    if meta.mode == "gateway":
        return gateway_credentials(mesh, meta, ident.namespace, ident.service_account, SYSTEM_CA_FILE)
    return []


class IdentityPlanner:
    """Certificates in proxies' own layers. `on_change` is called when certificates or the
    trust bundle may have changed (the runtime then re-plans every own layer);
    `connections` lists the open streams (for `bundle_synced`)."""

    def __init__(self, identity: IdentityService | None, on_change: Callable[[], None],
                 connections: Callable[[], Iterable[Connection]]) -> None:
        self.identity = identity
        self._on_change = on_change
        self._connections = connections
        self._rotation_timer: asyncio.TimerHandle | None = None
        if identity is not None:
            identity.on_change = on_change
            identity.bundle_synced = self.bundle_synced

    def own_layer(self, mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        """The proxy's own layer (`translate.proxy.plan_own`) plus, for an authenticated
        identity, its certificate(s) and the trust bundle."""
        specs = plan_own(mesh, meta)
        ident = identity_of(meta)
        if ident is None or self.identity is None:
            return specs
        if meta.mode == "node":
            return [*specs, *self.node_secrets(mesh, meta)]
        material = self.identity.material(ident)
        if material is None:
            return specs
        return [*specs, *plan_secrets(material, self.identity.bundle), *credential_layer(mesh, meta, ident)]

    def node_secrets(self, mesh: Mesh, meta: ProxyMeta) -> list[ResourceSpec]:
        """A node proxy's certificates: one per identity of the ambient pods on the node its
        credential proves, and no other (the CA issues nothing else to it)."""
        assert self.identity is not None
        node = proven_node(meta)
        if node is None or node != meta.node:
            return []
        named = []
        for ns, sa in node_identities(mesh, node):
            material = self.identity.material(Identity(ns, sa))
            if material is not None:
                named.append((identity_secret(mesh.trust_domain, ns, sa), material))
        return plan_named_secrets(named, self.identity.bundle)

    def upkeep(self, mesh: Mesh, conns: Sequence[Connection]) -> None:
        """Forget certificates nobody holds; wake up at the next half-life to rotate."""
        if self.identity is None:
            return
        live = {c.identity for c in conns if c.identity is not None}
        for c in conns:
            node = proven_node(c.meta) if c.meta.mode == "node" else None
            if node is not None and node == c.meta.node:
                live.update(Identity(ns, sa) for ns, sa in node_identities(mesh, node))
        delay = self.identity.sweep(live)
        if self._rotation_timer is not None:
            self._rotation_timer.cancel()
            self._rotation_timer = None
        if delay is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._rotation_timer = loop.call_later(delay + 0.01, self._on_change)

    def bundle_synced(self, bundle: str) -> bool:
        """Whether every authenticated proxy that subscribes to ROOTCA has ACKed `bundle`."""
        want = Resource(SECRET, ROOT_SECRET, root_secret(bundle).SerializeToString(deterministic=True)).version
        for c in list(self._connections()):
            if c.identity is None or not c.stream.subscribes(SECRET, ROOT_SECRET):
                continue
            acked = c.stream.acked_resource(SECRET, ROOT_SECRET)
            if acked is None or acked.version != want:
                return False
        return True
