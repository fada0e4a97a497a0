"""Unit tests of controlplane.translate.names: client-visible domains and weighted splits."""

from __future__ import annotations

from controlplane.model.ir import (
    Destination,
    Hostname,
    PortProtocol,
    RouteDestination,
    Service,
    ServicePort,
    SourceRef,
    service_fqdn,
)
from controlplane.translate.names import (
    dedupe_domains,
    destination_cluster,
    destination_port,
    inbound_cluster_name,
    outbound_cluster_name,
    service_domains,
    visible_to,
    weighted_split,
)


def svc(
    name: str, ns: str, ports: tuple[int, ...] = (9080,), cluster_ip: str | None = "10.96.0.10"
) -> Service:
    return Service(
        ref=SourceRef("Service", ns, name),
        namespace=ns,
        name=name,
        hostname=service_fqdn(name, ns),
        cluster_ip=cluster_ip,
        ports=tuple(ServicePort(f"http-{p}", p, p, PortProtocol.HTTP) for p in ports),
    )


def test_cluster_names() -> None:
    host = "reviews.default.svc.cluster.local"
    assert outbound_cluster_name(9080, host) == "outbound|9080||reviews.default.svc.cluster.local"
    assert outbound_cluster_name(9080, host, "v1") == "outbound|9080|v1|reviews.default.svc.cluster.local"
    assert inbound_cluster_name(8080) == "inbound|8080||"


def test_domains_for_a_client_in_the_same_namespace() -> None:
    assert service_domains(svc("reviews", "default"), 9080, "default") == (
        "reviews",
        "reviews:9080",
        "reviews.default",
        "reviews.default:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local:9080",
        "10.96.0.10",
        "10.96.0.10:9080",
    )


def test_short_name_only_in_the_services_own_namespace() -> None:
    domains = service_domains(svc("reviews", "default"), 9080, "shop")
    assert "reviews" not in domains
    assert "reviews:9080" not in domains
    assert domains[0] == "reviews.default"
    assert "reviews.default.svc.cluster.local:9080" in domains


def test_headless_service_has_no_ip_domain() -> None:
    domains = service_domains(svc("db", "default", cluster_ip=None), 5432, "default")
    assert all(not d[0].isdigit() for d in domains)
    assert len(domains) == len(set(domains)) == 8


def test_dedupe_keeps_the_first_claim_and_order() -> None:
    a = service_domains(svc("a", "default", cluster_ip="10.0.0.1"), 80, "default")
    b = service_domains(svc("b", "default", cluster_ip="10.0.0.1"), 80, "default")  # same (bogus) IP
    da, db = dedupe_domains([a, b])
    assert da == a
    assert "10.0.0.1" not in db and "10.0.0.1:80" not in db
    assert db[:2] == ("b", "b:80")
    assert not set(da) & set(db)


def test_dedupe_is_case_insensitive() -> None:
    assert dedupe_domains([["Reviews"], ["reviews", "x"]]) == [("Reviews",), ("x",)]


def rd(host: str, weight: int, subset: str | None = None) -> RouteDestination:
    return RouteDestination(Destination(Hostname(host), subset), weight)


def test_weighted_split_drops_zero_weights_and_keeps_order() -> None:
    route = (rd("r", 80, "v1"), rd("r", 0, "v2"), rd("r", 20, "v3"))
    assert weighted_split(route) == (route[0], route[2])


def test_weighted_split_single_destination_is_kept() -> None:
    route = (rd("r", 100),)
    assert weighted_split(route) == route


def test_weighted_split_all_zero_sends_everything_to_the_first() -> None:
    out = weighted_split((rd("r", 0, "v1"), rd("r", 0, "v2")))
    assert len(out) == 1
    assert out[0].destination.subset == "v1"
    assert out[0].weight == 100


def test_weighted_split_empty() -> None:
    assert weighted_split(()) == ()


def test_destination_port_resolution() -> None:
    two = svc("shadow", "default", ports=(9080, 9901))
    one = svc("legacy", "default", ports=(8000,))
    assert destination_port(Destination(two.hostname, None, 9901), 9080, two) == 9901  # explicit
    assert destination_port(Destination(two.hostname), 9080, two) == 9080  # same port as the route
    assert destination_port(Destination(one.hostname), 9080, one) == 8000  # its only port
    assert destination_port(Destination(two.hostname), 7000, two) == 7000  # ambiguous: the route's
    unknown = Destination(Hostname("ext.example.com"))
    assert destination_cluster(unknown, 443, {}) == "outbound|443||ext.example.com"
    assert destination_cluster(Destination(one.hostname, "v1"), 80, {one.hostname: one}) == (
        "outbound|8000|v1|legacy.default.svc.cluster.local"
    )


def test_export_to() -> None:
    assert visible_to((), "a", "b")
    assert visible_to(("*",), "a", "b")
    assert visible_to((".",), "a", "a")
    assert not visible_to((".",), "a", "b")
    assert visible_to(("b",), "a", "b")
    assert not visible_to(("c",), "a", "b")
