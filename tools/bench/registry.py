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
        what="one MFCC window through the model, LiteRT in this process and Keras in "
        "one child per thread count",
    ),
    Section(
        name="stream",
        title="Streaming: per 1 s hop, and `soundwatch run` sustained",
        func="tools.bench.stream:run",
        one_core=True,
        what="rows 1-5: one 1 s hop, incremental against recomputing the 10 s window, one "
        "core, in one process, interleaved; rows 6-9: `soundwatch run` and a reference-style "
        "loop streaming in real time side by side as processes without thread pins",
    ),
    Section(
        name="http",
        title="HTTP API: POST /inference",
        func="tools.bench.http_bench:run",
        one_core=False,
        what="soundwatch serve against a reference-style Flask + librosa + Keras server, both on "
        "waitress as processes, 1 and 4 concurrent clients over loopback",
    ),
    Section(
        name="mqtt",
        title="MQTT publish and delivery",
        func="tools.bench.mqtt_bench:run",
        one_core=False,
        what="QoS 1 to a loopback mosquitto: outbox throughput, and the real pipeline's events "
        "to a mosquitto_sub process",
    ),
]
