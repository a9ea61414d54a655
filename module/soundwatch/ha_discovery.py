"""Home Assistant MQTT discovery: the retained config messages that make HA show the module.

With discovery on, the MQTT sink publishes (retained, on every connect) one
config message per entity under ``<discovery prefix>/<component>/<node id>/
<object id>/config``:

* ``binary_sensor`` *Anomaly* (device class ``problem``): ``ON`` while an
  anomaly is active (the state's ``active_class`` is not null), with the
  active class and anomaly id as attributes;
* one ``sensor`` per class: *<class> probability*, the latest window's
  probability of that class in percent;
* ``sensor`` *Level*: the latest window's RMS level in dBFS.

Every entity reads the module's retained ``state`` topic and uses its
``status`` topic for availability (``online`` / ``offline``, the Last Will),
and all belong to one HA device identified by the node id, so a dashboard
shows the module with no set-up. Only the standard library is used here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "homeassistant"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")


@dataclass(frozen=True)
class DiscoveryMessage:
    """One retained config message: where it goes and its JSON payload."""

    topic: str
    payload: dict[str, Any]


def node_id(device_id: str, module_id: str) -> str:
    """A discovery node id from the device and module ids (HA allows ``[a-zA-Z0-9_-]``)."""
    raw = f"{module_id}_{device_id}"
    return _UNSAFE.sub("_", raw).strip("_") or "soundwatch"


def object_id(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_").lower() or "x"


def discovery_messages(
    *,
    device_id: str,
    module_id: str,
    model_version: str,
    class_names: Sequence[str],
    state_topic: str,
    status_topic: str,
    discovery_prefix: str = DEFAULT_PREFIX,
    sw_version: str = "",
) -> list[DiscoveryMessage]:
    """The config messages for the anomaly binary sensor, class probabilities and level."""
    node = node_id(device_id, module_id)
    device: dict[str, Any] = {
        "identifiers": [node],
        "name": f"soundwatch {device_id}",
        "manufacturer": "soundwatch",
        "model": model_version,
    }
    if sw_version:
        device["sw_version"] = sw_version
    common: dict[str, Any] = {
        "state_topic": state_topic,
        "availability_topic": status_topic,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "soundwatch", **({"sw_version": sw_version} if sw_version else {})},
    }
    out = [
        DiscoveryMessage(
            f"{discovery_prefix}/binary_sensor/{node}/anomaly/config",
            {
                **common,
                "name": "Anomaly",
                "unique_id": f"{node}_anomaly",
                "device_class": "problem",
                "value_template": "{{ 'ON' if value_json.active_class else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "json_attributes_topic": state_topic,
                "json_attributes_template": (
                    "{{ {'active_class': value_json.active_class, "
                    "'anomaly_id': value_json.anomaly_id, "
                    "'class': value_json['class']} | tojson }}"
                ),
            },
        )
    ]
    for name in class_names:
        oid = f"probability_{object_id(name)}"
        out.append(
            DiscoveryMessage(
                f"{discovery_prefix}/sensor/{node}/{oid}/config",
                {
                    **common,
                    "name": f"{name.replace('_', ' ').capitalize()} probability",
                    "unique_id": f"{node}_{oid}",
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    "suggested_display_precision": 1,
                    "value_template": (
                        f"{{{{ (value_json.Probabilities[{json.dumps(name)}] * 100) | round(1) }}}}"
                    ),
                    "icon": "mdi:percent",
                },
            )
        )
    out.append(
        DiscoveryMessage(
            f"{discovery_prefix}/sensor/{node}/level/config",
            {
                **common,
                "name": "Level",
                "unique_id": f"{node}_level",
                "unit_of_measurement": "dBFS",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                "value_template": "{{ value_json.level.rms_dbfs }}",
                "icon": "mdi:waveform",
            },
        )
    )
    return out
