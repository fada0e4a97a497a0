"""Telemetry access logging -> Envoy access loggers on sidecar listeners. Pure, no I/O.

The access logs in force for a proxy and a direction (`controlplane.model.telemetry.
access_logs_for`: provider names and CEL filters) are resolved against the mesh config's
`envoyFileAccessLog` providers (`resolve`): Envoy's file access logger
(`envoy.access_loggers.file`) writing to the provider's `path`, in its `logFormat.text`, as
JSON with its `logFormat.labels`, or, with neither, in Istio's default text format
(`ISTIO_TEXT_FORMAT`). The provider `envoy`, which Istio's default mesh config defines,
writes that format to `/dev/stdout` unless the mesh config defines the name itself. A
`filter.expression` becomes Envoy's CEL access-log filter
(`envoy.access_loggers.filters.cel`), the same expression language Istio hands it to.

HTTP chains log per request (the HTTP connection manager's `access_log`), TCP chains per
connection (`tcp_proxy`'s `access_log`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from google.protobuf import struct_pb2

from controlplane.model.ir import BUILTIN_PROVIDER, AccessLog
from controlplane.model.meshconfig import MeshConfig
from controlplane.translate.names import pack

FILE_LOGGER = "envoy.access_loggers.file"
CEL_FILTER = "envoy.access_loggers.filters.cel"
ISTIO_TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% '
    '%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n'
)
"""Istio's default access log format (istio.io, "Envoy Access Logs": the default text format)."""
STDOUT = "/dev/stdout"


@dataclass(frozen=True, slots=True)
class AccessLogSink:
    """One Envoy file access log: where, in which format, for which requests."""

    path: str = STDOUT
    text: str | None = None  # None with labels None: ISTIO_TEXT_FORMAT
    labels: tuple[tuple[str, str], ...] | None = None  # JSON
    filter: str | None = None  # CEL


def resolve(logs: Sequence[AccessLog], config: MeshConfig) -> tuple[AccessLogSink, ...]:
    """The sinks of `logs`; a provider the mesh config lacks (warned by the model) is left out."""
    by_name = {p.name: p for p in config.access_log_providers}
    out: list[AccessLogSink] = []
    for log in logs:
        p = by_name.get(log.provider)
        if p is not None:
            out.append(AccessLogSink(p.path, p.text, p.labels, log.filter))
        elif log.provider == BUILTIN_PROVIDER:
            out.append(AccessLogSink(STDOUT, None, None, log.filter))
    return tuple(dict.fromkeys(out))


def access_log(sink: AccessLogSink) -> accesslog_pb2.AccessLog:
    cfg = file_pb2.FileAccessLog(path=sink.path)
    fmt = cfg.log_format
    if sink.labels is not None:
        fmt.json_format.CopyFrom(struct_pb2.Struct(fields={k: struct_pb2.Value(string_value=v)
                                                           for k, v in sink.labels}))
    else:
        text = sink.text if sink.text is not None else ISTIO_TEXT_FORMAT
        fmt.text_format_source.inline_string = text if text.endswith("\n") else f"{text}\n"
    out = accesslog_pb2.AccessLog(name=FILE_LOGGER)
    out.typed_config.CopyFrom(pack(cfg))
    if sink.filter:
        ext = out.filter.extension_filter
        ext.name = CEL_FILTER
        ext.typed_config.CopyFrom(pack(cel_pb2.ExpressionFilter(expression=sink.filter)))
    return out


def access_logs(sinks: Sequence[AccessLogSink]) -> list[accesslog_pb2.AccessLog]:
    return [access_log(s) for s in sinks]
