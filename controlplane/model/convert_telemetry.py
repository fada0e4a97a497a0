"""Telemetry spec -> IR (`controlplane.model.telemetry`). Pure, no I/O.

Istio's public v1 schema (`telemetry.istio.io/v1`, `v1alpha1`, or `telemetry.meshline.io/v1`).
Meshline translates `accessLogging` (match.mode, providers[].name, disabled, filter.expression)
for sidecars; `metrics` and `tracing` are accepted with a warning naming them (Meshline
configures neither). `targetRef`/`targetRefs` make it a waypoint's (the waypoint, kind
Gateway, or a Service bound to one). A `filter.expression` is Envoy's CEL
access-log filter (`envoy.access_loggers.filters.cel`): Envoy parses it, so an expression it
rejects is found by the pre-flight check and the object withheld.
"""

from __future__ import annotations

from controlplane.model.convert_base import (
    Ctx,
    check_fields,
    child,
    get_bool,
    get_list,
    get_str,
    index,
    item_map,
    join,
)
from controlplane.model.convert_security import _selector, _spec, _target_refs
from controlplane.model.ir import LOG_MODES, AccessLogging, LogMode, Telemetry

TELEMETRY_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "tracing", "metrics", "accessLogging")
ACCESS_LOGGING_FIELDS = ("match", "providers", "disabled", "filter")


def convert_telemetry(ctx: Ctx, namespace: str, name: str) -> Telemetry | None:
    spec = _spec(ctx)
    if spec is None:
        return None
    check_fields(ctx, spec, "spec", TELEMETRY_SPEC_FIELDS)
    targets = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k) is not None]
    if len(targets) > 1:
        ctx.error("spec", f"set at most one of selector, targetRef and targetRefs (got {', '.join(targets)})")
    selector = _selector(ctx, spec)
    refs = _target_refs(ctx, spec, namespace)
    for key, what in (("metrics", "Istio metrics (Envoy's own stats stay on :15090)"), ("tracing", "tracing")):
        if spec.get(key):
            ctx.warn(join("spec", key), f"Meshline configures no {what}: this section is ignored")
    entries: list[AccessLogging] = []
    for i, item in enumerate(get_list(ctx, spec, "accessLogging", "spec")):
        entry = _access_logging(ctx, item, index("spec.accessLogging", i))
        if entry is not None:
            entries.append(entry)
    return Telemetry(ctx.raw.ref, namespace, name, selector, tuple(entries), refs)


def _access_logging(ctx: Ctx, item: object, p: str) -> AccessLogging | None:
    m = item_map(ctx, item, p)
    if m is None:
        return None
    check_fields(ctx, m, p, ACCESS_LOGGING_FIELDS)
    mode: LogMode = "CLIENT_AND_SERVER"
    mm = child(ctx, m, "match", p)
    if mm is not None:
        mp = join(p, "match")
        check_fields(ctx, mm, mp, ("mode",))
        text = get_str(ctx, mm, "mode", mp)
        if text is not None:
            found = next((lm for lm in LOG_MODES if lm == text), None)
            if found is None:
                ctx.error(join(mp, "mode"), f"unknown mode {text!r} (expected one of {', '.join(LOG_MODES)})")
            else:
                mode = found
    providers: list[str] = []
    for i, pr in enumerate(get_list(ctx, m, "providers", p)):
        pp = index(join(p, "providers"), i)
        pm = item_map(ctx, pr, pp)
        if pm is None:
            continue
        check_fields(ctx, pm, pp, ("name",))
        pname = get_str(ctx, pm, "name", pp, required=True)
        if pname:
            providers.append(pname)
    expression: str | None = None
    fm = child(ctx, m, "filter", p)
    if fm is not None:
        fp = join(p, "filter")
        check_fields(ctx, fm, fp, ("expression",))
        expression = get_str(ctx, fm, "expression", fp) or None
    disabled = bool(get_bool(ctx, m, "disabled", p))
    return AccessLogging(mode, tuple(dict.fromkeys(providers)), disabled, expression)
