"""Method configs as plain dataclasses: one policy to read, write, override and describe them.

Every method's config is a ``@dataclass`` whose fields each carry a one-line meaning, written as
the trailing ``#`` comment of the field's line (or the comment lines just above it), as in
detectron2's ``config.py``. This module turns such a class into what the CLI and checkpoints need:

* :func:`config_to_dict` / :func:`config_from_dict`: the JSON form stored in a checkpoint's
  header, and the one policy for reading it back (unknown fields are ignored and named, missing
  fields take their defaults, lists become tuples where the field is a tuple);
* :func:`parse_set` and :func:`read_override_file`: ``--set key=value`` and ``--config FILE``
  (TOML or JSON), checked against the fields (an unknown key is an error with the closest names);
* :func:`describe`: every field with its value and meaning (``inrseg config METHOD``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from inrseg.core.errors import InputError
from inrseg.core.progress import status

__all__ = ["Recipe", "apply_overrides", "config_from_dict", "config_to_dict", "describe", "field_help", "field_types", "parse_set",
           "read_override_file"]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The JSON-ready dict of a config dataclass (tuples become lists in JSON)."""
    return dataclasses.asdict(cfg)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of the config class ``cls``."""
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def _wants_tuple(hint: Any) -> bool:
    """Whether a field annotated ``hint`` holds a tuple (``tuple[int, ...]``, ``tuple | None``)."""
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    return any(_wants_tuple(a) for a in typing.get_args(hint) if a is not type(None)) \
        if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", ())) else False


def _coerce(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with JSON lists turned into tuples where the field of ``cls`` is a tuple."""
    hints = field_types(cls)
    out = {}
    for k, v in values.items():
        hint = hints.get(k)
        if isinstance(v, list) and _wants_tuple(hint):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        elif isinstance(v, int) and not isinstance(v, bool) and (hint is float or hint == (float | None)):
            v = float(v)
        out[k] = v
    return out


def config_from_dict(cls: type, values: Mapping[str, Any], path: Path | None = None) -> Any:
    """``cls(**values)`` under the one policy for stored configs: fields this version does not
    know are ignored (named in a status line), missing fields take their defaults, JSON lists
    become tuples where the field is a tuple.

    Raises:
        InputError: a value the config refuses (its ``__post_init__`` raised), naming ``path``.
    """
    if not isinstance(values, Mapping):
        raise InputError(path, f"corrupt checkpoint metadata ('config' is not an object: {values!r:.60})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        status(f"{path}: config fields unknown to this version of inrseg, ignored: {', '.join(unknown)}")
    try:
        return cls(**_coerce(cls, {k: v for k, v in values.items() if k in known}))
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"unusable {cls.__name__} ({str(exc).splitlines()[0][:160]})") from None


def _closest(key: str, names: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(names), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def parse_set(cls: type, items: Iterable[str], where: str = "--set") -> dict[str, Any]:
    """``["lr=1e-3", "channels=[8,16]"]`` -> ``{"lr": 0.001, "channels": (8, 16)}``.

    A value is read as JSON where it parses (numbers, ``true`` / ``false``, ``null``, lists), else
    as a string. Raises :class:`InputError` for a malformed item or an unknown key.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(None, f"{where} {item!r}: expected KEY=VALUE")
        if key not in known:
            raise InputError(None, f"{where} {item!r}: {cls.__name__} has no field {key!r}{_closest(key, known)}; "
                                   f"`inrseg config METHOD` lists them")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[key] = value
    return _coerce(cls, out)


def read_override_file(cls: type, path: Path) -> tuple[str | None, dict[str, Any]]:
    """An experiment's override file: ``(preset, fields)``. TOML (``.toml``) or JSON, a flat table
    of config fields plus an optional ``preset`` key.

    Raises:
        InputError: unreadable file, not a table, or a key that is not a field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the override file ({type(exc).__name__})") from None
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # optional: only for TOML override files on 3.10
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise InputError(path, f"not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} "
                               f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise InputError(path, "an override file is a table of config fields")
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise InputError(path, f"'preset' should be a string, not {preset!r:.40}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise InputError(path, f"{cls.__name__} has no field {key!r}{_closest(key, known)}")
    return preset, _coerce(cls, data)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], where: str = "config") -> Any:
    """A copy of ``cfg`` with ``overrides``; a value the config refuses is an :class:`InputError`."""
    if not overrides:
        return cfg
    try:
        return dataclasses.replace(cfg, **overrides)
    except (TypeError, ValueError) as exc:
        raise InputError(None, f"{where}: {str(exc).splitlines()[0][:200]}") from None


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line meaning: its line's trailing ``#`` comment, else the comment lines
    just above it (read from the class's source; "" where there is none)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):  # pragma: no cover - no source (frozen installs)
            continue
        source = textwrap.dedent("".join(lines))
        tree = ast.parse(source)
        body = source.splitlines()
        node = tree.body[0]
        for stmt in getattr(node, "body", []):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            line = body[stmt.end_lineno - 1]
            comment = _trailing_comment(line)
            if not comment:
                above, k = [], stmt.lineno - 2
                while k >= 0 and body[k].strip().startswith("#"):
                    above.insert(0, body[k].strip().lstrip("#").strip())
                    k -= 1
                comment = " ".join(above)
            out[stmt.target.id] = comment
    return out


def _trailing_comment(line: str) -> str:
    """The ``# ...`` comment at the end of a source line (outside string literals)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return ""


def describe(cfg: Any) -> list[tuple[str, str, str]]:
    """``(field, value as JSON, meaning)`` for every field of the config instance ``cfg``."""
    helps = field_help(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rows.append((f.name, json.dumps(value, default=str), helps.get(f.name, "")))
    return rows


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a method's config is made.

    Args:
        config_class: the config dataclass.
        presets: preset name -> field values.
        default_preset: ``spatial_ndim -> preset`` (2, 3, or 4 for 3D + t).
        build: ``(preset, spatial_ndim, overrides) -> config``: the preset's fields, the defaults
            that depend on the data (a 3D batch of 2 crops, ...), then ``overrides``; default
            :func:`build_plain`.
    """

    config_class: type
    presets: Mapping[str, Mapping[str, Any]]
    default_preset: Callable[[int], str]
    build: Callable[..., Any] | None = None

    def make(self, preset: str, spatial_ndim: int, overrides: Mapping[str, Any]) -> Any:
        if preset not in self.presets:
            raise InputError(None, f"unknown preset {preset!r} ({', '.join(self.presets)})")
        try:
            if self.build is not None:
                return self.build(preset, spatial_ndim, dict(overrides))
            return self.config_class(**{**self.presets[preset], **overrides})
        except (TypeError, ValueError) as exc:
            raise InputError(None, f"{self.config_class.__name__}: {str(exc).splitlines()[0][:200]}") from None
