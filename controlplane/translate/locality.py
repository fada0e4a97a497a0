"""Locality load balancing as Istio does it: where workloads run, and the EDS priorities and
weights a client's locality gives a service's endpoints. Pure, no I/O.

A locality is `(region, zone, subzone)`. A workload's comes from its labels: Istio's
`topology.istio.io/locality` or `istio-locality` (`region.zone.subzone`, dots because label
values cannot hold `/`), else `topology.kubernetes.io/region`, `topology.kubernetes.io/zone`
(or the older `failure-domain.beta.kubernetes.io/*`) and `topology.istio.io/subzone`. Istio
reads the last three from the Pod's *Node*; Meshline watches no Nodes, so it reads them from
the Pod's own labels (set them on the Pod template, or let a tool copy them from the Node).
An endpoint without a known Pod takes the zone its EndpointSlice reports (region unknown).
A proxy's locality is its workload's (or, without a Pod, the labels it declares).

Per cluster (`locality_mode`), as Istio:
- `localityLbSetting.enabled: false`: nothing;
- `distribute`: for a client matching a rule's `from`, each locality group gets the weight of
  the `to` entries it matches (split over the groups one entry matches, by endpoint count);
  groups no entry matches are left out;
- otherwise, only when outlier detection applies: priorities by proximity (0: same region,
  zone and subzone; 1: same zone; 2: same region; 3: another region; 4: a region that a
  `failover` rule from the client's region does not name), after `failoverPriority` (the
  number of leading labels where the endpoint differs from the client, ranked first),
  renumbered without gaps.
Clients of one locality (and equal `failoverPriority` label values) receive equal load
assignments, so the cache serializes each once per locality, not per proxy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from controlplane.model.ir import Labels, LocalityLbSetting, ProxyMeta
from controlplane.model.mesh import Mesh

Locality = tuple[str, str, str]
NO_LOCALITY: Locality = ("", "", "")
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
LOCALITY_LABELS = ("topology.istio.io/locality", "istio-locality")
_LEGACY_REGION = "failure-domain.beta.kubernetes.io/region"
_LEGACY_ZONE = "failure-domain.beta.kubernetes.io/zone"
_WANTED = frozenset({REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL, _LEGACY_REGION, _LEGACY_ZONE, *LOCALITY_LABELS})

LocalityMode = Literal["failover", "distribute"]


def parse_locality(text: str, sep: str = "/") -> Locality:
    parts = [*text.split(sep, 2), "", ""]
    return (parts[0], parts[1], parts[2])


def labels_locality(labels: Labels) -> Locality:
    """The locality a workload's labels give (NO_LOCALITY when none)."""
    found: dict[str, str] = {}
    for k, v in labels:
        if k in _WANTED:
            found[k] = v
    if not found:
        return NO_LOCALITY
    for key in LOCALITY_LABELS:
        if found.get(key):
            return parse_locality(found[key].replace("/", "."), ".")
    return (found.get(REGION_LABEL) or found.get(_LEGACY_REGION, ""),
            found.get(ZONE_LABEL) or found.get(_LEGACY_ZONE, ""), found.get(SUBZONE_LABEL, ""))


def locality_text(loc: Locality) -> str:
    return "/".join(loc).rstrip("/")


def label_value(key: str, labels: Mapping[str, str], loc: Locality) -> str:
    """A workload's value of `key` for failoverPriority: the topology keys come from its
    locality (as Istio labels endpoints), others from its labels."""
    if key == REGION_LABEL:
        return loc[0]
    if key == ZONE_LABEL:
        return loc[1]
    if key == SUBZONE_LABEL:
        return loc[2]
    return labels.get(key, "")


@dataclass(frozen=True, slots=True)
class ClientLocality:
    """What of a client decides its load assignments: its locality and its values of the
    labels DestinationRules' failoverPriority names."""

    locality: Locality = NO_LOCALITY
    labels: Labels = ()  # (key, value) for each failoverPriority key in the mesh, sorted


def failover_priority_keys(mesh: Mesh) -> frozenset[str]:
    keys: set[str] = set()
    for dr in mesh.destination_rules:
        policies = [dr.traffic_policy, *(s.traffic_policy for s in dr.subsets)]
        for tp in policies:
            if tp is None:
                continue
            for lb in (tp.load_balancer, *(pl.load_balancer for pl in tp.port_level)):
                if lb is not None and lb.locality_lb is not None:
                    keys.update(k.split("=", 1)[0] for k in lb.locality_lb.failover_priority)
    return frozenset(keys)


class ClientLocalities:
    """`client(mesh, meta)`: a proxy's ClientLocality; remembers the failoverPriority keys of
    the last mesh it saw (they are looked up once per mesh, not once per proxy)."""

    def __init__(self) -> None:
        self._mesh: Mesh | None = None
        self._keys: frozenset[str] = frozenset()

    def __call__(self, mesh: Mesh, meta: ProxyMeta) -> ClientLocality:
        if self._mesh is not mesh:
            self._mesh, self._keys = mesh, failover_priority_keys(mesh)
        return client_locality(mesh, meta, self._keys)


def client_locality(mesh: Mesh, meta: ProxyMeta, keys: Iterable[str] = ()) -> ClientLocality:
    wl = mesh.workload(meta.namespace, meta.workload) if meta.workload else None
    labels = wl.labels if wl is not None else meta.labels
    loc = labels_locality(labels)
    have = dict(labels)
    return ClientLocality(loc, tuple(sorted((k, label_value(k, have, loc)) for k in keys)))


# --------------------------------------------------------------------------- load assignments


def locality_mode(setting: LocalityLbSetting | None, outlier_detection: bool) -> LocalityMode | None:
    """How a cluster balances over localities (Istio): None when locality load balancing is
    off for it, or when nothing would fail over (no outlier detection, no distribute)."""
    if setting is not None and setting.enabled is False:
        return None
    if setting is not None and setting.distribute:
        return "distribute"
    return "failover" if outlier_detection else None


def locality_match(loc: Locality, rule: str) -> bool:
    """Istio's LocalityMatch: `*` or a missing part matches anything (a missing region
    does not)."""
    region, zone, subzone = parse_locality(rule)
    return ((region == "*" or region == loc[0]) and (zone in ("*", "") or zone == loc[1])
            and (subzone in ("*", "") or subzone == loc[2]))


def proximity(client: Locality, ep: Locality) -> int:
    if client[0] != ep[0]:
        return 3
    if client[1] != ep[1]:
        return 2
    return 0 if client[2] == ep[2] else 1


Group = tuple[Locality, int, int]
"""(locality, priority, weight) of one LocalityLbEndpoints group; weight 0: none set."""


def failover_priorities(client: ClientLocality, setting: LocalityLbSetting | None,
                        groups: Iterable[tuple[Locality, Labels]]) -> dict[tuple[Locality, Labels], int]:
    """Priority (0..N without gaps) of each (locality, failoverPriority label values) group."""
    failover = setting.failover if setting is not None else ()
    keys = setting.failover_priority if setting is not None else ()
    have = dict(client.labels)
    raw: dict[tuple[Locality, Labels], int] = {}
    for loc, values in groups:
        level = 0
        if keys:
            ep_values = dict(values)
            matched = 0
            for key in keys:
                name, _, override = key.partition("=")
                want = override if "=" in key else have.get(name, "")
                if ep_values.get(name, "") != want:
                    break
                matched += 1
            level = (len(keys) - matched) * 5
        if not keys or failover:
            prio = proximity(client.locality, loc)
            if prio == 3:
                for src, dst in failover:
                    if src == client.locality[0]:
                        if loc[0] != dst:
                            prio = 4
                        break
            level += prio
        raw[(loc, values)] = level
    order = {p: i for i, p in enumerate(sorted(set(raw.values())))}
    return {g: order[p] for g, p in raw.items()}


def distribute_weights(client: Locality, setting: LocalityLbSetting,
                       counts: Mapping[Locality, int]) -> dict[Locality, int] | None:
    """The weight of each locality for a client matching one of `distribute`'s `from` rules
    (localities left out get none); None when no rule applies to the client."""
    for src, targets in setting.distribute:
        if not locality_match(client, src):
            continue
        unmatched = dict(counts)
        weights: dict[Locality, int] = {}
        for rule, weight in targets:
            hits = {loc: n for loc, n in unmatched.items() if locality_match(loc, rule)}
            total = sum(hits.values())
            for loc, n in hits.items():
                del unmatched[loc]
                w = math.ceil(n * weight / total) if total else 0
                if w > 0:
                    weights[loc] = w
        return weights
    return None
