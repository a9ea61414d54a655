"""The reference service's path, as their ``prediction.py`` ran it: librosa + Keras.

Importing this module loads neither librosa nor TensorFlow; the functions do,
so a caller can pin TensorFlow's threads first (:func:`pin_tf_threads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_SR_HZ = 22050
REFERENCE_N_MFCC = 40
REFERENCE_N_FRAMES = 433
REFERENCE_PAD_COLUMNS = 2
REFERENCE_INPUT_SHAPE = (REFERENCE_N_MFCC, REFERENCE_N_FRAMES, 1)
REFERENCE_N_CLASSES = 4

# A whole process doing reference: import, load the model, classify one
# file. Arguments: model path, audio path. Kept as a script (run with
# ``python -c``) so that nothing of soundwatch or of this bench is imported.
REFERENCE_PROCESS_SCRIPT = """\
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
REFERENCE_LOAD_ONLY_SCRIPT = """\
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


def build_reference_cnn() -> tuple[Any, str]:
    """The reference service's CNN (untrained: weights do not matter for timing), and its origin.

    Uses ``tools.train.arch.reference_cnn`` when it is there, so the bench
    times exactly what training builds; otherwise builds it here:
    Conv2D 16/32/64 (kernel 2, relu), each followed by MaxPooling2D(2) and
    Dropout(0.2), then GlobalAveragePooling2D and Dense(4, softmax).
    """
    try:
        from tools.train.arch import reference_cnn
    except ImportError:
        pass
    else:
        model = reference_cnn((REFERENCE_N_MFCC, REFERENCE_N_FRAMES), REFERENCE_N_CLASSES)
        _compile_like_reference(model)
        return model, "tools.train.arch.reference_cnn (untrained)"
    from tensorflow import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=REFERENCE_INPUT_SHAPE),
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
            layers.Dense(REFERENCE_N_CLASSES, activation="softmax"),
        ]
    )
    _compile_like_reference(model)
    return (
        model,
        "built in tools/bench/reference_service.py (its architecture, untrained)",
    )


def _compile_like_reference(model: Any) -> None:
    # The reference service saved a compiled model, so load_model() also rebuilds an optimizer.
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])


def load_reference_model(path: Path) -> Any:
    from tensorflow import keras

    return keras.models.load_model(path)


def reference_fit_frames(mfcc: np.ndarray) -> np.ndarray:
    """The reference service's padding: append two zero columns, then cut or zero-fill to 433."""
    padded = np.pad(mfcc, ((0, 0), (0, REFERENCE_PAD_COLUMNS)))
    out = np.zeros((REFERENCE_N_MFCC, REFERENCE_N_FRAMES), dtype=np.float32)
    keep = min(REFERENCE_N_FRAMES, padded.shape[1])
    out[:, :keep] = padded[:, :keep]
    return out


def reference_load(path: Path) -> np.ndarray:
    import librosa

    y, _ = librosa.load(path, sr=REFERENCE_SR_HZ)
    return y


def reference_features(y: np.ndarray) -> np.ndarray:
    """librosa MFCCs + the reference service's padding, as its input batch (1, 40, 433, 1)."""
    import librosa

    mfcc = librosa.feature.mfcc(y=y, sr=REFERENCE_SR_HZ, n_mfcc=REFERENCE_N_MFCC)
    return reference_fit_frames(mfcc)[None, :, :, None]


def reference_predict(model: Any, x: np.ndarray) -> np.ndarray:
    probs: np.ndarray = np.asarray(model.predict(x, verbose=0))[0]
    return probs


def reference_call(model: Any, x: np.ndarray) -> np.ndarray:
    probs: np.ndarray = np.asarray(model(x, training=False))[0]
    return probs
