"""Optional OpenTelemetry tracing: one span per request with the routing decision as attributes.

OpenTelemetry is not a dependency (extra `otel`); `tracing.enabled` without it installed is a config
error at start. Without `otlp_endpoint` the spans go to the global tracer provider, which the standard
OTEL_* environment variables (or the host application) configure.
"""

from __future__ import annotations

from typing import Any

from serving.config import ConfigError, TracingConfig


class Span:
    """A span that may be absent (tracing off): every method is then a no-op."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            for key, value in attributes.items():
                if value is not None:
                    self._span.set_attribute(f"moerge.{key}", value)

    def end(self, status: int) -> None:
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()
        self._span = None


class Tracer:
    def __init__(self, config: TracingConfig) -> None:
        self._tracer: Any = None
        if not config.enabled:
            return
        try:
            from opentelemetry import trace
        except ImportError:
            raise ConfigError(
                "tracing.enabled: the opentelemetry packages are not installed (pip install 'moerge[otel]')"
            ) from None
        provider = None
        if config.otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
            except ImportError:
                raise ConfigError(
                    "tracing.otlp_endpoint: needs opentelemetry-sdk and the OTLP/HTTP exporter "
                    "(pip install 'moerge[otel]')"
                ) from None
            provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        self._tracer = trace.get_tracer("moerge.serving", tracer_provider=provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, name: str, **attributes: Any) -> Span:
        if self._tracer is None:
            return Span()
        span = Span(self._tracer.start_span(name))
        span.set(**attributes)
        return span
