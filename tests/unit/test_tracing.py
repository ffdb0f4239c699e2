"""Trace propagation with the SDK's in-memory exporter: the request's context (headers,
else metadata) is continued; each attempt's context goes to the gateway; off costs nothing."""
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from asyncproc import tracing  # noqa: E402
from asyncproc.messages import Request, Result  # noqa: E402
from asyncproc.outcomes import Kind, Outcome  # noqa: E402

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
NOW = 1_700_000_000.0


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracing.Otel(provider), exporter


@pytest.mark.parametrize("where", ["metadata", "headers"])
def test_request_context_is_continued_and_sent_to_the_gateway(spans, where):
    tracer, exporter = spans
    carried = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    request = Request("r", NOW + 60, {}, "q", NOW, **{where: carried})
    tracer.received(request)
    headers = tracer.attempt_started(request, {"Authorization": "Bearer x", "TraceParent": "stale"})
    assert headers["Authorization"] == "Bearer x" and "TraceParent" not in headers
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert trace_id == TRACE and span_id != PARENT and headers["tracestate"] == "vendor=1"
    tracer.attempt_ended(request.key, Outcome(Kind.RETRY, 503, b""))
    tracer.finished(request, Result("r", "q", True), "success")
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["asyncproc.receive", "asyncproc.attempt", "asyncproc.result"]
    for span in exporter.get_finished_spans():
        assert format(span.context.trace_id, "032x") == TRACE and format(span.parent.span_id, "016x") == PARENT
    attempt = exporter.get_finished_spans()[1]
    assert format(attempt.context.span_id, "016x") == span_id
    assert attempt.attributes["http.response.status_code"] == 503


def test_without_a_context_a_new_trace_starts(spans):
    tracer, exporter = spans
    headers = tracer.attempt_started(Request("r", NOW + 60, {}, "q", NOW), {})
    assert headers["traceparent"].startswith("00-")
    assert tracing.carrier_of(None, {"traceparent": 5}) == {}


def test_off_changes_nothing():
    off = tracing.load(False)
    headers = {"a": "b"}
    assert off.attempt_started(Request("r", NOW + 60, {}, "q", NOW), headers) is headers


def test_a_missing_exporter_is_named():
    assert "not installed" in tracing.exporter_problem({"OTEL_TRACES_EXPORTER": "zipkin-nope"})
    assert tracing.exporter_problem({"OTEL_TRACES_EXPORTER": "console"}) is None
