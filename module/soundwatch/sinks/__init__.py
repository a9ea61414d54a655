"""Sinks: where events and state messages go, chosen by a ``type:`` name.

``make_sink({"type": "jsonl", "path": "/data/events.jsonl"})`` builds a sink
from (already validated) config; the keys other than ``type`` are the sink
class's keyword arguments. Backends are registered by dotted path and imported
only when used, so a heavy client library (paho, azure-iot-device) costs
nothing unless that sink is configured. Later backends register themselves
here with :func:`register_sink` or by adding a line to ``_BUILTIN``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from soundwatch.sinks.base import Sink, SinkConfigError, SinkError, resolved, sink_error

__all__ = [
    "Sink",
    "SinkConfigError",
    "SinkError",
    "available_sink_types",
    "make_sink",
    "register_sink",
    "resolved",
    "sink_error",
]

SinkFactory = Callable[..., Sink]

_BUILTIN: dict[str, str] = {
    "console": "soundwatch.sinks.console:ConsoleSink",
    "jsonl": "soundwatch.sinks.jsonl:JsonlSink",
    "mqtt": "soundwatch.sinks.mqtt:MqttSink",
    "iothub": "soundwatch.sinks.iothub:IotHubSink",
}
_registry: dict[str, str | SinkFactory] = dict(_BUILTIN)


def register_sink(type_name: str, factory: str | SinkFactory) -> None:
    """Make ``type_name`` available to :func:`make_sink`.

    ``factory`` is a callable taking the config's keyword arguments, or a
    ``"module:attribute"`` path to one, imported on first use.
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


def make_sink(config: Mapping[str, Any]) -> Sink:
    """Build the sink that ``config["type"]`` names, with the other keys as options.

    Raises :class:`SinkConfigError` for an unknown type or options the sink
    does not take, naming what is accepted.
    """
    options = dict(config)
    type_name = options.pop("type", None)
    if not isinstance(type_name, str) or type_name not in _registry:
        raise SinkConfigError(
            f"unknown sink type {type_name!r}; choose one of {available_sink_types()}"
        )
    factory = _resolve(type_name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        accepted = [
            name
            for name, p in inspect.signature(factory).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        raise SinkConfigError(f"sink {type_name!r}: {e}; accepted options: {accepted}") from e
    return factory(**options)
