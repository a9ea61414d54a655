"""The simulated fan line: its physics follow fan-line.md, its world varies, its output is exact.

Physics is checked on the rendered sound itself (spectra of the fan's part at
the microphone, at 16 kHz), not on the parameters that made it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundwatch import sim
from soundwatch.sim.dataset import ClipPlan, RecordingPlan, plan_clips, write_clips, write_recording
from soundwatch.sim.fan import STATES, fan_state
from soundwatch.sim.recording import Renderer, schedule_segments, state_fractions
from soundwatch.sim.scene import EVENT_KINDS, Event, Room, render_event, room_ir
from soundwatch.sim.world import FAMILIES, draw_faults, draw_take

RATE = 16000
CLEAN = {**sim.TYPICAL, "room": ("dry",)}


def _spectrum(x: np.ndarray, rate: int = RATE) -> tuple[np.ndarray, np.ndarray]:
    window = np.hanning(x.size)
    power = np.abs(np.fft.rfft(x * window)) ** 2
    return np.fft.rfftfreq(x.size, 1.0 / rate), power


def _band(freqs: np.ndarray, power: np.ndarray, centre: float, half: float) -> float:
    return float(power[(freqs >= centre - half) & (freqs <= centre + half)].sum())


def _machine(
    unit_id: int, state: str, seed: int = 5, seconds: float = 10.0
) -> tuple[np.ndarray, sim.Take]:
    """The fan's own sound at the microphone (no background) in a dry, flat scene."""
    take = draw_take(sim.draw_unit(unit_id), seed, seconds, 60.0, only=CLEAN)
    segments = schedule_segments([(state, seconds)], RATE)
    parts = Renderer(take, segments, seed, RATE).read(segments[-1].stop)
    return parts.machine, take


def test_units_are_deterministic_and_within_the_description() -> None:
    for unit_id in range(40):
        unit = sim.draw_unit(unit_id)
        assert unit == sim.draw_unit(unit_id)
        assert 20.0 <= unit.shaft_hz <= 24.0
        assert unit.blades == 7
        assert all(a > b for a, b in zip(unit.bpf_amps, unit.bpf_amps[1:], strict=False))
        assert unit.hum_amps[0] > unit.hum_amps[1] > unit.hum_amps[2] > 0
    assert sim.draw_unit(1) != sim.draw_unit(2)


@pytest.mark.parametrize("strength", ["weak", "stated", "strong"])
def test_fault_strengths_stay_within_or_near_the_stated_ranges(strength: str) -> None:
    rng = np.random.default_rng(3)
    lo, hi = {"weak": (-0.25, 0.34), "stated": (0.33, 0.67), "strong": (0.66, 1.25)}[strength]

    def within(value: float, weakest: float, strongest: float) -> bool:
        u = (value - weakest) / (strongest - weakest)
        return lo - 1e-9 <= u <= hi + 1e-9

    for _ in range(200):
        f = draw_faults(rng, strength)
        assert within(f.imbalance_shaft_gain, 3.0, 6.0)
        assert within(f.imbalance_am_depth, 0.25, 0.60)
        assert within(f.clogging_speed, 1.05, 1.15)
        assert within(f.clogging_airflow_db, -3.0, -8.0)
        assert 0.3 <= f.clogging_surge_hz <= 2.0
        assert 1200.0 <= f.clogging_whistle_hz <= 3000.0
        if f.voltage_speed < 1.0:
            assert within(f.voltage_speed, 0.80, 0.65)
        else:
            assert within(f.voltage_speed, 1.20, 1.35)
        assert abs(f.bearing_order - round(f.bearing_order)) >= 0.15


def test_a_healthy_fan_has_its_comb_at_seven_times_the_shaft_rate() -> None:
    machine, take = _machine(3, "normal")
    freqs, power = _spectrum(machine)
    bpf = 7 * take.unit.shaft_hz
    tone = _band(freqs, power, bpf, 0.02 * bpf)
    beside = _band(freqs, power, bpf + 0.1 * bpf, 0.02 * bpf)
    assert tone > 5 * beside
    hum = _band(freqs, power, 50.0, 0.3)
    assert hum > 3 * _band(freqs, power, 52.0, 0.3)


def _envelope_line(x: np.ndarray, freq: float) -> float:
    """Power of the sound's level modulation at ``freq`` over its neighbourhood."""
    env = np.convolve(x.astype(np.float64) ** 2, np.ones(40) / 40, mode="valid")[::16]
    f, p = _spectrum(env - env.mean(), rate=RATE // 16)
    return _band(f, p, freq, 0.3) / _band(f, p, freq + 3.0, 0.3)


@pytest.mark.parametrize("unit_id", [1, 2])
def test_imbalance_raises_the_shaft_tone_and_the_whole_sound_breathes_at_the_shaft_rate(
    unit_id: int,
) -> None:
    normal, take = _machine(unit_id, "normal")
    faulty, _ = _machine(unit_id, "imbalance")
    f, p_normal = _spectrum(normal / math.sqrt(np.mean(normal**2)))
    _, p_faulty = _spectrum(faulty / math.sqrt(np.mean(faulty**2)))
    shaft = take.unit.shaft_hz
    assert _band(f, p_faulty, shaft, 0.5) > 4 * _band(f, p_normal, shaft, 0.5)
    # Amplitude modulation at f_r of the whole sound (which also puts
    # sidebands at BPF ± f_r: here under the airflow noise of the same band).
    assert _envelope_line(faulty, shaft) > 20 * _envelope_line(normal, shaft)


def test_clogging_speeds_up_whistles_and_surges() -> None:
    normal, take = _machine(4, "normal")
    faulty, _ = _machine(4, "clogging")
    faults = take.faults
    f, p_normal = _spectrum(normal)
    _, p_faulty = _spectrum(faulty)
    bpf_new = 7 * take.unit.shaft_hz * faults.clogging_speed
    assert _band(f, p_faulty, bpf_new, 0.015 * bpf_new) > 5 * _band(
        f, p_normal, bpf_new, 0.015 * bpf_new
    )
    whistle = _band(f, p_faulty, faults.clogging_whistle_hz, faults.clogging_whistle_bw_hz)
    assert whistle > 5 * _band(
        f, p_normal, faults.clogging_whistle_hz, faults.clogging_whistle_bw_hz
    )
    # Surging: the level's slow modulation at the surge rate.
    env = np.sqrt(np.convolve(faulty**2, np.ones(800) / 800, mode="valid"))[::160]
    fe, pe = _spectrum(env - env.mean(), rate=100)
    assert _band(fe, pe, faults.clogging_surge_hz, 0.1) > 10 * _band(
        fe, pe, faults.clogging_surge_hz + 1.5, 0.1
    )


def test_voltage_change_moves_every_shaft_tone_and_enriches_the_hum() -> None:
    normal, take = _machine(5, "normal")
    faulty, _ = _machine(5, "voltage_change")
    f, p_normal = _spectrum(normal)
    _, p_faulty = _spectrum(faulty)
    speed = take.faults.voltage_speed
    assert speed < 0.8 or speed > 1.2
    moved = 7 * take.unit.shaft_hz * speed
    assert _band(f, p_faulty, moved, 0.015 * moved) > 5 * _band(f, p_normal, moved, 0.015 * moved)

    def lines_over_floor(p: np.ndarray) -> float:
        # Mains lines are exact: their power in ±0.15 Hz over the ring 0.5–1.5 Hz away.
        line = sum(_band(f, p, 50.0 * h, 0.15) for h in (4, 5, 6, 7))
        ring = sum(_band(f, p, 50.0 * h + side, 0.5) for h in (4, 5, 6, 7) for side in (-1.0, 1.0))
        return line / ring

    assert lines_over_floor(p_faulty) > 3 * lines_over_floor(p_normal)


@pytest.mark.parametrize("state", ["bearing", "rubbing", "loose_guard"])
def test_unnamed_faults_add_impulsive_or_shaft_locked_sound(state: str) -> None:
    normal, _ = _machine(6, "normal")
    faulty, _ = _machine(6, state)
    assert np.mean(faulty**2) > 1.02 * np.mean(normal**2)
    fan = fan_state(sim.draw_unit(6), draw_faults(np.random.default_rng(0), "stated"), state)
    assert fan.bearing_amp + fan.rub_amp + fan.rattle_amp > 0


@pytest.mark.parametrize("snr_db", [-6.0, 0.0, 6.0])
def test_a_clip_has_its_snr_and_peak_exactly(snr_db: float) -> None:
    take = draw_take(sim.draw_unit(2), 11, 10.0, snr_db, only={"agc": ["off"]})
    r = sim.render_clip(take, [("clogging", 10.0)], 11, RATE)
    measured = 10 * math.log10(np.mean(r.machine**2) / np.mean(r.background**2))
    assert measured == pytest.approx(snr_db, abs=0.01)
    assert r.peak_dbfs == pytest.approx(take.scene.peak_dbfs, abs=0.05)
    assert -42.0 <= take.scene.peak_dbfs <= -3.0
    again = sim.render_clip(
        draw_take(sim.draw_unit(2), 11, 10.0, snr_db, only={"agc": ["off"]}),
        [("clogging", 10.0)],
        11,
        RATE,
    )
    np.testing.assert_array_equal(r.mix, again.mix)


def test_the_world_draws_every_family_and_can_leave_one_out() -> None:
    seen: dict[str, set[str]] = {k: set() for k in FAMILIES}
    for seed in range(300):
        take = draw_take(sim.draw_unit(0), seed, 10.0, 0.0, exclude={"room": ["live"]})
        for key, value in take.families.items():
            seen[key].add(value)
    assert seen["room"] == {"dry", "medium"}
    for key, values in FAMILIES.items():
        if key != "room":
            assert seen[key] == set(values)
    with pytest.raises(ValueError, match="every room family is excluded"):
        draw_take(sim.draw_unit(0), 0, 10.0, exclude={"room": list(FAMILIES["room"])})


def test_a_real_line_mixture_brings_events_dropouts_steps_and_clipping() -> None:
    kinds: set[str] = set()
    impairments: set[str] = set()
    for seed in range(400):
        take = draw_take(sim.draw_unit(0), seed, 10.0, 0.0, mixture=sim.Mixture())
        kinds |= {e.kind for e in take.scene.events}
        impairments |= {i.kind for i in take.scene.impairments}
    assert kinds == set(EVENT_KINDS)
    assert impairments == {"dropout", "level_step", "clip"}


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_every_event_renders_at_any_length_and_rate(kind: str) -> None:
    for seconds in (0.05, 2.0, 12.0):
        for rate in (16000, 48000):
            x = render_event(Event(kind, 0.0, seconds, 0.0, 7), rate)
            assert x.size == round(seconds * rate)
            assert np.all(np.isfinite(x))
            assert np.mean(x.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("model", ["tail", "reflections", "image"])
def test_every_room_model_keeps_its_direct_to_reverberant_ratio(model: str) -> None:
    ir = room_ir(Room(model, 0.3, 6.0, 0.003), 9, RATE)
    assert ir[0] == 1.0
    drr = 10 * math.log10(1.0 / float(np.sum(ir[1:] ** 2)))
    assert drr == pytest.approx(6.0, abs=0.01)


def test_stream_samples_do_not_depend_on_read_sizes() -> None:
    take = draw_take(sim.draw_unit(3), 4, 30.0, 0.0, mixture=sim.Mixture(events_per_clip=3))
    schedule = [("normal", 4.0), ("imbalance", 3.0), ("normal", 3.0)]

    def stream() -> sim.Stream:
        return sim.Stream(take, schedule, 4, RATE, ramp_s=1.0, drift_db=0.5)

    whole = stream().read(25 * RATE)
    s = stream()
    pieces = np.concatenate([s.read(n) for n in (1, 999, 12345, 160000, 25 * RATE - 173345)])
    np.testing.assert_allclose(pieces, whole, atol=1e-6)


def test_stream_truth_follows_the_schedule_and_loops() -> None:
    take = draw_take(sim.draw_unit(3), 4, 10.0, 6.0)
    s = sim.Stream(take, [("normal", 2.0), ("clogging", 3.0)], 4, RATE)
    assert s.state_at(0) == "normal"
    assert s.state_at(2 * RATE) == "clogging"
    assert s.state_at(5 * RATE + 10) == "normal"  # the next pass
    once = sim.Stream(take, [("normal", 2.0)], 4, RATE, loop=False)
    assert np.all(once.read(3 * RATE)[2 * RATE :] == 0)
    with pytest.raises(IndexError):
        once.state_at(2 * RATE)


def test_a_change_of_state_ramps_and_shares_are_counted_half_each_side() -> None:
    segments = schedule_segments([("normal", 4.0), ("imbalance", 6.0)], 8000, ramp_s=2.0)
    shares = state_fractions(segments, 0, 80000)
    assert shares == pytest.approx({"normal": 0.5, "imbalance": 0.5})
    with pytest.raises(ValueError, match="unknown state"):
        schedule_segments([("wobble", 1.0)], RATE)


def test_clip_sets_use_mimii_layout_and_are_identical_with_workers(tmp_path: Path) -> None:
    plan = ClipPlan(
        units=(0, 2), per_class=1, snrs_db=(-6.0, 6.0), mixture=sim.Mixture(), straddle=0.5
    )
    roots = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        write_clips(plan_clips(root, plan, seed=3), root, workers)
        roots.append(root)
    rows = list(csv.DictReader((roots[0] / "metadata.csv").open()))
    assert len(rows) == 2 * 2 * 4
    for row in rows:
        path = roots[0] / row["path"]
        assert path.parts[-5].endswith("_dB_fan") and path.parts[-3].startswith("id_")
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        shares = json.loads(row["fractions"])
        assert max(shares, key=shares.get) == row["fault"]
        assert (path.parent.name == "normal") == (row["fault"] == "normal")
        assert (roots[1] / row["path"]).read_bytes() == path.read_bytes()
    assert (roots[1] / "metadata.csv").read_text() == (roots[0] / "metadata.csv").read_text()


def test_a_long_recording_is_written_with_its_truth(tmp_path: Path) -> None:
    wav = tmp_path / "day.wav"
    truth = write_recording(
        wav,
        RecordingPlan(
            unit_number=7, schedule=[("normal", 20.0), ("bearing", 8.0)], events_per_min=6.0
        ),
        block_s=3.0,
    )
    info = sf.info(str(wav))
    assert info.frames == 28 * 16000
    assert [s["state"] for s in truth["segments"]] == ["normal", "bearing"]
    assert truth["segments"][1]["start_s"] == pytest.approx(20.0)
    assert all(e["kind"] in EVENT_KINDS for e in truth["events"])
    assert json.loads(wav.with_suffix(".json").read_text())["unit"] == "id_07"


def test_states_named_and_unnamed() -> None:
    assert sim.CLASSES == ("normal", "imbalance", "clogging", "voltage_change")
    assert set(sim.UNNAMED_FAULTS) == {"bearing", "rubbing", "loose_guard"}
    assert STATES == sim.CLASSES + sim.UNNAMED_FAULTS
