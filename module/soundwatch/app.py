"""The wiring: the only module that knows every stage.

source -> resample -> features -> model -> decision -> events -> sinks

:class:`Runtime` owns one pipeline run and its control plane
(:mod:`soundwatch.control`): commands from every channel (MQTT, the IoT Hub
twin and direct methods, the HTTP API) come in there, never through a sink.
The edges read what they need (health, the latest state, recent events)
through the runtime's typed methods; sinks get a :class:`SinkContext` and
publish.
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
from soundwatch.channels import Channel, open_channels
from soundwatch.config import Config, ConfigError, apply_patch
from soundwatch.control import ControlPlane
from soundwatch.decision import (
    AnomalyEnded,
    AnomalyStarted,
    DecisionConfigError,
    DecisionOutput,
    DecisionState,
    ModelClasses,
    NoveltyDecision,
    WindowResult,
    WindowState,
    learning_config,
)
from soundwatch.device_audio import DeviceAudioRing
from soundwatch.events import (
    Event,
    EventFactory,
    Message,
    SequenceCounter,
    SequenceError,
    State,
    to_wire,
)
from soundwatch.features import FeatureExtractor, FeatureSpec
from soundwatch.model import Classifier
from soundwatch.native_log import litert_banner_to_log
from soundwatch.resample import StreamResampler
from soundwatch.sinks import Sink, SinkContext, SinkKept, make_sink
from soundwatch.sources import Source, open_source
from soundwatch.stream_types import AudioBlock, SourceHealth
from soundwatch.unit_baseline import UnitBaseline, UnitBaselineError
from soundwatch.windowing import FeatureWindow, StreamingFeatures, hop_frames_for, window_level

logger = logging.getLogger(__name__)

Listener = Callable[[Message], None]
# How long the end of a source (a file run) waits for sinks to flush (MQTT acks, file fsync).
CLOSE_TIMEOUT_S = 10.0
# After a stop request (SIGTERM, Ctrl-C) the sinks get this long, together: the
# process must be gone within 3 s whatever the broker does (docker stop's grace
# is 10 s). What is not acknowledged by then stays in the outboxes.
STOP_CLOSE_TIMEOUT_S = 1.5
RECENT_EVENTS = 500
# Decided events waiting for a sequence number that can be persisted (a full
# state disk); beyond this the oldest is given up, counted and logged.
MAX_HELD_EVENTS = 1000


def apply_log_level(level: str) -> None:
    """Set soundwatch's own log level (the root logger's, e.g. from ``-v``, may say more)."""
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("soundwatch").setLevel(min(root, logging.getLevelName(level)))


@dataclass
class Stats:
    """Counters and per-stage timings, read by health and /metrics."""

    windows: int = 0
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    publish_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    # Per sink: events neither delivered nor stored for later (a run that had
    # any exits 1), and events stored to be sent after the next start.
    events_lost: collections.Counter[str] = field(default_factory=collections.Counter)
    events_kept: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_event_ids: set[str] = field(default_factory=set)  # lost by one sink or more
    # Decided events never numbered (no sequence number could be persisted).
    events_not_emitted: int = 0
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
        litert_banner_to_log(self.bundle.model_path)  # to logging, not bare to stderr
        self.classifier = Classifier(self.bundle, threads=config.model.threads)
        self.extractor = FeatureExtractor(self.bundle.spec)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # The unit's own normal (learned, then judged against); None when off.
        self.unit = (
            UnitBaseline(config.baseline, config.state_dir, self.bundle.model_version)
            if config.baseline.enabled
            else None
        )
        self.events = EventFactory.from_bundle(
            self.bundle,
            device_id=config.device_id,
            module_id=config.module_id,
            sequence=SequenceCounter(config.state_dir / "sequence"),
            baseline=self.unit is not None,
        )
        self.stats = Stats()
        self._lock = threading.Lock()
        self._classes = ModelClasses.from_bundle(self.bundle)
        try:
            self._decision, self._decision_generation = self._make_decision(config)
        except DecisionConfigError as e:
            raise ConfigError("<config>", [("decision.thresholds", None, str(e))]) from e
        self._features = self._make_features(config)
        self._latest_state: State | None = None
        self._recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self._held: collections.deque[AnomalyStarted | AnomalyEnded] = collections.deque()
        self._listeners: list[Listener] = []
        # What the edges beside the pipeline report about themselves (e.g. "http").
        self._edges: dict[str, Mapping[str, Any]] = {}
        self._running = False
        self._ended = False
        self.block_peak_dbfs = float("-inf")
        self.block_rms_dbfs = float("-inf")
        self.recorder = Recorder(config.record_dir) if config.record_dir else None
        self.source = source or open_source(config.source)
        context = SinkContext(
            origin=self.events.origin,
            class_names=self.bundle.class_names,
            health=self.health,
            latest_state=lambda: self._latest_state,
            baseline=self.unit is not None,
        )
        # Each sink is bound as soon as it is built, before its worker can have
        # connected: an MQTT sink then knows to announce itself only with a
        # state of this run. Its worker may ask for health() at once, before
        # the control plane and channels exist: health() allows for that.
        self.control: ControlPlane | None = None
        self.channels: list[Channel] = []
        if sinks is None:
            sinks = []
            for sink_config in config.sinks:
                sinks.append(make_sink(sink_config))
                sinks[-1].bind(context)
        else:
            for sink in sinks:
                sink.bind(context)
        self.sinks = sinks
        # Events the console sink prints are not logged again (once on a terminal).
        self._log_events = not any(s.type_name == "console" for s in self.sinks)
        self.control = ControlPlane(self)
        self.channels = open_channels(self.sinks, self.control)
        self.control.start()

    # --- what the edges use ------------------------------------------------

    @property
    def hop_s(self) -> float:
        return self._features.hop_s

    def describe_source(self) -> str:
        """The source for a person: its kind and what it reads (``mic: USB``, ``file: a.wav``)."""
        src = self.config.source
        if src.type == "file":
            what = Path(src.path).name
        elif src.type == "simulator":
            what = f"unit {src.unit}"
        else:
            what = "default device" if src.device is None else str(src.device)
        return f"{src.type}: {what}"

    def report_edge(self, name: str, status: Mapping[str, Any]) -> None:
        """Show an edge's own status (where the HTTP API listens, why not) in health."""
        self._edges[name] = dict(status)

    def add_listener(self, listener: Listener) -> None:
        """Called with every message (state and events) after it is built."""
        self._listeners.append(listener)

    @property
    def latest_state(self) -> State | None:
        return self._latest_state

    def recent_events(self, limit: int = 50, before_seq: int | None = None) -> list[Event]:
        """Newest first; ``before_seq`` pages backwards."""
        with self._lock:
            items = list(self._recent)
        items.reverse()
        if before_seq is not None:
            items = [e for e in items if e.seq < before_seq]
        return items[:limit]

    def apply_patch(self, patch: Mapping[str, Any], source: str = "<patch>") -> Config:
        """Validate and apply a live config change; all or nothing.

        Thresholds, confirmation, cooldown, enable/disable and the log level
        apply at the next window; a hop change restarts windowing (the
        decision state is kept). Every other key is read at start-up only and
        refused here (:data:`soundwatch.config.LIVE_KEYS`). Raises
        :class:`ConfigError`.
        """
        new = apply_patch(self.config, patch, source)
        with self._lock:
            if new.decision != self.config.decision or new.baseline != self.config.baseline:
                try:
                    self._reconfigure_decision(new)
                except DecisionConfigError as e:
                    raise ConfigError(source, [("decision.thresholds", None, str(e))]) from e
            if self.unit is not None and new.baseline != self.config.baseline:
                self.unit.reconfigure(new.baseline)
            if new.window != self.config.window:
                self._features = self._make_features(new)
            if new.log_level != self.config.log_level:
                apply_log_level(new.log_level)
            self.config = new
        logger.info("config patch applied from %s", source)
        return new

    def model_info(self) -> dict[str, Any]:
        """The bundle's description, without its training metrics and provenance."""
        info = self.bundle.info()
        return {k: v for k, v in info.items() if k not in ("metrics", "provenance")}

    def counters(self) -> dict[str, Any]:
        return {
            "windows": self.stats.windows,
            "events": dict(self.stats.events),
            "publish_failures": dict(self.stats.publish_failures),
        }

    def health(self) -> dict[str, Any]:
        src: SourceHealth = self.source.health()
        sinks = {s.name: s.health() for s in self.sinks}
        # A sink that cannot reach its broker keeps events in its outbox, so
        # the module is still doing its job: that is "degraded", not unhealthy
        # (an orchestrator restarting us would not bring the broker back).
        sinks_ok = all(h.get("healthy", True) for h in sinks.values())
        # Events waiting for a sequence number are not going out: unhealthy.
        healthy = src.healthy and not (self._ended and self._running) and not self._held
        return {
            "healthy": healthy,
            "degraded": not sinks_ok,
            "sequence": {
                "error": self.events.sequence_error,
                "held_events": len(self._held),
            },
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
            "control": {
                **(self.control.health() if self.control is not None else {"state": "starting"}),
                "channels": {c.name: c.health() for c in self.channels},
            },
            "baseline": self.unit.health() if self.unit is not None else {"state": "off"},
            **{name: dict(status) for name, status in self._edges.items()},
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
            if self.unit is not None:
                self.unit.close()  # keeps what was learned
            with self._lock:
                closing = self._decision.finish()
            for out in closing:
                self._emit(out)
            self._give_up_held()
            last = self._latest_state
            if last is not None and last.active_class is not None:
                # Dashboards keep the last retained state: it must not show an
                # anomaly that this process has just closed.
                self._latest_state = self.events.ended(last)
                self._publish(self._latest_state)
            self._ended = True
            self._close_sinks(STOP_CLOSE_TIMEOUT_S if stop.is_set() else CLOSE_TIMEOUT_S)
            self._running = False
        return self._report_delivery()

    def _report_delivery(self) -> int:
        """Log what could not be delivered or stored; 1 if anything, else 0."""
        stats = self.stats
        emitted = sum(stats.events.values())
        with self._lock:
            lost = len(stats.lost_event_ids)
        for sink, n in sorted(stats.events_kept.items()):
            logger.warning(
                "%s: %d event(s) not yet delivered wait in its outbox for the next start", sink, n
            )
        if not lost and not stats.events_not_emitted:
            return 0
        per_sink = ", ".join(f"{name}: {n}" for name, n in sorted(stats.events_lost.items()))
        logger.error(
            "%d of %d event(s) could not be delivered or stored%s%s",
            lost,
            emitted,
            f" ({per_sink})" if per_sink else "",
            f"; {stats.events_not_emitted} decided event(s) were never emitted (no sequence "
            "number could be persisted)"
            if stats.events_not_emitted
            else "",
        )
        return 1

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
                self._emit(out)
        t0 = time.perf_counter()
        windows = self._features.push(block)
        self.stats.observe("features", time.perf_counter() - t0)
        for window in windows:
            self._on_window(window)

    def _on_window(self, window: FeatureWindow) -> None:
        t0 = time.perf_counter()
        prediction = self.classifier.predict(window.features)
        t1 = time.perf_counter()
        self.stats.observe("inference", t1 - t0)
        # A window the model cannot judge keeps its class probabilities only
        # in proportion: what is unknown votes for no fault.
        probabilities = prediction.distribution[:-1]
        with self._lock:
            verdict = None
            closing = self._follow_baseline()  # dropped by a command since the last window
            if self.unit is not None:
                decision = self._decision
                # While learning, a fault the classifier has confirmed is not
                # learned as this unit's normal (nor the windows that led to it).
                fault = (
                    decision.current.active_class if isinstance(decision, DecisionState) else None
                )
                verdict = self.unit.observe(window, fault)
            result = WindowResult(
                index=window.index,
                start_s=window.start_s,
                end_s=window.end_s,
                probabilities=probabilities,
                level=window.level,
                captured_at=window.captured_at,
                no_verdict=window.features.quality.problem,
                baseline=verdict,
            )
            closing += self._follow_baseline()  # learned with this window
            outputs = [*closing, *self._decision.update(result)]
            enabled = self.config.decision.enabled
        self.stats.observe("decision", time.perf_counter() - t1)
        self.stats.windows += 1
        self._release_held()
        for out in outputs:
            message = self._build(out)
            if message is None:  # held until it can be numbered
                continue
            if isinstance(message, State):
                self._latest_state = message
            elif not enabled:
                continue
            elif message.kind == "anomaly_started" and self.recorder is not None:
                self.recorder.save(window, message)
            self._publish(message)

    def _emit(self, out: DecisionOutput) -> None:
        message = self._build(out)
        if message is not None:
            self._publish(message)

    def _build(self, out: DecisionOutput) -> Message | None:
        """The message for ``out``; ``None`` when the event waits for a sequence number.

        Events keep their order: one decided while others wait, waits behind them.
        """
        if isinstance(out, WindowState):
            return self.events.build(out)
        if not self._held:
            try:
                return self.events.build(out)
            except SequenceError as e:
                logger.error("event held, not emitted yet: %s", e)
        if len(self._held) >= MAX_HELD_EVENTS:
            self._give_up(self._held.popleft(), f"more than {MAX_HELD_EVENTS} events wait")
        self._held.append(out)
        return None

    def _release_held(self) -> None:
        """Number and publish the waiting events, in order, while numbers can be had."""
        while self._held:
            try:
                event = self.events.build(self._held[0])
            except SequenceError:
                return
            self._held.popleft()
            logger.warning("held event emitted as #%d (%d still held)", event.seq, len(self._held))
            self._publish(event)

    def _give_up_held(self) -> None:
        """At the end of a run: a last try, then every event still waiting is reported lost."""
        self._release_held()
        error = self.events.sequence_error or "no sequence number"
        while self._held:
            self._give_up(self._held.popleft(), error)

    def _give_up(self, out: AnomalyStarted | AnomalyEnded, why: str) -> None:
        self.stats.events_not_emitted += 1
        logger.error(
            "event NOT emitted: %s %s, stream %.1f-%.1f s (%s)",
            type(out).__name__,
            out.class_name,
            out.stream_start_s,
            out.stream_end_s,
            why,
        )

    # --- the unit's baseline -----------------------------------------------------

    def _make_decision(self, config: Config) -> tuple[DecisionState | NoveltyDecision, int]:
        """The decision that fits the baseline's state: the classifier alone (baseline
        off), the classifier at strict thresholds (learning), or the novelty."""
        unit = self.unit
        if unit is None:
            return DecisionState(config.decision, self._classes), 0
        if unit.learning:
            strict = learning_config(config.decision, config.baseline, self._classes)
            return DecisionState(strict, self._classes), unit.generation
        return NoveltyDecision(config.decision, config.baseline, self._classes), unit.generation

    def _reconfigure_decision(self, config: Config) -> None:
        decision = self._decision
        if isinstance(decision, NoveltyDecision):
            decision.reconfigure(config.decision, config.baseline)
        elif self.unit is not None:
            decision.reconfigure(learning_config(config.decision, config.baseline, self._classes))
        else:
            decision.reconfigure(config.decision)

    def _follow_baseline(self) -> list[DecisionOutput]:
        """When the baseline appeared or was dropped: decide the other way from now on.

        The old decision closes like a source gap (an active anomaly ends with
        reason ``reset``). Called with the lock held.
        """
        if self.unit is None or self.unit.generation == self._decision_generation:
            return []
        closing = self._decision.reset()
        self._decision, self._decision_generation = self._make_decision(self.config)
        logger.info(
            "deciding %s from now on",
            "on the classifier alone, at strict thresholds, while the unit's baseline is learned"
            if self.unit.learning
            else "on the unit's baseline (novelty), naming faults with the classifier",
        )
        return list(closing)

    def relearn_baseline(self, origin: str) -> dict[str, Any]:
        """Drop the unit's baseline and learn it again (the next window decides strictly)."""
        return self._unit().relearn(origin)

    def mark_false_alarm(self, seq: int, origin: str) -> dict[str, Any]:
        """Add the windows of anomaly event ``seq`` to the unit's baseline.

        Raises :class:`UnitBaselineError` when the baseline is off or not
        learned yet, or the event is unknown or too old.
        """
        unit = self._unit()
        unit.require_baseline()
        with self._lock:
            events = list(self._recent)
            current = self._decision.current
            last_index = current.last_window_index
        event = next((e for e in events if e.seq == seq), None)
        if event is None:
            raise UnitBaselineError(
                f"no anomaly event #{seq} among the last {len(events)} events of this run "
                "(getRecentEvents lists them)",
                "seq",
            )
        first, last = event.first_window_index, event.last_window_index
        anomaly_id = event.event_id if event.ending is None else event.ending.started_event_id
        # The whole anomaly: through its end, or through now while it lasts.
        ended = next(
            (e for e in events if e.ending is not None and e.ending.started_event_id == anomaly_id),
            None,
        )
        if ended is not None:
            first, last = ended.first_window_index, ended.last_window_index
        elif current.anomaly_id == anomaly_id and last_index is not None:
            last = last_index
        data = unit.mark_false_alarm(first, last, f"event #{seq}", origin)
        return {"seq": seq, "anomaly_id": anomaly_id, **data}

    def _unit(self) -> UnitBaseline:
        if self.unit is None:
            raise UnitBaselineError(
                "the per-unit baseline is off: set baseline.enabled: true and restart",
                "baseline.enabled",
            )
        return self.unit

    def _publish(self, message: Message) -> None:
        if isinstance(message, Event):
            self.stats.events[f"{message.kind}:{message.class_name}"] += 1
            with self._lock:
                self._recent.append(message)
            if self._log_events:
                logger.info(
                    "event #%d %s %s (p_max %.2f, stream %.1f-%.1f s)",
                    message.seq,
                    message.kind,
                    message.class_name,
                    message.probability_max,
                    message.stream_start_s,
                    message.stream_end_s,
                )
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # a view must never stop the pipeline
                logger.exception("listener failed")
        event_id = message.event_id if isinstance(message, Event) else None
        for sink in self.sinks:
            future = sink.publish(message)
            future.add_done_callback(
                functools.partial(self._on_delivery, sink_name=sink.name, event_id=event_id)
            )

    def _on_delivery(self, future: Future[None], *, sink_name: str, event_id: str | None) -> None:
        error = future.exception()
        if error is None:
            return
        if isinstance(error, SinkKept):  # stored durably, sent after the next start
            self.stats.events_kept[sink_name] += 1
            return
        self.stats.publish_failures[sink_name] += 1
        if event_id is not None:
            self.stats.events_lost[sink_name] += 1
            with self._lock:
                self.stats.lost_event_ids.add(event_id)
        logger.error("sink %s failed to deliver a message: %s", sink_name, error)

    def _close_sinks(self, timeout_s: float) -> None:
        """Close the channels, the control plane and the sinks, within about ``timeout_s``.

        The sinks close side by side, each with the whole budget, so one
        whose destination hangs does not eat another's time.
        """
        deadline = time.monotonic() + timeout_s
        # Commands first: a channel answers through its sink's connection.
        for channel in self.channels:
            try:
                channel.close()
            except Exception:
                logger.exception("closing the command channel of %s failed", channel.name)
        if self.control is not None:
            self.control.close(min(5.0, timeout_s / 2))
        closers = [
            threading.Thread(
                target=self._close_sink, args=(sink, timeout_s), name=f"close-{sink.name}"
            )
            for sink in self.sinks
        ]
        for closer in closers:
            closer.daemon = True
            closer.start()
        for closer in closers:
            # The sinks keep to the budget themselves; the margin is for their last steps.
            closer.join(max(deadline - time.monotonic(), 0.0) + 0.5)
            if closer.is_alive():
                logger.error("%s did not finish in time; leaving it", closer.name)

    @staticmethod
    def _close_sink(sink: Sink, timeout_s: float) -> None:
        try:
            sink.close(timeout_s)
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
        # Set by the bench mic mode: the device's own audio is saved beside the model's.
        self.device_audio: DeviceAudioRing | None = None

    def save(self, window: FeatureWindow, event: Event) -> Path | None:
        if window.samples is None:
            return None
        stem = f"{event.seq:08d}_{event.class_name}_{window.start_s:.1f}s"
        path = self.directory / f"{stem}.wav"
        try:
            sf.write(path, window.samples, window.sample_rate_hz, subtype="PCM_16")
            self._save_device_audio(window, self.directory / f"{stem}.device.wav")
            doc = json.dumps(to_wire(event), indent=2) + "\n"
            (self.directory / f"{stem}.json").write_text(doc, encoding="utf-8")
        except (OSError, sf.LibsndfileError) as e:  # a full disk must not stop detection
            logger.error("could not record %s: %s", path, e)
            return None
        logger.info("recorded event window to %s", path)
        return path

    def _save_device_audio(self, window: FeatureWindow, path: Path) -> None:
        if self.device_audio is None:
            return
        audio = self.device_audio.segment(window.start_s, window.end_s)
        if audio is None:
            logger.warning("the device audio of %s is no longer buffered", path.name)
            return
        subtype = "PCM_16" if audio.samples.dtype == np.int16 else "FLOAT"
        sf.write(path, audio.samples, audio.rate_hz, subtype=subtype)


def _with_discontinuity(block: AudioBlock) -> AudioBlock:
    return AudioBlock(
        block.samples, block.start_sample, block.sample_rate_hz, True, block.captured_at
    )
