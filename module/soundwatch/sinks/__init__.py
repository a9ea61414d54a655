"""Sinks: where events and state messages go, chosen by the config's ``type:``.

``make_sink(config.sinks[0])`` builds the sink a validated config model
names; the model goes into the sink's constructor as it is. Backends are
registered by dotted path and imported only when used, so a heavy client
library (paho, azure-iot-device) costs nothing unless that sink is
configured. A program may add a backend with :func:`register_sink`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from soundwatch.sinks.base import (
    Sink,
    SinkConfigError,
    SinkContext,
    SinkError,
    SinkKept,
    resolved,
    sink_error,
)

__all__ = [
    "Sink",
    "SinkConfigError",
    "SinkContext",
    "SinkError",
    "SinkKept",
    "available_sink_types",
    "make_sink",
    "register_sink",
    "resolved",
    "sink_error",
]


class SinkConfigModel(Protocol):
    """A sink's config model: the ``config.sinks`` items, or a registered backend's own."""

    @property
    def type(self) -> str: ...


SinkFactory = Callable[[Any], Sink]

_BUILTIN: dict[str, str] = {
    "console": "soundwatch.sinks.console:ConsoleSink",
    "jsonl": "soundwatch.sinks.jsonl:JsonlSink",
    "mqtt": "soundwatch.sinks.mqtt:MqttSink",
    "iothub": "soundwatch.sinks.iothub:IotHubSink",
}
_registry: dict[str, str | SinkFactory] = dict(_BUILTIN)


def register_sink(type_name: str, factory: str | SinkFactory) -> None:
    """Make ``type_name`` available to :func:`make_sink`.

    ``factory`` takes the sink's config model, or is a ``"module:attribute"``
    path to such a callable, imported on first use.
    """
    _registry[type_name] = factory


def available_sink_types() -> list[str]:
    """The ``type:`` names :func:`make_sink` knows."""
    return sorted(_registry)


def _resolve(type_name: str) -> SinkFactory:
    entry = _registry[type_name]
    if not isinstance(entry, str):
        return entry
    module_name, _, attr = entry.partition(":")
    try:
        factory: SinkFactory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise SinkConfigError(
            f"sink type {type_name!r} needs a package that is not installed: {e}"
        ) from e
    _registry[type_name] = factory
    return factory


def make_sink(config: SinkConfigModel) -> Sink:
    """Build the sink that ``config.type`` names from its (validated) config model.

    Raises :class:`SinkConfigError` for an unknown type or a backend whose
    package is missing.
    """
    type_name = config.type
    if type_name not in _registry:
        raise SinkConfigError(
            f"unknown sink type {type_name!r}; choose one of {available_sink_types()}"
        )
    return _resolve(type_name)(config)
