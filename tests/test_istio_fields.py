"""Every field of Istio's VirtualService, DestinationRule, Sidecar, PeerAuthentication,
AuthorizationPolicy, ServiceEntry and WorkloadEntry is translated, warned about or refused:
never ignored in silence (issues 16, 18). Also writes the table in docs/istio-compatibility.md (`--update-golden`).

The field list is the spec schema of Meshline's CRDs (manifests/crds), which mirror
Istio's public v1 schema field for field (Istio's networking.istio.io/security.istio.io
CRDs, istio/api 1.31). For each leaf field the test builds one object of that kind that
sets it (with the sibling fields it needs: `CONTEXT`), converts and validates it in a small
mesh, and plans the Envoy config of a few proxies (sidecars in two namespaces and both
capture modes, and a server sidecar for the security kinds):
- refused: an error names the field (or one of its parents);
- warned: a warning of the object's own conversion names the field (or a parent), or the
  Envoy config does not change and a cross-object warning names it;
- supported: the Envoy config of some proxy changes, with no such warning;
- no effect: listed in `NO_EFFECT` with the reason (Istio gives it no effect either).
Anything else is a silent drop and fails the test. Reads the CRD files; writes the doc
only with `--update-golden`.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.model.convert import convert
from controlplane.model.ir import Issue, ProxyMeta, labels_of
from controlplane.model.meshconfig import parse_mesh_config
from controlplane.model.raw import RawObject
from controlplane.model.store import assemble
from controlplane.sources.yamlload import parse_documents
from controlplane.translate.gateway import gateway_credentials, plan_gateway
from controlplane.translate.locality import client_locality, failover_priority_keys
from controlplane.translate.plan import ResourceSpec
from controlplane.translate.proxy import outbound_access_logs
from controlplane.translate.scope import proxy_scope
from controlplane.translate.sidecar import plan_inbound, plan_outbound
from tests.runonce import once

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "manifests" / "crds"
DOC = ROOT / "docs" / "istio-compatibility.md"

KINDS = {
    "VirtualService": ("virtualservices.yaml", "networking.istio.io/v1"),
    "DestinationRule": ("destinationrules.yaml", "networking.istio.io/v1"),
    "Sidecar": ("sidecars.yaml", "networking.istio.io/v1"),
    "PeerAuthentication": ("peerauthentications.yaml", "security.istio.io/v1"),
    "AuthorizationPolicy": ("authorizationpolicies.yaml", "security.istio.io/v1"),
    "RequestAuthentication": ("requestauthentications.yaml", "security.istio.io/v1"),
    "Telemetry": ("telemetries.yaml", "telemetry.istio.io/v1"),
    "Gateway": ("gateways.yaml", "networking.istio.io/v1"),
    "ServiceEntry": ("serviceentries.yaml", "networking.istio.io/v1"),
    "WorkloadEntry": ("workloadentries.yaml", "networking.istio.io/v1"),
}

# --------------------------------------------------------------------------- the mesh around the object

SCENARIO = """
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: http2-admin, port: 9443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}, {name: http2-admin, port: 9443, protocol: TCP}]
endpoints:
- {addresses: [10.1.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1}}
- {addresses: [10.1.0.2], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v2}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1,
           topology.kubernetes.io/region: region1, topology.kubernetes.io/zone: zone1},
           annotations: {meshline.io/status: injected}}
spec: {serviceAccountName: reviews, containers: [{name: app, image: x, ports: [{containerPort: 9080},
       {containerPort: 9443}]}]}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews, version: v2,
           topology.kubernetes.io/region: region2, topology.kubernetes.io/zone: zone2},
           annotations: {meshline.io/status: injected}}
spec: {serviceAccountName: reviews, containers: [{name: app, image: x, ports: [{containerPort: 9080},
       {containerPort: 9443}]}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: mysql, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: mysql}
  ports: [{name: tcp-mysql, port: 3306}, {name: tcp-x, port: 33060}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mysql-1, namespace: default, labels: {kubernetes.io/service-name: mysql}}
addressType: IPv4
ports: [{name: tcp-mysql, port: 3306, protocol: TCP}, {name: tcp-x, port: 33060, protocol: TCP}]
endpoints:
- {addresses: [10.1.1.1], conditions: {ready: true}, targetRef: {kind: Pod, name: mysql-v1}}
- {addresses: [10.1.1.2], conditions: {ready: true}, targetRef: {kind: Pod, name: mysql-v2}}
---
apiVersion: v1
kind: Pod
metadata: {name: mysql-v1, namespace: default, labels: {app: mysql, version: v1}}
spec: {containers: [{name: db, image: x, ports: [{containerPort: 3306}]}]}
status: {podIP: 10.1.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: mysql-v2, namespace: default, labels: {app: mysql, version: v2}}
spec: {containers: [{name: db, image: x, ports: [{containerPort: 3306}]}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Service
metadata: {name: mysql2, namespace: default}
spec:
  clusterIP: 10.96.0.21
  selector: {app: mysql2}
  ports: [{name: tcp-mysql, port: 3306}]
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-1, namespace: default, labels: {app: productpage,
           topology.kubernetes.io/region: region1, topology.kubernetes.io/zone: zone1}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.1.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: tool-1, namespace: other, labels: {app: tool, topology.kubernetes.io/region: region3}}
spec: {containers: [{name: app, image: x}]}
status: {podIP: 10.1.3.1}
---
# The CA of a DestinationRule credentialName (a TLS Secret in the clients' namespace).
apiVersion: v1
kind: Secret
metadata: {name: client-credential, namespace: default}
stringData:
  ca.crt: |
    -----BEGIN CERTIFICATE-----
    MIIBKDCB0KADAgECAgEBMAoGCCqGSM49BAMCMBQxEjAQBgNVBAMMCWZpZWxkcy1j
    YTAeFw0yNjAxMDEwMDAwMDBaFw0zNTEyMzAwMDAwMDBaMBQxEjAQBgNVBAMMCWZp
    ZWxkcy1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABOwN+4glplLzgOeUP0Jh
    CIEad1hfMCYV4cmWUa4hQka3GH4d+KANQbcg2XBU2rQmFWVFhour6CbDa2aWFRDn
    BGmjEzARMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgJB/82ASK
    +kUYmhp2z99nWfmyI7/02EwmyKUYtdgjQcsCID7c4v4ZLGQHNRnbNdKcoDMBY0GI
    5wP+n/2nwqDhb2Py
    -----END CERTIFICATE-----
---
# Subsets for routes, in the root namespace (a rule under test in `default` takes precedence).
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: subsets, namespace: meshline-system}
spec:
  host: reviews.default.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
# A route to a subset, so subset policies that act on routes (hashing) show (a VirtualService
# under test, in `default`, takes the host over).
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: to-v1, namespace: meshline-system}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http: [{route: [{destination: {host: reviews.default.svc.cluster.local, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mysql-subsets, namespace: meshline-system}
spec:
  host: mysql.default.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
# The ServiceEntry that selects the WorkloadEntry under test (VMs labelled app: vm).
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: default}
spec:
  hosts: [vms.internal.example]
  location: MESH_INTERNAL
  ports: [{number: 7070, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
# An ingress gateway Pod, Gateway `edge` and the routes bound to it and to the Gateway under
# test (`t`), with the TLS Secret its servers name (certificate, key and CA).
apiVersion: v1
kind: Pod
metadata: {name: gateway-1, namespace: default, labels: {istio: ingressgateway}}
spec: {serviceAccountName: gateway, containers: [{name: envoy, image: x}]}
status: {podIP: 10.1.9.1}
---
apiVersion: v1
kind: Secret
metadata: {name: gw-cert, namespace: default}
type: kubernetes.io/tls
stringData:
  tls.crt: |
    -----BEGIN CERTIFICATE-----
    MIIBTjCB9aADAgECAgEHMAoGCCqGSM49BAMCMBkxFzAVBgNVBAMMDmd3LmV4YW1w
    bGUuY29tMB4XDTI2MDEwMTAwMDAwMFoXDTM1MTIzMDAwMDAwMFowGTEXMBUGA1UE
    AwwOZ3cuZXhhbXBsZS5jb20wWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATXevA2
    mpMJORbZkA/sDl5nYRu7/aYVGcqyVbF9VaNejQLHHUZel/3xOCKM/+wI3xxmuIQc
    63/bedYEQJjcU3Uloy4wLDAPBgNVHRMBAf8EBTADAQH/MBkGA1UdEQQSMBCCDmd3
    LmV4YW1wbGUuY29tMAoGCCqGSM49BAMCA0gAMEUCIQD73VHGQGpExvxFiT1wKsS7
    vRRvJrAflB1akMgaVA6pFQIgdInQ7lupIj27HpKxBbS+InaeTHmrkeUuAIQwszqh
    mjI=
    -----END CERTIFICATE-----
  tls.key: |
    -----BEGIN PRIVATE KEY-----
    MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNYV05eAqD2kJXcLv
    esDkmD83nqFWr2qgUZF2c8R9C/ehRANCAATXevA2mpMJORbZkA/sDl5nYRu7/aYV
    GcqyVbF9VaNejQLHHUZel/3xOCKM/+wI3xxmuIQc63/bedYEQJjcU3Ul
    -----END PRIVATE KEY-----
  ca.crt: |
    -----BEGIN CERTIFICATE-----
    MIIBTjCB9aADAgECAgEHMAoGCCqGSM49BAMCMBkxFzAVBgNVBAMMDmd3LmV4YW1w
    bGUuY29tMB4XDTI2MDEwMTAwMDAwMFoXDTM1MTIzMDAwMDAwMFowGTEXMBUGA1UE
    AwwOZ3cuZXhhbXBsZS5jb20wWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATXevA2
    mpMJORbZkA/sDl5nYRu7/aYVGcqyVbF9VaNejQLHHUZel/3xOCKM/+wI3xxmuIQc
    63/bedYEQJjcU3Uloy4wLDAPBgNVHRMBAf8EBTADAQH/MBkGA1UdEQQSMBCCDmd3
    LmV4YW1wbGUuY29tMAoGCCqGSM49BAMCA0gAMEUCIQD73VHGQGpExvxFiT1wKsS7
    vRRvJrAflB1akMgaVA6pFQIgdInQ7lupIj27HpKxBbS+InaeTHmrkeUuAIQwszqh
    mjI=
    -----END CERTIFICATE-----
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}
  - {port: {number: 3306, name: tcp, protocol: TCP}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge-routes, namespace: default}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: t-routes, namespace: default}
spec:
  hosts: ["*"]
  gateways: [t]
  http: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]
  tcp: [{route: [{destination: {host: mysql.default.svc.cluster.local, port: {number: 3306}}}]}]
"""

PROXIES = (
    ProxyMeta("pp-bind", namespace="default", workload="productpage-1", capture="bind"),
    ProxyMeta("pp-intercept", namespace="default", workload="productpage-1", capture="intercept"),
    ProxyMeta("other-intercept", namespace="other", workload="tool-1", capture="intercept"),
    ProxyMeta("reviews-intercept", namespace="default", workload="reviews-v1", capture="intercept"),
    ProxyMeta("reviews-bind", namespace="default", workload="reviews-v1", capture="bind"),
    ProxyMeta("unknown-bind", namespace="default", labels=labels_of({"app": "web"}), capture="bind"),
    # Gateway proxies (authenticated as the gateway Pod's service account, so they hold the
    # servers' credentials): of Gateway `edge` and of the Gateway under test.
    ProxyMeta("gw-edge", mode="gateway", namespace="default", workload="gateway-1", gateway="default/edge"),
    ProxyMeta("gw-t", mode="gateway", namespace="default", workload="gateway-1", gateway="default/t"),
)

_HTTPS = {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"]}
_HTTP = {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
_FILES = {"serverCertificate": "/etc/certs/server.pem", "privateKey": "/etc/certs/server-key.pem"}
_JWKS = '{"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
"""An inline JSON Web Key Set (RequestAuthentication `jwks`)."""
BASE: dict[str, dict[str, Any]] = {
    "VirtualService": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
    "DestinationRule": {"host": "reviews.default.svc.cluster.local"},
    "Sidecar": {"egress": [{"hosts": ["./reviews.default.svc.cluster.local"]}]},
    "PeerAuthentication": {"mtls": {"mode": "PERMISSIVE"}},
    "AuthorizationPolicy": {"action": "DENY",
                            "rules": [{"from": [{"source": {"namespaces": ["blocked"]}}]}]},
    "RequestAuthentication": {"jwtRules": [{"issuer": "iss", "jwks": _JWKS}]},
    "Telemetry": {"accessLogging": [{"providers": [{"name": "envoy"}]}]},
    "Gateway": {"selector": {"istio": "ingressgateway"},
                "servers": [{**_HTTPS, "tls": {"mode": "SIMPLE", "credentialName": "gw-cert"}}]},
    "ServiceEntry": {"hosts": ["api.external.example"], "resolution": "STATIC",
                     "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                     "endpoints": [{"address": "192.0.2.10"}]},
    "WorkloadEntry": {"address": "192.0.2.30", "labels": {"app": "vm"}},
}
"""The object of each kind without the field under test (it must be valid)."""

# --------------------------------------------------------------------------- samples

SAMPLES: dict[str, Any] = {
    # VirtualService
    "hosts": ["mysql"],
    "gateways": ["mesh", "edge"],
    "http[].name": "named",
    "match[].name": "m1",
    "uri.exact": "/a", "uri.prefix": "/a", "uri.regex": "/a.*",
    "exact": "a", "prefix": "a", "regex": "a.*",
    "match[].port": 1234,
    "sourceLabels": {"app": "productpage"},
    "match[].gateways": ["mesh", "edge"],
    "ignoreUriCase": True,
    "sourceNamespace": "other",
    "statPrefix": "x",
    "destination.host": "mysql",
    "destination.subset": "v2",
    "route[].weight": 80,
    "set": {"x-a": "b"}, "add": {"x-a": "b"}, "remove": ["x-b"],
    "redirect.uri": "/elsewhere", "redirect.authority": "a.example.com", "redirect.port": 8443,
    "redirect.derivePort": "FROM_REQUEST_PORT", "redirect.scheme": "https", "redirect.redirectCode": 302,
    "redirect.prefixRewrite": "/new",
    "directResponse.status": 404, "body.string": "hi", "body.bytes": "aGk=",
    "delegate.name": "d", "delegate.namespace": "default",
    "rewrite.uri": "/r", "rewrite.authority": "a.example.com",
    "uriRegexRewrite.match": "^/c", "uriRegexRewrite.rewrite": "/d",
    "timeout": "5s",
    "retries.attempts": 5, "retries.perTryTimeout": "1s", "retries.retryOn": "5xx",
    "retries.retryRemoteLocalities": True, "retries.retryIgnorePreviousHosts": False, "retries.backoff": "50ms",
    "delay.fixedDelay": "2s", "delay.exponentialDelay": "1s", "delay.percent": 50,
    "abort.httpStatus": 500, "abort.grpcStatus": "UNAVAILABLE", "abort.http2Error": "x",
    "percentage.value": 50,
    "mirror.host": "mysql", "mirror.subset": "v2", "port.number": 9443,
    "mirrors[].destination.host": "mysql",
    "mirrorPercent": 50, "mirror_percent": 50,
    "allowOrigin": ["https://a.example.com"], "allowMethods": ["GET"], "allowHeaders": ["x-a"],
    "exposeHeaders": ["x-a"], "maxAge": "1h", "allowCredentials": True, "unmatchedPreflights": "IGNORE",
    "destinationSubnets": ["10.96.0.20/32"],
    "tcp[].match[].port": 1234,
    "sourceSubnet": "10.0.0.0/8",
    "tcp[].route[].destination.host": "mysql2",
    "tcp[].route[].destination.port.number": 33060,
    "tcp[].route[].weight": 80,
    "sniHosts": ["a.example.com"],
    "exportTo": ["."],
    # DestinationRule
    "host": "reviews.default.svc.cluster.local",
    "loadBalancer.simple": "LEAST_REQUEST",
    "httpHeaderName": "x-user", "httpCookie.name": "c", "httpCookie.path": "/p", "httpCookie.ttl": "60s",
    "useSourceIp": True, "httpQueryParameterName": "q", "minimumRingSize": 2048, "maglev.tableSize": 5003,
    "maxConnections": 10, "connectTimeout": "1s", "http1MaxPendingRequests": 10, "http2MaxRequests": 100,
    "maxRequestsPerConnection": 5, "maxRetries": 3, "http.idleTimeout": "30s", "maxConcurrentStreams": 64,
    "http2KeepAlive.interval": "10s", "http2KeepAlive.timeout": "3s",
    "consecutive5xxErrors": 7, "consecutiveGatewayErrors": 3, "consecutiveLocalOriginFailures": 4,
    "splitExternalLocalOriginErrors": True, "interval": "10s", "baseEjectionTime": "30s",
    "maxEjectionPercent": 50, "minHealthPercent": 25, "consecutiveErrors": 5,
    "outlierDetectionHttpErrorCodes": [503, 429],
    "tls.mode": "SIMPLE", "subjectAltNames": ["spiffe://x"], "sni": "a.example.com",
    "clientCertificate": "/etc/certs/client.pem", "privateKey": "/etc/certs/client-key.pem",
    "caCertificates": "/etc/certs/ca.pem", "caCrl": "/etc/certs/crl.pem", "credentialName": "client-credential",
    "insecureSkipVerify": True,
    "distribute[].from": "*", "distribute[].to": {"region1/*": 100},
    "failover[].from": "region3", "failover[].to": "region2",
    "failoverPriority": ["version=v2"], "localityLbSetting.enabled": False,
    "subsets[].name": "v2", "subsets[].labels": {"version": "v2"},
    "portLevelSettings[].port.number": 9080,
    "workloadSelector.matchLabels": {"app": "productpage"},
    # Sidecar
    "workloadSelector.labels": {"app": "productpage"},
    "egress[].hosts": ["./mysql.default.svc.cluster.local"],
    "egress[].port.number": 9080,
    "egress[].port.protocol": "TCP",
    "egress[].port.name": "reviews",
    "outboundTrafficPolicy.mode": "REGISTRY_ONLY",
    # PeerAuthentication
    "selector.matchLabels": {"app": "other"},
    "mtls.mode": "STRICT",
    "portLevelMtls{}.mode": "STRICT",
    # Gateway
    "servers[].port.protocol": "HTTP", "servers[].bind": "127.0.0.1", "servers[].tls.mode": "MUTUAL",
    "minProtocolVersion": "TLSV1_3", "maxProtocolVersion": "TLSV1_2",
    "cipherSuites": ["ECDHE-ECDSA-AES128-GCM-SHA256"],
    "verifyCertificateSpki": ["NvqYIYSbgK2vCJpQhObf77vv+bQWtc5ek5RIOwPiC9A="],
    "verifyCertificateHash": ["df6ff72fe9116521268f6474250e3e44ac36da38d74e9761d0ec48a362fc431a"],
    "servers[].tls.credentialName": "other-cert", "servers[].tls.caCertCredentialName": "client-credential",
    # AuthorizationPolicy
    "targetRef.kind": "Gateway", "targetRef.name": "waypoint", "targetRef.group": "gateway.networking.k8s.io",
    "targetRefs[].kind": "Gateway", "targetRefs[].name": "waypoint", "targetRefs[].group": "gateway.networking.k8s.io",
    "targetRef.namespace": "default", "targetRefs[].namespace": "default",
    "action": "ALLOW",
    "provider.name": "ext-authz",
    "principals": ["cluster.local/ns/default/sa/a"], "notPrincipals": ["cluster.local/ns/default/sa/a"],
    "requestPrincipals": ["iss/sub"], "notRequestPrincipals": ["iss/sub"],
    "namespaces": ["other"], "notNamespaces": ["other"],
    "serviceAccounts": ["default/a"], "notServiceAccounts": ["default/a"],
    "ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.0.0.0/8"],
    "remoteIpBlocks": ["10.0.0.0/8"], "notRemoteIpBlocks": ["10.0.0.0/8"],
    "trustDomains": ["example.org"], "notTrustDomains": ["example.org"],
    "operation.hosts": ["a.example.com"], "operation.notHosts": ["a.example.com"],
    "ports": ["9080"], "notPorts": ["9080"], "methods": ["GET"], "notMethods": ["GET"],
    "paths": ["/a"], "notPaths": ["/a"],
    "when[].key": "source.namespace", "when[].values": ["192.168.0.0/16"], "when[].notValues": ["192.168.0.0/16"],
    # RequestAuthentication
    "jwtRules[].jwks": _JWKS.replace("P-256", "P-256", 1).replace("}]}", ', "kid": "k2"}]}'),
    "fromHeaders[].name": "x-jwt", "outputClaimToHeaders[].header": "x-jwt-sub", "outputClaimToHeaders[].claim": "sub",
    # Telemetry
    "accessLogging[].match.mode": "SERVER", "accessLogging[].providers[].name": "file-log",
    "accessLogging[].filter.expression": "response.code >= 400",
}
"""Sample values, by the longest matching path suffix (leaf field paths without `spec.`)."""

_WAYPOINT_REF = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
CONTEXT: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {
    # kind -> path key -> [(anchor, fields merged into the object at the anchor: the last
    # occurrence of that path among the leaf's parents; "" is the spec)]. In the baseline too.
    "VirtualService": {
        "http[].redirect.": [("http[]", {"route": None, "redirect": {"uri": "/r"}})],
        "http[].directResponse.": [("http[]", {"route": None, "directResponse": {"status": 503}})],
        "uriRegexRewrite.": [("uriRegexRewrite", {"match": "^/a", "rewrite": "/b"})],
        "delay.percentage.": [("delay", {"fixedDelay": "1s"})],
        "delay.percent": [("delay", {"fixedDelay": "1s"})],
        "abort.percentage.": [("abort", {"httpStatus": 503})],
        "mirror.subset": [("mirror", {"host": "reviews"})],
        "mirror.port.": [("mirror", {"host": "reviews"})],
        "mirrors[].destination.subset": [("destination", {"host": "reviews"})],
        "mirrors[].destination.port.": [("destination", {"host": "reviews"})],
        "mirrors[].percentage.": [("mirrors[]", {"destination": {"host": "reviews"}})],
        "mirrorPercentage.": [("http[]", {"mirror": {"host": "reviews"}})],
        "mirrorPercent": [("http[]", {"mirror": {"host": "reviews"}})],
        "mirror_percent": [("http[]", {"mirror": {"host": "reviews"}})],
        "http[].route[].destination.subset": [("destination", {"host": "reviews"})],
        "http[].route[].destination.port.": [("destination", {"host": "reviews"})],
        "tcp[].": [("", {"hosts": ["mysql", "mysql2"]}),
                   ("tcp[]", {"route": [{"destination": {"host": "mysql", "subset": "v1"}}]})],
        "tcp[].route[].destination.host": [("tcp[]", {"route": [{"destination": {"host": "mysql"}}]})],
        "tls[].": [("tls[]", {"match": [{"sniHosts": ["x.example.com"]}],
                              "route": [{"destination": {"host": "mysql"}}]})],
    },
    "DestinationRule": {
        "host": [("", {"host": "mysql.default.svc.cluster.local",
                       "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}})],
        "httpCookie.path": [("httpCookie", {"name": "c"})],
        "httpCookie.ttl": [("httpCookie", {"name": "c"})],
        "httpCookie.attributes[].": [("httpCookie", {"name": "c"})],
        "consistentHash.minimumRingSize": [("consistentHash", {"httpHeaderName": "x-user"})],
        "consistentHash.ringHash.": [("consistentHash", {"httpHeaderName": "x-user"})],
        "consistentHash.maglev.": [("consistentHash", {"httpHeaderName": "x-user"})],
        "consecutiveLocalOriginFailures": [("outlierDetection", {"splitExternalLocalOriginErrors": True})],
        # (Istio requires both; the baseline's values differ from the samples)
        "http2KeepAlive.": [("http2KeepAlive", {"interval": "30s", "timeout": "20s"})],
        "tls.subjectAltNames": [("tls", {"mode": "SIMPLE"})],
        "tls.sni": [("tls", {"mode": "SIMPLE"})],
        **{f"tls.{k}": [("tls", {"mode": "SIMPLE"})]
           for k in ("caCertificates", "caCrl", "credentialName", "insecureSkipVerify")},
        # Locality load balancing acts with outlier detection, on clients and endpoints with
        # localities (reviews-v1 region1/zone1, reviews-v2 region2/zone2, productpage-1
        # region1/zone1, tool-1 region3); a subset of both endpoints.
        "localityLbSetting.": [("trafficPolicy", {"outlierDetection": {"consecutive5xxErrors": 1}})],
        "portLevelSettings[].loadBalancer.localityLbSetting.": [
            ("portLevelSettings[]", {"outlierDetection": {"consecutive5xxErrors": 1}})],
        "localityLbSetting.distribute[].from": [("distribute[]", {"to": {"region2/*": 100}})],
        "localityLbSetting.distribute[].to": [("distribute[]", {"from": "*", "to": {"region2/*": 100}})],
        "localityLbSetting.failover[].from": [("failover[]", {"to": "region2"})],
        "localityLbSetting.failover[].to": [("failover[]", {"from": "region3"})],
        "subsets[].": [("subsets[]", {"name": "v1", "labels": {"version": "v1"}})],
        "portLevelSettings[].": [("portLevelSettings[]", {"port": {"number": 9443}})],
        "portLevelSettings[].port.": [("trafficPolicy", {"loadBalancer": {"simple": "RANDOM"}}),
                                      ("portLevelSettings[]", {"port": {"number": 9443}})],
        # (after "subsets[].": locality groups need a subset of both endpoints)
        "subsets[].trafficPolicy.loadBalancer.localityLbSetting.": [("subsets[]", {"labels": {"app": "reviews"}})],
        "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.": [
            ("subsets[]", {"labels": {"app": "reviews"}})],
    },
    "Sidecar": {
        "egress[].port.": [("port", {"number": 9080})],
        "egress[].port.number": [("egress[]", {"port": None})],
        "ingress[].": [("ingress[]", {"port": {"number": 9080, "protocol": "HTTP", "name": "http"}})],
    },
    "PeerAuthentication": {
        "selector.matchLabels": [("", {"mtls": {"mode": "STRICT"}})],
        "portLevelMtls{}.": [("", {"selector": {"matchLabels": {"app": "reviews"}}})],
    },
    "Gateway": {
        **{f"servers[].tls.{k}": [("tls", {"mode": "MUTUAL"})]
           for k in ("subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash", "insecureSkipVerify",
                     "caCertCredentialName")},
    },
    "RequestAuthentication": {
        "fromHeaders[].": [("fromHeaders[]", {"name": "x-token"})],
        "outputClaimToHeaders[].": [("outputClaimToHeaders[]", {"header": "x-jwt-iss", "claim": "iss"})],
    },
    "AuthorizationPolicy": {
        "rules[].to[].": [("rules[]", {"from": None})],
        "rules[].when[].": [("rules[]", {"from": None}),
                            ("when[]", {"key": "source.ip", "values": ["10.0.0.0/8"]})],
    },
}
"""Fields a leaf needs around it (all matching entries apply, in order)."""

_POLICY_PREFIXES = ("trafficPolicy.", "trafficPolicy.portLevelSettings[].", "subsets[].trafficPolicy.",
                    "subsets[].trafficPolicy.portLevelSettings[].")


def _at(prefix: str, policy: dict[str, Any]) -> dict[str, Any]:
    """A DestinationRule spec with `policy` at a traffic-policy path prefix (subset v1, port 9443)."""
    level = {"port": {"number": 9443}, **policy} if "portLevelSettings" in prefix else policy
    tp = {"portLevelSettings": [level]} if "portLevelSettings" in prefix else level
    if prefix.startswith("subsets"):
        return {"subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": tp}]}
    return {"trafficPolicy": tp}


MESH_CONFIG = parse_mesh_config("extensionProviders: [{name: ext-authz, envoyExtAuthzHttp: "
                                "{service: reviews.default.svc.cluster.local, port: 9080}}, "
                                "{name: file-log, envoyFileAccessLog: {path: /var/log/access.log}}]", "mesh.yaml")[0]
"""`--mesh-config`: the extension provider CUSTOM policies name, and an access log provider."""

_SE_PORT = {"number": 8080, "name": "http", "protocol": "HTTP"}
_SE_EP = {"address": "192.0.2.10"}
_SE_INTERNAL = {"location": "MESH_INTERNAL", "endpoints": [{**_SE_EP, "serviceAccount": "vm"}]}
_SE_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # ServiceEntry path -> (baseline fields, variant fields) over BASE (paths share suffixes with
    # other kinds' SAMPLES, so each is spelled out)
    "hosts": ({}, {"hosts": ["api2.external.example"]}),
    "addresses": ({}, {"addresses": ["192.0.2.50"]}),
    "ports[].number": ({}, {"ports": [{**_SE_PORT, "number": 8081}]}),
    "ports[].protocol": ({}, {"ports": [{**_SE_PORT, "protocol": "TCP"}], "addresses": ["192.0.2.50"]}),
    "ports[].name": ({}, {"ports": [{**_SE_PORT, "name": "web"}]}),
    "ports[].targetPort": ({}, {"ports": [{**_SE_PORT, "targetPort": 9090}]}),
    "location": ({"endpoints": [{**_SE_EP, "serviceAccount": "vm"}]}, _SE_INTERNAL),
    "resolution": ({}, {"resolution": "DNS"}),
    "endpoints[].address": ({}, {"endpoints": [{"address": "192.0.2.11"}]}),
    "endpoints[].ports": ({}, {"endpoints": [{**_SE_EP, "ports": {"http": 9090}}]}),
    "endpoints[].labels": ({}, {"endpoints": [{**_SE_EP, "labels": {"topology.kubernetes.io/region": "region1"}}]}),
    "endpoints[].network": ({}, {"endpoints": [{**_SE_EP, "network": "net2"}]}),
    "endpoints[].locality": ({}, {"endpoints": [{**_SE_EP, "locality": "region1/zone1"}]}),
    "endpoints[].weight": ({}, {"endpoints": [{**_SE_EP, "weight": 3}]}),
    "endpoints[].serviceAccount": ({"location": "MESH_INTERNAL"}, _SE_INTERNAL),
    "workloadSelector.labels": ({}, {"endpoints": None, "workloadSelector": {"labels": {"app": "reviews"}}}),
    "exportTo": ({}, {"exportTo": ["."]}),
    "subjectAltNames": (_SE_INTERNAL, {**_SE_INTERNAL, "subjectAltNames": ["spiffe://cluster.local/ns/x/sa/y"]}),
}
_WE_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "address": ({}, {"address": "192.0.2.31"}),
    "ports": ({}, {"ports": {"http": 9090}}),
    "labels": ({}, {"labels": {"app": "vm", "topology.kubernetes.io/region": "region1"}}),
    "network": ({}, {"network": "net2"}),
    "locality": ({}, {"locality": "region1/zone1"}),
    "weight": ({}, {"weight": 3}),
    "serviceAccount": ({}, {"serviceAccount": "vm"}),
}

OVERRIDES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {
    **{("ServiceEntry", p): v for p, v in _SE_VARIANTS.items()},
    **{("WorkloadEntry", p): v for p, v in _WE_VARIANTS.items()},
    # A CUSTOM policy whose provider (of MESH_CONFIG) is usable, against the DENY it is otherwise.
    ("AuthorizationPolicy", "provider.name"): ({}, {"action": "CUSTOM", "provider": {"name": "ext-authz"}}),
    # (kind, path) -> (fields merged into the spec for the baseline, for the variant): for
    # fields that are only valid together with siblings the baseline must not have.
    **{("AuthorizationPolicy", p): ({}, {"targetRef": _WAYPOINT_REF})
       for p in ("targetRef.kind", "targetRef.group", "targetRef.name", "targetRef.namespace")},
    **{("AuthorizationPolicy", p): ({}, {"targetRefs": [_WAYPOINT_REF]})
       for p in ("targetRefs[].kind", "targetRefs[].group", "targetRefs[].name", "targetRefs[].namespace")},
    # RequestAuthentication and Telemetry attach to the waypoint instead of the namespace's sidecars.
    **{(k, p): ({}, {"targetRef": _WAYPOINT_REF}) for k in ("RequestAuthentication", "Telemetry")
       for p in ("targetRef.kind", "targetRef.group", "targetRef.name", "targetRef.namespace")},
    **{(k, p): ({}, {"targetRefs": [_WAYPOINT_REF]}) for k in ("RequestAuthentication", "Telemetry")
       for p in ("targetRefs[].kind", "targetRefs[].group", "targetRefs[].name", "targetRefs[].namespace")},
    # jwksUri instead of the baseline's inline keys (one of the two is required).
    ("RequestAuthentication", "jwtRules[].jwksUri"): (
        {}, {"jwtRules": [{"issuer": "iss", "jwksUri": "https://keys.example.com/jwks.json"}]}),
    ("RequestAuthentication", "jwtRules[].jwks_uri"): (
        {}, {"jwtRules": [{"issuer": "iss", "jwks_uri": "https://keys.example.com/jwks.json"}]}),
    # a redirect with a prefix match (prefixRewrite replaces the matched prefix)
    ("VirtualService", "http[].redirect.prefixRewrite"): (
        {"http": [{"match": [{"uri": {"prefix": "/old"}}], "redirect": {"authority": "a.example.com"}}]},
        {"http": [{"match": [{"uri": {"prefix": "/old"}}], "redirect": {"authority": "a.example.com",
                                                                         "prefixRewrite": "/new"}}]}),
    ("RequestAuthentication", "jwtRules[].timeout"): (
        {"jwtRules": [{"issuer": "iss", "jwksUri": "https://keys.example.com/jwks.json"}]},
        {"jwtRules": [{"issuer": "iss", "jwksUri": "https://keys.example.com/jwks.json", "timeout": "2s"}]}),
    **{("DestinationRule", f"{prefix}tls.{k}"): (
        _at(prefix, {"tls": {"mode": "SIMPLE"}}),
        _at(prefix, {"tls": {"mode": "MUTUAL", "clientCertificate": "/etc/certs/client.pem",
                             "privateKey": "/etc/certs/client-key.pem"}}))
       for prefix in _POLICY_PREFIXES for k in ("clientCertificate", "privateKey")},
    # Gateway: certificate files instead of the Secret; a CRL; httpsRedirect on an HTTP server.
    **{("Gateway", f"servers[].tls.{k}"): ({}, {"servers": [{**_HTTPS, "tls": {"mode": "SIMPLE", **_FILES}}]})
       for k in ("serverCertificate", "privateKey")},
    ("Gateway", "servers[].tls.caCertificates"): (
        {"servers": [{**_HTTPS, "tls": {"mode": "MUTUAL", "credentialName": "gw-cert"}}]},
        {"servers": [{**_HTTPS, "tls": {"mode": "MUTUAL", **_FILES, "caCertificates": "/etc/certs/ca.pem"}}]}),
    ("Gateway", "servers[].tls.caCrl"): (
        {"servers": [{**_HTTPS, "tls": {"mode": "MUTUAL", **_FILES, "caCertificates": "/etc/certs/ca.pem"}}]},
        {"servers": [{**_HTTPS, "tls": {"mode": "MUTUAL", **_FILES, "caCertificates": "/etc/certs/ca.pem",
                                        "caCrl": "/etc/certs/crl.pem"}}]}),
    ("Gateway", "servers[].tls.httpsRedirect"): (
        {"servers": [_HTTP]}, {"servers": [{**_HTTP, "tls": {"httpsRedirect": True}}]}),
    ("VirtualService", "http[].route[].weight"): (
        {"http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 100},
                             {"destination": {"host": "reviews", "subset": "v2"}, "weight": 0}]}]},
        {"http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                             {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]}]}),
    ("VirtualService", "tcp[].route[].weight"): (
        {"hosts": ["mysql"], "tcp": [{"route": [{"destination": {"host": "mysql", "subset": "v1"}, "weight": 100},
                                                {"destination": {"host": "mysql", "subset": "v2"}, "weight": 0}]}]},
        {"hosts": ["mysql"], "tcp": [{"route": [{"destination": {"host": "mysql", "subset": "v1"}, "weight": 80},
                                                {"destination": {"host": "mysql", "subset": "v2"}, "weight": 20}]}]}),
}
"""(kind, path) -> (baseline fields, variant fields), replacing CONTEXT and SAMPLES."""

MAP_KEYS = {"headers": "end-user", "queryParams": "user", "withoutHeaders": "x-debug", "portLevelMtls": "9080"}

NO_EFFECT = {
    ("ServiceEntry", "ports[].name"): "A label for the port, which endpoints' `ports` maps refer to; the protocol "
                                      "comes from `protocol`, so Istio gives the name no effect on Envoy either.",
    ("Sidecar", "egress[].port.name"): "A label for the port; Istio gives it no effect on Envoy's configuration "
                                      "either.",
}
"""Fields that change nothing in Envoy in Istio either, and why."""

NOTES = {
    ("RequestAuthentication", "jwtRules[].jwksUri"): "Fetched by Envoy through a cluster of its own (STATIC for an IP "
                                                     "address, STRICT_DNS for a name; TLS with the system CA bundle for "
                                                     "https). Neither jwksUri nor jwks (OpenID discovery) is refused.",
    ("RequestAuthentication", "jwtRules[].jwks_uri"): "Another spelling of jwksUri (Istio accepts both); set "
                                                      "one of them.",
    ("Telemetry", "accessLogging[].providers[].name"): "`envoy` (Istio's default text format on stdout) or a mesh "
                                                       "config envoyFileAccessLog provider (path, text or JSON labels); "
                                                       "other provider types are warned.",
    ("Sidecar", "egress[].port.protocol"): "Warned when it differs from the protocol of a service port the listener "
                                          "imports: Meshline keeps each service port's own protocol (from its name "
                                          "or appProtocol); the same protocol changes nothing, as in Istio.",
    ("VirtualService", "tcp[].match[].destinationSubnets"): "Matched against the destination service's cluster IP; "
                                                           "warned when it contains none of the hosts' cluster "
                                                           "IPs, or for headless services (never matched).",
    ("VirtualService", "http[].match[].sourceLabels"): "Sidecars whose workload labels include them; never "
                                                      "waypoints (warned).",
    ("VirtualService", "tcp[].match[].sourceLabels"): "Sidecars whose workload labels include them; never "
                                                     "waypoints (warned).",
    ("Sidecar", "outboundTrafficPolicy.mode"): "Enforced (intercept capture): REGISTRY_ONLY refuses destinations "
                                               "outside the egress scope (TCP: BlackHoleCluster, HTTP: 502); "
                                               "ServiceEntry hosts the scope imports are admitted.",
    ("DestinationRule", "workloadSelector.matchLabels"): "Only sidecars of the rule's namespace whose labels "
                                                        "match, before that namespace's rules without one.",
    ("DestinationRule", "trafficPolicy.loadBalancer.simple"): "PASSTHROUGH: the original destination for "
                                                             "intercepting sidecars, round robin in bind capture.",
}
"""Notes shown in the table instead of a scenario-specific message."""

# --------------------------------------------------------------------------- schema walk


_CRD_DOCS: dict[str, dict[str, Any]] = {}


def _crd_spec(kind: str) -> dict[str, Any]:
    """`kind`'s CRD schema of `spec` (parsed once, with libyaml when present; read only)."""
    if kind not in _CRD_DOCS:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        _CRD_DOCS[kind] = yaml.load((CRDS / KINDS[kind][0]).read_text(), Loader=loader)
    spec: dict[str, Any] = _CRD_DOCS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def leaves(kind: str) -> list[str]:
    """The leaf field paths of `kind`'s spec (`a.b[].c{}.d`: `[]` a list item, `{}` a map value)."""
    spec = _crd_spec(kind)
    out: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("properties"):
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}" if path else key)
            return
        items = node.get("items")
        if isinstance(items, dict) and items.get("properties"):
            walk(items, f"{path}[]")
            return
        values = node.get("additionalProperties")
        if isinstance(values, dict) and values.get("properties"):
            walk(values, f"{path}{{}}")
            return
        out.append(path)

    walk(spec, "")
    return out


def tokens(path: str) -> list[str]:
    """`a.b[].c{}.d` -> [a, b, [], c, {}, d]."""
    out: list[str] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]{}]+)((?:\[\]|\{\})*)", part)
        assert m is not None, path
        out.append(m.group(1))
        out += re.findall(r"\[\]|\{\}", m.group(2))
    return out


def sample(path: str, schema_type: str | None) -> Any:
    for n in range(len(path)):
        key = path[n:]
        if (n == 0 or path[n - 1] in ".]}") and key in SAMPLES:
            return SAMPLES[key]
    return {"string": "x", "integer": 5, "number": 50, "boolean": True, "array": ["x"],
            "object": {"k": "v"}}.get(schema_type or "", "x")


def _contexts(kind: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The context entries for `path`: keys ending in `.` match a parent path (at the start
    or after a `.`), other keys the leaf (the whole path or a suffix after a `.`)."""
    for key, entries in CONTEXT.get(kind, {}).items():
        if key.endswith("."):
            hit = path.startswith(key) or f".{key}" in path
        else:
            hit = path == key or path.endswith("." + key)
        if hit:
            yield from entries


# --------------------------------------------------------------------------- building objects


def _container(next_tok: str | None) -> Any:
    return [] if next_tok == "[]" else {}


def set_path(spec: dict[str, Any], toks: list[str], value: Any) -> None:
    node: Any = spec
    for i, tok in enumerate(toks[:-1]):
        nxt = toks[i + 1]
        if tok in ("[]", "{}"):
            key = MAP_KEYS.get(toks[i - 1], "k")
            if tok == "[]":
                if not node:
                    node.append(_container(nxt))
                node = node[0]
            else:
                node = node.setdefault(key, _container(nxt))
            continue
        if not isinstance(node.get(tok), list | dict):
            node[tok] = _container(nxt)
        node = node[tok]
    last = toks[-1]
    if last == "{}":
        node[MAP_KEYS.get(toks[-2], "k")] = value
    else:
        node[last] = value


def merge_at(spec: dict[str, Any], toks: list[str], anchor: str, fields: dict[str, Any]) -> None:
    """Merge `fields` into the object at the last occurrence of `anchor` along `toks`
    (creating it); a None value deletes the field."""
    if anchor:
        atoks = tokens(anchor)
        ends = [i + len(atoks) for i in range(len(toks) - len(atoks) + 1) if toks[i:i + len(atoks)] == atoks]
        assert ends, (anchor, toks)
        prefix = toks[:ends[-1]]
    else:
        prefix = []
    node: Any = spec
    for i, tok in enumerate(prefix):
        nxt = prefix[i + 1] if i + 1 < len(prefix) else None
        if tok == "[]":
            if not node:
                node.append({} if nxt != "[]" else [])
            node = node[0]
        elif tok == "{}":
            node = node.setdefault(MAP_KEYS.get(prefix[i - 1], "k"), {})
        else:
            if not isinstance(node.get(tok), list | dict):
                node[tok] = [] if nxt == "[]" else {}
            node = node[tok]
    for key, value in fields.items():
        if value is None:
            node.pop(key, None)
        else:
            node[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class Outcome:
    kind: str
    path: str
    status: str  # supported | warned | refused | no effect | SILENT
    note: str = ""


def _object(kind: str, spec: dict[str, Any]) -> RawObject:
    api = KINDS[kind][1]
    body = {"apiVersion": api, "kind": kind, "metadata": {"name": "t", "namespace": "default"}, "spec": spec}
    return RawObject(kind=kind, api_version=api, namespace="default", name="t", body=body)


_SCENARIO_VALUES: list[object] = []


def _scenario() -> list[object]:
    if not _SCENARIO_VALUES:
        objects, errors = parse_documents(textwrap.dedent(SCENARIO), "scenario.yaml")
        assert not errors
        for raw in objects:
            value, issues = convert(raw)
            assert not [i for i in issues if i.severity == "error"], issues
            if value is not None:
                _SCENARIO_VALUES.append(value)
    return _SCENARIO_VALUES


# Memos of one session: an evaluation per distinct (kind, spec) (a field's baseline is often
# another's), and each resource serialized once per distinct (builder, args), as the runtime's
# cache does (most resources are the same in every evaluation).
Evaluation = tuple[tuple[Issue, ...], tuple[Issue, ...], dict[str, bytes]]
_EVALUATED: dict[tuple[str, str], Evaluation] = {}
_BUILT: dict[tuple[object, tuple[Any, ...]], bytes] = {}


def evaluate(kind: str, spec: dict[str, Any]) -> Evaluation:
    """(the object's own issues, cross-object issues about it, every proxy's resources)."""
    key = (kind, json.dumps(spec, sort_keys=True, default=repr))
    if key not in _EVALUATED:
        _EVALUATED[key] = _evaluate(kind, spec)
    return _EVALUATED[key]


def _built(s: ResourceSpec) -> bytes:
    key = (s.build, s.args)
    found = _BUILT.get(key)
    if found is None:
        found = _BUILT[key] = s.make().SerializeToString(deterministic=True)
    return found


def _evaluate(kind: str, spec: dict[str, Any]) -> Evaluation:
    value, own = convert(_object(kind, spec))
    values = [*_scenario(), *([value] if value is not None else [])]
    mesh = assemble(values, mesh_config=MESH_CONFIG)
    cross = tuple(i for i in mesh.issues if (i.ref.kind, i.ref.name) == (kind, "t"))
    out: dict[str, bytes] = {}
    for p in PROXIES:
        client = client_locality(mesh, p, failover_priority_keys(mesh))
        if p.mode == "gateway":
            specs = plan_gateway(mesh, p) + gateway_credentials(mesh, p, p.namespace, "gateway", "/ca.pem")
        else:
            specs = plan_outbound(mesh, p.namespace, p.capture, scope=proxy_scope(mesh, p), client=client,
                                  access_logs=outbound_access_logs(mesh, p))
            specs += plan_inbound(mesh, p)
        for s in specs:
            out[f"{p.node_id}/{s.type_url}/{s.name}"] = _built(s)
    return own, cross, out


def _names(issue_field: str, path: str) -> bool:
    """Whether an issue's field names `path`, one of its parents or one of its children."""
    f = issue_field.removeprefix("spec.").removeprefix("spec")
    if not f:
        return False
    ftoks: list[str] = []
    for part in f.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if m is None:
            ftoks.append(part)
            continue
        ftoks.append(m.group(1))
        ftoks += ["[]"] * len(re.findall(r"\[\d+\]", m.group(2)))
    ptoks = tokens(path)
    n = min(len(ftoks), len(ptoks))
    return all(a == b or b == "{}" for a, b in zip(ftoks[:n], ptoks[:n], strict=True))


def classify(kind: str, path: str, schema_type: str | None) -> Outcome:
    toks = tokens(path)
    base = copy.deepcopy(BASE[kind])
    if (kind, path) in OVERRIDES:
        before, after = OVERRIDES[(kind, path)]
        variant = {**copy.deepcopy(base), **copy.deepcopy(after)}
        base.update(copy.deepcopy(before))
    else:
        for anchor, fields in _contexts(kind, path):
            merge_at(base, toks, anchor, fields)
        variant = copy.deepcopy(base)
        set_path(variant, toks, copy.deepcopy(sample(path, schema_type)))
    b_own, b_cross, b_out = evaluate(kind, base)
    bad = [i.format() for i in (*b_own, *b_cross) if i.severity == "error"]
    if bad:
        return Outcome(kind, path, "BAD SAMPLE", f"the baseline is invalid: {bad} ({base})")
    v_own, v_cross, v_out = evaluate(kind, variant)
    seen = {(i.field, i.message) for i in (*b_own, *b_cross)}
    new_own = [i for i in v_own if (i.field, i.message) not in seen]
    new_cross = [i for i in v_cross if (i.field, i.message) not in seen]
    errors = [i for i in (*new_own, *new_cross) if i.severity == "error"]
    named_errors = [i for i in errors if _names(i.field, path)]
    if errors and not named_errors:
        return Outcome(kind, path, "BAD SAMPLE", f"the variant is invalid elsewhere: {errors} ({variant})")
    if named_errors:
        return Outcome(kind, path, "refused", named_errors[0].message)
    own_warn = [i for i in new_own if i.severity == "warning" and _names(i.field, path)]
    if own_warn:
        return Outcome(kind, path, "warned", own_warn[0].message)
    if v_out != b_out:
        return Outcome(kind, path, "supported")
    # No change: a warning about the field or a parent (e.g. "tls routes are not supported",
    # already there for the baseline's parent) says why.
    named = [i for i in (*new_own, *new_cross, *v_own, *v_cross) if i.severity == "warning" and _names(i.field, path)]
    if named:
        return Outcome(kind, path, "warned", named[0].message)
    if (kind, path) in NO_EFFECT:
        return Outcome(kind, path, "no effect", NO_EFFECT[(kind, path)])
    return Outcome(kind, path, "SILENT", f"baseline {base} / variant {variant}")


def _schema_types(kind: str) -> dict[str, str | None]:
    spec = _crd_spec(kind)
    types: dict[str, str | None] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        types[path] = node.get("type")
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(spec, "")
    return types


def all_outcomes() -> list[Outcome]:
    out: list[Outcome] = []
    for kind in KINDS:
        types = _schema_types(kind)
        out += [classify(kind, path, types.get(path)) for path in leaves(kind)]
    return out


# --------------------------------------------------------------------------- the table


_NESTED = re.compile(r"^(subsets\[\]\.trafficPolicy\.portLevelSettings\[\]\.|subsets\[\]\.trafficPolicy\.|"
                     r"trafficPolicy\.portLevelSettings\[\]\.)")


def render(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines = [
        "# Istio compatibility: every field, and what Meshline does with it",
        "",
        "Generated by `tests/test_istio_fields.py` (`pytest tests/test_istio_fields.py --update-golden`);",
        "do not edit by hand. For each leaf field of Istio's VirtualService, DestinationRule, Sidecar,",
        "PeerAuthentication, AuthorizationPolicy, ServiceEntry and WorkloadEntry spec (the CRD",
        "schemas in `manifests/crds`, which mirror Istio's v1 schema) the test converts an object that",
        "sets the field and plans the Envoy configuration of a few sidecars:",
        "",
        "- **supported**: the field changes Envoy's configuration as Istio documents it;",
        "- **warned**: accepted with a warning naming the field (in `meshline analyze`,",
        "  `/v1/config/errors`, the object's status and the validating webhook's warnings); the",
        "  note is the warning;",
        "- **refused**: an error naming the field; the object is not applied;",
        "- **no effect**: Istio gives the field no effect on Envoy either.",
        "",
        "No field is ignored in silence: the test fails when one is.",
        "",
        "Totals: " + ", ".join(f"{counts[s]} {s}" for s in ("supported", "warned", "refused", "no effect")
                               if s in counts) + f" ({len(outcomes)} fields).",
        "",
        "DestinationRule fields under `subsets[].trafficPolicy.` and `portLevelSettings[].` behave as the",
        "same field under `trafficPolicy.`; they are listed only where they differ.",
        "",
        "Semantics worth knowing (Istio's, unless said otherwise):",
        "",
        "- `sourceLabels` (http and tcp matches) apply to sidecars whose workload labels include",
        "  them; sidecars matching the same selectors share one outbound configuration. Waypoints",
        "  and node proxies never match them (a warning says so where it matters).",
        "- tcp `destinationSubnets` match the destination service's cluster IP; headless services",
        "  never match (warned).",
        "- DestinationRules are looked up in the client's namespace, then the service's, then the",
        "  root namespace, honouring `exportTo`; one with a `workloadSelector` applies only to the",
        "  matching sidecars of its own namespace.",
        "- `loadBalancer.simple: PASSTHROUGH` forwards to the original destination for",
        "  intercepting sidecars; in bind capture (local runs) it is round robin, because the",
        "  original destination is the sidecar's own listener.",
        "- `outlierDetection`: `maxEjectionPercent` 0 or unset keeps Envoy's default (10%), the panic",
        "  threshold is `minHealthPercent` (0 unless set), success-rate ejection is off. Beyond Istio's",
        "  translation, Meshline sets Envoy's `always_eject_one_host`: Istio's docs and tasks (locality",
        "  failover) rely on the first ejection always being allowed, which Envoy stopped doing by",
        "  default in 1.28; without it a service with fewer than 10 endpoints never ejects one, so",
        "  locality failover never happens.",
        "- AuthorizationPolicy `action: CUSTOM` asks the external authorizer of its provider",
        "  (`--mesh-config`: Istio's MeshConfig `extensionProviders`, envoyExtAuthzHttp/Grpc) through",
        "  Envoy's ext_authz filter, as Istio does; with a provider it cannot use (unknown, service not",
        "  in the mesh, an HTTP provider on a TCP port, two providers on one workload) it fails closed",
        "  as Istio does: the policy's rules deny. Waypoints ask the authorizer too (policies attached",
        "  with targetRefs to the waypoint or a Service bound to it), as in Istio's ambient mode. Node",
        "  proxies cannot (Istio's ztunnel does not support CUSTOM either): a CUSTOM policy selecting",
        "  ambient Pods is warned about (`spec.action`) and its rules deny there (fail closed).",
        "- ServiceEntry hosts are registry services (VirtualService hosts, DestinationRule lookup with",
        "  the entry's namespace as the service's, subsets by endpoint or WorkloadEntry labels, Sidecar",
        "  egress, REGISTRY_ONLY). Clusters: STATIC and workloadSelector EDS, DNS `STRICT_DNS`,",
        "  DNS_ROUND_ROBIN `LOGICAL_DNS`, NONE `ORIGINAL_DST` for intercepting sidecars (in bind capture",
        "  the host is resolved by DNS; a wildcard NONE host is unreachable there). MESH_EXTERNAL",
        "  endpoints never get mesh mTLS; MESH_INTERNAL ones do when they are Pods with a sidecar or",
        "  name a `serviceAccount` (or carry `security.istio.io/tlsMode: istio`). A Kubernetes",
        "  Service with the same hostname wins over an entry (warned). Of several entries of one host",
        "  each client namespace gets the one Istio's registry gives it: private to its namespace, else",
        "  exported to it by name, else exported everywhere (in a class the first by namespace/name;",
        "  Istio: the oldest); an entry that loses a namespace it is exported to is warned, and one",
        "  not held mesh-wide gets clusters `outbound|<port>||<host>~<ns>/<name>`. Node proxies route",
        "  only entries exported everywhere. TLS/HTTPS ports are proxied as TCP (no SNI routing).",
        "- The root namespace is `meshline-system` unless configured; mesh-wide objects in",
        "  `istio-system` while it is not the root namespace are warned about (NOT MESH-WIDE).",
        "",
    ]
    lines += _kinds_and_labels()
    for kind in KINDS:
        rows = [o for o in outcomes if o.kind == kind]
        by_path = {o.path: o for o in rows}
        lines += [f"## {kind}", "", "| field | status | note |", "|---|---|---|"]
        for o in rows:
            m = _NESTED.match(o.path)
            if m is not None:
                canonical = by_path.get("trafficPolicy." + o.path[m.end():])
                if canonical is not None and canonical.status == o.status:
                    continue
            note = NOTES.get((o.kind, o.path), o.note).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{o.path}` | {o.status} | {note} |")
        lines.append("")
    return "\n".join(lines)


def _kinds_and_labels() -> list[str]:
    from controlplane.model.convert import API_VERSIONS, UNSUPPORTED_KINDS
    from controlplane.model.convert_core import ISTIO_ALIASES

    lines = ["## Kinds", "", "Accepted (Meshline's groups and Istio's as aliases):", ""]
    for kind in KINDS:
        lines.append(f"- {kind}: {', '.join(f'`{v}`' for v in API_VERSIONS[kind])}")
    lines += ["", "Every other kind of Istio's groups (`*.istio.io`) and of the Gateway API",
              "(`gateway.networking.k8s.io`, `gateway.networking.x-k8s.io`) is ignored with a warning naming",
              "the kind and what is lost (every kind of `networking.x-k8s.io` and",
              "`inference.networking.x-k8s.io` too: no effect), in directory and Kubernetes mode:", "",
              "| kind | what is lost |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(UNSUPPORTED_KINDS.items())]
    lines += ["", "## Istio's labels and annotations", "",
              "Read as aliases of Meshline's (Meshline's own key wins; a disagreement is warned about):", "",
              "| Istio | Meshline |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(ISTIO_ALIASES.items())]
    lines += ["| `istio-injection: enabled` (namespace) | `meshline.io/dataplane-mode: sidecar` |",
              "| `istio.io/rev` (namespace, without `istio-injection`) | `meshline.io/dataplane-mode: sidecar` |",
              ""]
    return lines


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[Outcome]:
    return once(tmp_path_factory, "istio-field-outcomes", all_outcomes)  # one walk per run, not per worker


def test_the_field_list_covers_istios_kinds() -> None:
    """A sanity check that the schemas are Istio's (spot checks of fields of each kind)."""
    expected = {
        "VirtualService": {"http[].match[].sourceLabels", "tcp[].match[].destinationSubnets",
                           "http[].retries.retryRemoteLocalities", "http[].match[].name", "tls[].match[].sniHosts",
                           "http[].corsPolicy.unmatchedPreflights", "http[].retries.backoff"},
        "DestinationRule": {"trafficPolicy.loadBalancer.localityLbSetting.failoverPriority",
                            "trafficPolicy.tls.credentialName", "workloadSelector.matchLabels",
                            "trafficPolicy.retryBudget.percent", "trafficPolicy.proxyProtocol.version"},
        "Sidecar": {"egress[].port.protocol", "egress[].port.name", "outboundTrafficPolicy.mode",
                    "inboundConnectionPool.http.maxRetries"},
        "PeerAuthentication": {"selector.matchLabels", "mtls.mode", "portLevelMtls{}.mode"},
        "AuthorizationPolicy": {"targetRefs[].kind", "provider.name", "rules[].when[].notValues"},
    }
    for kind, fields in expected.items():
        assert fields <= set(leaves(kind)), (kind, fields - set(leaves(kind)))


def test_no_field_is_ignored_in_silence(outcomes: list[Outcome]) -> None:
    silent = [f"{o.kind} {o.path}: {o.status}: {o.note}" for o in outcomes if o.status in ("SILENT", "BAD SAMPLE")]
    assert not silent, "\n".join(silent)


@pytest.mark.parametrize(("kind", "path"), [
    ("VirtualService", "http[].match[].sourceLabels"),
    ("VirtualService", "tcp[].match[].sourceLabels"),
    ("VirtualService", "tcp[].match[].destinationSubnets"),
    ("VirtualService", "http[].retries.retryRemoteLocalities"),
    ("VirtualService", "http[].match[].name"),
    ("VirtualService", "http[].retries.retryIgnorePreviousHosts"),
    ("VirtualService", "http[].retries.backoff"),
])
def test_fields_that_used_to_be_dropped_are_translated(outcomes: list[Outcome], kind: str, path: str) -> None:
    (o,) = [o for o in outcomes if (o.kind, o.path) == (kind, path)]
    assert o.status == "supported", o


def test_sidecar_egress_port_fields_are_not_silent(outcomes: list[Outcome]) -> None:
    got = {o.path: o.status for o in outcomes if o.kind == "Sidecar" and o.path.startswith("egress[].port.")}
    assert got == {"egress[].port.number": "supported", "egress[].port.protocol": "warned",
                   "egress[].port.name": "no effect", "egress[].port.targetPort": "warned"}


def test_compatibility_doc_is_current(outcomes: list[Outcome], request: pytest.FixtureRequest) -> None:
    text = render(outcomes)
    if request.config.getoption("--update-golden"):
        if not DOC.exists() or DOC.read_text() != text:
            DOC.write_text(text)
        return
    assert DOC.exists() and DOC.read_text() == text, (
        "docs/istio-compatibility.md is stale; run pytest tests/test_istio_fields.py --update-golden and review")
