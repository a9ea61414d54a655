"""Audio sources behind one interface: microphone, file, fan simulator.

``open_source(config.source)`` builds the source a validated config model
describes; the model goes into the source's constructor as it is.
"""

from __future__ import annotations

from soundwatch.config import (
    FileSourceConfig,
    MicSourceConfig,
    SimulatorSourceConfig,
    SourceConfig,
)
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


def open_source(config: SourceConfig) -> Source:
    """The source ``config.type`` names, built from its config model.

    Raises what the source raises for a device or file it cannot use (a
    :class:`SourceError` for an unreadable file).
    """
    if isinstance(config, MicSourceConfig):
        return MicSource(config)
    if isinstance(config, FileSourceConfig):
        return FileSource(config)
    if isinstance(config, SimulatorSourceConfig):
        from soundwatch.sources.simulator import SimulatorSource

        return SimulatorSource(config)
    raise SourceError(f"unknown source config {type(config).__name__}")
