"""Sidecar injection: decides whether a pod gets Meshline's proxy and builds the JSONPatch
that adds it. Pure functions over plain dicts (the Pod as the API server sends it); no I/O.

What an injected pod gets (native layout, the default):

- init container `meshline-init`: `meshline iptables ...` (root, NET_ADMIN and NET_RAW
  only), first, so every later container's traffic is captured;
- init container `meshline-proxy` with `restartPolicy: Always` (a native sidecar), second:
  writes its bootstrap with `meshline bootstrap --capture intercept` into an in-memory
  emptyDir and execs Envoy as uid 1337 (the uid the capture rules exempt). Its startup
  probe (15021 /healthz/ready, which answers only once Envoy has its xDS config) holds the
  pod's other init containers and its app containers until the proxy is ready; Kubernetes
  stops it after them;
- a projected volume at /var/run/secrets/meshline/tokens holding the service-account token
  (audience `meshline`, rotated by the kubelet) as `meshline-token` and the mesh trust
  bundle (ConfigMap `meshline-ca-root`, kept current by the control plane) as
  `root-cert.pem`. Envoy talks xDS over TLS to port 15012, verifying the control plane
  against that bundle, and reads the token file at every stream (no restart on rotation);
- the annotation `meshline.io/status: injected`.

The classic layout (`native_sidecars=False`, clusters < 1.29): `meshline-init` is the last
init container (earlier ones run uncaptured, as they would have no proxy), the proxy is the
first app container; a postStart hook (`meshline proxy-wait`) holds the next containers
until it is ready, and a preStop hook (`meshline proxy-drain`) keeps it serving while the
app shuts down.

Every problem becomes a warning with the pod left unchanged; injection never fails a pod.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from controlplane.iptables import (
    CaptureSpec,
    format_cidrs,
    format_ports,
    parse_cidrs,
    parse_ports,
)
from webhook.config import (
    ADMIN_PORT,
    CA_BUNDLE_CONFIGMAP,
    CA_BUNDLE_FILE,
    DATAPLANE_MODE_LABEL,
    ENVOY_CONFIG_DIR,
    ENVOY_CONFIG_VOLUME,
    ENVOY_LOG_LEVELS,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    HEALTH_PATH,
    HEALTH_PORT,
    INCLUDE_OUTBOUND_CIDRS,
    INIT_CONTAINER,
    INJECT,
    PROXY_CONTAINER,
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_LOG_LEVEL,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    PROXY_PORTS,
    STATS_PORT,
    STATUS,
    TOKEN_DIR,
    TOKEN_FILE,
    TOKEN_VOLUME,
    WebhookConfig,
)

Patch = tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class InjectionResult:
    """`patch` is empty when the pod is left unchanged; `outcome` says why."""

    patch: Patch
    warnings: tuple[str, ...]
    outcome: str  # injected | not-in-mesh-namespace | opted-out | already-injected | skipped


def _skip(outcome: str, *warnings: str) -> InjectionResult:
    return InjectionResult((), tuple(warnings), outcome)


# --------------------------------------------------------------------------- annotations

_QUANTITY = re.compile(r"(?P<num>\+?(?:\d+(?:\.\d*)?|\.\d+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity (`100m`, `1.5`, `128Mi`, `1e3`) as a number. Raises
    ValueError for anything else (negative quantities included)."""
    m = _QUANTITY.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 1, 128Mi)")
    suffix = m.group("suffix")
    try:
        num = Decimal(m.group("num"))
        if suffix is not None and suffix[0] in "eE" and len(suffix) > 1:
            return num * Decimal(10) ** int(suffix[1:])
        return num * _SUFFIX[suffix]
    except (InvalidOperation, OverflowError, ValueError):
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    capture: CaptureSpec
    requests: tuple[tuple[str, str], ...]
    limits: tuple[tuple[str, str], ...]
    log_level: str


def _resources(annotations: Mapping[str, str], config: WebhookConfig) -> tuple[dict[str, str], dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for res, req_ann, lim_ann, req_default, lim_default in (
        ("cpu", PROXY_CPU, PROXY_CPU_LIMIT, config.cpu_request, config.cpu_limit),
        ("memory", PROXY_MEMORY, PROXY_MEMORY_LIMIT, config.memory_request, config.memory_limit),
    ):
        req = annotations.get(req_ann)
        lim = annotations.get(lim_ann)
        for ann, value in ((req_ann, req), (lim_ann, lim)):
            if value is not None:
                try:
                    parse_quantity(value)
                except ValueError as exc:
                    raise ValueError(f"{ann}: {exc}") from None
        limit = lim if lim is not None else lim_default
        request = req if req is not None else req_default
        if limit is not None and request is not None and parse_quantity(request) > parse_quantity(limit):
            if req is not None:
                raise ValueError(f"{req_ann}: the request {req} exceeds the limit {limit}")
            request = limit  # only the limit was lowered: the default request follows it down
        if request is not None:
            requests[res] = request.strip()
        if limit is not None:
            limits[res] = limit.strip()
    return requests, limits


def proxy_settings(annotations: Mapping[str, str], config: WebhookConfig) -> ProxySettings:
    """The pod's proxy settings from its `meshline.io/*` annotations over the config's
    defaults. Raises ValueError naming the annotation for any invalid value."""
    capture = CaptureSpec(
        proxy_uid=config.proxy_uid,
        exclude_outbound_ports=parse_ports(annotations.get(EXCLUDE_OUTBOUND_PORTS, ""), EXCLUDE_OUTBOUND_PORTS),
        exclude_inbound_ports=parse_ports(annotations.get(EXCLUDE_INBOUND_PORTS, ""), EXCLUDE_INBOUND_PORTS),
        exclude_outbound_cidrs=parse_cidrs(annotations.get(EXCLUDE_OUTBOUND_CIDRS, ""), EXCLUDE_OUTBOUND_CIDRS) or (),
        include_outbound_cidrs=parse_cidrs(annotations.get(INCLUDE_OUTBOUND_CIDRS, "*"), INCLUDE_OUTBOUND_CIDRS,
                                           allow_all=True),
    )
    requests, limits = _resources(annotations, config)
    level = annotations.get(PROXY_LOG_LEVEL, config.log_level).strip().lower()
    level = "warning" if level == "warn" else level
    if level not in ENVOY_LOG_LEVELS:
        raise ValueError(f"{PROXY_LOG_LEVEL}: {level!r} is not one of {', '.join(ENVOY_LOG_LEVELS)}")
    return ProxySettings(capture, tuple(sorted(requests.items())), tuple(sorted(limits.items())), level)


# --------------------------------------------------------------------------- containers


def init_container(s: ProxySettings, config: WebhookConfig) -> dict[str, Any]:
    c = s.capture
    args = ["iptables", "--proxy-uid", str(c.proxy_uid), "--outbound-port", str(c.outbound_port),
            "--inbound-port", str(c.inbound_port)]
    for flag, value in (("--exclude-outbound-ports", format_ports(c.exclude_outbound_ports)),
                        ("--exclude-inbound-ports", format_ports(c.exclude_inbound_ports)),
                        ("--exclude-outbound-cidrs", format_cidrs(c.exclude_outbound_cidrs))):
        if value:
            args += [flag, value]
    args += ["--include-outbound-cidrs", format_cidrs(c.include_outbound_cidrs)]
    return {
        "name": INIT_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["meshline"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,  # iptables takes its lock under /run
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _start_script(pod_labels: Mapping[str, str], config: WebhookConfig) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(pod_labels.items()))
    config_file = f"{ENVOY_CONFIG_DIR}/envoy.yaml"
    bootstrap = [
        "meshline bootstrap --mode sidecar --capture intercept",
        '--node-id "$POD_NAME.$POD_NAMESPACE" --namespace "$POD_NAMESPACE"',
        '--workload "$POD_NAME" --service-account "$SERVICE_ACCOUNT"',
        *([f"--labels {shlex.quote(labels)}"] if labels else []),
        f'--xds-protocol {shlex.quote(config.xds_protocol)} --xds-address "$MESHLINE_XDS_ADDRESS"',
        # TLS to the control plane, verified against the mesh trust bundle (a ConfigMap).
        '--xds-tls --ca-bundle "$MESHLINE_CA_BUNDLE"',
        # The projected service-account token (audience `meshline`) proves the pod's identity:
        # the control plane checks it with a TokenReview and then sends this pod's certificate.
        # Envoy reads the file at every xDS stream, so the kubelet's rotation needs no restart.
        '--token-file "$MESHLINE_TOKEN_FILE"',
        f"--admin-address 127.0.0.1:{ADMIN_PORT} > {config_file}",
    ]
    envoy = [
        f"exec envoy -c {config_file} --disable-hot-restart",
        f'--concurrency {int(config.concurrency)} --log-level "$MESHLINE_LOG_LEVEL"',
        f"--drain-time-s {int(config.drain_seconds)}",
    ]
    return "set -e\n" + " \\\n  ".join(bootstrap) + "\n" + " \\\n  ".join(envoy) + "\n"


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": HEALTH_PATH, "port": HEALTH_PORT, "scheme": "HTTP"}, "periodSeconds": period,
            "timeoutSeconds": 3, "failureThreshold": failures}


def proxy_container(pod_labels: Mapping[str, str], s: ProxySettings, config: WebhookConfig) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
    }
    if config.native_sidecars:
        c["restartPolicy"] = "Always"
    c |= {
        "command": ["/bin/sh", "-c"],
        "args": [_start_script(pod_labels, config)],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            _field_env("NODE_NAME", "spec.nodeName"),
            {"name": "MESHLINE_XDS_ADDRESS", "value": config.xds_address},
            {"name": "MESHLINE_LOG_LEVEL", "value": s.log_level},
            {"name": "MESHLINE_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_FILE}"},
            {"name": "MESHLINE_CA_BUNDLE", "value": f"{TOKEN_DIR}/{CA_BUNDLE_FILE}"},
        ],
        "ports": [{"name": "http-envoy-prom", "containerPort": STATS_PORT, "protocol": "TCP"}],
        "resources": {k: dict(v) for k, v in (("requests", s.requests), ("limits", s.limits)) if v},
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "startupProbe": _probe(1, config.startup_timeout_seconds),
        "readinessProbe": _probe(15, 4),
        "volumeMounts": [
            {"name": ENVOY_CONFIG_VOLUME, "mountPath": ENVOY_CONFIG_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if not config.native_sidecars:
        wait = ["meshline", "proxy-wait", "--url", f"http://127.0.0.1:{HEALTH_PORT}{HEALTH_PATH}",
                "--timeout", str(config.startup_timeout_seconds)]
        drain = ["meshline", "proxy-drain", "--admin-address", f"127.0.0.1:{ADMIN_PORT}",
                 "--min-wait", str(config.drain_seconds), "--timeout", str(max(config.drain_seconds, 1) * 4)]
        c["lifecycle"] = {"postStart": {"exec": {"command": wait}}, "preStop": {"exec": {"command": drain}}}
    return c


def volumes(config: WebhookConfig) -> list[dict[str, Any]]:
    return [
        {"name": ENVOY_CONFIG_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {"audience": config.token_audience,
                                     "expirationSeconds": config.token_expiration_seconds, "path": TOKEN_FILE}},
            {"configMap": {"name": CA_BUNDLE_CONFIGMAP,
                           "items": [{"key": CA_BUNDLE_FILE, "path": CA_BUNDLE_FILE}]}},
        ]}},
    ]


# --------------------------------------------------------------------------- decision


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str | int | float | bool)}


def _list_of_maps(value: Any) -> list[Mapping[str, Any]]:
    return [c for c in value if isinstance(c, Mapping)] if isinstance(value, list) else []


def namespace_in_mesh(labels: Mapping[str, str] | None) -> bool | None:
    """What a namespace's labels say about injection (None: namespace unknown), for
    `create_webhook_app(namespace_in_mesh=...)` fed from the control plane's view."""
    if labels is None:
        return None
    return labels.get(DATAPLANE_MODE_LABEL) == "sidecar"


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


ISTIO_INJECT = "sidecar.istio.io/inject"


def opted_out(pod: Mapping[str, Any]) -> bool:
    """`meshline.io/inject: "false"` (or Istio's `sidecar.istio.io/inject: "false"`), as an
    annotation or a label."""
    meta = _map(pod.get("metadata"))
    for where in ("annotations", "labels"):
        for key in (INJECT, ISTIO_INJECT):
            value = _str_map(meta.get(where)).get(key)
            if value is not None and value.strip().lower() == "false":
                return True
    return False


def _container_names(spec: Mapping[str, Any]) -> list[str]:
    return [str(c.get("name")) for key in ("initContainers", "containers") for c in _list_of_maps(spec.get(key))]


def _problems(spec: Mapping[str, Any]) -> list[str]:
    out = []
    if spec.get("hostNetwork") is True:
        out.append("the pod uses hostNetwork: capturing its traffic would capture the node's")
    taken = sorted(set(_container_names(spec)) & {INIT_CONTAINER})
    taken += sorted({str(v.get("name")) for v in _list_of_maps(spec.get("volumes"))} & {ENVOY_CONFIG_VOLUME,
                                                                                      TOKEN_VOLUME})
    if taken:
        out.append(f"the pod already has {', '.join(taken)} (partly injected?)")
    for key in ("initContainers", "containers"):
        for c in _list_of_maps(spec.get(key)):
            for p in _list_of_maps(c.get("ports")):
                if p.get("containerPort") in PROXY_PORTS:
                    out.append(f"container {c.get('name')} uses port {p.get('containerPort')}, "
                               "which the proxy needs")
    return out


def _uid_warnings(spec: Mapping[str, Any], config: WebhookConfig) -> list[str]:
    pod_uid = _map(spec.get("securityContext")).get("runAsUser")
    out = []
    for c in _list_of_maps(spec.get("containers")):
        sc = c.get("securityContext")
        uid = sc.get("runAsUser", pod_uid) if isinstance(sc, Mapping) else pod_uid
        if uid == config.proxy_uid:
            out.append(f"container {c.get('name')} runs as uid {uid}, the proxy's uid: its traffic bypasses "
                       "the proxy")
    return out


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def build_patch(pod: Mapping[str, Any], s: ProxySettings, config: WebhookConfig) -> Patch:
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else None
    spec: Mapping[str, Any] = pod["spec"]
    labels = _str_map(meta.get("labels")) if meta else {}
    init = init_container(s, config)
    proxy = proxy_container(labels, s, config)
    ops: list[dict[str, Any]] = []
    existing_init = spec.get("initContainers")
    if config.native_sidecars:
        if existing_init:
            ops += [{"op": "add", "path": "/spec/initContainers/0", "value": init},
                    {"op": "add", "path": "/spec/initContainers/1", "value": proxy}]
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]})
    else:
        if existing_init:
            ops.append({"op": "add", "path": "/spec/initContainers/-", "value": init})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [init]})
        ops.append({"op": "add", "path": "/spec/containers/0", "value": proxy})
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes(config)]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes(config)})
    if meta is None:
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": {STATUS: "injected"}}})
    elif isinstance(meta.get("annotations"), Mapping) and meta["annotations"]:
        ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(STATUS)}", "value": "injected"})
    else:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {STATUS: "injected"}})
    return tuple(ops)


def inject(pod: Mapping[str, Any], namespace: str, config: WebhookConfig,
           namespace_in_mesh: bool | None = None) -> InjectionResult:
    """Decide and build the injection for `pod` (created in `namespace`).

    `namespace_in_mesh`: what the caller knows of the namespace's
    `meshline.io/dataplane-mode` label (True: sidecar; False: not; None: unknown, trust
    the webhook configuration's namespaceSelector unless `config.sidecar_namespaces` is set).
    """
    if namespace_in_mesh is False or (
        namespace_in_mesh is None and config.sidecar_namespaces is not None
        and namespace not in config.sidecar_namespaces
    ):
        return _skip("not-in-mesh-namespace")
    if opted_out(pod):
        return _skip("opted-out")
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not _list_of_maps(spec.get("containers")):
        return _skip("skipped", "meshline: not injected: the pod has no containers")
    if PROXY_CONTAINER in _container_names(spec):
        return _skip("already-injected")
    problems = _problems(spec)
    if problems:
        return _skip("skipped", *(f"meshline: sidecar not injected: {p}" for p in problems))
    try:
        settings = proxy_settings(_str_map(_map(pod.get("metadata")).get("annotations")), config)
    except ValueError as exc:
        return _skip("skipped", f"meshline: sidecar not injected: invalid annotation {exc}")
    warnings = tuple(f"meshline: {w}" for w in _uid_warnings(spec, config))
    return InjectionResult(build_patch(pod, settings, config), warnings, "injected")

