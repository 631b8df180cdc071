"""OpenTelemetry spans (the optional `otel` extra), configured by the standard `OTEL_*` variables.

With `OTEL_TRACES_EXPORTER` (`otlp` or `console`) or an `OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`
set and opentelemetry-sdk installed, each worker exports a server span per request (named by
method and route template, a child of the caller's `traceparent`) and a child span around the
onnxruntime run. Service name and resource attributes come from `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` as the SDK reads them. Without the extra or the variables nothing is
imported and requests pay nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("bnserve.service")

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
#: This process's tracer once the app is built with one (the runtime's model spans read it).
ACTIVE: Any | None = None


def tracer_from_env(environ: dict[str, str] | None = None) -> Any | None:
    """A tracer exporting as the `OTEL_*` variables say, or None (not asked for, or no SDK)."""
    env = os.environ if environ is None else environ
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_name in ("", "none") and not any(env.get(k) for k in _ENDPOINTS):
        return None
    if exporter_name == "none":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* tracing is configured but opentelemetry-sdk is not installed: "
                    "pip install 'bnserve[otel]'")  # fmt: skip
        return None
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTLP trace export needs opentelemetry-exporter-otlp-proto-http")
            return None
        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("bnserve")


class RequestSpan:
    """The server span of one request (a child of its `traceparent`), current while it runs."""

    def __init__(self, tracer: Any, method: str, traceparent: str | None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {"traceparent": traceparent} if traceparent else {}
        parent = TraceContextTextMapPropagator().extract(carrier)
        self.span = tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER)
        self._token = context.attach(trace.set_span_in_context(self.span))
        self._context = context

    def traceparent(self) -> str:
        """This span as a `traceparent` header value."""
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def end(self, route: str, method: str, status: int) -> None:
        self.span.update_name(f"{method} {route}")
        self.span.set_attribute("http.request.method", method)
        self.span.set_attribute("http.route", route)
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR))
        self._context.detach(self._token)
        self.span.end()


def model_span(tracer: Any, model: str, version: int) -> Any:
    """A span around one onnxruntime run (a child of the request's span)."""
    span = tracer.start_as_current_span("onnxruntime.run")
    return _Named(span, model, version)


class _Named:
    def __init__(self, manager: Any, model: str, version: int) -> None:
        self.manager, self.model, self.version = manager, model, version

    def __enter__(self) -> Any:
        span = self.manager.__enter__()
        span.set_attribute("bnserve.model", self.model)
        span.set_attribute("bnserve.model_version", self.version)
        return span

    def __exit__(self, *exc: Any) -> Any:
        return self.manager.__exit__(*exc)
