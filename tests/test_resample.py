"""StreamResampler: streamed output equals one-shot soxr, whatever the block size."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from soundwatch.audio import resample as oneshot_resample
from soundwatch.resample import StreamResampler, resampled
from soundwatch.stream_types import AudioBlock

OUT_RATE = 22050


def _signal(rate: int, seconds: float = 2.3, seed: int = 0) -> npt.NDArray[np.float32]:
    """Noise plus tones, a length that is not a multiple of any block size tested."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate) + 17
    t = np.arange(n) / rate
    x = 0.2 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 440 * t)
    x += 0.1 * np.sin(2 * np.pi * 0.45 * min(rate, OUT_RATE) * t)  # near the band edge
    return x.astype(np.float32)


def _chunks(n: int, block: int | str, rng: np.random.Generator) -> list[tuple[int, int]]:
    spans = []
    i = 0
    while i < n:
        size = int(rng.integers(1, 5000)) if block == "random" else int(block)
        spans.append((i, min(n, i + size)))
        i += size
    return spans


def _stream(
    x: npt.NDArray[np.float32], rate: int, block: int | str, seed: int = 1
) -> tuple[npt.NDArray[np.float32], list[AudioBlock]]:
    rs = StreamResampler(rate, OUT_RATE)
    outs = []
    for a, b in _chunks(len(x), block, np.random.default_rng(seed)):
        outs.append(rs.process(AudioBlock(x[a:b], a, rate)))
    outs.append(rs.flush())
    return np.concatenate([o.samples for o in outs]), outs


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
@pytest.mark.parametrize("block", [1, 7, 256, 1024, 4410, 48000, "random"])
def test_streamed_equals_oneshot_exactly(rate: int, block: int | str) -> None:
    x = _signal(rate)
    y, outs = _stream(x, rate, block)
    reference = soxr.resample(x, rate, OUT_RATE, quality="HQ")
    # Bit-exact, not merely close: soxr's one-shot call runs the same filter.
    assert y.dtype == np.float32
    assert y.shape == reference.shape
    np.testing.assert_array_equal(y, reference)
    # Positions count output samples and are contiguous.
    assert outs[0].start_sample == 0
    for prev, cur in itertools.pairwise(outs):
        assert cur.start_sample == prev.end_sample
        assert cur.sample_rate_hz == OUT_RATE
        assert not cur.discontinuity


def test_streamed_equals_the_file_decoder() -> None:
    """A file decoded by audio.decode_audio and the same audio streamed agree."""
    x = _signal(44100, 1.0)
    y, _ = _stream(x, 44100, 4410)
    np.testing.assert_array_equal(y, oneshot_resample(x, 44100, OUT_RATE))


def test_passthrough_when_rates_are_equal() -> None:
    rs = StreamResampler(OUT_RATE, OUT_RATE)
    block = AudioBlock(np.ones(100, dtype=np.float32), 500, OUT_RATE, True, 12.5)
    assert rs.passthrough
    assert rs.process(block) is block
    assert rs.flush().samples.size == 0


def test_rate_mismatch_is_refused() -> None:
    rs = StreamResampler(48000, OUT_RATE)
    with pytest.raises(ValueError, match="44100 Hz"):
        rs.process(AudioBlock(np.zeros(10, dtype=np.float32), 0, 44100))


def test_discontinuity_resets_state_and_maps_position() -> None:
    rate = 48000
    first, second = _signal(rate, 1.0, seed=1)[:48000], _signal(rate, 1.0, seed=2)[:48000]
    rs = StreamResampler(rate, OUT_RATE)
    out1 = [rs.process(AudioBlock(first[i : i + 4800], i, rate)) for i in range(0, 48000, 4800)]
    # The second segment arrives after a gap of 0.5 s (e.g. dropped blocks).
    gap_start = len(first) + 24000
    out2 = [
        rs.process(AudioBlock(second[i : i + 4800], gap_start + i, rate, i == 0, 7.0))
        for i in range(0, 48000, 4800)
    ]
    out2.append(rs.flush())
    assert out2[0].discontinuity and out2[0].captured_at == 7.0
    assert not any(b.discontinuity for b in out1 + out2[1:])
    # Output position jumps to the input position mapped to the output rate.
    assert out2[0].start_sample == gap_start * OUT_RATE // rate
    # After the reset the second segment resamples exactly as if on its own.
    y2 = np.concatenate([b.samples for b in out2])
    np.testing.assert_array_equal(y2, soxr.resample(second, rate, OUT_RATE, quality="HQ"))
    for prev, cur in itertools.pairwise(out2):
        assert cur.start_sample == prev.end_sample


def test_resampled_helper_builds_from_first_block_and_flushes() -> None:
    rate = 44100
    x = _signal(rate, 1.0)
    blocks = [AudioBlock(x[i : i + 1000], i, rate) for i in range(0, len(x), 1000)]
    out = list(resampled(iter(blocks), OUT_RATE))
    np.testing.assert_array_equal(
        np.concatenate([b.samples for b in out]), soxr.resample(x, rate, OUT_RATE, quality="HQ")
    )
    assert all(b.samples.size for b in out)
