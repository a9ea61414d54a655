"""A physics simulator of the reference fan line, in numpy alone, and its wider world.

The default model is trained on this simulation of the fan line described in
``fan-line.md`` (MIMII cannot be downloaded here), and the live demo source
plays it. Split by concern:

* :mod:`.fan`: the fan's physics: a unit, its faults, its dry sound;
* :mod:`.scene`: room, microphone, background, events, the signal chain;
* :mod:`.world`: what is drawn from which ranges, in which families;
* :mod:`.recording`: schedules, clips and endless streams;
* :mod:`.dataset`: MIMII-layout datasets and long recordings on disk.

The serving path never imports this package, except the simulator source.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from soundwatch.sim.fan import CLASSES, STATES, UNNAMED_FAULTS, Faults, Segment, Unit
from soundwatch.sim.recording import (
    Rendering,
    Stream,
    render_clip,
    schedule_segments,
    state_fractions,
)
from soundwatch.sim.scene import EVENT_KINDS, Scene
from soundwatch.sim.world import FAMILIES, Mixture, Take, draw_take, draw_unit

#: A scene in the middle of the simulated world: a medium room, a flat
#: microphone, pink background, faults of the stated strengths, no AGC.
TYPICAL: Mapping[str, Sequence[str]] = {
    "room": ("medium",),
    "room_model": ("tail",),
    "noise": ("pink",),
    "mic": ("flat",),
    "strength": ("stated",),
    "agc": ("off",),
}


def typical_clip(
    unit_id: int,
    state: str,
    snr_db: float,
    seed: int,
    duration_s: float = 10.0,
    sample_rate_hz: int = 16000,
) -> npt.NDArray[np.float32]:
    """A clean clip of ``unit_id`` in ``state`` in the :data:`TYPICAL` scene (a MIMII-like clip)."""
    take = draw_take(draw_unit(unit_id), seed, duration_s, snr_db, only=TYPICAL)
    return render_clip(take, [(state, duration_s)], seed, sample_rate_hz).mix


def typical_recording(
    unit_id: int,
    schedule: Sequence[tuple[str, float]],
    snr_db: float,
    seed: int,
    sample_rate_hz: int = 16000,
    ramp_s: float = 2.0,
) -> npt.NDArray[np.float32]:
    """One continuous recording of ``schedule`` in the :data:`TYPICAL` scene."""
    total = float(sum(s for _, s in schedule))
    take = draw_take(draw_unit(unit_id), seed, total, snr_db, only=TYPICAL)
    stream = Stream(take, schedule, seed, sample_rate_hz, ramp_s=ramp_s, loop=False)
    return stream.read(stream.cycle_samples)


__all__ = [
    "CLASSES",
    "EVENT_KINDS",
    "FAMILIES",
    "STATES",
    "TYPICAL",
    "UNNAMED_FAULTS",
    "Faults",
    "Mixture",
    "Rendering",
    "Scene",
    "Segment",
    "Stream",
    "Take",
    "Unit",
    "draw_take",
    "draw_unit",
    "render_clip",
    "schedule_segments",
    "state_fractions",
    "typical_clip",
    "typical_recording",
]
