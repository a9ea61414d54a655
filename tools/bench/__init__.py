"""``make bench``: soundwatch measured side by side with the reference service's path.

Every figure is a ratio against the reference service's path (librosa + Keras), measured
in the same run on the same machine, because absolute numbers on a shared,
noisy machine say little on their own. The runner (:mod:`tools.bench.__main__`)
walks a list of sections (:data:`tools.bench.registry.SECTIONS`); each
section is a function ``run(ctx) -> list[Row]`` in its own module and runs in
its own child process, so one section's imports (TensorFlow, librosa) and
thread settings cannot change another's figures.

To add a section: write ``tools/bench/<name>.py`` with ``run(ctx: Context)
-> list[Row]`` (see :mod:`tools.bench.core`) and add one ``Section`` line to
:mod:`tools.bench.registry`.
"""
