"""Reading a config: a hardened YAML loader (no duplicate keys, no alias bombs, bounded
size, UTF-8 only), profiles, ``--set`` overrides, and one readable line per problem. The
schema the tree is validated against is ``pipeline.config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import RunConfig, section_at, unknown_key


class ConfigError(ValueError):
    """A config that cannot run; the message is one line per problem."""


def format_validation_error(err: ValidationError, model: type[BaseModel] = RunConfig) -> str:
    """One ``config error:`` line per problem pydantic found validating ``model``."""
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        allowed = (e.get("ctx") or {}).get("expected")
        if e["type"] == "extra_forbidden":
            msg, parts = unknown_key(section_at(model, e["loc"][:-1]), parts[-1]), parts[:-1]
        elif allowed and e["type"] == "literal_error":
            msg = f"{e['input']!r} is not allowed (allowed: {allowed})"
        elif not isinstance(e.get("input"), (dict, list)) and e["type"] != "value_error":
            msg = f"{e['input']!r}: {msg}"
        loc = ".".join(parts)
        lines.append(f"config error: {loc}: {msg}" if loc else f"config error: {msg}")
    return "\n".join(lines)


def set_path(tree: dict[str, Any], dotted: str, value: Any, where: str = "--set") -> None:
    """``where``: what gave the override, for the error (``--set``, a sweep file's variant)."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {where} {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


# Bounds on what a config or sweep file may make the loader build. A config is a few KiB
# and a few hundred values; without bounds a 570-byte file of nested aliases ("billion
# laughs") expands into gigabytes once anything walks or copies it.
MAX_FILE_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def _expanded_values(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under ``node`` counting each alias once per use, as the constructed tree
    holds them; linear in the file (each node is sized once)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it "
                          f"(a cycle); a config is a tree")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    total = 1 + sum(_expanded_values(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    sizes[key] = total
    return total


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses what plain YAML silently accepts: a key given twice (the last
    one would win), keys that are not strings, and aliases that expand past
    ``MAX_YAML_VALUES`` values."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            total = _expanded_values(node, {}, set())
            if total > MAX_YAML_VALUES:
                raise ConfigError(f"{total:,} values once its aliases (*name) are expanded, above the "
                                  f"{MAX_YAML_VALUES:,} a config or sweep file may hold")
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"line {line}: key {key!r} is not a string (quote it, or fix the indentation)")
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError("collections nested too deeply (thousands of levels); a config is a few levels "
                          "deep") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"config error: --set {text!r}: expected key.path=value")
    try:
        return key.strip(), parse_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: --set {text}: the value is not valid YAML ({_yaml_problem(e)}); "
                          f"quote it, e.g. --set '{key.strip()}=[A, B]'") from None
    except ConfigError as e:
        raise ConfigError(f"config error: --set {text}: {e}") from None


def merge_profile(tree: dict[str, Any], profile: dict[str, Any]) -> None:
    """Nested mappings merge key by key; anything else replaces the config's value."""
    for key, value in profile.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge_profile(tree[key], value)
        else:
            tree[key] = value


def read_tree(path: Path) -> dict[str, Any]:
    """The config file as a mapping; every problem is one ConfigError line naming the file."""
    if not path.is_file():
        raise ConfigError(f"config error: {path}: no such file")
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # not the whole file: it may be a 65 MB mistake
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"config error: {path}: {path.stat().st_size:,} bytes, above the {MAX_FILE_BYTES:,} "
                          f"bytes (1 MiB) a config or sweep file may hold; a config is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config error: {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    try:
        tree = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path}: not valid YAML ({_yaml_problem(e)})") from None
    except ConfigError as e:
        raise ConfigError(f"config error: {path}: {e}") from None
    if tree is None or tree == {}:
        raise ConfigError(f"config error: {path}: the config is empty; start from configs/digits.yaml")
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of sections, "
                          f"got {type(tree).__name__}")
    return tree


def read_profiles(tree: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    profiles = tree.pop("profiles", None)
    if profiles is None:
        return {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"config error: {path}: profiles: must be a mapping of profile name to overrides, "
                          f"got {type(profiles).__name__}")
    for name, overrides in profiles.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"config error: {path}: profiles.{name}: must be a mapping of overrides "
                              f"(e.g. {{mid: {{epochs: 5}}}}), got {type(overrides).__name__}")
    return profiles


def load_config(path: str | Path, overrides: list[str] = (), store: str | None = None,
                profile: str | None = None) -> RunConfig:
    """The config at ``path``; then the named profile of its ``profiles:`` section, the
    ``--set`` overrides and the store, in that order."""
    path = Path(path)
    tree = read_tree(path)
    profiles = read_profiles(tree, path)
    if profile is not None:
        if profile not in profiles:
            available = ", ".join(profiles) or "none"
            raise ConfigError(f"config error: --profile {profile!r}: {path} defines no such profile "
                              f"(available: {available})")
        merge_profile(tree, profiles[profile])
    for text in overrides:
        set_path(tree, *parse_override(text))
    if store is not None:
        set_path(tree, "store.url", store)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
