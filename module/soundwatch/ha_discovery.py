"""Home Assistant MQTT discovery: the retained config messages that make HA show the module.

With discovery on, the MQTT sink publishes (retained, on every connect) one
config message per entity under ``<discovery prefix>/<component>/<node id>/
<object id>/config``:

* ``binary_sensor`` *Anomaly* (device class ``problem``): ``ON`` while an
  anomaly is active (the state's ``active_class`` is not null), with the
  active class and anomaly id as attributes;
* one ``sensor`` per class: *<class> probability*, the latest window's
  probability of that class in percent;
* ``sensor`` *Level*: the latest window's RMS level in dBFS;
* with the per-unit baseline on, ``sensor`` *Novelty*: how far the latest
  window departs from the unit's normal (unknown while it is learned), with
  the threshold and baseline id as attributes, and ``sensor`` *Baseline
  learned*: how much of the learning period is done, in percent.

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
    baseline: bool = False,
) -> list[DiscoveryMessage]:
    """The config messages for the anomaly binary sensor, class probabilities and level
    (and, with ``baseline``, the novelty and the learning progress)."""
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
    if baseline:
        out.extend(_baseline_entities(discovery_prefix, node, common))
    return out


def _baseline_entities(prefix: str, node: str, common: dict[str, Any]) -> list[DiscoveryMessage]:
    """Novelty (unknown while learning or for a window not judged) and learning progress."""
    return [
        DiscoveryMessage(
            f"{prefix}/sensor/{node}/novelty/config",
            {
                **common,
                "name": "Novelty",
                "unique_id": f"{node}_novelty",
                "state_class": "measurement",
                "suggested_display_precision": 2,
                "value_template": (
                    "{{ value_json.novelty.score if value_json.novelty else none }}"
                ),
                "json_attributes_topic": common["state_topic"],
                "json_attributes_template": (
                    "{{ {'threshold': value_json.novelty.threshold if value_json.novelty "
                    "else none, 'baseline_id': value_json.baseline_id} | tojson }}"
                ),
                "icon": "mdi:chart-bell-curve",
            },
        ),
        DiscoveryMessage(
            f"{prefix}/sensor/{node}/baseline_learned/config",
            {
                **common,
                "name": "Baseline learned",
                "unique_id": f"{node}_baseline_learned",
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 0,
                "value_template": (
                    "{{ (100 * value_json.learning.learned_s / value_json.learning.learn_s) "
                    "| round(1) if value_json.learning else 100 }}"
                ),
                "icon": "mdi:school",
            },
        ),
    ]
