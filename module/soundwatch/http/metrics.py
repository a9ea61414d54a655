"""``GET /metrics``: Prometheus exposition of the pipeline and of the API.

The pipeline knows nothing of Prometheus. Its counters live in
:class:`soundwatch.app.Stats` and :meth:`soundwatch.app.Runtime.health`; a
custom collector reads them at scrape time, so a scrape costs nothing
between scrapes and cannot disturb the audio thread. Only the per-stage
latency histograms need every observation as it happens: they hang off
``Stats.observers``, a callback the pipeline calls after each timing.

Every :class:`ApiMetrics` has its own registry, so several servers (tests,
``serve`` beside ``run``) never collide on the process-wide default one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.bundle import Bundle

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Pipeline stages take from well under a millisecond (decision) to tens of
# milliseconds (features on a slow ARM board); uploads add decoding.
STAGE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
REQUEST_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RuntimeCollector:
    """Reads the running pipeline's counters and health at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        stats = self.runtime.stats
        health = self.runtime.health()

        yield GaugeMetricFamily(
            "soundwatch_healthy",
            "1 when the module reports itself healthy (as GET /health)",
            value=1.0 if health.get("healthy") else 0.0,
        )
        yield CounterMetricFamily(
            "soundwatch_windows_processed",
            "Analysis windows classified by the pipeline",
            value=stats.windows,
        )

        events = CounterMetricFamily(
            "soundwatch_events",
            "Anomaly events built, by event type and class",
            labels=["type", "class"],
        )
        for key, count in sorted(stats.events.items()):
            kind, _, name = key.partition(":")
            events.add_metric([kind, name], count)
        yield events

        failures = CounterMetricFamily(
            "soundwatch_publish_failures",
            "Messages a sink failed to deliver, by sink",
            labels=["sink"],
        )
        for sink, count in sorted(stats.publish_failures.items()):
            failures.add_metric([sink], count)
        yield failures

        source = health.get("source") or {}
        yield CounterMetricFamily(
            "soundwatch_source_overflows",
            "Capture blocks dropped because the pipeline fell behind",
            value=int(source.get("overflows") or 0),
        )
        yield CounterMetricFamily(
            "soundwatch_source_reopens",
            "Times the audio source was reopened after a fault",
            value=int(source.get("reopens") or 0),
        )
        yield GaugeMetricFamily(
            "soundwatch_source_healthy",
            "1 when the audio source delivers audio",
            value=1.0 if source.get("healthy") else 0.0,
        )

        sinks: Mapping[str, Mapping[str, Any]] = health.get("sinks") or {}
        sink_healthy = GaugeMetricFamily(
            "soundwatch_sink_healthy", "1 when the sink is healthy", labels=["sink"]
        )
        depth = GaugeMetricFamily(
            "soundwatch_outbox_depth",
            "Messages waiting in a sink's outbox for the broker's acknowledgement",
            labels=["sink"],
        )
        for sink_name, sink_health in sorted(sinks.items()):
            ok = sink_health.get("healthy", True)
            sink_healthy.add_metric([sink_name], 1.0 if ok else 0.0)
            value = sink_health.get("outbox_depth")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                depth.add_metric([sink_name], float(value))
        yield sink_healthy
        yield depth

        level = GaugeMetricFamily(
            "soundwatch_block_level_dbfs",
            "Level of the last audio block, in dBFS (-Inf: silent, or no audio yet)",
            labels=["kind"],
        )
        for kind, value in (
            ("peak", self.runtime.block_peak_dbfs),
            ("rms", self.runtime.block_rms_dbfs),
        ):
            level.add_metric([kind], value if not math.isnan(value) else float("-inf"))
        yield level

        yield GaugeMetricFamily(
            "soundwatch_uptime_seconds",
            "Seconds since the pipeline was built",
            value=float(health.get("uptime_s") or 0.0),
        )


class _ModelCollector:
    """``soundwatch_model_info``: which model answers, as labels on a constant 1."""

    def __init__(self, bundle: Bundle, backend: str, mode: str) -> None:
        self.labels = {
            "name": bundle.name,
            "version": bundle.version,
            "backend": backend,
            "mode": mode,
        }

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("soundwatch_model", "The model bundle this module serves")
        info.add_metric([], self.labels)
        yield info


class ApiMetrics:
    """The registry behind ``/metrics``, and the instruments the API updates."""

    def __init__(self, bundle: Bundle, backend: str, runtime: Runtime | None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        mode = "run" if runtime is not None else "serve"
        self.registry.register(_ModelCollector(bundle, backend, mode))
        # CPU, memory and open files of this process: on an edge box these are
        # the first things to look at when the module misbehaves.
        ProcessCollector(registry=self.registry)

        self.stage_seconds = Histogram(
            "soundwatch_stage_seconds",
            "Pipeline stage latency per call (features per audio block; inference and "
            "decision per window)",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.requests = Counter(
            "soundwatch_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "soundwatch_http_request_seconds",
            "HTTP request handling time, by route",
            ["route"],
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self.uploads = Counter(
            "soundwatch_http_classifications",
            "Uploaded clips classified, by the winning class",
            ["label"],
            registry=self.registry,
        )
        self.upload_stage_seconds = Histogram(
            "soundwatch_http_classify_stage_seconds",
            "Stage latency of uploaded clips (decode, features, inference)",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.pool_wait_seconds = Histogram(
            "soundwatch_http_classifier_wait_seconds",
            "Time an upload waited for a free classifier",
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        if runtime is not None:
            self.registry.register(RuntimeCollector(runtime))
            runtime.stats.observers.append(self.observe_stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_classification(self, label: str, timing_ms: Mapping[str, float]) -> None:
        self.uploads.labels(label).inc()
        for stage, ms in timing_ms.items():
            self.upload_stage_seconds.labels(stage).observe(ms / 1e3)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def detach(self, runtime: Runtime | None) -> None:
        """Stop observing ``runtime`` (the server is going away, the pipeline may not)."""
        if runtime is None:
            return
        observers = runtime.stats.observers
        if self.observe_stage in observers:
            observers.remove(self.observe_stage)
