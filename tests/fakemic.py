"""A virtual ALSA microphone for tests (verified-recipes.md section 1).

PortAudio captures from an ALSA ``file`` PCM whose ``infile`` holds raw
S16_LE mono samples; a ``plug`` PCM in front converts to whatever format,
rate and channel count the capture asks for. No kernel module or sound server
is needed. Point ALSA at the generated config with :attr:`FakeMic.env`
(``ALSA_CONFIG_PATH``) before PortAudio initialises, or call
:func:`activate`, which sets it and re-initialises PortAudio in-process.

What this device does (seen with alsa-lib 1.2.8 and PortAudio 19.6):

- The ``null`` slave is not clock-paced: a second of audio arrives in a
  millisecond or so, so tests reason in sample counts, not seconds.
- Capture it as int16 mono (MicSource's default). When the plug has to
  convert (to float32 or int32, or 1 -> 2 channels), whole periods are lost
  silently after the first three or so (no overflow flag), because the
  unpaced slave runs ahead of the conversion; int16 mono arrives bit-exact.
- At the end of ``infile`` capture does not stop, error or go silent: the
  plugin keeps handing out its ring buffer, i.e. the last buffer's worth of
  the file (9600 frames here) repeats forever, as fast as it is read. An
  all-zero file therefore flat-lines forever; a file with sound never trips
  a watchdog.
- A missing ``infile`` makes the device show up with 0 input channels
  (``mode="missing"``, or :meth:`FakeMic.unplug`); a bogus slave PCM makes it
  vanish from the device list (``mode="bogus"``). PortAudio only notices
  either after a re-initialisation (a rescan).
- With a named pipe as ``infile`` (``mode="fifo"``, fed by :class:`FifoFeeder`)
  the device really stops delivering when the pipe is empty: PortAudio's
  capture thread blocks in ``read()``, and ``Pa_AbortStream`` blocks with it
  until more data arrives or every writer closes the pipe. Opening the pipe
  (which PortAudio already does while enumerating devices) blocks until a
  writer exists, so create the feeder first.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

ALSA_BASE_CONFIG = "/usr/share/alsa/alsa.conf"
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 on Linux)


def to_int16(samples: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Float samples in [-1, 1) (or int16 already) as int16, mono."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.dtype == np.int16:
        return x
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def load_audio(source: npt.ArrayLike | str | Path) -> tuple[npt.NDArray[np.int16], int | None]:
    """int16 mono samples and the file's rate (``None`` for arrays)."""
    if isinstance(source, (str, Path)):
        data, rate = sf.read(str(source), dtype="int16", always_2d=True)
        mono = data[:, 0] if data.shape[1] == 1 else to_int16(data.mean(axis=1) / 32768.0)
        return np.ascontiguousarray(mono), int(rate)
    return to_int16(source), None


def _pcm_block(name: str, infile: str | None, rate_hz: int, bogus: bool) -> str:
    if bogus:
        inner = '"soundwatch_no_such_pcm"'
    else:
        inner = f"""{{
            type file
            slave.pcm "null"
            file "/dev/null"
            infile "{infile}"
            format "raw"
        }}"""
    return f"""pcm.{name} {{
    type plug
    slave {{
        pcm {inner}
        format S16_LE
        rate {rate_hz}
        channels 1
    }}
}}
"""


@dataclass
class FakeMic:
    """One virtual microphone: an ALSA config and the raw file (or pipe) it reads."""

    directory: Path
    name: str
    rate_hz: int
    samples: npt.NDArray[np.int16] = field(repr=False)
    mode: str = "file"
    as_default: bool = False
    devices_before: tuple[str, ...] = ()

    @property
    def conf_path(self) -> Path:
        return self.directory / "asound.conf"

    @property
    def raw_path(self) -> Path:
        return self.directory / f"{self.name}.raw"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make ALSA (and so PortAudio) see this device."""
        return {"ALSA_CONFIG_PATH": f"{ALSA_BASE_CONFIG}:{self.conf_path}"}

    @property
    def expected(self) -> npt.NDArray[np.float32]:
        """The samples as PortAudio delivers them in float32."""
        return self.samples.astype(np.float32) / np.float32(32768.0)

    def write(self) -> None:
        """(Re)write the config and the raw file for the current settings."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.mode == "fifo":
            if not self.raw_path.exists():
                os.mkfifo(self.raw_path)
        elif self.mode == "file":
            self.samples.astype("<i2").tofile(self.raw_path)
        parts = [
            _pcm_block(other, str(self.directory / f"{other}.raw"), self.rate_hz, False)
            for other in self.devices_before
        ]
        for other in self.devices_before:
            np.zeros(self.rate_hz // 10, dtype="<i2").tofile(self.directory / f"{other}.raw")
        infile = str(self.raw_path)
        if self.mode == "missing":
            infile = str(self.directory / "no-such-file.raw")
        parts.append(_pcm_block(self.name, infile, self.rate_hz, self.mode == "bogus"))
        if self.as_default:
            parts.append(f'pcm.!default "{self.name}"\n')
        # Write then rename: ALSA never sees a half-written config.
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text("".join(parts))
        tmp.replace(self.conf_path)

    def unplug(self) -> None:
        """Make the device lose its input (visible to PortAudio after a rescan)."""
        if self.raw_path.exists():
            self.raw_path.rename(self.raw_path.with_suffix(".unplugged"))

    def replug(
        self,
        samples: npt.ArrayLike | None = None,
        devices_before: tuple[str, ...] | None = None,
    ) -> None:
        """Bring the device back, optionally with new audio and other devices
        listed before it (so that its PortAudio index changes)."""
        if samples is not None:
            self.samples = to_int16(samples)
        if devices_before is not None:
            self.devices_before = devices_before
        self.mode = "file"
        unplugged = self.raw_path.with_suffix(".unplugged")
        if unplugged.exists():
            unplugged.unlink()
        self.write()


def make_fake_mic(
    directory: str | Path,
    audio: npt.ArrayLike | str | Path,
    rate_hz: int | None = None,
    name: str = "soundwatch_fakemic",
    mode: str = "file",
    as_default: bool = False,
) -> FakeMic:
    """Create a virtual microphone in ``directory`` playing ``audio``.

    ``audio`` is a float array in [-1, 1), an int16 array, or a WAV/FLAC path
    (its rate is used unless ``rate_hz`` is given; 44.1 or 48 kHz typically).
    ``mode``: ``"file"`` (works), ``"missing"`` (listed with no inputs),
    ``"bogus"`` (not listed at all), ``"fifo"`` (a named pipe: feed it with
    :class:`FifoFeeder`, created before PortAudio initialises).
    """
    if mode not in ("file", "missing", "bogus", "fifo"):
        raise ValueError(f"unknown fake mic mode {mode!r}")
    samples, file_rate = load_audio(audio)
    rate = rate_hz or file_rate or 48000
    mic = FakeMic(Path(directory), name, int(rate), samples, mode, as_default)
    mic.write()
    return mic


class FifoFeeder:
    """Holds a fake mic's named pipe open for writing and feeds it samples.

    Opened read-write and non-blocking, so creating it never blocks and the
    pipe always has a writer (PortAudio's open does not block). The pipe
    buffer is enlarged to 1 MiB (about 10 s at 48 kHz).
    """

    def __init__(self, mic: FakeMic) -> None:
        if mic.mode != "fifo":
            raise ValueError("FifoFeeder needs a fake mic made with mode='fifo'")
        self.fd: int | None = os.open(mic.raw_path, os.O_RDWR | os.O_NONBLOCK)
        fcntl.fcntl(self.fd, _F_SETPIPE_SZ, 1 << 20)

    def feed(self, samples: npt.ArrayLike) -> int:
        """Write samples; returns how many fitted in the pipe."""
        assert self.fd is not None, "feeder closed"
        data = to_int16(samples).astype("<i2").tobytes()
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        return written // 2

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def activate(mic: FakeMic) -> None:
    """Point ALSA at ``mic`` in this process and make PortAudio rescan."""
    os.environ.update(mic.env)
    from soundwatch.sources.mic import rescan_devices

    if not rescan_devices():
        raise RuntimeError("PortAudio could not be re-initialised (a stream is still open?)")
