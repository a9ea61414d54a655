"""The per-unit baseline in a running module: learning it, scoring with it, operating it.

:mod:`soundwatch.baseline` is the model of a unit's normal (embedding, fit,
novelty, files). This module is its life beside the pipeline:

* **Learning.** On a fresh ``state_dir`` the unit learns from the first
  ``baseline.learn_s`` seconds of *stream time* (sample counts: a file read
  with ``--fast`` learns as a live microphone does). Each window adds the
  audio it brings (a first window its whole length, then one hop); windows
  that are silent, clipped or cannot be judged (a dropout) add nothing.
  Usable windows are held back for ``during_learning.confirm_n`` windows
  before they are learned: if the classifier confirms an anomaly meanwhile,
  the held windows (which led to it) and every window while it is active are
  dropped. A window the classifier alone calls a fault, a knock or a beeper
  it mistakes for one, is learned: excluding such windows would leave the
  unit's ordinary events out of its normal and make them novel later. The kept
  windows are decimated to at most :data:`MAX_LEARN_WINDOWS`, evenly over
  the period, so a day of learning stays a few megabytes.
* **Persistence.** The learner is written to ``state_dir`` every
  :data:`CHECKPOINT_S` of stream time and at shutdown (atomically, with the
  model and physics versions), so progress survives restarts and ``kill -9``
  (at most a minute is learned again). The baseline is written once learned.
  A learner or baseline from another model or physics version is refused
  with a log line saying so, and learning starts again.
* **Scoring.** Once learned, every judged window gets a novelty reading
  against the baseline's threshold.
* **Operations.** :meth:`UnitBaseline.relearn` drops the baseline and starts
  learning again; :meth:`UnitBaseline.mark_false_alarm` adds the windows of
  an event (kept in a bounded ring of recent windows) to the baseline, which
  recomputes its threshold, and saves it.

All methods are thread-safe: the pipeline thread observes windows while the
control plane's thread runs commands and the HTTP threads read health.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from soundwatch.baseline import (
    CV_BLOCKS,
    LAYOUT,
    Baseline,
    BaselineError,
    Layout,
    embedding,
    fit,
    read_state,
    write_state,
)
from soundwatch.bundle import Bundle
from soundwatch.config import BaselineConfig
from soundwatch.features import MAX_CLIPPED_FRACTION, FeatureExtractor, Quality
from soundwatch.physics import PHYSICS_VERSION
from soundwatch.stream_types import BaselineVerdict, LearningProgress, NoveltyReading, clock
from soundwatch.windowing import FeatureWindow

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

BASELINE_FILE: Final = "baseline.npz"
LEARNER_FILE: Final = "baseline-learning.npz"
LEARNER_FORMAT: Final = "soundwatch-baseline-learning/2"
#: Stream seconds between checkpoints of the learner (what a crash may cost).
CHECKPOINT_S: Final = 60.0
#: Windows kept for the fit: a day at a 1 s hop is decimated to this many.
MAX_LEARN_WINDOWS: Final = 3000
#: The fit needs this many windows at least (its out-of-sample blocks).
MIN_LEARN_WINDOWS: Final = 2 * CV_BLOCKS
#: Recent windows kept for marking a false alarm (an hour at a 1 s hop).
RECENT_WINDOWS: Final = 3600
#: Stream seconds without a learned window after which learning is said to stall.
STALL_S: Final = 300.0


class UnitBaselineError(ValueError):
    """An operation on the baseline that cannot be done now (the message says why).

    ``key`` names what the problem is about (an argument such as ``seq``, or
    ``(baseline)`` for the baseline's own state), for the command's answer.
    """

    def __init__(self, message: str, key: str = "(baseline)") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class _Recent:
    index: int
    start_s: float
    end_s: float
    embedding: F32 = field(repr=False)


class Learner:
    """The learning period's windows and progress (module docstring)."""

    def __init__(self, layout: Layout, model_version: str) -> None:
        self.layout = layout
        self.model_version = model_version
        self.learned_s = 0.0
        self.accepted = 0  # windows learned, before decimation
        self.stride = 1  # every stride-th accepted window is kept
        self._kept = np.zeros((MAX_LEARN_WINDOWS, layout.size), dtype=np.float32)
        self._n = 0
        self.rejected: collections.Counter[str] = collections.Counter()

    @property
    def kept(self) -> F32:
        return self._kept[: self._n]

    def add(self, emb: F32, new_s: float) -> None:
        """Learn one window that brings ``new_s`` seconds of new audio."""
        if self.accepted % self.stride == 0:
            if self._n == MAX_LEARN_WINDOWS:
                # Keep every other window and halve the rate from now on: the
                # kept windows stay evenly spread over the whole period.
                half = self._kept[: self._n : 2].copy()
                self._n = half.shape[0]
                self._kept[: self._n] = half
                self.stride *= 2
            if self.accepted % self.stride == 0:
                self._kept[self._n] = emb
                self._n += 1
        self.accepted += 1
        self.learned_s += new_s

    def save(self, path: Path) -> None:
        """Write atomically (a crash mid-write leaves the previous checkpoint)."""
        doc = {
            "format": LEARNER_FORMAT,
            "model_version": self.model_version,
            "physics_version": PHYSICS_VERSION,
            "layout": [list(g) for g in self.layout.groups],
            "learned_s": self.learned_s,
            "accepted": self.accepted,
            "stride": self.stride,
            "rejected": dict(self.rejected),
            "saved_at": round(time.time(), 3),
        }
        # float16 as in the baseline's own file (dB-sized values): a day's
        # checkpoint is about 1 MB, written once a minute while learning.
        finite = np.finfo(np.float16).max
        kept = np.clip(self.kept, -finite, finite).astype(np.float16)
        write_state(path, doc, kept=kept)

    @classmethod
    def load(cls, path: Path, layout: Layout, model_version: str) -> Learner:
        """A checkpoint, checked against this model, physics version and layout.

        Raises :class:`BaselineError` naming what does not match.
        """
        doc, arrays = read_state(path, LEARNER_FORMAT, model_version, "learning checkpoint")
        if "kept" not in arrays:
            raise BaselineError(f"{path}: unreadable learning checkpoint (no 'kept')")
        kept = np.asarray(arrays["kept"], dtype=np.float32)
        stored = Layout(tuple((str(n), int(k)) for n, k in doc.get("layout", [])))
        if stored != layout or kept.ndim != 2 or kept.shape[1] != layout.size:
            raise BaselineError(f"{path}: learned with another embedding layout")
        if kept.shape[0] > MAX_LEARN_WINDOWS:
            raise BaselineError(f"{path}: more than {MAX_LEARN_WINDOWS} kept windows")
        learner = cls(layout, model_version)
        learner._n = kept.shape[0]
        learner._kept[: learner._n] = kept
        learner.learned_s = float(doc["learned_s"])
        learner.accepted = int(doc["accepted"])
        learner.stride = max(1, int(doc["stride"]))
        learner.rejected.update({str(k): int(v) for k, v in doc.get("rejected", {}).items()})
        return learner


class UnitBaseline:
    """The unit's baseline beside the pipeline: learning, then scoring (module docstring).

    ``generation`` changes whenever the baseline appears or is dropped, so
    the pipeline knows to decide another way from the next window.
    """

    def __init__(self, config: BaselineConfig, state_dir: Path, model_version: str) -> None:
        self.config = config
        self.state_dir = state_dir
        self.model_version = model_version
        self.baseline_path = state_dir / BASELINE_FILE
        self.learner_path = state_dir / LEARNER_FILE
        self.generation = 0
        self.false_alarms = 0
        self._lock = threading.RLock()
        self._baseline: Baseline | None = None
        self._learner: Learner | None = None
        self._recent: collections.deque[_Recent] = collections.deque(maxlen=RECENT_WINDOWS)
        self._prev_end_s: float | None = None
        self._checkpoint_end_s: float | None = None
        # Stream time of the last learned window (or of the first one seen):
        # how long learning has made no progress.
        self._quiet_since_s: float | None = None
        self._last_end_s: float | None = None
        self._stall_rejects: collections.Counter[str] = collections.Counter()
        self._stall_logged = False
        # Usable windows wait here until the classifier's confirmation could have
        # covered them (module docstring): (end_s, embedding, new audio s).
        self._held: collections.deque[tuple[float, F32, float]] = collections.deque()
        self._baseline = self._load_baseline()
        if self._baseline is None:
            logger.info(
                "no baseline for this unit yet: learning its normal sound from the next %s "
                "of usable audio",
                clock(config.learn_s),
            )

    # --- state ---------------------------------------------------------------------------

    @property
    def baseline(self) -> Baseline | None:
        return self._baseline

    @property
    def learning(self) -> bool:
        return self._baseline is None

    def reconfigure(self, config: BaselineConfig) -> None:
        """New settings; a new ``learn_s`` moves the target of the learning in progress."""
        with self._lock:
            self.config = config

    def progress(self) -> LearningProgress | None:
        with self._lock:
            if self._baseline is not None:
                return None
            learned = self._learner.learned_s if self._learner is not None else 0.0
            return LearningProgress(round(learned, 3), self.config.learn_s)

    # --- the pipeline's side -----------------------------------------------------------------

    def observe(self, window: FeatureWindow, fault: str | None) -> BaselineVerdict:
        """One window: learn from it or score it. ``fault``: the class of the anomaly the
        classifier has confirmed and is active at this window, if any (then neither
        this window nor those held back before it are learned).

        Window starts and ends are stream seconds; after a source gap the stream
        time may jump: a window never brings more than its own length.
        """
        features = window.features
        problem = features.quality.problem
        emb = embedding(features)
        with self._lock:
            unusable = _unusable(features.quality, window.level.silent)
            if unusable is None:
                self._recent.append(_Recent(window.index, window.start_s, window.end_s, emb))
            new_s = self._new_audio_s(window.start_s, window.end_s)
            if self._baseline is not None:
                return self._score(emb, problem)
            self._learn(window.end_s, emb, new_s, unusable, fault is not None)
            baseline = self._baseline  # set once learning is complete
            if baseline is not None:
                return self._score(emb, problem)
            progress = self.progress()
            return BaselineVerdict(None, None, progress)

    def close(self) -> None:
        """The pipeline stops: keep what was learned (a checkpoint)."""
        with self._lock:
            if self._learner is not None and self._baseline is None:
                self._checkpoint()

    # --- operations (the control plane's side) -----------------------------------------------

    def relearn(self, origin: str) -> dict[str, Any]:
        """Drop the baseline (and any learning in progress) and learn the unit again."""
        with self._lock:
            old = self._baseline
            for path in (self.baseline_path, self.learner_path):
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:
                    raise UnitBaselineError(f"cannot remove {path}: {e}") from e
            self._baseline = None
            self._learner = None
            self._held.clear()
            self._checkpoint_end_s = None
            self._quiet_since_s = None
            self._stall_rejects.clear()
            self._stall_logged = False
            self.generation += 1
            logger.info(
                "baseline %s dropped (%s): learning this unit's normal sound again for %s",
                old.baseline_id if old is not None else "(none: was learning)",
                origin,
                clock(self.config.learn_s),
            )
            return {
                "dropped": None if old is None else old.baseline_id,
                "learning": {"learned_s": 0.0, "learn_s": self.config.learn_s},
            }

    def mark_false_alarm(
        self, first_index: int, last_index: int, what: str, origin: str
    ) -> dict[str, Any]:
        """Add the windows ``first_index..last_index`` (an event's) to the baseline.

        The threshold is recomputed and the new baseline saved. Raises
        :class:`UnitBaselineError` while learning, or when those windows are no
        longer kept (older than the last :data:`RECENT_WINDOWS` windows).
        """
        with self._lock:
            old = self.require_baseline()
            windows = [r for r in self._recent if first_index <= r.index <= last_index]
            if not windows:
                oldest = self._recent[0].start_s if self._recent else None
                kept = (
                    f"windows from stream {oldest:.1f} s on are kept"
                    if oldest is not None
                    else "no windows are kept yet"
                )
                raise UnitBaselineError(
                    f"{what} is too old: its windows ({first_index}..{last_index}) are no longer "
                    f"kept ({kept}; the last {RECENT_WINDOWS} windows)",
                    "seq",
                )
            extra = np.stack([r.embedding for r in windows])
        # The fit takes a moment: done outside the lock, so health stays responsive.
        new = old.refit(extra)
        with self._lock:
            if self._baseline is not old:
                raise UnitBaselineError(
                    "the baseline changed meanwhile; mark the false alarm again"
                )
            self._baseline = new
            self.false_alarms += 1
            saved = self._save_baseline(new)
        logger.info(
            "%s marked as a false alarm (%s): %d windows joined baseline %s -> %s, threshold "
            "%.4g -> %.4g",
            what,
            origin,
            len(windows),
            old.baseline_id,
            new.baseline_id,
            old.threshold,
            new.threshold,
        )
        return {
            "windows": len(windows),
            "previous": {"baseline_id": old.baseline_id, "threshold": old.threshold},
            "baseline": new.summary(),
            "saved": saved,
        }

    def require_baseline(self) -> Baseline:
        """The baseline, or :class:`UnitBaselineError` while it is being learned."""
        with self._lock:
            if self._baseline is None:
                progress = self.progress()
                done = progress.describe() if progress is not None else "learning"
                raise UnitBaselineError(
                    f"there is no baseline yet ({done}); the classifier alone decides until "
                    "then: mark false alarms once it is learned"
                )
            return self._baseline

    def health(self) -> dict[str, Any]:
        with self._lock:
            baseline = self._baseline
            if baseline is not None:
                return {
                    "state": "ready",
                    **baseline.summary(),
                    "false_alarms_marked": self.false_alarms,
                    "file": str(self.baseline_path),
                }
            learner = self._learner
            progress = self.progress()
            assert progress is not None
            return {
                "state": "learning",
                "learned_s": round(progress.learned_s, 1),
                "learn_s": progress.learn_s,
                "progress": round(progress.fraction, 4),
                "describe": progress.describe(),
                "windows": learner.accepted if learner is not None else 0,
                "kept": learner.kept.shape[0] if learner is not None else 0,
                "rejected": dict(learner.rejected) if learner is not None else {},
                "stalled": self._stalled(),
                "file": str(self.learner_path),
            }

    # --- internals ---------------------------------------------------------------------------

    def _new_audio_s(self, start_s: float, end_s: float) -> float:
        """The audio a window adds to what the windows before it covered."""
        prev = self._prev_end_s
        self._prev_end_s = end_s
        length = end_s - start_s
        if prev is None or end_s <= prev:
            return length
        return min(length, end_s - prev)

    def _learn(
        self, end_s: float, emb: F32, new_s: float, unusable: str | None, fault: bool
    ) -> None:
        learner = self._learner_for()
        if self._quiet_since_s is None or end_s < (self._last_end_s or 0.0):
            self._quiet_since_s = end_s  # a new stream (or a source that restarted its clock)
            self._held.clear()
        self._last_end_s = end_s
        if fault:  # the held windows led to the anomaly: none of them is this unit's normal
            self._reject("fault", 1 + len(self._held))
            self._held.clear()
        elif unusable is not None:
            self._reject(unusable, 1)
        else:
            self._held.append((end_s, emb, new_s))
        while len(self._held) > self.config.during_learning.confirm_n:
            _, held_emb, held_s = self._held.popleft()
            learner.add(held_emb, held_s)
            self._quiet_since_s = end_s
            self._stall_rejects.clear()
            if self._stall_logged:
                logger.info("learning resumed at stream %.1f s", end_s)
                self._stall_logged = False
        if learner.learned_s >= self.config.learn_s and learner.kept.shape[0] >= MIN_LEARN_WINDOWS:
            self._complete(learner)
            return
        if self._checkpoint_end_s is None:
            self._checkpoint_end_s = end_s
        elif end_s - self._checkpoint_end_s >= CHECKPOINT_S or end_s < self._checkpoint_end_s:
            self._checkpoint()
            self._checkpoint_end_s = end_s

    def _reject(self, reason: str, n: int) -> None:
        assert self._learner is not None
        self._learner.rejected[reason] += n
        self._stall_rejects[reason] += n
        self._warn_if_stalled()

    def _learner_for(self) -> Learner:
        if self._learner is None:
            self._learner = self._load_learner(LAYOUT)
        return self._learner

    def _complete(self, learner: Learner) -> None:
        t0 = time.perf_counter()
        try:
            baseline = fit(
                learner.kept,
                learner.layout,
                self.model_version,
                false_alarm_rate=self.config.false_alarm_rate,
                learned_s=learner.learned_s,
            )
        except BaselineError as e:  # not expected with enough windows; keep learning
            logger.error("could not learn the baseline yet: %s", e)
            return
        self._baseline = baseline
        self._learner = None
        self.generation += 1
        self._save_baseline(baseline)
        try:
            self.learner_path.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("cannot remove the learning checkpoint %s: %s", self.learner_path, e)
        logger.info(
            "baseline %s learned from %d windows (%s of audio; %d kept) in %.2f s: novelty "
            "threshold %.4g at a false-alarm rate of %g per window",
            baseline.baseline_id,
            learner.accepted,
            clock(learner.learned_s),
            learner.kept.shape[0],
            time.perf_counter() - t0,
            baseline.threshold,
            baseline.false_alarm_rate,
        )

    def _score(self, emb: F32, problem: str | None) -> BaselineVerdict:
        baseline = self._baseline
        assert baseline is not None
        if problem is not None:
            return BaselineVerdict(baseline.baseline_id, None)
        n = baseline.novelty(emb)
        return BaselineVerdict(
            baseline.baseline_id, NoveltyReading(n.score, n.threshold, n.speed_ratio)
        )

    def _checkpoint(self) -> None:
        if self._learner is None:
            return
        try:
            self._learner.save(self.learner_path)
        except OSError as e:  # a full disk must not stop detection
            logger.error("cannot save the learning checkpoint %s: %s", self.learner_path, e)

    def _save_baseline(self, baseline: Baseline) -> bool:
        try:
            baseline.save(self.baseline_path)
            return True
        except OSError as e:
            logger.error(
                "cannot save baseline %s to %s: %s (it is used until the module stops)",
                baseline.baseline_id,
                self.baseline_path,
                e,
            )
            return False

    def _load_baseline(self) -> Baseline | None:
        if not self.baseline_path.exists():
            return None
        try:
            baseline = Baseline.load(self.baseline_path, self.model_version)
        except BaselineError as e:
            logger.warning("baseline refused: %s; learning this unit's normal sound again", e)
            return None
        logger.info(
            "baseline %s loaded from %s (learned from %s of audio, threshold %.4g)",
            baseline.baseline_id,
            self.baseline_path,
            clock(baseline.learned_s),
            baseline.threshold,
        )
        return baseline

    def _load_learner(self, layout: Layout) -> Learner:
        if self.learner_path.exists():
            try:
                learner = Learner.load(self.learner_path, layout, self.model_version)
            except BaselineError as e:
                logger.warning("learning checkpoint refused: %s; learning starts again", e)
            else:
                logger.info(
                    "learning resumed from %s: %s of %s learned",
                    self.learner_path,
                    clock(learner.learned_s),
                    clock(self.config.learn_s),
                )
                return learner
        return Learner(layout, self.model_version)

    def _stalled(self) -> str | None:
        if self._last_end_s is None or self._quiet_since_s is None:
            return None
        quiet_s = self._last_end_s - self._quiet_since_s
        if quiet_s < STALL_S or not self._stall_rejects:
            return None
        reason, n = self._stall_rejects.most_common(1)[0]
        why = {
            "fault": "the classifier hears a fault",
            "silent": "the audio is silent",
            "clipped": "the audio clips",
            "dropout": "the audio drops out",
        }.get(reason, reason)
        return (
            f"nothing learned in the last {clock(quiet_s)} of audio: {why} "
            f"({n} of {sum(self._stall_rejects.values())} windows)"
        )

    def _warn_if_stalled(self) -> None:
        if self._stall_logged:
            return
        stalled = self._stalled()
        if stalled is not None:
            logger.warning("learning stalls: %s", stalled)
            self._stall_logged = True


def _unusable(quality: Quality, silent: bool) -> str | None:
    """Why a window cannot be learned from (its audio, not its sound), or ``None``.

    The same windows cast no vote once the baseline is learned (they cannot be
    judged). A window with a few clipped samples (a loud knock, a gain that
    pumps) is judged, so it is learned too: leaving out what a unit's loud
    events do to its windows made those events novel later.
    """
    if silent:
        return "silent"
    if quality.problem is None:
        return None
    return "clipped" if quality.clipped_fraction > MAX_CLIPPED_FRACTION else "dropout"


# --- offline: a baseline from recordings ------------------------------------------------------


@dataclass(frozen=True)
class ClipWindows:
    """What one clip gave an offline baseline: its usable windows, or why it gave none."""

    path: Path
    windows: int = 0
    skipped: int = 0  # windows that cannot be judged (dropouts, silence, clipping)
    seconds: float = 0.0
    error: str | None = None


def clip_embeddings(
    path: Path, bundle: Bundle, extractor: FeatureExtractor, hop_s: float
) -> tuple[list[F32], ClipWindows]:
    """The baseline embeddings of one recording, analysed as ``soundwatch classify`` does.

    A clip up to one window long gives one window (a shorter one is looped,
    as for ``classify``); a longer one gives a window every ``hop_s`` seconds.
    Windows that cannot be judged are skipped, as the running module does.
    """
    from soundwatch.audio import AudioError, decode_audio

    spec = bundle.spec
    try:
        clip = decode_audio(path, spec.sample_rate_hz, via_rate_hz=spec.train_rate_hz)
    except (AudioError, OSError, ValueError) as e:
        return [], ClipWindows(path, error=str(e))
    samples = clip.samples
    n = extractor.window_samples
    hop = max(1, round(hop_s * spec.sample_rate_hz))
    starts = range(0, samples.shape[0] - n + 1, hop) if samples.shape[0] > n else range(1)
    out: list[F32] = []
    skipped = 0
    for start in starts:
        features = extractor.analyse(samples[start : start + n])
        if features.quality.problem is not None:
            skipped += 1
            continue
        out.append(embedding(features))
    return out, ClipWindows(path, len(out), skipped, clip.duration_s)


def learn_from_clips(
    paths: list[Path],
    bundle: Bundle,
    *,
    hop_s: float = 10.0,
    false_alarm_rate: float = 0.01,
) -> tuple[Baseline, list[ClipWindows]]:
    """A baseline learned from recordings of one unit's normal sound.

    Returns it with what each clip gave. Raises :class:`BaselineError` when the
    clips give fewer than :data:`MIN_LEARN_WINDOWS` usable windows (the
    message says how many and what to do).
    """
    extractor = FeatureExtractor(bundle.spec)
    embeddings: list[F32] = []
    report: list[ClipWindows] = []
    for path in paths:
        embs, windows = clip_embeddings(path, bundle, extractor, hop_s)
        report.append(windows)
        embeddings.extend(embs)
    if len(embeddings) < MIN_LEARN_WINDOWS:
        raise BaselineError(
            f"the clips gave {len(embeddings)} usable windows; a baseline needs at least "
            f"{MIN_LEARN_WINDOWS}: give more or longer clips, or a shorter --hop"
        )
    seconds = sum(w.seconds for w in report)
    data = np.stack(embeddings)
    if data.shape[0] > MAX_LEARN_WINDOWS:  # evenly over the recordings, as the module keeps
        data = data[np.linspace(0, data.shape[0] - 1, MAX_LEARN_WINDOWS).round().astype(int)]
    baseline = fit(
        data,
        LAYOUT,
        bundle.model_version,
        false_alarm_rate=false_alarm_rate,
        learned_s=seconds,
    )
    return baseline, report
