"""The wiring: the only module that knows every stage.

source -> resample -> features -> model -> decision -> events -> sinks

:class:`Runtime` owns one pipeline run. It exposes what the edges need
(health, the latest state, recent events, live config patches) to the HTTP
API, the MQTT command topic, the IoT Hub twin and the mic test view, which
all go through it rather than reaching into stages.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from soundwatch.bundle import Bundle, load_bundle
from soundwatch.config import Config, ConfigError, apply_patch
from soundwatch.decision import DecisionConfig, DecisionConfigError, DecisionState, WindowResult
from soundwatch.events import EventFactory, SequenceCounter
from soundwatch.features import FeatureExtractor, FeatureSpec
from soundwatch.model import Classifier
from soundwatch.resample import StreamResampler
from soundwatch.sinks import Sink, make_sink
from soundwatch.sources import Source, open_source
from soundwatch.stream_types import AudioBlock, SourceHealth
from soundwatch.windowing import FeatureWindow, StreamingFeatures, hop_frames_for, window_level

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]
# How long shutdown waits for sinks to flush (MQTT acks, file fsync).
CLOSE_TIMEOUT_S = 10.0
RECENT_EVENTS = 500


def decision_config(config: Config, bundle: Bundle) -> DecisionConfig:
    """Thresholds: the config's per-class values, else the bundle's defaults."""
    d = config.decision
    on = {c: float(v) for c, v in bundle.thresholds.items() if c != "normal"}
    off = {c: max(0.0, round(v - 0.2, 3)) for c, v in on.items()}
    for name, t in d.thresholds.items():
        on[name], off[name] = t.on, t.off
    return DecisionConfig(
        class_names=bundle.class_names,
        normal_class=next((c.name for c in bundle.classes if not c.anomaly), "normal"),
        on_threshold=on,
        off_threshold=off,
        confirm_k=d.confirm_k,
        confirm_n=d.confirm_n,
        cooldown_s=d.cooldown_s,
        warmup_windows=d.warmup_windows,
    )


@dataclass
class Stats:
    """Counters and per-stage timings, read by health and /metrics."""

    windows: int = 0
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    publish_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    stage_seconds: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    started_at: float = field(default_factory=time.time)
    # Called with every timing, in the pipeline thread (e.g. /metrics
    # histograms, which need every observation, not the rolling window).
    observers: list[Callable[[str, float], None]] = field(default_factory=list)

    def observe(self, stage: str, seconds: float) -> None:
        samples = self.stage_seconds[stage]
        samples.append(seconds)
        if len(samples) > 1000:  # a rolling window is enough for p50/p95
            del samples[:500]
        for observer in self.observers:
            try:
                observer(stage, seconds)
            except Exception:  # instrumentation must never stop the pipeline
                logger.exception("stage observer failed")


class Runtime:
    """One run of the module: builds the stages from config and drives them."""

    def __init__(
        self,
        config: Config,
        *,
        bundle: Bundle | None = None,
        source: Source | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle or load_bundle(config.model.bundle)
        self.classifier = Classifier(self.bundle, threads=config.model.threads)
        self.extractor = FeatureExtractor(self.bundle.spec)
        self.source = source or _make_source(config)
        self.sinks = (
            sinks if sinks is not None else [make_sink(s.model_dump()) for s in config.sinks]
        )
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventFactory.from_bundle(
            self.bundle,
            device_id=config.device_id,
            module_id=config.module_id,
            sequence=SequenceCounter(config.state_dir / "sequence"),
        )
        self.stats = Stats()
        self._lock = threading.Lock()
        try:
            self._decision = DecisionState(decision_config(config, self.bundle))
        except DecisionConfigError as e:
            raise ConfigError("<config>", [("decision", None, str(e))]) from e
        self._features = self._make_features(config)
        self._latest_state: dict[str, Any] | None = None
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._listeners: list[Listener] = []
        self._pending: set[Future[None]] = set()
        self._running = False
        self._ended = False
        self.block_peak_dbfs = float("-inf")
        self.block_rms_dbfs = float("-inf")
        self.recorder = Recorder(config.record_dir) if config.record_dir else None
        # Sinks that also take commands or report health (MQTT `set`, the IoT
        # Hub twin and direct methods) get the runtime through `attach`.
        for sink in self.sinks:
            attach = getattr(sink, "attach", None)
            if callable(attach):
                attach(self)

    # --- what the edges use ------------------------------------------------

    @property
    def hop_s(self) -> float:
        return self._features.hop_s

    def add_listener(self, listener: Listener) -> None:
        """Called with every message (state and events) after it is built."""
        self._listeners.append(listener)

    @property
    def latest_state(self) -> dict[str, Any] | None:
        return self._latest_state

    def recent_events(self, limit: int = 50, before_seq: int | None = None) -> list[dict[str, Any]]:
        """Newest first; ``before_seq`` pages backwards."""
        with self._lock:
            items = list(self._recent)
        items.reverse()
        if before_seq is not None:
            items = [e for e in items if e.get("seq", 0) < before_seq]
        return items[:limit]

    def apply_patch(self, patch: Mapping[str, Any], source: str = "<patch>") -> Config:
        """Validate and apply a live config change; all or nothing.

        Thresholds, confirmation, cooldown and enable/disable apply at the next
        window; a hop change restarts windowing (the decision state is kept).
        Source, model and sinks need a restart and are refused here.
        """
        new = apply_patch(self.config, patch, source)
        for key in ("source", "model", "sinks", "state_dir", "device_id", "module_id"):
            if getattr(new, key) != getattr(self.config, key):
                raise ConfigError(source, [(key, None, "cannot change while running; restart")])
        try:
            decision = decision_config(new, self.bundle)
        except DecisionConfigError as e:
            raise ConfigError(source, [("decision", None, str(e))]) from e
        with self._lock:
            if new.decision != self.config.decision:
                self._decision.reconfigure(decision)
            if new.window != self.config.window:
                self._features = self._make_features(new)
            self.config = new
        logger.info("config patch applied from %s", source)
        return new

    def health(self) -> dict[str, Any]:
        src: SourceHealth = self.source.health()
        sinks = {s.name: s.health() for s in self.sinks}
        # A sink that cannot reach its broker keeps events in its outbox, so
        # the module is still doing its job: that is "degraded", not unhealthy
        # (an orchestrator restarting us would not bring the broker back).
        sinks_ok = all(h.get("healthy", True) for h in sinks.values())
        healthy = src.healthy and not (self._ended and self._running)
        return {
            "healthy": healthy,
            "degraded": not sinks_ok,
            "source": {
                "healthy": src.healthy,
                "state": src.state,
                "detail": src.detail,
                "device": src.device,
                "device_rate_hz": src.device_rate_hz,
                "overflows": src.overflows,
                "reopens": src.reopens,
            },
            "model": {
                "healthy": True,
                "version": self.bundle.model_version,
                "backend": self.classifier.backend,
            },
            "sinks": sinks,
            "windows": self.stats.windows,
            "events": dict(self.stats.events),
            "uptime_s": round(time.time() - self.stats.started_at, 1),
        }

    # --- the pipeline ------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Drive the pipeline until the source ends or ``stop`` is set.

        Always closes the decision (pending anomalies end with an event) and
        flushes and closes the sinks. Returns a process exit code.
        """
        self._running = True
        resampler: ResampleChain | None = None
        try:
            for block in self.source.blocks(stop):
                if resampler is None or resampler.in_rate_hz != block.sample_rate_hz:
                    if resampler is not None:
                        logger.info("source rate changed to %d Hz", block.sample_rate_hz)
                        block = _with_discontinuity(block)
                    resampler = ResampleChain(block.sample_rate_hz, self.bundle.spec)
                self._process(resampler.process(block))
            if resampler is not None:
                self._process(resampler.flush())
        finally:
            with self._lock:
                closing = self._decision.finish()
            for out in closing:
                self._publish(self.events.build(out))
            self._ended = True
            self._close_sinks()
            self._running = False
        return 0

    def _make_features(self, config: Config) -> StreamingFeatures:
        spec = self.bundle.spec
        return StreamingFeatures(
            self.extractor,
            window_s=config.window.window_s,
            hop_frames=hop_frames_for(config.window.hop_s, spec.sample_rate_hz, spec.hop_length),
            silence_rms_dbfs=config.window.silence_rms_dbfs,
        )

    def _process(self, block: AudioBlock) -> None:
        if block.samples.size:
            level = window_level(block.samples, self.config.window.silence_rms_dbfs)
            self.block_peak_dbfs, self.block_rms_dbfs = level.peak_dbfs, level.rms_dbfs
        if block.discontinuity:
            with self._lock:
                closing = self._decision.reset()
            for out in closing:
                self._publish(self.events.build(out))
        t0 = time.perf_counter()
        windows = self._features.push(block)
        self.stats.observe("features", time.perf_counter() - t0)
        for window in windows:
            self._on_window(window)

    def _on_window(self, window: FeatureWindow) -> None:
        t0 = time.perf_counter()
        probs = self.classifier.predict(window.features)
        t1 = time.perf_counter()
        self.stats.observe("inference", t1 - t0)
        result = WindowResult(
            index=window.index,
            start_s=window.start_s,
            end_s=window.end_s,
            probabilities=tuple(float(p) for p in probs),
            level=window.level,
            captured_at=window.captured_at,
        )
        with self._lock:
            outputs = self._decision.update(result)
            enabled = self.config.decision.enabled
        self.stats.observe("decision", time.perf_counter() - t1)
        self.stats.windows += 1
        for out in outputs:
            message = self.events.build(out)
            if message["type"] == "state":
                self._latest_state = message
            elif not enabled:
                continue
            elif message["type"] == "anomaly_started" and self.recorder is not None:
                self.recorder.save(window, message)
            self._publish(message)

    def _publish(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind != "state":
            self.stats.events[f"{kind}:{message.get('class')}"] += 1
            with self._lock:
                self._recent.append(message)
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # a view must never stop the pipeline
                logger.exception("listener failed")
        for sink in self.sinks:
            future = sink.publish(message)
            future.add_done_callback(functools.partial(self._on_delivery, sink_name=sink.name))

    def _on_delivery(self, future: Future[None], *, sink_name: str) -> None:
        error = future.exception()
        if error is not None:
            self.stats.publish_failures[sink_name] += 1
            logger.error("sink %s failed to deliver a message: %s", sink_name, error)

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close(CLOSE_TIMEOUT_S)
            except Exception:
                logger.exception("closing sink %s failed", sink.name)


class ResampleChain:
    """Source rate -> (training rate, when the source is faster) -> model rate."""

    def __init__(self, in_rate_hz: int, spec: FeatureSpec) -> None:
        self.in_rate_hz = in_rate_hz
        via = spec.via_rate_hz(in_rate_hz)
        rates = [in_rate_hz, *([via] if via else []), spec.sample_rate_hz]
        self._stages = [StreamResampler(a, b) for a, b in itertools.pairwise(rates)]

    def process(self, block: AudioBlock) -> AudioBlock:
        for stage in self._stages:
            block = stage.process(block)
        return block

    def flush(self) -> AudioBlock:
        block = self._stages[0].flush()
        for stage in self._stages[1:]:
            block = stage.process(block)
            tail = stage.flush()
            block = AudioBlock(
                np.concatenate([block.samples, tail.samples]),
                block.start_sample,
                block.sample_rate_hz,
                block.discontinuity,
                block.captured_at,
            )
        return block


class Recorder:
    """Saves the windows that started anomalies as WAV files plus the event JSON."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, window: FeatureWindow, event: Mapping[str, Any]) -> Path | None:
        if window.samples is None:
            return None
        stem = f"{event.get('seq', 0):08d}_{event.get('class')}_{window.start_s:.1f}s"
        path = self.directory / f"{stem}.wav"
        try:
            sf.write(path, window.samples, window.sample_rate_hz, subtype="PCM_16")
            (self.directory / f"{stem}.json").write_text(json.dumps(event, indent=2) + "\n")
        except (OSError, sf.LibsndfileError) as e:  # a full disk must not stop detection
            logger.error("could not record %s: %s", path, e)
            return None
        logger.info("recorded event window to %s", path)
        return path


def _with_discontinuity(block: AudioBlock) -> AudioBlock:
    return AudioBlock(
        block.samples, block.start_sample, block.sample_rate_hz, True, block.captured_at
    )


def _make_source(config: Config) -> Source:
    return open_source(config.source.type, **config.source.model_dump())
