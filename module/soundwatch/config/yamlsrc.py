"""YAML loading that remembers where each key stood, and env handling.

Validation errors must name the key *and* the line, so the YAML is composed
into nodes first: every mapping key keeps its position, and
:func:`line_of` maps a pydantic error location back to the file.

A config file is untrusted input, and YAML can describe more than plain
values. Before anything is built from the nodes, :func:`_check_nodes` refuses,
naming the line: a tag other than YAML's plain ones (``!!python/...``
included: the loader is a ``SafeLoader`` anyway, this says so clearly), an
alias that contains itself, nesting deeper than :data:`MAX_DEPTH`, and more
than :data:`MAX_VALUES` values once aliases are expanded (an "alias bomb" of
a few lines would otherwise grow to gigabytes in the env substitution and
deep copies that follow). The file itself is at most :data:`MAX_CONFIG_BYTES`.
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


# Far above any real config (the documented default.yaml is ~10 KiB and a
# few hundred values), far below what could exhaust memory or time.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_VALUES = 100_000
MAX_DEPTH = 64

# Tags of plain data (what yaml.SafeLoader builds, and the merge key `<<`).
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}"
    for name in (
        "null", "bool", "int", "float", "str", "binary", "timestamp",
        "seq", "map", "omap", "pairs", "set", "merge",
    )
)  # fmt: skip


class ConfigSyntaxError(ValueError):
    """The YAML is malformed or not plain data; ``line`` (1-based) says where, if known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


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


def load_yaml_value(text: str, source: str = "<value>") -> Any:
    """One YAML document parsed like the config file is (for env values and tests).

    Raises :class:`ConfigSyntaxError` for malformed YAML and for anything
    :func:`parse_yaml` refuses.
    """
    return parse_yaml(text, source).data


def decode_config(raw: bytes, source: str) -> str:
    """The file's text; raises :class:`ConfigSyntaxError` (with the line) if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigSyntaxError(
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column} "
            "cannot be decoded; save the file as UTF-8",
            line,
        ) from None


@dataclass(frozen=True)
class Located:
    """Parsed data plus a map from key paths to 1-based line numbers."""

    data: Any
    lines: Mapping[tuple[str | int, ...], int]


def parse_yaml(text: str, source: str) -> Located:
    """Parse YAML into plain data, recording the line of every key and item.

    Raises :class:`ConfigSyntaxError` for malformed YAML and for what the
    module docstring lists (tags, recursive aliases, depth, size).
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigSyntaxError(
            f"{len(text)} characters: a config file is at most {MAX_CONFIG_BYTES} bytes"
        )
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Located({}, {})
        _check_nodes(node)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigSyntaxError(f"invalid YAML: {getattr(e, 'problem', None) or e}", line) from e
    except RecursionError:  # PyYAML composes recursively
        raise ConfigSyntaxError(f"nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()
    lines: dict[tuple[str | int, ...], int] = {}
    _walk(node, (), lines)
    return Located(data, lines)


def _check_nodes(root: yaml.Node) -> None:
    """Refuse what is not plain, bounded data (module docstring), naming the line.

    Visits the tree as it will be built, an alias once per use, so the
    count is that of the values the data will hold.
    """
    seen = 0
    # (node, depth, entering); a node is "open" between entering and leaving.
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, True)]
    open_nodes: set[int] = set()
    while stack:
        node, depth, entering = stack.pop()
        if not entering:
            open_nodes.discard(id(node))
            continue
        line = node.start_mark.line + 1
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConfigSyntaxError(
                f"tag {tag} is not allowed: a config holds plain values "
                "(strings, numbers, booleans, lists, mappings)",
                line,
            )
        if id(node) in open_nodes:
            raise ConfigSyntaxError("an alias refers to a value that contains it (a cycle)", line)
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigSyntaxError(
                f"more than {MAX_VALUES} values once aliases are expanded "
                "(aliases of aliases: an 'alias bomb'?)",
                line,
            )
        if depth > MAX_DEPTH:
            raise ConfigSyntaxError(f"nested more than {MAX_DEPTH} levels deep", line)
        if isinstance(node, yaml.ScalarNode):
            continue
        open_nodes.add(id(node))
        stack.append((node, depth, False))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = list(node.value)
        stack.extend((child, depth + 1, True) for child in reversed(children))


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
        try:
            value = load_yaml_value(env[name], name) if env[name] != "" else ""
        except ConfigSyntaxError as e:
            raise ConfigSyntaxError(f"{name}: {e}") from None
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
