"""Istio's MeshConfig (`meshline serve --mesh-config FILE`) -> extension providers. Pure, no I/O.

The file is what Istio keeps under the `mesh` key of its `istio` ConfigMap (a YAML document
with `extensionProviders:`), or that whole ConfigMap (its `data.mesh` is read). Meshline uses
the external-authorization providers, the targets of `action: CUSTOM` AuthorizationPolicies:

| MeshConfig field | Meshline |
|---|---|
| `extensionProviders[].name` | the name `spec.provider.name` of a CUSTOM policy refers to |
| `envoyExtAuthzHttp.service`, `.port` | the authorizer: a mesh Service (`name.ns.svc.cluster.local`, `ns/host`, `name.ns`, or a name unique in the mesh) and one of its ports; Envoy calls it through that service's outbound cluster |
| `.timeout` | `server_uri.timeout` (default 600 s, as Istio) |
| `.pathPrefix` | `http_service.path_prefix` |
| `.failOpen` | `failure_mode_allow` (default false: an unreachable authorizer denies) |
| `.statusOnError` | `status_on_error` (default 403) |
| `.includeRequestHeadersInCheck` (and deprecated `.includeHeadersInCheck`) | `allowed_headers` (exact, `prefix*` or `*suffix`, case-insensitive) |
| `.includeAdditionalHeadersInCheck` | `authorization_request.headers_to_add` |
| `.headersToUpstreamOnAllow`, `.headersToDownstreamOnDeny`, `.headersToDownstreamOnAllow` | `authorization_response.allowed_upstream_headers`, `.allowed_client_headers`, `.allowed_client_headers_on_success` |
| `.includeRequestBodyInCheck` (`maxRequestBytes`, `allowPartialMessage`, `packAsBytes`) | `with_request_body` |
| `.clearRouteCache` | `clear_route_cache` |
| `envoyExtAuthzGrpc.service`, `.port`, `.timeout`, `.failOpen`, `.statusOnError`, `.includeRequestBodyInCheck`, `.clearRouteCache` | the same, over Envoy's gRPC `Authorization` API (the service port should speak HTTP/2: `grpc`/`http2`) |
| `envoyFileAccessLog.path`, `.logFormat.text`, `.logFormat.labels` | a file access log (Telemetry `accessLogging`, `controlplane.translate.accesslog`): the path Envoy writes (`/dev/stdout` by default), a text format (Istio's default text format when neither is set) or JSON with those labels |
| `defaultProviders.accessLogging` | the providers of a Telemetry `accessLogging` entry that names none |
| `defaultProviders.tracing`, `.metrics` | warned: Meshline configures neither |
| other provider types (tracing, gRPC access log services, ...) | warned: Meshline does not use them |
| other MeshConfig fields | warned: Meshline's own flags set what they would (`--root-namespace`, `--trust-domain`, ...) |

A provider with an error is left out, so policies naming it fail closed. Resolution of a
provider's service against the mesh happens at every rebuild (`provider_target`), and
`check_custom_policies` reports CUSTOM policies whose provider is unknown or unusable: they
are enforced as DENY policies with the same rules (Istio: "will generate deny configs for the
specified rules"), so requests the authorizer could have denied are denied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
    get_bool,
    get_duration,
    get_int,
    get_list,
    get_str,
    get_str_list,
    get_str_map,
    index,
    is_header_name,
    item_map,
    join,
)
from controlplane.model.ir import (
    AuthorizationPolicy,
    Hostname,
    Issue,
    PortProtocol,
    Service,
    ServicePort,
    SourceRef,
)
from controlplane.model.raw import RawObject

MESH_CONFIG_KIND = "MeshConfig"
DEFAULT_TIMEOUT_MS = 600_000
"""Istio's default timeout for a call to an external authorizer."""

HTTP_FIELDS = ("service", "port", "timeout", "pathPrefix", "failOpen", "clearRouteCache", "statusOnError",
               "includeHeadersInCheck", "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck",
               "includeRequestBodyInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnDeny",
               "headersToDownstreamOnAllow")
GRPC_FIELDS = ("service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError",
               "includeRequestBodyInCheck")
BODY_FIELDS = ("maxRequestBytes", "allowPartialMessage", "packAsBytes")
OTHER_PROVIDER_TYPES = ("zipkin", "lightstep", "datadog", "stackdriver", "opencensus", "skywalking",
                        "opentelemetry", "prometheus", "envoyHttpAls", "envoyTcpAls",
                        "envoyOtelAls", "sds")
_PROVIDER_FIELDS = ("name", "envoyExtAuthzHttp", "envoyExtAuthzGrpc", "envoyFileAccessLog", *OTHER_PROVIDER_TYPES)
_READ_FIELDS = ("extensionProviders", "defaultProviders")


@dataclass(frozen=True, slots=True)
class RequestBody:
    """`includeRequestBodyInCheck`: buffer the request body and send it with the check."""

    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


@dataclass(frozen=True, slots=True)
class ExtAuthzProvider:
    """One `extensionProviders[]` entry of type envoyExtAuthzHttp (`protocol` http) or
    envoyExtAuthzGrpc (grpc). Header lists keep Istio's match forms (`x-a`, `x-*`, `*-a`)."""

    name: str
    protocol: Literal["http", "grpc"]
    service: str
    port: int
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    fail_open: bool = False
    status_on_error: int | None = None
    clear_route_cache: bool = False
    request_body: RequestBody | None = None
    path_prefix: str = ""
    include_request_headers: tuple[str, ...] = ()
    include_additional_headers: tuple[tuple[str, str], ...] = ()
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileAccessLogProvider:
    """An `envoyFileAccessLog` provider: Envoy appends a line per request (or TCP connection)
    to `path`, formatted by `text` or, with `labels` ((key, Envoy format string) pairs), as JSON;
    neither: Istio's default text format."""

    name: str
    path: str = "/dev/stdout"
    text: str | None = None
    labels: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The parts of Istio's MeshConfig Meshline uses. `source`: the file it came from ("" when
    no mesh config was given); `other_providers`: names of providers of types Meshline does
    not use (a CUSTOM policy naming one gets its own message)."""

    source: str = ""
    providers: tuple[ExtAuthzProvider, ...] = ()
    other_providers: tuple[str, ...] = ()
    access_log_providers: tuple[FileAccessLogProvider, ...] = ()
    default_access_logging: tuple[str, ...] = ()  # defaultProviders.accessLogging

    def provider(self, name: str) -> ExtAuthzProvider | None:
        return next((p for p in self.providers if p.name == name), None)


NO_MESH_CONFIG = MeshConfig()
"""No `--mesh-config`: no extension providers (every CUSTOM policy fails closed)."""


# --------------------------------------------------------------------------- parsing


def _ref(file: str) -> SourceRef:
    return SourceRef(MESH_CONFIG_KIND, "", "mesh", file, None)


def _raw(body: Mapping[str, Any], file: str) -> RawObject:
    return RawObject(MESH_CONFIG_KIND, "", "", "mesh", body, file, None)


def _headers(ctx: Ctx, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    out = []
    for i, h in enumerate(get_str_list(ctx, m, key, path)):
        bare = h.strip("*")
        if (h != "*" and not bare) or "*" in bare or (bare and not is_header_name(bare)):
            ctx.error(index(join(path, key), i), f"{h!r} is not a header name (or `prefix*` / `*suffix`)")
            continue
        out.append(h.lower())
    return tuple(out)


def _status(ctx: Ctx, m: Mapping[str, Any], path: str) -> int | None:
    value = m.get("statusOnError")
    if value is None:
        return None
    text = str(value).strip()
    p = join(path, "statusOnError")
    if not text.isdigit() or not 100 <= int(text) <= 599:
        ctx.error(p, f"{value!r} is not an HTTP status code (100-599)")
        return None
    return int(text)


def _body(ctx: Ctx, m: Mapping[str, Any], path: str) -> RequestBody | None:
    bm = child(ctx, m, "includeRequestBodyInCheck", path)
    if bm is None:
        return None
    p = join(path, "includeRequestBodyInCheck")
    check_fields(ctx, bm, p, BODY_FIELDS)
    return RequestBody(get_int(ctx, bm, "maxRequestBytes", p, lo=0, hi=2**32 - 1) or 0,
                       bool(get_bool(ctx, bm, "allowPartialMessage", p)), bool(get_bool(ctx, bm, "packAsBytes", p)))


def _access_log_provider(ctx: Ctx, name: str, m: Mapping[str, Any], path: str) -> FileAccessLogProvider | None:
    p = join(path, "envoyFileAccessLog")
    pm = child(ctx, m, "envoyFileAccessLog", path)
    if pm is None:
        return None
    before = ctx.error_count()
    check_fields(ctx, pm, p, ("path", "logFormat"))
    file = get_str(ctx, pm, "path", p) or "/dev/stdout"
    text: str | None = None
    labels: tuple[tuple[str, str], ...] | None = None
    fm = child(ctx, pm, "logFormat", p)
    if fm is not None:
        fp = join(p, "logFormat")
        check_fields(ctx, fm, fp, ("text", "labels"))
        if fm.get("text") is not None and fm.get("labels") is not None:
            ctx.error(fp, "set text or labels, not both")
        text = get_str(ctx, fm, "text", fp)
        lm = child(ctx, fm, "labels", fp)
        if lm is not None:
            pairs = []
            for k, v in lm.items():
                if not isinstance(v, str | int | float | bool):
                    ctx.error(join(join(fp, "labels"), str(k)), "expected a string (an Envoy format string)")
                    continue
                pairs.append((str(k), str(v)))
            labels = tuple(sorted(pairs))
    if ctx.error_count() > before:
        return None
    return FileAccessLogProvider(name, file, text, labels)


def _provider(ctx: Ctx, item: object, path: str) -> ExtAuthzProvider | FileAccessLogProvider | str | None:
    """The ext_authz provider at `path`; the name of a provider of another type; or None."""
    m = item_map(ctx, item, path)
    if m is None:
        return None
    check_fields(ctx, m, path, _PROVIDER_FIELDS)
    name = get_str(ctx, m, "name", path, required=True)
    types = [k for k in ("envoyExtAuthzHttp", "envoyExtAuthzGrpc", "envoyFileAccessLog", *OTHER_PROVIDER_TYPES)
             if m.get(k) is not None]
    if len(types) != 1:
        ctx.error(path, f"set exactly one provider type (got {', '.join(types) or 'none'})")
        return None
    kind = types[0]
    if name is None:
        return None
    if kind in OTHER_PROVIDER_TYPES:
        ctx.warn(join(path, kind), f"provider {name!r}: {kind} is not used by Meshline (only envoyExtAuthzHttp and "
                                   "envoyExtAuthzGrpc, for CUSTOM AuthorizationPolicies, and envoyFileAccessLog, "
                                   "for Telemetry access logging)")
        return name
    if kind == "envoyFileAccessLog":
        return _access_log_provider(ctx, name, m, path)
    p = join(path, kind)
    pm = child(ctx, m, kind, path)
    if pm is None:
        return None
    before = ctx.error_count()
    http = kind == "envoyExtAuthzHttp"
    check_fields(ctx, pm, p, HTTP_FIELDS if http else GRPC_FIELDS)
    service = get_str(ctx, pm, "service", p, required=True)
    port = get_int(ctx, pm, "port", p, lo=1, hi=65535)
    if pm.get("port") is None:
        ctx.error(join(p, "port"), "is required")
    timeout = get_duration(ctx, pm, "timeout", p, min_ms=1)
    headers: tuple[str, ...] = ()
    if http:
        if pm.get("includeHeadersInCheck") is not None and pm.get("includeRequestHeadersInCheck") is not None:
            ctx.error(join(p, "includeHeadersInCheck"), "deprecated: set only includeRequestHeadersInCheck")
        headers = _headers(ctx, pm, "includeRequestHeadersInCheck", p) or _headers(ctx, pm, "includeHeadersInCheck", p)
        prefix = get_str(ctx, pm, "pathPrefix", p) or ""
        if prefix and not prefix.startswith("/"):
            ctx.error(join(p, "pathPrefix"), f"{prefix!r} must start with '/'")
        extra = get_str_map(ctx, pm, "includeAdditionalHeadersInCheck", p)
        for k, _ in extra:
            if not is_header_name(k):
                ctx.error(join(join(p, "includeAdditionalHeadersInCheck"), k), f"{k!r} is not a header name")
    status = _status(ctx, pm, p)
    body = _body(ctx, pm, p)
    if ctx.error_count() > before or service is None or port is None:
        return None
    common: dict[str, Any] = {
        "timeout_ms": DEFAULT_TIMEOUT_MS if timeout is None else timeout,
        "fail_open": bool(get_bool(ctx, pm, "failOpen", p)),
        "status_on_error": status,
        "clear_route_cache": bool(get_bool(ctx, pm, "clearRouteCache", p)),
        "request_body": body,
    }
    if not http:
        return ExtAuthzProvider(name, "grpc", service, port, **common)
    return ExtAuthzProvider(
        name, "http", service, port, **common,
        path_prefix=prefix,
        include_request_headers=headers,
        include_additional_headers=tuple(sorted(extra)),
        headers_to_upstream_on_allow=_headers(ctx, pm, "headersToUpstreamOnAllow", p),
        headers_to_downstream_on_deny=_headers(ctx, pm, "headersToDownstreamOnDeny", p),
        headers_to_downstream_on_allow=_headers(ctx, pm, "headersToDownstreamOnAllow", p),
    )


def parse_mesh_config(text: str, file: str) -> tuple[MeshConfig, tuple[Issue, ...]]:
    """`text` (MeshConfig YAML, or an `istio` ConfigMap holding it in `data.mesh`) as a
    MeshConfig and the issues found, each naming its field (`extensionProviders[0].name`)."""
    ctx = Ctx(_raw({}, file))
    try:
        doc: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        ctx.error("", f"invalid YAML: {exc}")
        return MeshConfig(source=file), tuple(ctx.issues)
    if doc is None:
        doc = {}
    if isinstance(doc, Mapping) and doc.get("kind") == "ConfigMap":
        data = doc.get("data")
        mesh = data.get("mesh") if isinstance(data, Mapping) else None
        if not isinstance(mesh, str):
            ctx.error("data.mesh", "a ConfigMap given as mesh config needs `data.mesh` (Istio's MeshConfig YAML)")
            return MeshConfig(source=file), tuple(ctx.issues)
        try:
            doc = yaml.safe_load(mesh) or {}
        except yaml.YAMLError as exc:
            ctx.error("data.mesh", f"invalid YAML: {exc}")
            return MeshConfig(source=file), tuple(ctx.issues)
    if not isinstance(doc, Mapping):
        ctx.error("", "expected a mapping (Istio's MeshConfig, e.g. `extensionProviders: [...]`)")
        return MeshConfig(source=file), tuple(ctx.issues)
    ctx.raw = _raw(doc, file)
    for key in sorted(str(k) for k in doc):
        if key not in _READ_FIELDS and doc.get(key) is not None:
            ctx.warn(key, "not used by Meshline (only extensionProviders and defaultProviders are read; Meshline's "
                          "own flags, e.g. --root-namespace and --trust-domain, set the rest)")
    defaults: tuple[str, ...] = ()
    dm = child(ctx, doc, "defaultProviders", "")
    if dm is not None:
        check_fields(ctx, dm, "defaultProviders", ("accessLogging", "tracing", "metrics"))
        defaults = get_str_list(ctx, dm, "accessLogging", "defaultProviders")
        for key in ("tracing", "metrics"):
            if dm.get(key):
                ctx.warn(join("defaultProviders", key), f"Meshline configures no {key}: not used")
    logs: list[FileAccessLogProvider] = []
    providers: list[ExtAuthzProvider] = []
    others: list[str] = []
    seen: set[str] = set()
    twice: set[str] = set()
    for i, item in enumerate(get_list(ctx, doc, "extensionProviders", "")):
        path = index("extensionProviders", i)
        got = _provider(ctx, item, path)
        name = got if isinstance(got, str) else got.name if got is not None else None
        if name is not None and name in seen:
            ctx.error(join(path, "name"), f"provider name {name!r} is used twice (neither is used)")
            twice.add(name)
            continue
        if name is not None:
            seen.add(name)
        if isinstance(got, ExtAuthzProvider):
            providers.append(got)
        elif isinstance(got, FileAccessLogProvider):
            logs.append(got)
        elif isinstance(got, str):
            others.append(got)
    providers = [p for p in providers if p.name not in twice]
    logs = [p for p in logs if p.name not in twice]
    return (MeshConfig(file, tuple(providers), tuple(others), tuple(logs), tuple(dict.fromkeys(defaults))),
            tuple(ctx.issues))


# --------------------------------------------------------------------------- resolution


def provider_target(provider: ExtAuthzProvider, services: Mapping[Hostname, Service]
                    ) -> tuple[Service, ServicePort] | str:
    """The mesh service and port `provider` calls, or why there is none. `service` is
    `[ns/]host`: a fully qualified name, `name.ns` (`.svc.cluster.local` added), or a bare
    name that one service of the mesh has (of `ns` when given)."""
    raw = provider.service.strip().rstrip(".").lower()
    ns, _, host = raw.rpartition("/")
    candidates: list[Service]
    if "." not in host:
        candidates = [s for s in services.values() if s.name == host and (not ns or s.namespace == ns)]
        if len(candidates) > 1:
            where = ", ".join(sorted(s.hostname for s in candidates))
            return f"service {provider.service!r} is ambiguous ({where}): give its full name"
    else:
        full = host if host.count(".") > 1 else f"{host}.svc.cluster.local"
        if full.endswith(".svc"):
            full += ".cluster.local"
        svc = services.get(Hostname(full))
        candidates = [svc] if svc is not None and (not ns or svc.namespace == ns) else []
    if not candidates:
        return f"service {provider.service!r} is not in the mesh"
    svc = candidates[0]
    sp = next((p for p in svc.ports if p.port == provider.port), None)
    if sp is None:
        ports = ", ".join(str(p.port) for p in svc.ports) or "none"
        return f"service {svc.hostname} has no port {provider.port} (its ports: {ports})"
    return svc, sp


def usable_provider(name: str | None, config: MeshConfig, services: Mapping[Hostname, Service]
                    ) -> tuple[ExtAuthzProvider, Service, ServicePort] | str:
    """The provider named `name` with its service and port, or why a policy naming it fails closed."""
    if not name:
        return "a CUSTOM policy needs spec.provider.name"
    provider = config.provider(name)
    if provider is None:
        if name in config.other_providers:
            return f"extension provider {name!r} is not an external authorizer (envoyExtAuthzHttp/Grpc)"
        if not config.source:
            return (f"unknown extension provider {name!r}: no mesh config was given (meshline serve/analyze "
                    "--mesh-config FILE, with Istio's extensionProviders)")
        known = ", ".join(p.name for p in config.providers) or "none"
        return f"unknown extension provider {name!r} (the mesh config {config.source} defines: {known})"
    target = provider_target(provider, services)
    if isinstance(target, str):
        return f"extension provider {name!r}: {target}"
    return provider, *target


def check_custom_policies(policies: Iterable[AuthorizationPolicy], config: MeshConfig,
                          services: Mapping[Hostname, Service]) -> list[Issue]:
    """An error for each CUSTOM policy whose provider cannot be used (it fails closed), and a
    warning for a gRPC provider on a port that does not speak HTTP/2."""
    out: list[Issue] = []
    for ap in policies:
        if ap.provider is None:
            continue
        got = usable_provider(ap.provider, config, services)
        if isinstance(got, str):
            out.append(Issue(ap.ref, "spec.provider.name", f"{got}; the policy fails closed: requests its rules "
                             "match are denied", "error"))
            continue
        provider, svc, sp = got
        if provider.protocol == "grpc" and sp.protocol not in (PortProtocol.GRPC, PortProtocol.HTTP2):
            out.append(Issue(ap.ref, "spec.provider.name", f"extension provider {provider.name!r} speaks gRPC, but "
                             f"port {sp.port} of {svc.hostname} is not declared as grpc/http2 (name it "
                             "`grpc-...` or set appProtocol): Envoy would call it over HTTP/1.1", "warning"))
    return out
