"""Audio sources behind one interface: microphone, file, fan simulator.

``open_source("mic" | "file" | "simulator", **options)`` builds one. Options
are the source's constructor arguments; the config file's spellings
(``preferred_rates_hz``, ``unit``, ``rate_hz``, a ``type`` equal to the kind)
are accepted too, so ``open_source(cfg.type, **cfg.model_dump())`` works.
"""

from __future__ import annotations

import inspect
from typing import Any

from soundwatch.sources.base import Source, SourceError
from soundwatch.sources.file import FileSource
from soundwatch.sources.mic import MicSource, list_input_devices, rescan_devices

__all__ = [
    "FileSource",
    "MicSource",
    "Source",
    "SourceError",
    "list_input_devices",
    "open_source",
    "rescan_devices",
]

SOURCE_KINDS: tuple[str, ...] = ("mic", "file", "simulator")

_ALIASES: dict[str, dict[str, str]] = {
    "mic": {"preferred_rates_hz": "preferred_rates"},
    "file": {},
    "simulator": {"unit": "unit_id", "rate_hz": "sample_rate_hz"},
}


def open_source(kind: str, **options: Any) -> Source:
    """A source of type ``kind`` built from ``options``.

    Raises :class:`SourceError` for an unknown kind or options the source does
    not take, and whatever the constructor raises for bad values (a
    :class:`SourceError` for an unreadable file, ``ValueError`` for bad values).
    """
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source type {kind!r} (one of {', '.join(SOURCE_KINDS)})")
    given_type = options.pop("type", kind)
    if given_type != kind:
        raise SourceError(f"source type {given_type!r} given for a {kind!r} source")
    options = {_ALIASES[kind].get(key, key): value for key, value in options.items()}
    source_class: type[Source]
    if kind == "mic":
        source_class = MicSource
    elif kind == "file":
        source_class = FileSource
    else:
        from soundwatch.sources.simulator import SimulatorSource

        source_class = SimulatorSource
    accepted = [p for p in inspect.signature(source_class).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SourceError(
            f"unknown option(s) {', '.join(unknown)} for a {kind} source "
            f"(accepted: {', '.join(accepted)})"
        )
    return source_class(**options)
