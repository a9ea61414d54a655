"""soundwatch's configuration: one schema, validated at the edge.

Sources of configuration, later ones winning:
1. the schema's defaults (documented in ``config/default.yaml``);
2. a YAML file (``--config``), with ``${VAR}`` / ``${VAR:-default}``
   substituted from the environment (use this for secrets);
3. ``SOUNDWATCH__SECTION__KEY=value`` environment overrides;
4. command-line shortcuts (``--source``, ``--hop``, ``--sink``...).

Every error names the key path and, when it came from the file, the line.
IoT Hub desired properties and MQTT ``set`` patches are the same schema
arriving another way (:func:`apply_patch`).
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from soundwatch.config.yamlsrc import (
    MAX_CONFIG_BYTES,
    ConfigSyntaxError,
    Located,
    apply_env_overrides,
    decode_config,
    line_of,
    parse_yaml,
    substitute_env,
)

__all__ = [
    "LIVE_KEYS",
    "BaselineConfig",
    "Config",
    "ConfigError",
    "apply_patch",
    "changed_keys",
    "is_live_key",
    "load_config",
]


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` lists ``(key path, line, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [
            f"{source}:{line}: {key}: {msg}" if line else f"{source}: {key}: {msg}"
            for key, line, msg in problems
        ]
        super().__init__("invalid configuration\n  " + "\n  ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --- sources -----------------------------------------------------------------


class MicSourceConfig(_Strict):
    type: Literal["mic"] = "mic"
    device: str | int | None = Field(
        None, description="device name substring or index; null = system default"
    )
    block_s: float = Field(0.1, gt=0, le=2, description="capture block length")
    preferred_rates_hz: tuple[Annotated[int, Field(ge=1000, le=768_000)], ...] = Field(
        (48000, 44100, 22050, 16000), min_length=1, description="rates to probe, in order"
    )
    watchdog_s: float = Field(5.0, gt=0, le=600, description="no samples for this long = unhealthy")
    flatline_s: float = Field(
        10.0, gt=0, le=3600, description="constant signal for this long = unhealthy"
    )
    queue_blocks: int = Field(100, ge=2, le=10_000, description="capture queue bound (blocks)")
    overflow_storm_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="blocks lost faster than the device makes them for this long = unhealthy",
    )


class FileSourceConfig(_Strict):
    type: Literal["file"] = "file"
    path: Path
    loop: bool = False
    realtime: bool = Field(False, description="pace at real time instead of as fast as possible")
    speed: float = Field(
        1.0, gt=0, le=1000, description="with realtime: play this many times faster (drills)"
    )
    block_s: float = Field(0.1, gt=0, le=10)


class SimulatorSourceConfig(_Strict):
    type: Literal["simulator"] = "simulator"
    schedule: str = Field(
        "normal:20,imbalance:20,normal:15,clogging:20,normal:15,voltage_change:20",
        description="class:seconds,... played in a loop",
    )
    unit: int = Field(
        7, ge=0, le=999, description="simulated fan unit id (odd ids: units no model trained on)"
    )
    snr_db: float = Field(6.0, ge=-20, le=40)
    seed: int = 0
    rate_hz: int = Field(48000, ge=8000, le=192000)
    realtime: bool = True
    loop: bool = True
    block_s: float = Field(0.1, gt=0, le=10)
    ramp_s: float = Field(2.0, ge=0.02, le=30, description="how long a change of state takes")
    events_per_min: float = Field(
        0.0, ge=0, le=30, description="background events (knocks, beeper, truck, ...) per minute"
    )

    @field_validator("schedule")
    @classmethod
    def _schedule_ok(cls, v: str) -> str:
        from soundwatch.sim.fan import STATES

        for part in v.split(","):
            name, _, secs = part.strip().partition(":")
            if name not in STATES:
                raise ValueError(f"unknown state {name!r} in schedule (one of {', '.join(STATES)})")
            try:
                if float(secs) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"schedule item {part!r}: seconds must be a positive number"
                ) from None
        return v


SourceConfig = Annotated[
    MicSourceConfig | FileSourceConfig | SimulatorSourceConfig, Field(discriminator="type")
]

# --- pipeline ----------------------------------------------------------------


class ModelConfig(_Strict):
    bundle: Path | None = Field(None, description="bundle directory; null = the shipped model")
    threads: int = Field(1, ge=1, le=16)


# Bounds that keep detection possible. A decision spans confirm_n windows,
# one hop apart: a K-of-N over more than ten minutes of stream would take that
# long to confirm an anomaly and as long to clear one (one accepted command
# once silenced every later alarm that way).
MAX_DECISION_SPAN_S = 600.0
MAX_COOLDOWN_S = 3600.0
MIN_HOP_S = 0.1
# An int8 model's largest probability is 255/256: a higher `on` never votes.
MAX_ON_THRESHOLD = 0.99
# Below this `off`, almost every window keeps an anomaly present: it would never clear.
MIN_OFF_THRESHOLD = 0.05


class WindowConfig(_Strict):
    window_s: float = Field(
        10.0,
        ge=1.0,
        le=60.0,
        description="window length (the model sees 10 s); restart-only",
    )
    hop_s: float = Field(
        1.0,
        ge=MIN_HOP_S,
        le=60.0,
        description="hop; rounded to whole STFT frames (1 s -> 0.998 s); at most window_s",
    )
    silence_rms_dbfs: float = Field(
        -70.0, ge=-150.0, le=-20.0, description="windows below this RMS are silent (never alarm)"
    )

    @model_validator(mode="after")
    def _hop_within_window(self) -> WindowConfig:
        if self.hop_s > self.window_s:
            raise ValueError(
                f"hop_s ({self.hop_s}) must not exceed window_s ({self.window_s}): "
                "audio between windows would never be analysed"
            )
        return self


class ClassThreshold(_Strict):
    on: float = Field(
        ..., gt=0, le=MAX_ON_THRESHOLD, description="probability that votes for the class"
    )
    off: float = Field(
        ..., ge=MIN_OFF_THRESHOLD, le=1, description="below this the anomaly is over"
    )

    @model_validator(mode="after")
    def _off_le_on(self) -> ClassThreshold:
        if self.off > self.on:
            raise ValueError(f"off ({self.off}) must not exceed on ({self.on})")
        return self


class DecisionConfig(_Strict):
    """The decision stage's controls (thresholds with hysteresis, K of N, cooldown).

    Used as it is by :class:`soundwatch.decision.DecisionState`; rules that
    need the model's classes (a threshold for an unknown class) are checked
    there, against the bundle.
    """

    thresholds: dict[str, ClassThreshold] = Field(
        default_factory=dict,
        description="per fault class; missing classes use the bundle's, with off = on - 0.2",
    )
    confirm_k: int = Field(3, ge=1, le=1000, description="windows that must agree ...")
    confirm_n: int = Field(5, ge=1, le=1000, description="... out of the last N")
    cooldown_s: float = Field(
        10.0,
        ge=0,
        le=MAX_COOLDOWN_S,
        description="quiet time before the same class re-fires",
    )
    warmup_windows: int = Field(
        0, ge=0, le=1000, description="windows ignored after start or a gap"
    )
    suppress_when_silent: bool = Field(
        True, description="silent windows neither vote nor keep an anomaly present"
    )
    enabled: bool = Field(True, description="false: state only, no anomaly events")

    @model_validator(mode="after")
    def _k_le_n(self) -> DecisionConfig:
        if self.confirm_k > self.confirm_n:
            raise ValueError(
                f"confirm_k ({self.confirm_k}) must not exceed confirm_n ({self.confirm_n})"
            )
        return self


# --- the per-unit baseline -----------------------------------------------------

# A day of stream time covers a factory's daily rhythm (shifts, breaks, the
# background of the day and of the night); real products learn for longer
# (Amazon Monitron: 14-21 days), the tests for a few minutes.
DEFAULT_LEARN_S = 86_400.0
MIN_LEARN_S = 60.0
MAX_LEARN_S = 30 * 86_400.0


class LearningDecisionConfig(_Strict):
    """How the classifier alone decides while the unit's baseline is being learned.

    Stricter than ``decision``: a model trained elsewhere misjudges some
    units' normal sound, and until the baseline exists nothing else checks it.
    """

    on: float = Field(
        0.9,
        gt=0,
        le=MAX_ON_THRESHOLD,
        description="every fault class votes at p >= max(its own on, this)",
    )
    off: float = Field(
        0.7,
        ge=MIN_OFF_THRESHOLD,
        le=1,
        description="and stays present down to max(its own off, this)",
    )
    confirm_k: int = Field(12, ge=1, le=1000, description="windows that must agree ...")
    confirm_n: int = Field(15, ge=1, le=1000, description="... out of the last N")

    @model_validator(mode="after")
    def _consistent(self) -> LearningDecisionConfig:
        if self.off > self.on:
            raise ValueError(f"off ({self.off}) must not exceed on ({self.on})")
        if self.confirm_k > self.confirm_n:
            raise ValueError(
                f"confirm_k ({self.confirm_k}) must not exceed confirm_n ({self.confirm_n})"
            )
        return self


class BaselineConfig(_Strict):
    """The per-unit baseline: learn the unit's own normal, then alarm on departures from it."""

    enabled: bool = Field(
        True, description="false: the classifier alone decides (decision.*), nothing is learned"
    )
    learn_s: float = Field(
        DEFAULT_LEARN_S,
        ge=MIN_LEARN_S,
        le=MAX_LEARN_S,
        description="stream seconds of usable audio to learn from (silent, clipped, dropout "
        "and fault windows do not count)",
    )
    false_alarm_rate: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="share of the unit's normal windows whose novelty lies above the "
        "threshold (per window, before confirmation)",
    )
    confirm_k: int = Field(18, ge=1, le=1000, description="novel windows that must agree ...")
    confirm_n: int = Field(20, ge=1, le=1000, description="... out of the last N")
    off_ratio: float = Field(
        0.8,
        ge=0.1,
        le=1.0,
        description="an anomaly stays present while novelty > off_ratio x threshold",
    )
    name_on: float = Field(
        0.9,
        ge=0,
        le=MAX_ON_THRESHOLD,
        description="the classifier names a novel window's fault at p >= max(its on, this)",
    )
    name_by_speed: bool = Field(
        True,
        description="name a departure by the unit's shaft speed over its learned nominal "
        "speed too (a voltage change or clogging moves it; imbalance does not)",
    )
    during_learning: LearningDecisionConfig = LearningDecisionConfig()

    @model_validator(mode="after")
    def _k_le_n(self) -> BaselineConfig:
        if self.confirm_k > self.confirm_n:
            raise ValueError(
                f"confirm_k ({self.confirm_k}) must not exceed confirm_n ({self.confirm_n})"
            )
        return self


# --- sinks ---------------------------------------------------------------------


class ConsoleSinkConfig(_Strict):
    type: Literal["console"] = "console"
    name: str = Field(
        "console", pattern=r"^[A-Za-z0-9_.-]+$", description="names the sink in health"
    )
    show_state: bool = Field(False, description="also print one line per window")


class JsonlSinkConfig(_Strict):
    type: Literal["jsonl"] = "jsonl"
    name: str = Field("jsonl", pattern=r"^[A-Za-z0-9_.-]+$", description="names the sink in health")
    path: Path
    max_bytes: int = Field(
        10_000_000, ge=1024, le=10_000_000_000, description="rotate before a file grows past this"
    )
    backups: int = Field(5, ge=1, le=1000, description="rotated files kept (path.1 ...)")
    include_state: bool = Field(False, description="also write per-window state messages")


class MqttTlsConfig(_Strict):
    enabled: bool = Field(False, description="use TLS (also on when ca, cert or key is set)")
    ca: Path | None = Field(
        None, description="CA that signed the broker's certificate; null = system CAs"
    )
    cert: Path | None = Field(
        None, description="client certificate (PEM) for brokers that require one"
    )
    key: Path | None = Field(None, description="the client certificate's private key (PEM)")
    insecure: bool = Field(False, description="skip the broker host name check (tests only)")

    @model_validator(mode="after")
    def _cert_with_key(self) -> MqttTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        return self


class OutboxConfig(_Strict):
    """Where the MQTT and IoT Hub sinks keep events until they are acknowledged."""

    path: Path | None = Field(
        None, description="SQLite file; null = <state_dir>/outbox-<sink name>.sqlite3"
    )
    max_events: int = Field(10_000, ge=1, le=10_000_000, description="bound on waiting events")
    max_bytes: int = Field(
        50_000_000, ge=1024, le=100_000_000_000, description="bound on their total size"
    )
    max_age_s: float = Field(
        604_800.0, gt=0, le=31_536_000, description="events waiting longer are dropped (7 days)"
    )
    overflow: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest", description="what a full outbox drops; drops are counted and logged"
    )


class ReconnectConfig(_Strict):
    min_delay_s: float = Field(1.0, gt=0, le=3600, description="first reconnect delay")
    max_delay_s: float = Field(60.0, gt=0, le=3600, description="the delay doubles up to this")

    @model_validator(mode="after")
    def _min_le_max(self) -> ReconnectConfig:
        if self.min_delay_s > self.max_delay_s:
            raise ValueError(
                f"min_delay_s ({self.min_delay_s}) must not exceed max_delay_s ({self.max_delay_s})"
            )
        return self


class HaDiscoveryConfig(_Strict):
    enabled: bool = Field(False, description="publish Home Assistant discovery config")
    prefix: str = Field("homeassistant", min_length=1, description="HA's discovery prefix")


_TOPIC_PLACEHOLDERS = ("{device_id}", "{module_id}")


class MqttSinkConfig(_Strict):
    type: Literal["mqtt"] = "mqtt"
    name: str = Field(
        "mqtt",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="names the sink in health and its default outbox file",
    )
    host: str = Field(..., min_length=1)
    port: int | None = Field(None, ge=1, le=65535, description="null = 1883, or 8883 with TLS")
    tls: MqttTlsConfig = MqttTlsConfig()
    username: str | None = None
    password: str | None = Field(
        None, repr=False, description="use ${VAR}; null = read the variable password_env names"
    )
    password_env: str | None = Field(
        "MQTT_PASSWORD", description="environment variable with the password, if password is null"
    )
    client_id: str = Field(
        "{module_id}-{device_id}", min_length=1, max_length=128, description="MQTT client id"
    )
    keepalive_s: int = Field(30, ge=5, le=3600)
    qos: Literal[1, 2] = Field(1, description="for events; the outbox needs broker acks")
    retain: bool = Field(True, description="retain status, state and health (never events)")
    topic_prefix: str = Field(
        "soundwatch/{device_id}", min_length=1, description="{device_id}, {module_id} allowed"
    )
    include_state: bool = Field(True, description="publish the latest state (retained)")
    state_min_interval_s: float = Field(
        5.0, ge=0, le=3600, description="state rate limit; a class change is published at once"
    )
    health_interval_s: float = Field(30.0, gt=0, le=86_400, description="retained health every N s")
    max_inflight: int = Field(20, ge=1, le=1000, description="events awaiting PUBACK at once")
    connect_timeout_s: float = Field(10.0, gt=0, le=120)
    outbox: OutboxConfig = OutboxConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    ha_discovery: HaDiscoveryConfig = HaDiscoveryConfig()

    @field_validator("topic_prefix")
    @classmethod
    def _topic_ok(cls, v: str) -> str:
        rest = v
        for placeholder in _TOPIC_PLACEHOLDERS:
            rest = rest.replace(placeholder, "")
        if any(c in rest for c in "+#{}\0") or not v.strip("/"):
            raise ValueError(
                "must be a non-empty MQTT topic without wildcards (+, #); "
                "placeholders: {device_id}, {module_id}"
            )
        return v

    @model_validator(mode="after")
    def _discovery_needs_state(self) -> MqttSinkConfig:
        if self.ha_discovery.enabled and not self.include_state:
            raise ValueError("ha_discovery reads the state topic: it needs include_state: true")
        return self

    def resolved(self, device_id: str, module_id: str, state_dir: Path) -> MqttSinkConfig:
        """Placeholders filled in and the default outbox path made concrete."""

        def fill(text: str) -> str:
            return text.replace("{device_id}", device_id).replace("{module_id}", module_id)

        outbox = self.outbox
        if outbox.path is None:
            outbox = outbox.model_copy(update={"path": state_dir / f"outbox-{self.name}.sqlite3"})
        return self.model_copy(
            update={
                "topic_prefix": fill(self.topic_prefix),
                "client_id": fill(self.client_id),
                "outbox": outbox,
            }
        )


class IotHubSinkConfig(_Strict):
    """Azure IoT Hub / IoT Edge (edgeHub) through azure-iot-device (``pip install .[iotedge]``)."""

    type: Literal["iothub"] = "iothub"
    name: str = Field(
        "iothub",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="names the sink in health and its default outbox file",
    )
    connection_string: str | None = Field(
        None,
        repr=False,
        description="device or module connection string (use ${VAR}); null = read "
        "connection_string_env, else the IoT Edge environment",
    )
    connection_string_env: str | None = Field(
        "IOTHUB_CONNECTION_STRING",
        description="environment variable with the connection string, if connection_string is null",
    )
    events_output: str = Field(
        "anomalies", min_length=1, description="module output for anomaly events"
    )
    telemetry_output: str = Field(
        "telemetry", min_length=1, description="module output for state messages"
    )
    include_state: bool = Field(True, description="send the latest state on telemetry_output")
    state_min_interval_s: float = Field(
        60.0, ge=0, le=3600, description="state rate limit; a class change is sent at once"
    )
    twin: bool = Field(True, description="apply desired properties live; report the config")
    methods: bool = Field(True, description="answer getStatus, setThresholds and getRecentEvents")
    keepalive_s: int = Field(60, ge=5, le=1740)
    connect_timeout_s: float = Field(30.0, gt=0, le=300)
    outbox: OutboxConfig = OutboxConfig()
    reconnect: ReconnectConfig = ReconnectConfig()

    def resolved(self, device_id: str, module_id: str, state_dir: Path) -> IotHubSinkConfig:
        """The default outbox path made concrete."""
        if self.outbox.path is not None:
            return self
        outbox = self.outbox.model_copy(update={"path": state_dir / f"outbox-{self.name}.sqlite3"})
        return self.model_copy(update={"outbox": outbox})


SinkConfig = Annotated[
    ConsoleSinkConfig | JsonlSinkConfig | MqttSinkConfig | IotHubSinkConfig,
    Field(discriminator="type"),
]


def _resolve_sinks(
    sinks: tuple[Any, ...], device_id: str, module_id: str, state_dir: Path
) -> tuple[Any, ...]:
    """Fill in the MQTT sinks' placeholders; each outbox sink must get its own file."""
    for label, value in (("device_id", device_id), ("module_id", module_id)):
        if any(c in value for c in "+#/") and any(
            isinstance(s, MqttSinkConfig) and "{" + label + "}" in s.topic_prefix for s in sinks
        ):
            raise ValueError(
                f"{label} {value!r} contains +, # or /, which cannot go into an MQTT topic; "
                "set topic_prefix explicitly"
            )
    out: list[Any] = []
    outboxes: dict[Path, str] = {}
    for sink in sinks:
        if isinstance(sink, MqttSinkConfig | IotHubSinkConfig):
            sink = sink.resolved(device_id, module_id, state_dir)
            path = sink.outbox.path
            assert path is not None
            if path in outboxes:
                raise ValueError(
                    f"sinks {outboxes[path]!r} and {sink.name!r} share the outbox {path}; "
                    "give each a different name or outbox.path"
                )
            outboxes[path] = sink.name
        out.append(sink)
    names = [s.name for s in sinks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # health reports each sink under its name
        raise ValueError(
            f"sink name(s) {repeated} used more than once; give each sink its own `name`"
        )
    return tuple(out)


def _default_device_id() -> str:
    return os.environ.get("IOTEDGE_DEVICEID") or socket.gethostname() or "soundwatch"


class Config(_Strict):
    """The whole configuration. See ``config/default.yaml`` for every key."""

    device_id: str = Field(default_factory=_default_device_id, min_length=1)
    module_id: str = Field("soundwatch", min_length=1)
    state_dir: Path = Field(Path("./state"), description="sequence counter, outbox, recordings")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    record_dir: Path | None = Field(
        None, description="save each window that starts an anomaly here (WAV + event JSON)"
    )
    model: ModelConfig = ModelConfig()
    source: SourceConfig = SimulatorSourceConfig()
    window: WindowConfig = WindowConfig()
    decision: DecisionConfig = DecisionConfig()
    baseline: BaselineConfig = BaselineConfig()
    sinks: tuple[SinkConfig, ...] = (ConsoleSinkConfig(),)

    @field_validator("decision")
    @classmethod
    def _decision_fits_the_hop(
        cls, decision: DecisionConfig, info: ValidationInfo
    ) -> DecisionConfig:
        window = info.data.get("window")
        if not isinstance(window, WindowConfig):
            return decision  # the window's own error is reported
        problems = []
        span_s = decision.confirm_n * window.hop_s
        if span_s > MAX_DECISION_SPAN_S:
            problems.append(
                f"confirm_n ({decision.confirm_n}) windows at hop_s {window.hop_s:g} span "
                f"{span_s:g} s: an anomaly could take that long to confirm and as long to "
                f"clear; keep confirm_n x hop_s <= {MAX_DECISION_SPAN_S:g} s"
            )
        warmup_s = decision.warmup_windows * window.hop_s
        if warmup_s > MAX_DECISION_SPAN_S:
            problems.append(
                f"warmup_windows ({decision.warmup_windows}) at hop_s {window.hop_s:g} mute "
                f"{warmup_s:g} s after every start and gap; keep warmup_windows x hop_s "
                f"<= {MAX_DECISION_SPAN_S:g} s"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return decision

    @field_validator("baseline")
    @classmethod
    def _baseline_fits_the_hop(
        cls, baseline: BaselineConfig, info: ValidationInfo
    ) -> BaselineConfig:
        window = info.data.get("window")
        if not isinstance(window, WindowConfig):
            return baseline  # the window's own error is reported
        problems = []
        for name, n in (
            ("confirm_n", baseline.confirm_n),
            ("during_learning.confirm_n", baseline.during_learning.confirm_n),
        ):
            span_s = n * window.hop_s
            if span_s > MAX_DECISION_SPAN_S:
                problems.append(
                    f"{name} ({n}) windows at hop_s {window.hop_s:g} span {span_s:g} s: an "
                    "anomaly could take that long to confirm and as long to clear; keep "
                    f"{name} x hop_s <= {MAX_DECISION_SPAN_S:g} s"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return baseline

    @field_validator("sinks")
    @classmethod
    def _resolve_sink_placeholders(
        cls, sinks: tuple[Any, ...], info: ValidationInfo
    ) -> tuple[Any, ...]:
        device_id = info.data.get("device_id")
        module_id = info.data.get("module_id")
        state_dir = info.data.get("state_dir")
        if device_id is None or module_id is None or state_dir is None:
            return sinks  # an error in those fields is reported on its own
        return _resolve_sinks(sinks, str(device_id), str(module_id), Path(state_dir))


def _yaml_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop pydantic's union-tag segments (``source.mic.x`` -> ``source.x``)."""
    out: list[int | str] = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i else None
        in_union = prev == "source" or (isinstance(prev, int) and i >= 2 and loc[i - 2] == "sinks")
        if in_union and isinstance(part, str) and part in _UNION_TAGS:
            continue
        out.append(part)
    return tuple(out)


_UNION_TAGS = {"mic", "file", "simulator", "console", "jsonl", "mqtt", "iothub"}


def _problems(e: ValidationError, located: Located | None) -> list[tuple[str, int | None, str]]:
    out = []
    for err in e.errors():
        loc = _yaml_path(tuple(err["loc"]))
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "type")  # point at the offending `type:` line
        key = ".".join(str(p) for p in loc) or "(root)"
        line = line_of(located.lines, loc) if located else None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see config/default.yaml)"
        out.append((key, line, msg))
    return out


def validate(
    data: Mapping[str, Any], source: str = "<config>", located: Located | None = None
) -> Config:
    """Validate plain data into a :class:`Config`, or raise :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems(e, located)) from None


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, substitute, override and validate. Raises :class:`ConfigError`."""
    env = dict(os.environ) if env is None else dict(env)
    source = str(path) if path else "<defaults>"
    located: Located | None = None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)  # no more than that, whatever the file is
        except OSError as e:
            raise ConfigError(source, [("(file)", None, f"cannot read: {e.strerror or e}")]) from e
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                source, [("(file)", None, f"larger than {MAX_CONFIG_BYTES} bytes: not a config")]
            )
        try:
            located = parse_yaml(decode_config(raw, source), source)
        except ConfigSyntaxError as e:
            raise ConfigError(source, [("(syntax)", e.line, str(e))]) from None
        if located.data is None:
            located = Located({}, located.lines)
        if not isinstance(located.data, dict):
            raise ConfigError(source, [("(root)", 1, "the file must be a mapping of keys")])
        try:
            data = substitute_env(located.data, env)
        except KeyError as e:
            key = str(e.args[0]).split(":")[0]
            loc = tuple(key.replace("[", ".").replace("]", "").split("."))
            raise ConfigError(
                source, [(key, line_of(located.lines, loc), str(e.args[0]).split(": ", 1)[1])]
            ) from None
    data = copy.deepcopy(data)
    try:
        apply_env_overrides(data, env)
    except KeyError as e:
        raise ConfigError(source, [("(environment)", None, str(e.args[0]))]) from None
    except ConfigSyntaxError as e:
        raise ConfigError(source, [("(environment)", None, str(e))]) from None
    for key, value in (overrides or {}).items():
        _merge(data, key.split("."), value)
    return validate(data, source, located)


def _merge(data: dict[str, Any], parts: list[str], value: Any) -> None:
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = _deep_merge(cur.get(parts[-1]), value)


# What a running module changes at once; every other key is read at start-up
# only, and a live patch that changes one is refused (the model sees 10 s
# windows whatever window_s says later, a source or sink cannot be swapped
# under a running pipeline).
LIVE_KEYS: tuple[str, ...] = (
    "log_level",
    "window.hop_s",
    "window.silence_rms_dbfs",
    "decision",
    # The baseline's decision and learning targets; turning it on or off
    # changes what the pipeline is, so baseline.enabled is read at start-up.
    "baseline.learn_s",
    "baseline.false_alarm_rate",
    "baseline.confirm_k",
    "baseline.confirm_n",
    "baseline.off_ratio",
    "baseline.name_on",
    "baseline.name_by_speed",
    "baseline.during_learning",
)
RESTART_ONLY = "takes effect at start-up only: change it in the config file and restart"


def is_live_key(path: str) -> bool:
    """Whether a dotted key path (``decision.confirm_k``) can change while running."""
    return any(path == key or path.startswith(key + ".") for key in LIVE_KEYS)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted paths of every setting that differs (lists compare as a whole)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))
    if "source.type" in changed:  # another kind of source: name it once
        changed = ["source", *(k for k in changed if not k.startswith("source."))]
    return changed


_MISSING = object()


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def apply_patch(config: Config, patch: Mapping[str, Any], source: str = "<patch>") -> Config:
    """A new Config with ``patch`` deep-merged in; all or nothing.

    For live changes (MQTT ``set``, IoT Hub desired properties, the HTTP API):
    the patch is validated as a whole, and refused if it changes a setting
    that is read at start-up only (:data:`LIVE_KEYS` lists what may change).
    Restating a start-up setting with its current value is not a change. The
    old config is untouched on error.
    """
    base = config.model_dump(mode="json")
    merged = _deep_merge(base, dict(patch))
    new = validate(merged, source)
    frozen = [key for key in changed_keys(config, new) if not is_live_key(key)]
    if frozen:
        raise ConfigError(source, [(key, None, RESTART_ONLY) for key in frozen])
    return new


def _deep_merge(base: Any, patch: Any) -> Any:
    """Merge mappings key by key; a mapping whose ``type`` changes replaces the old one
    (a file source's options mean nothing to a mic source)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "type" in patch and patch["type"] != base.get("type", patch["type"]):
            return dict(patch)
        out = dict(base)
        for k, v in patch.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else v
        return out
    return patch
