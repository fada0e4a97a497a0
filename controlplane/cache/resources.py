"""Serialized resources and the memo that builds each one once. Pure computation, no I/O.

A `Resource` holds the bytes of one Envoy message, serialized exactly once, its content
version, and lazily the two wire chunks the xDS layer concatenates into responses (a
DiscoveryResponse `resources` field, a DeltaDiscoveryResponse `resources` field). Every
proxy that receives the resource shares these bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.model.ir import SourceRef, TypeUrl
from controlplane.translate.plan import CLUSTER, ResourceSpec

_UNPARSED = "\0unparsed"  # Resource._eds not yet computed


class Resource:
    __slots__ = ("_delta", "_eds", "_sotw", "body", "name", "sources", "type_url", "version")

    def __init__(self, type_url: TypeUrl, name: str, body: bytes, sources: tuple[SourceRef, ...] = ()) -> None:
        self.type_url = type_url
        self.name = name
        self.body = body
        self.version = hashlib.blake2b(body, digest_size=8).hexdigest()
        self.sources = sources
        self._sotw: bytes | None = None
        self._delta: bytes | None = None
        self._eds: str | None = _UNPARSED

    @classmethod
    def placeholder(cls, type_url: TypeUrl, name: str, version: str) -> Resource:
        """A resource known only by its version (one Envoy says it holds, from a delta
        stream's initial_resource_versions): no body, never sent, compared by version."""
        r = cls(type_url, name, b"")
        r.version = version
        return r

    def any(self) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.type_url, value=self.body)

    @property
    def sotw_chunk(self) -> bytes:
        """Wire bytes of `DiscoveryResponse.resources` holding this resource."""
        if self._sotw is None:
            self._sotw = discovery_pb2.DiscoveryResponse(resources=[self.any()]).SerializeToString()
        return self._sotw

    @property
    def delta_chunk(self) -> bytes:
        """Wire bytes of `DeltaDiscoveryResponse.resources` holding this resource."""
        if self._delta is None:
            res = discovery_pb2.Resource(name=self.name, version=self.version, resource=self.any())
            self._delta = discovery_pb2.DeltaDiscoveryResponse(resources=[res]).SerializeToString()
        return self._delta

    def eds_service_name(self) -> str | None:
        """For an EDS cluster, the ClusterLoadAssignment it uses (`service_name`, else its
        name); None for any other resource. Parsed once, on first use."""
        if self._eds is _UNPARSED:
            self._eds = None
            if self.type_url == CLUSTER and self.body:
                c = cluster_pb2.Cluster.FromString(self.body)
                if c.type == cluster_pb2.Cluster.EDS:
                    self._eds = c.eds_cluster_config.service_name or c.name
        return self._eds

    def __repr__(self) -> str:
        return f"Resource({self.name!r}, {self.version})"


@dataclass(slots=True)
class _Variant:
    spec_build: object
    args: tuple[object, ...]
    resource: Resource
    round: int


@dataclass(slots=True)
class BuildStats:
    builds: int = 0
    serializations: int = 0
    reused: int = 0


@dataclass(slots=True)
class ResourceMemo:
    """Builds each distinct (builder, args) once and returns the shared Resource.

    Variants are kept per (type, name); entries not used during a full round are dropped
    by `end_round()` so removed resources do not linger."""

    max_variants: int = 64
    _variants: dict[tuple[TypeUrl, str], list[_Variant]] = field(default_factory=dict)
    stats: BuildStats = field(default_factory=BuildStats)
    _round: int = 0

    def realize(self, spec: ResourceSpec) -> Resource:
        key = (spec.type_url, spec.name)
        variants = self._variants.get(key)
        if variants is not None:
            for v in variants:
                if v.spec_build is spec.build and (v.args is spec.args or v.args == spec.args):
                    v.round = self._round
                    self.stats.reused += 1
                    return v.resource
        msg: Message = spec.make()
        self.stats.builds += 1
        body = msg.SerializeToString(deterministic=True)
        self.stats.serializations += 1
        res = Resource(spec.type_url, spec.name, body, spec.sources)
        if variants is None:
            variants = self._variants[key] = []
        # Identical bytes from different inputs still share one Resource (when they name the
        # same source objects, so NACK attribution stays right).
        for v in variants:
            if v.resource.version == res.version and v.resource.body == body and v.resource.sources == res.sources:
                res = v.resource
                break
        variants.append(_Variant(spec.build, spec.args, res, self._round))
        if len(variants) > self.max_variants:
            variants.sort(key=lambda v: v.round)
            del variants[0]
        return res

    def begin_round(self) -> None:
        self._round += 1

    def end_round(self) -> None:
        """Drop variants not used since begin_round()."""
        cur = self._round
        for key in list(self._variants):
            kept = [v for v in self._variants[key] if v.round == cur]
            if kept:
                self._variants[key] = kept
            else:
                del self._variants[key]

    def __len__(self) -> int:
        return sum(len(v) for v in self._variants.values())
