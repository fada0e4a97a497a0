"""Prometheus metrics of one control-plane process (prometheus-client, own registry).
No I/O; the status app exposes them at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.proxies = Gauge("meshline_proxies_connected", "Connected proxies", ["mode", "protocol"], registry=r)
        self.pushes = Counter("meshline_xds_pushes_total", "xDS responses sent", ["type"], registry=r)
        self.nacks = Counter("meshline_xds_nacks_total", "xDS responses rejected by proxies", ["type"], registry=r)
        self.validation_errors = Gauge(
            "meshline_config_validation_errors", "Objects with validation errors", registry=r
        )
        self.serializations = Gauge(
            "meshline_resource_serializations", "Envoy resources serialized since start", registry=r
        )
        self.quarantined = Gauge(
            "meshline_objects_quarantined", "Objects withheld because a proxy rejected what they produced",
            registry=r,
        )
        self.proxies_degraded = Gauge(
            "meshline_proxies_degraded",
            "Connected proxies not receiving something they should (held back after their NACK, withheld, "
            "or served fail-closed)", registry=r,
        )
        self.preflight_seconds = Histogram(
            "meshline_preflight_seconds", "Pre-flight checks of changed resources by Meshline's own Envoy",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.push_seconds = Histogram(
            "meshline_xds_push_seconds", "From a source change to the first response sent to a proxy", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
        )
        self.convergence_seconds = Histogram(
            "meshline_convergence_seconds", "From a source change to a proxy ACKing all of it", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.watch_restarts = Counter(
            "meshline_source_watch_restarts_total", "Source watches restarted after an error", ["source"], registry=r
        )
        self.status_writes = Counter(
            "meshline_crd_status_writes_total", "CRD status conditions written (leader only)", registry=r
        )
        self.gc_settle_seconds = Histogram(
            "meshline_gc_settle_seconds",
            "Full garbage collections (then freeze) run once the control plane settles after full rebuilds",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.gc_settle_pending = Gauge(
            "meshline_gc_settle_pending", "1 while a settle pass is due (after a full rebuild)", registry=r
        )
        self.snapshot_inconsistencies = Counter(
            "meshline_snapshot_inconsistencies_total",
            "Proxy snapshots pushed that name a resource the proxy does not get, by type of the missing "
            "resource (cluster, endpoint, route, secret)", ["type"], registry=r,
        )
        self.rebuild_seconds = Histogram(
            "meshline_snapshot_rebuild_seconds", "Time to rebuild proxy snapshots after a change", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
