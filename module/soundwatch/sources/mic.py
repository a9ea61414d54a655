"""A microphone (any PortAudio input device) as a source.

Capture follows python-sounddevice's ``rec_unlimited.py`` pattern: an
``InputStream`` in callback mode whose callback only copies the buffer into a
bounded queue and counts problems. It does not allocate beyond that copy, block,
log or touch files. Everything else (mix-down, watchdog, health, positions)
happens in the consumer thread inside :meth:`MicSource.blocks`.

Faults never end the stream and never raise out of ``blocks()``: a device that
cannot be found or opened, that stops delivering samples for ``watchdog_s``,
that delivers a flat line (peak-to-peak ~ 0) for ``flatline_s`` worth of
samples, or whose blocks overflow the queue faster than the device itself
produces blocks for ``overflow_storm_s`` (an *overflow storm*: impossible for
a live device, whose clock bounds it; seen with a capture whose feed has gone
and that keeps handing out a stale buffer as fast as it is read) is reported
unhealthy (with the reason in ``health().detail``), logged, closed and
reopened with backoff. The blocks still queued from a storming stream are
dropped with it: they are that stale buffer, not audio. Before each reopen
PortAudio is re-initialised so it rescans devices, and the device is looked
up again by name: after an unplug the device index may change.

Positions:
- A reopened device's first block starts where the count left off and has
  ``discontinuity=True``. Stream time therefore excludes the time the device
  was away (it is sample time, not wall-clock time).
- Queue overflow policy is *count and drop the newest*: when the consumer
  falls behind and the queue (``queue_blocks``) is full, the callback drops the
  incoming buffer and counts it. The audio already queued stays contiguous;
  the next block delivered has ``discontinuity=True`` and its position jumps
  by the number of frames dropped, so stream time still matches the device.
- A PortAudio input overflow (frames lost before the callback ran; how many is
  unknown) is counted and marks the next block as a discontinuity.

PortAudio calls that may hang in a driver (open, abort/close) run in named
helper threads with timeouts. A stream that cannot be closed in time is
abandoned (logged, kept referenced, later callbacks ignored), and
sounddevice's at-exit ``Pa_Terminate`` is unregistered so that process exit
cannot hang on it. Device rescans are skipped while such a stream exists.

``sounddevice`` is imported lazily, so a machine without ``libportaudio2``
can still use file and simulator sources.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt

from soundwatch.config import MicSourceConfig
from soundwatch.sources.base import Source, SourceError
from soundwatch.stream_types import AudioBlock

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BACKOFF_S: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
# Below one step of a 16-bit converter (3.05e-5); a live microphone's noise
# floor is far above this over a few seconds.
DEFAULT_FLATLINE_PTP = 1e-6
# An overflow storm is judged over windows of this many seconds: more than
# STORM_FACTOR times the blocks the device makes in that time overflowed.
STORM_WINDOW_S = 0.5
STORM_FACTOR = 2.0
# Capture formats and the factor that maps them to float32 in [-1, 1).
_SCALE: dict[str, float] = {"int16": 1.0 / 32768.0, "float32": 1.0}

# Serialises device enumeration, stream opening and PortAudio re-initialisation
# (Pa_Terminate invalidates every device index and every open stream).
_PORTAUDIO_LOCK = threading.RLock()
# Streams opened by this module and not yet closed; rescans need it empty.
_REGISTRY_LOCK = threading.Lock()
_open_streams: set[int] = set()
# Streams whose close timed out; kept referenced so they are never collected.
_abandoned_streams: list[Any] = []


@contextlib.contextmanager
def _portaudio_lock(timeout_s: float = 10.0) -> Iterator[None]:
    """Hold the PortAudio lock, or raise SourceError if a hung call keeps it."""
    if not _PORTAUDIO_LOCK.acquire(timeout=timeout_s):
        raise SourceError(f"PortAudio is busy: an earlier call has not returned in {timeout_s:g} s")
    try:
        yield
    finally:
        _PORTAUDIO_LOCK.release()


def _sounddevice() -> ModuleType:
    """The sounddevice module, imported on first use (it initialises PortAudio)."""
    try:
        import sounddevice as sd
    except OSError as e:  # libportaudio missing
        raise SourceError(
            f"PortAudio is not available ({e}); install libportaudio2 (make setup does)"
        ) from e
    module: ModuleType = sd
    return module


def _portaudio_errors(sd: ModuleType) -> tuple[type[BaseException], ...]:
    return (sd.PortAudioError, ValueError, TypeError)


def rescan_devices() -> bool:
    """Re-initialise PortAudio so that it sees devices plugged in or removed since.

    PortAudio enumerates devices once, in ``Pa_Initialize``; sounddevice
    exposes no public rescan, so this uses its private ``_terminate`` and
    ``_initialize`` (guarded: skipped if they are missing). ``Pa_Terminate``
    closes every open stream, so the rescan is skipped (returns ``False``)
    while any stream opened by this module is still open or abandoned. Other
    code in the process must not hold PortAudio streams of its own.
    Raises :class:`SourceError` if PortAudio is unavailable or stuck.
    """
    sd = _sounddevice()
    terminate = getattr(sd, "_terminate", None)
    initialize = getattr(sd, "_initialize", None)
    if not callable(terminate) or not callable(initialize):
        logger.debug("sounddevice has no _terminate/_initialize; cannot rescan devices")
        return False
    with _portaudio_lock():
        with _REGISTRY_LOCK:
            busy = len(_open_streams) + len(_abandoned_streams)
        if busy:
            logger.debug("not rescanning devices: %d stream(s) still open", busy)
            return False
        try:
            if getattr(sd, "_initialized", 1) > 0:
                terminate()
            initialize()
        except sd.PortAudioError as e:
            logger.warning("PortAudio re-initialisation failed: %s", e)
            return False
    return True


def list_input_devices(rescan: bool = False) -> list[dict[str, Any]]:
    """Input devices PortAudio sees: index, name, max_input_channels,
    default_samplerate, hostapi (name) and is_default.

    ``rescan=True`` re-initialises PortAudio first (see :func:`rescan_devices`).
    Raises :class:`SourceError` if PortAudio is unavailable.
    """
    sd = _sounddevice()
    with _portaudio_lock():
        if rescan:
            rescan_devices()
        try:
            devices = list(sd.query_devices())
            hostapis = list(sd.query_hostapis())
        except sd.PortAudioError as e:
            raise SourceError(f"cannot list audio devices: {e}") from e
        try:
            default_index = int(sd.query_devices(kind="input")["index"])
        except (sd.PortAudioError, ValueError, KeyError):
            default_index = -1
    result: list[dict[str, Any]] = []
    for d in devices:
        if int(d["max_input_channels"]) <= 0:
            continue
        api = int(d["hostapi"])
        result.append(
            {
                "index": int(d["index"]),
                "name": str(d["name"]),
                "max_input_channels": int(d["max_input_channels"]),
                "default_samplerate": float(d["default_samplerate"]),
                "hostapi": str(hostapis[api]["name"]) if 0 <= api < len(hostapis) else str(api),
                "is_default": int(d["index"]) == default_index,
            }
        )
    return result


def match_input_device(
    spec: str | int, devices: Sequence[dict[str, Any]], prefer_index: int | None = None
) -> dict[str, Any]:
    """Pick one device from ``devices`` (as listed by :func:`list_input_devices`).

    An ``int`` is a device index. A ``str`` is matched case-insensitively as a
    substring of the name; an exact name match wins over substring matches, and
    among several equal candidates ``prefer_index`` wins. Raises
    :class:`SourceError` when nothing or several devices match.
    """
    available = ", ".join(f"[{d['index']}] {d['name']}" for d in devices) or "none"
    if isinstance(spec, int):
        for d in devices:
            if d["index"] == spec:
                return d
        raise SourceError(f"no input device with index {spec} (input devices: {available})")
    needle = spec.casefold()
    matches = [d for d in devices if needle in str(d["name"]).casefold()]
    exact = [d for d in matches if str(d["name"]).casefold() == needle]
    candidates = exact or matches
    if not candidates:
        raise SourceError(f"no input device matching {spec!r} (input devices: {available})")
    if len(candidates) > 1:
        preferred = [d for d in candidates if d["index"] == prefer_index]
        if preferred:
            return preferred[0]
        names = ", ".join(f"[{d['index']}] {d['name']}" for d in candidates)
        raise SourceError(
            f"{spec!r} matches several input devices ({names}); use a longer name or an index"
        )
    return candidates[0]


class _Stopped(Exception):
    """The stop event was set while waiting for a helper thread."""


class _BoundedCall(Generic[T]):
    """Run ``fn`` in a named daemon thread; wait for it with a timeout and a stop event.

    If the caller gives up, ``on_late`` receives the result whenever it arrives
    (to close a stream that finished opening too late).
    """

    def __init__(
        self, fn: Callable[[], T], name: str, on_late: Callable[[T], None] | None = None
    ) -> None:
        self._fn = fn
        self._on_late = on_late
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._given_up = False
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            result = self._fn()
        except BaseException as e:  # handed to the waiting thread
            with self._lock:
                self._error = e
                self._done.set()
            return
        with self._lock:
            self._result = result
            self._done.set()
            late = self._given_up
        if late and self._on_late is not None:
            try:
                self._on_late(result)
            except Exception:
                logger.exception("cleaning up after a late %s failed", self._thread.name)

    def wait(self, timeout_s: float, stopping: Callable[[], bool] | None = None) -> T:
        deadline = time.monotonic() + timeout_s
        while not self._done.wait(0.05):
            if stopping is not None and stopping():
                self._give_up()
                raise _Stopped
            if time.monotonic() >= deadline:
                self._give_up()
                raise TimeoutError(f"{self._thread.name} did not finish in {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        return cast(T, self._result)

    def _give_up(self) -> None:
        with self._lock:
            self._given_up = True
            finished = self._done.is_set() and self._error is None
        if finished and self._on_late is not None:
            self._on_late(cast(T, self._result))


@dataclass
class _Chunk:
    data: npt.NDArray[Any]
    dropped_frames: int
    overflowed: bool
    captured_at: float


class _Capture:
    """The callback side of one open stream: a bounded queue and counters.

    Each stream has its own, so late callbacks of an abandoned stream can
    never reach a newer stream's queue.
    """

    def __init__(self, queue_blocks: int, abort_exc: type[BaseException]) -> None:
        self.queue: queue.Queue[_Chunk] = queue.Queue(maxsize=queue_blocks)
        self.finished = threading.Event()
        self.closed = False
        self.input_overflows = 0
        self.dropped_blocks = 0
        self._dropped_frames = 0
        self._overflow_pending = False
        self._abort_exc = abort_exc

    def callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy and enqueue only, never block.
        if self.closed:
            raise self._abort_exc
        if status.input_overflow:
            self.input_overflows += 1
            self._overflow_pending = True
        try:
            self.queue.put_nowait(
                _Chunk(indata.copy(), self._dropped_frames, self._overflow_pending, time.time())
            )
        except queue.Full:
            self.dropped_blocks += 1
            self._dropped_frames += frames
            return
        self._dropped_frames = 0
        self._overflow_pending = False

    def on_finished(self) -> None:
        self.finished.set()

    @property
    def overflows(self) -> int:
        return self.input_overflows + self.dropped_blocks


@dataclass
class _OpenStream:
    stream: Any
    capture: _Capture
    device_name: str
    device_index: int
    rate_hz: int
    channels: int
    rate_warning: str


class MicSource(Source):
    """A PortAudio input device, chosen by name substring or index (``None``: default).

    ``channels=None`` captures one channel (mono: the device's first channel,
    or ALSA's own downmix for plug devices); an int captures that many
    channels and mixes them down (their mean). Mono is the default because
    ALSA plug devices (``default``, ``pulse``) claim up to 128 channels.
    ``dtype`` is the capture format: ``int16`` (default: the training data's
    resolution, natively supported by every capture device, half the queue
    memory) or ``float32``; blocks are always float32 in [-1, 1).
    The device is opened at the first of ``config.preferred_rates_hz`` it supports
    (probed with ``sounddevice.check_input_settings``); if it supports none,
    at its default rate, with a warning in ``health().detail``. Once the
    device has been opened the rate is fixed for the source's life: a reopened
    device must support it (blocks never change rate).

    ``sample_rate_hz`` is probed at construction when the device is present;
    otherwise it is provisional (the first preferred rate) until the first
    open. Wiring that must not depend on this can take the rate from the first
    block (see :func:`soundwatch.resample.resampled`).

    The settings a user chooses come in ``config`` (validated there); the
    keyword arguments are the recovery policy (reopen backoff, flat-line
    level, timeouts) and the capture format, which tests vary.
    """

    def __init__(
        self,
        config: MicSourceConfig | None = None,
        *,
        channels: int | None = None,
        backoff_s: Sequence[float] = DEFAULT_BACKOFF_S,
        flatline_ptp: float = DEFAULT_FLATLINE_PTP,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
        dtype: str = "int16",
    ) -> None:
        config = config or MicSourceConfig()
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1 or None, got {channels}")
        if dtype not in _SCALE:
            raise ValueError(f"dtype must be one of {sorted(_SCALE)}, got {dtype!r}")
        if not backoff_s or any(b < 0 for b in backoff_s):
            raise ValueError(f"backoff_s must be non-negative delays, got {backoff_s!r}")
        device = config.device
        super().__init__(
            name=f"mic:{device if device is not None else 'default'}",
            sample_rate_hz=int(config.preferred_rates_hz[0]),
        )
        self.device = device
        self.block_s = config.block_s
        self.channels = channels
        self.preferred_rates_hz = tuple(int(r) for r in config.preferred_rates_hz)
        self.queue_blocks = config.queue_blocks
        self.overflow_storm_s = config.overflow_storm_s
        self.watchdog_s = config.watchdog_s
        self.flatline_s = config.flatline_s
        self.flatline_ptp = flatline_ptp
        self.backoff_s = tuple(float(b) for b in backoff_s)
        self.open_timeout_s = open_timeout_s
        self.close_timeout_s = close_timeout_s
        self.dtype = dtype
        self._rate_fixed = False
        self._device_name: str | None = None  # name seen at the first open
        self._device_index: int | None = None
        self._reopens = 0
        self._overflows_closed_streams = 0
        # Called (on the pipeline's thread) with each captured chunk as the device
        # delivered it, (frames, channels) in ``dtype``, its first sample's position
        # and the rate: the bench recorder keeps the device's own audio this way.
        self.raw_tap: Callable[[npt.NDArray[Any], int, int], None] | None = None
        try:
            with _portaudio_lock():
                info = self._resolve()
                self.sample_rate_hz, _ = self._choose_rate(info, self._channels_for(info))
        except SourceError as e:
            logger.warning("%s: not available yet (%s); will keep trying", self.name, e)

    # --- device lookup -----------------------------------------------------

    def _resolve(self) -> dict[str, Any]:
        """The device to open now; raises SourceError if it is not there."""
        devices = list_input_devices()
        if self._device_name is not None and not isinstance(self.device, str):
            # Reopening a device first given by index (or the default): follow its name.
            return match_input_device(self._device_name, devices, self._device_index)
        if self.device is None:
            default = [d for d in devices if d["is_default"]]
            if not default:
                names = ", ".join(d["name"] for d in devices) or "none"
                raise SourceError(
                    f"no default input device (input devices: {names}); set the source's device"
                )
            return default[0]
        return match_input_device(self.device, devices, self._device_index)

    def _channels_for(self, info: dict[str, Any]) -> int:
        available = int(info["max_input_channels"])
        if self.channels is None:
            return 1
        if self.channels > available:
            raise SourceError(
                f"device {info['name']!r} has {available} input channel(s), "
                f"{self.channels} requested"
            )
        return self.channels

    def _choose_rate(self, info: dict[str, Any], channels: int) -> tuple[int, str]:
        """The capture rate and a warning ('' if a preferred rate works)."""
        sd = _sounddevice()

        def supported(rate: int) -> bool:
            try:
                sd.check_input_settings(
                    device=info["index"], channels=channels, dtype=self.dtype, samplerate=rate
                )
            except _portaudio_errors(sd):
                return False
            return True

        if self._rate_fixed:
            if supported(self.sample_rate_hz):
                return self.sample_rate_hz, ""
            raise SourceError(
                f"device {info['name']!r} no longer supports {self.sample_rate_hz} Hz"
            )
        for rate in self.preferred_rates_hz:
            if supported(rate):
                return rate, ""
        fallback = int(info["default_samplerate"])
        if fallback > 0 and supported(fallback):
            warning = (
                f"wrong rate: device supports none of {list(self.preferred_rates_hz)} Hz; "
                f"capturing at {fallback} Hz"
            )
            return fallback, warning
        raise SourceError(
            f"device {info['name']!r} supports none of {list(self.preferred_rates_hz)} Hz "
            f"(nor its default {fallback} Hz) with {channels} channel(s)"
        )

    # --- stream lifecycle ---------------------------------------------------

    def _open(self, rescan: bool) -> _OpenStream:
        sd = _sounddevice()
        with _portaudio_lock(self.open_timeout_s):
            if rescan:
                rescan_devices()
            info = self._resolve()
            channels = self._channels_for(info)
            rate, warning = self._choose_rate(info, channels)
            capture = _Capture(self.queue_blocks, sd.CallbackAbort)
            try:
                stream = sd.InputStream(
                    device=info["index"],
                    samplerate=rate,
                    channels=channels,
                    dtype=self.dtype,
                    blocksize=max(1, round(self.block_s * rate)),
                    callback=capture.callback,
                    finished_callback=capture.on_finished,
                )
            except _portaudio_errors(sd) as e:
                raise SourceError(f"cannot open {info['name']!r} at {rate} Hz: {e}") from e
            with _REGISTRY_LOCK:
                _open_streams.add(id(stream))
            try:
                stream.start()
            except sd.PortAudioError as e:
                self._close_now(stream, capture)
                raise SourceError(f"cannot start {info['name']!r}: {e}") from e
        return _OpenStream(
            stream, capture, str(info["name"]), int(info["index"]), rate, channels, warning
        )

    @staticmethod
    def _close_now(stream: Any, capture: _Capture) -> None:
        capture.closed = True
        try:
            stream.abort()
            stream.close()
        finally:
            with _REGISTRY_LOCK:
                _open_streams.discard(id(stream))
                # A stream abandoned earlier that finally closed frees rescans again.
                _abandoned_streams[:] = [s for s in _abandoned_streams if s is not stream]

    def _close(self, opened: _OpenStream) -> None:
        """Abort and close, bounded by ``close_timeout_s``; abandon a stream that hangs."""
        self._overflows_closed_streams += opened.capture.overflows
        call = _BoundedCall(
            lambda: self._close_now(opened.stream, opened.capture),
            name=f"soundwatch-mic-close-{opened.device_index}",
        )
        try:
            call.wait(self.close_timeout_s)
        except TimeoutError:
            logger.error(
                "%s: closing %r hung for %g s; abandoning the stream",
                self.name,
                opened.device_name,
                self.close_timeout_s,
            )
            with _REGISTRY_LOCK:
                if id(opened.stream) in _open_streams:  # not closed meanwhile
                    _open_streams.discard(id(opened.stream))
                    _abandoned_streams.append(opened.stream)
            _unregister_portaudio_exit_handler()
        except Exception as e:
            logger.warning("%s: error closing %r: %s", self.name, opened.device_name, e)

    def _open_bounded(self, rescan: bool, stop: threading.Event) -> _OpenStream:
        call = _BoundedCall(
            lambda: self._open(rescan),
            name="soundwatch-mic-open",
            on_late=self._close,
        )
        try:
            return call.wait(self.open_timeout_s, lambda: self._stopping(stop))
        except TimeoutError as e:
            raise SourceError(f"opening the device hung for {self.open_timeout_s:g} s") from e

    # --- the stream ---------------------------------------------------------

    def blocks(self, stop: threading.Event) -> Iterator[AudioBlock]:
        """Capture until ``stop`` is set or :meth:`close` is called; never raises for
        device faults (they show in :meth:`health`)."""
        position = 0
        attempt = 0
        first_open = True
        yielded_any = False
        self._update_health(state="starting", healthy=False, detail="opening")
        while not self._stopping(stop):
            if not first_open:
                self._reopens += 1
                self._update_health(reopens=self._reopens)
            try:
                opened = self._open_bounded(rescan=not first_open, stop=stop)
            except _Stopped:
                break
            except Exception as e:  # never let a device fault end the stream
                if not isinstance(e, SourceError):
                    logger.exception("%s: unexpected error opening the device", self.name)
                first_open = False
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                attempt += 1
                logger.warning("%s: %s; retrying in %g s", self.name, e, delay)
                self._update_health(
                    healthy=False, state="reopening", detail=f"{e}; retrying in {delay:g} s"
                )
                if self._wait(stop, delay):
                    break
                continue
            first_open = False
            self._rate_fixed = True
            self.sample_rate_hz = opened.rate_hz
            self._device_name, self._device_index = opened.device_name, opened.device_index
            logger.info(
                "%s: capturing from [%d] %r at %d Hz, %d channel(s)",
                self.name,
                opened.device_index,
                opened.device_name,
                opened.rate_hz,
                opened.channels,
            )
            if opened.rate_warning:
                logger.warning("%s: %s", self.name, opened.rate_warning)
            self._update_health(
                device=opened.device_name,
                device_rate_hz=opened.rate_hz,
                state="running",
                detail=opened.rate_warning or "waiting for samples",
            )
            pump = _Pump(self, opened, position, discontinuity=yielded_any)
            try:
                for block in pump.run(stop):
                    if pump.healthy_data:
                        attempt = 0
                    yielded_any = True
                    yield block
                if pump.fault is not None:  # report before a possibly slow close
                    self._update_health(healthy=False, state="reopening", detail=pump.fault)
            finally:
                position = pump.position
                self._close(opened)
            if pump.fault is None:
                break
            delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
            attempt += 1
            logger.warning(
                "%s: %s; reopening %r in %g s", self.name, pump.fault, opened.device_name, delay
            )
            self._update_health(
                healthy=False, state="reopening", detail=f"{pump.fault}; reopening in {delay:g} s"
            )
            if self._wait(stop, delay):
                break
        self._update_health(state="ended", detail="stopped")

    def _wait(self, stop: threading.Event, delay_s: float) -> bool:
        """Wait up to ``delay_s``; True if stopped or closed meanwhile."""
        deadline = time.monotonic() + delay_s
        while True:
            if self._stopping(stop):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            stop.wait(min(remaining, 0.1))


class _Pump:
    """Moves chunks from one open stream's queue to blocks, and runs the watchdog.

    Ends (``fault`` set) when no chunk arrived for ``watchdog_s``, when the
    signal has been flat for ``flatline_s`` worth of samples, when blocks
    overflowed faster than the device makes them for ``overflow_storm_s``, or
    when PortAudio finished the stream; ends with ``fault=None`` when stopped.
    """

    def __init__(
        self, source: MicSource, opened: _OpenStream, position: int, discontinuity: bool
    ) -> None:
        self.source = source
        self.opened = opened
        self.position = position
        self.discontinuity = discontinuity
        self.fault: str | None = None
        self.healthy_data = False
        self._flat_limit = max(1, math.ceil(source.flatline_s * opened.rate_hz))
        self._run_len = 0
        self._run_min = 0.0
        self._run_max = 0.0
        # The device's own block rate, and the overflow storm being measured.
        self._blocks_per_s = opened.rate_hz / max(1, round(source.block_s * opened.rate_hz))
        self._storm_mark = (time.monotonic(), 0)  # (when, overflows then)
        self._storm_s = 0.0
        self._storm_overflows = 0

    def _overflow_storm(self) -> str | None:
        """The fault text once overflows have outrun the device for ``overflow_storm_s``."""
        now = time.monotonic()
        since, overflows_then = self._storm_mark
        elapsed = now - since
        if elapsed < STORM_WINDOW_S:
            return None
        overflows = self.opened.capture.overflows
        self._storm_mark = (now, overflows)
        lost = overflows - overflows_then
        made = elapsed * self._blocks_per_s
        if lost <= STORM_FACTOR * made:
            self._storm_s, self._storm_overflows = 0.0, 0
            return None
        self._storm_s += elapsed
        self._storm_overflows += lost
        if self._storm_s < self.source.overflow_storm_s:
            return None
        return (
            f"overflow storm: {self._storm_overflows} blocks lost in {self._storm_s:.1f} s, "
            f"{lost / made:.0f} times the {self._blocks_per_s:.3g} blocks/s the device makes: "
            "it is not delivering live audio (its feed gone?)"
        )

    def run(self, stop: threading.Event) -> Iterator[AudioBlock]:
        source, capture = self.source, self.opened.capture
        poll_s = min(0.1, source.watchdog_s / 4)
        last_chunk_at = time.monotonic()
        while not source._stopping(stop):
            storm = self._overflow_storm()
            if storm is not None:
                self.fault = storm
                return
            try:
                chunk = capture.queue.get(timeout=poll_s)
            except queue.Empty:
                if capture.finished.is_set():
                    self.fault = "the device stopped the stream"
                    return
                silent_s = time.monotonic() - last_chunk_at
                if silent_s >= source.watchdog_s:
                    self.fault = f"no samples for {silent_s:.1f} s"
                    return
                continue
            last_chunk_at = time.monotonic()
            samples = _to_mono_float32(chunk.data, _SCALE[source.dtype])
            if chunk.dropped_frames:
                self.position += chunk.dropped_frames
            block = AudioBlock(
                samples=samples,
                start_sample=self.position,
                sample_rate_hz=self.opened.rate_hz,
                discontinuity=self.discontinuity or chunk.dropped_frames > 0 or chunk.overflowed,
                captured_at=chunk.captured_at,
            )
            self.discontinuity = False
            self.position = block.end_sample
            tap = source.raw_tap
            if tap is not None:
                tap(chunk.data, block.start_sample, self.opened.rate_hz)
            flat = self._track_flatline(samples)
            self.healthy_data = not flat
            source._update_health(
                healthy=not flat or self._run_len < self._flat_limit,
                state="running",
                detail=self.opened.rate_warning,
                samples=self.position,
                overflows=source._overflows_closed_streams + capture.overflows,
            )
            yield block
            if self._run_len >= self._flat_limit:
                self.fault = (
                    f"flat line: peak-to-peak {self._run_max - self._run_min:.2g} "
                    f"(level {self._run_min:.3g}) for {self._run_len / self.opened.rate_hz:.1f} s"
                )
                return

    def _track_flatline(self, samples: npt.NDArray[np.float32]) -> bool:
        """Extend or restart the current flat run; True if this block is flat."""
        if samples.size == 0:
            return self._run_len > 0
        lo, hi = float(samples.min()), float(samples.max())
        tolerance = self.source.flatline_ptp
        if self._run_len and max(hi, self._run_max) - min(lo, self._run_min) <= tolerance:
            self._run_min, self._run_max = min(lo, self._run_min), max(hi, self._run_max)
            self._run_len += int(samples.size)
            return True
        if hi - lo <= tolerance:
            self._run_min, self._run_max, self._run_len = lo, hi, int(samples.size)
            return True
        self._run_len = 0
        return False


def _to_mono_float32(data: npt.NDArray[Any], scale: float) -> npt.NDArray[np.float32]:
    """(frames, channels) samples as mono float32 in [-1, 1) (channel mean)."""
    if data.shape[1] == 1:
        mono = data[:, 0].astype(np.float32)
    else:
        mono = data.mean(axis=1, dtype=np.float32)
    if scale != 1.0:
        mono *= np.float32(scale)
    return mono


def _unregister_portaudio_exit_handler() -> None:
    """Keep a hung stream from hanging process exit in sounddevice's Pa_Terminate."""
    sd = _sounddevice()
    handler = getattr(sd, "_exit_handler", None)
    if callable(handler):
        atexit.unregister(handler)
