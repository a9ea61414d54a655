"""Command channels: each translates one transport to :mod:`soundwatch.control`.

A channel rides on a sink's connection (one MQTT client, one IoT Hub client
per broker or hub) but is not part of the sink: sinks publish, channels take
commands and answer them. :func:`open_channels` makes the channels the
configured sinks carry; a transport's library is imported only when a sink
of that type exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

from soundwatch.control import ControlPlane
from soundwatch.sinks import Sink


class Channel(Protocol):
    """A running command channel."""

    name: str

    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def open_channels(sinks: Sequence[Sink], control: ControlPlane) -> list[Channel]:
    """The command channels of the MQTT and IoT Hub sinks among ``sinks``, started."""
    out: list[Channel] = []
    for sink in sinks:
        if sink.type_name == "mqtt":
            from soundwatch.channels.mqtt import MqttChannel
            from soundwatch.sinks.mqtt import MqttSink

            out.append(MqttChannel(cast(MqttSink, sink), control))
        elif sink.type_name == "iothub":
            from soundwatch.channels.iothub import IotHubChannel
            from soundwatch.sinks.iothub import IotHubSink

            iothub = cast(IotHubSink, sink)
            if iothub.config.twin or iothub.config.methods:
                out.append(IotHubChannel(iothub, control))
    return out
