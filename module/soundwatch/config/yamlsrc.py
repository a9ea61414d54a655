"""YAML loading that remembers where each key stood, and env handling.

Validation errors must name the key *and* the line, so the YAML is composed
into nodes first: every mapping key keeps its position, and
:func:`line_of` maps a pydantic error location back to the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_PREFIX = "SOUNDWATCH__"


class ConfigSyntaxError(ValueError):
    """The YAML itself is malformed."""


class ConfigLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """``yaml.SafeLoader`` with YAML 1.2's booleans: only ``true``/``false``.

    YAML 1.1 also reads ``on``/``off``/``yes``/``no`` as booleans, which turns
    the documented thresholds ``{on: 0.7, off: 0.5}`` into ``{True: 0.7,
    False: 0.5}``. Here those words stay strings; where the schema wants a
    boolean, pydantic still accepts ``yes``/``on``.
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_value(text: str) -> Any:
    """One YAML document parsed like the config file is (for env values and tests)."""
    # ConfigLoader is a SafeLoader: no Python tags.
    return yaml.load(text, Loader=ConfigLoader)


@dataclass(frozen=True)
class Located:
    """Parsed data plus a map from key paths to 1-based line numbers."""

    data: Any
    lines: Mapping[tuple[str | int, ...], int]


def parse_yaml(text: str, source: str) -> Located:
    """Parse YAML into plain data, recording the line of every key and item."""
    try:
        node = yaml.compose(text, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigSyntaxError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if node is None:
        return Located({}, {})
    lines: dict[tuple[str | int, ...], int] = {}
    _walk(node, (), lines)
    data = load_yaml_value(text)
    return Located(data, lines)


def _walk(
    node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]
) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def line_of(lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest known prefix of ``loc``."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def substitute_env(data: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value."""
    if isinstance(data, dict):
        return {
            k: substitute_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in data.items()
        }
    if isinstance(data, list):
        return [substitute_env(v, env, f"{path}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise KeyError(f"{path}: environment variable {name} is not set")

        return _ENV_REF.sub(repl, data)
    return data


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str] | None = None) -> list[str]:
    """Apply ``SOUNDWATCH__SECTION__KEY=value`` overrides; returns the paths set.

    Values are parsed as YAML scalars/flow values, so ``3``, ``true``,
    ``[a, b]`` and ``{on: 0.9, off: 0.7}`` work. List items are addressed by index
    (``SOUNDWATCH__SINKS__0__PATH``).
    """
    env = os.environ if env is None else env
    applied = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        value = load_yaml_value(env[name]) if env[name] != "" else ""
        _set_path(data, parts, value, name)
        applied.append(".".join(parts))
    return applied


def _set_path(data: Any, parts: list[str], value: Any, name: str) -> None:
    cur = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise KeyError(f"{name}: no list item {part!r}")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                cur = cur.setdefault(part, {})
        else:
            raise KeyError(f"{name}: {'.'.join(parts[:i])} is not a section")
