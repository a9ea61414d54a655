"""The seeds' path, as their ``prediction.py`` ran it: librosa + Keras.

Importing this module loads neither librosa nor TensorFlow; the functions do,
so a caller can pin TensorFlow's threads first (:func:`pin_tf_threads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SEED_SR_HZ = 22050
SEED_N_MFCC = 40
SEED_N_FRAMES = 433
SEED_PAD_COLUMNS = 2
SEED_INPUT_SHAPE = (SEED_N_MFCC, SEED_N_FRAMES, 1)
SEED_N_CLASSES = 4

# A whole process doing the seeds' path: import, load the model, classify one
# file. Arguments: model path, audio path. Kept as a script (run with
# ``python -c``) so that nothing of soundwatch or of this bench is imported.
SEEDS_PROCESS_SCRIPT = """\
import sys
import numpy as np
import librosa
from tensorflow import keras
model = keras.models.load_model(sys.argv[1])
y, sr = librosa.load(sys.argv[2], sr=22050)
mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=40)
mfcc = np.pad(mfcc, ((0, 0), (0, 2)))
x = np.zeros((40, 433), dtype=np.float32)
x[:, : min(433, mfcc.shape[1])] = mfcc[:, :433]
probs = model.predict(x[None, :, :, None], verbose=0)[0]
print(int(np.argmax(probs)), [round(float(p), 4) for p in probs])
"""

# The same imports and model load, without any audio.
SEEDS_LOAD_ONLY_SCRIPT = """\
import sys
import numpy as np
import librosa
from tensorflow import keras
model = keras.models.load_model(sys.argv[1])
"""


def pin_tf_threads(threads: int) -> None:
    """Set TensorFlow's intra- and inter-op pools; must run before TF does any work."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def build_seed_cnn() -> tuple[Any, str]:
    """The seeds' CNN (untrained; weights do not matter for timing) and where it came from.

    Uses ``tools.train.arch.build_model("seed", ...)`` when it is there, so the
    bench times exactly what training builds; otherwise builds it here:
    Conv2D 16/32/64 (kernel 2, relu), each followed by MaxPooling2D(2) and
    Dropout(0.2), then GlobalAveragePooling2D and Dense(4, softmax).
    """
    try:
        from tools.train.arch import build_model
    except ImportError:
        pass
    else:
        try:
            model = build_model("seed", (SEED_N_MFCC, SEED_N_FRAMES), SEED_N_CLASSES, None)
        except (TypeError, ValueError):
            pass
        else:
            _compile_like_seeds(model)
            return model, 'tools.train.arch.build_model("seed") (untrained)'
    from tensorflow import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=SEED_INPUT_SHAPE),
            layers.Conv2D(16, kernel_size=2, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.2),
            layers.Conv2D(32, kernel_size=2, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.2),
            layers.Conv2D(64, kernel_size=2, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(SEED_N_CLASSES, activation="softmax"),
        ]
    )
    _compile_like_seeds(model)
    return model, "built in tools/bench/seeds.py (seed architecture, untrained)"


def _compile_like_seeds(model: Any) -> None:
    # The seeds saved a compiled model, so load_model() also rebuilds an optimizer.
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])


def load_seed_model(path: Path) -> Any:
    from tensorflow import keras

    return keras.models.load_model(path)


def seeds_fit_frames(mfcc: np.ndarray) -> np.ndarray:
    """The seeds' padding: append two zero columns, then cut or zero-fill to 433."""
    padded = np.pad(mfcc, ((0, 0), (0, SEED_PAD_COLUMNS)))
    out = np.zeros((SEED_N_MFCC, SEED_N_FRAMES), dtype=np.float32)
    keep = min(SEED_N_FRAMES, padded.shape[1])
    out[:, :keep] = padded[:, :keep]
    return out


def seeds_load(path: Path) -> np.ndarray:
    import librosa

    y, _ = librosa.load(path, sr=SEED_SR_HZ)
    return y


def seeds_features(y: np.ndarray) -> np.ndarray:
    """librosa MFCCs + the seeds' padding, as the model's input batch (1, 40, 433, 1)."""
    import librosa

    mfcc = librosa.feature.mfcc(y=y, sr=SEED_SR_HZ, n_mfcc=SEED_N_MFCC)
    return seeds_fit_frames(mfcc)[None, :, :, None]


def seeds_predict(model: Any, x: np.ndarray) -> np.ndarray:
    probs: np.ndarray = np.asarray(model.predict(x, verbose=0))[0]
    return probs


def seeds_call(model: Any, x: np.ndarray) -> np.ndarray:
    probs: np.ndarray = np.asarray(model(x, training=False))[0]
    return probs
