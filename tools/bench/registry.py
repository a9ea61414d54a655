"""The bench's sections, in the order they run and print.

Each entry names a ``run(ctx) -> list[Row]`` function by ``"module:function"``;
the runner imports it only in that section's own child process. ``one_core``
sections run with every BLAS/OpenMP/numba/TensorFlow pool pinned to one
thread (see :data:`tools.bench.core.ONE_CORE_ENV`).
"""

from __future__ import annotations

from tools.bench.core import Section

SECTIONS: list[Section] = [
    Section(
        name="clip",
        title="Per 10-second clip",
        func="tools.bench.clip:run",
        one_core=True,
        what="one 10 s, 16 kHz WAV file to class probabilities; both paths on one core, "
        "in one process, interleaved",
    ),
    Section(
        name="startup",
        title="Start-up and peak RSS",
        func="tools.bench.startup:run",
        one_core=False,
        what="whole processes, started one after another as a user would, alternating",
    ),
    Section(
        name="inference",
        title="Inference alone",
        func="tools.bench.inference:run",
        one_core=True,
        what="one 40x433 window through the model, LiteRT in this process and Keras in "
        "one child per thread count",
    ),
]
