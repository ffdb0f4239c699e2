"""Trace propagation and spans (the optional extra `asyncproc[otel]`, on with --tracing).

A request's W3C `traceparent`/`tracestate` come from its own headers, else its metadata
(where llm-d-async's producers put them). asyncproc records, as children of that context,
a `receive` span when it takes the request in, one `attempt` span per gateway attempt
(dispatch to outcome, measured in the supervisor) and a `result` span when the result is
queued for writing; each attempt's context goes to the gateway as its `traceparent`.
Spans are exported as the standard `OTEL_*` environment variables say (OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...).

Off (the default) is `Off`: methods that return at once, no import of OpenTelemetry. On,
a failure in tracing costs a span, never a request: every call is guarded.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional

from asyncproc import llmd

log = logging.getLogger("asyncproc.tracing")

TRACE_KEYS = ("traceparent", "tracestate")
OTEL_EXTRA = "pip install 'asyncproc[otel]'"


def carrier_of(headers: Optional[Mapping[str, str]], metadata: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """The request's trace context: from its headers (any spelling), else its metadata."""
    out: Dict[str, str] = {}
    for source in (headers, metadata):
        if source:
            for name, value in source.items():
                if isinstance(name, str) and name.lower() in TRACE_KEYS and isinstance(value, str):
                    out.setdefault(name.lower(), value)
        if out:
            return out
    return out


class Off:
    """Tracing off: nothing recorded, headers unchanged."""

    enabled = False

    def received(self, request) -> None:
        pass

    def attempt_started(self, request, headers: Dict[str, str]) -> Dict[str, str]:
        return headers

    def attempt_ended(self, key: str, outcome) -> None:
        pass

    def finished(self, request, result, code: str) -> None:
        pass

    def close(self) -> None:
        pass


class Otel(Off):
    enabled = True

    def __init__(self, provider: Any = None) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider if provider is not None else default_provider()
        self.tracer = self.provider.get_tracer("asyncproc")
        self.propagator = TraceContextTextMapPropagator()
        self.open: Dict[str, Any] = {}   # id key -> the attempt span in flight

    def _context(self, request):
        return self.propagator.extract(carrier_of(request.headers, request.metadata))

    def _attributes(self, request) -> Dict[str, Any]:
        return {"asyncproc.request.id": str(request.id), "asyncproc.queue": request.queue,
                "asyncproc.attempts": request.attempts}

    def received(self, request) -> None:
        try:
            self.tracer.start_span("asyncproc.receive", context=self._context(request),
                                   attributes=self._attributes(request)).end()
        except Exception as exc:  # tracing must never cost a request
            log.debug("tracing: receive span failed (%s)", type(exc).__name__)

    def attempt_started(self, request, headers: Dict[str, str]) -> Dict[str, str]:
        try:
            from opentelemetry import trace

            span = self.tracer.start_span("asyncproc.attempt", context=self._context(request),
                                          attributes=self._attributes(request))
            previous = self.open.pop(request.key, None)
            if previous is not None:
                previous.end()
            self.open[request.key] = span
            carrier: Dict[str, str] = {}
            self.propagator.inject(carrier, context=trace.set_span_in_context(span))
            return llmd.merge_headers(headers, carrier, None, fairness_header="")
        except Exception as exc:
            log.debug("tracing: attempt span failed (%s)", type(exc).__name__)
            return headers

    def attempt_ended(self, key: str, outcome) -> None:
        span = self.open.pop(key, None)
        if span is None:
            return
        try:
            span.set_attribute("asyncproc.outcome", outcome.kind.value)
            if outcome.status is not None:
                span.set_attribute("http.response.status_code", outcome.status)
            span.end()
        except Exception as exc:
            log.debug("tracing: attempt span failed (%s)", type(exc).__name__)

    def finished(self, request, result, code: str) -> None:
        try:
            span = self.open.pop(request.key, None)
            if span is not None:
                span.end()
            attributes = self._attributes(request)
            attributes["asyncproc.result"] = code
            self.tracer.start_span("asyncproc.result", context=self._context(request), attributes=attributes).end()
        except Exception as exc:
            log.debug("tracing: result span failed (%s)", type(exc).__name__)

    def close(self) -> None:
        for span in self.open.values():
            span.end()
        self.open.clear()
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as exc:
                log.warning("tracing: exporting the last spans failed (%s)", type(exc).__name__)


def exporter_problem(environ: Mapping[str, str]) -> Optional[str]:
    """Why --tracing cannot start here (the extra or an exporter missing), or None."""
    import importlib.util
    from importlib.metadata import entry_points

    if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.sdk") is None:
        return f"OpenTelemetry is not installed ({OTEL_EXTRA})"
    available = {e.name for e in entry_points(group="opentelemetry_traces_exporter")} | {"none"}
    for name in (n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name and name not in available:
            return (f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed"
                    f" (installed: {', '.join(sorted(available))})")
    return None


def default_provider():
    """A TracerProvider as the OTEL_* environment describes it: its resource
    (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) and the exporters OTEL_TRACES_EXPORTER
    names (entry points, as the SDK's own configuration resolves them; default otlp)."""
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    os.environ.setdefault("OTEL_SERVICE_NAME", "asyncproc")
    provider = TracerProvider(resource=Resource.create())
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    available = {e.name: e for e in entry_points(group="opentelemetry_traces_exporter")}
    for name in names:
        if name == "none":
            continue
        if name not in available:
            raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed"
                             f" (installed: {', '.join(sorted(available)) or 'none'})")
        provider.add_span_processor(BatchSpanProcessor(available[name].load()()))
    return provider


def load(enabled: bool):
    return Otel() if enabled else Off()
