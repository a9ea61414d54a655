"""Writes the bundled sample clips and the results the shipped model gives for them.

    python -m tools.make_samples            # after a retrain: refresh module/soundwatch/samples/

One 10 s, 16 kHz clip per class from the fan simulator (unit 7, which no
training set contains: training units have even ids, at +6 dB, in the
middle of the simulated world), as FLAC, and ``expected.json`` with the
label and probabilities measured here (x86_64). ``soundwatch selftest`` and
``tools/arm64-check`` compare other machines against these.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import soundfile as sf

from soundwatch.bundle import load_bundle
from soundwatch.classify import ClipClassifier
from soundwatch.sim import CLASSES, typical_clip

OUT = Path(__file__).resolve().parents[1] / "module" / "soundwatch" / "samples"
UNIT, SNR_DB, SEED, RATE = 7, 6.0, 2024, 16000


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    classifier = ClipClassifier(load_bundle())
    expected: dict[str, object] = {
        "_about": f"simulated unit {UNIT}, {SNR_DB:+.0f} dB, seed {SEED}; measured on x86_64 "
        f"with {classifier.bundle.model_version}",
    }
    for i, fault in enumerate(CLASSES):
        audio = typical_clip(UNIT, fault, SNR_DB, SEED + i, sample_rate_hz=RATE)
        path = OUT / f"fan_{fault}.flac"
        sf.write(path, audio, RATE, format="FLAC", subtype="PCM_16")
        result = classifier.classify_source(path)
        if result.label != fault:
            # Recorded anyway: selftest checks that a machine computes what
            # this one did, not that the model is right on this clip.
            logging.warning("%s: the model says %s", path.name, result.label)
        expected[path.name] = {
            "class": fault,
            "label": result.label,
            "probabilities": dict(zip(result.class_names, result.probabilities, strict=True)),
        }
        logging.info("%s: %s %s", path.name, result.label, result.probabilities)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
