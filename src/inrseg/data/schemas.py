"""The JSON files a user gives inrseg, read strictly and checked field by field: a dataset's
``dataset.json`` and a splits file.

Reading (:func:`read_json_document`): a regular file (stat-ed first: a named pipe or a device is
never opened), at most :data:`MAX_JSON_BYTES`, UTF-8 whatever the locale, one JSON object without
duplicate keys, ``NaN`` / ``Infinity``, or nesting deeper than Python can parse.

``dataset.json`` (nnU-Net v2's format, :func:`check_dataset_json`)::

    {"channel_names": {"0": "T1", "1": "T2"},     # channel index (a string) -> name, from "0"
     "labels": {"background": 0, "lv": 1},        # name -> integer value, 0..K-1, each value once
     "file_ending": ".nii.gz",                    # ".nii.gz", ".nii", ".nrrd", ".mha" or ".mhd"
     "ignore": 255,                               # optional ignore value (or "labels" -> "ignore")
     "name": "...", "numTraining": 60,            # optional; other keys are left alone
     "time_axis": true}                           # optional: 3D + t images

The splits file (:func:`read_splits`) holds only ``"subjects"`` (case id -> subject id),
``"train"``, ``"val"`` and ``"test"`` (lists of distinct subject ids, no subject in two of them;
``"train"`` only with ``"val"``). Every problem is one :class:`~inrseg.core.errors.InputError`
naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from inrseg.core.errors import InputError
from inrseg.data.entries import require_regular_file
from inrseg.data.nifti import IMAGE_SUFFIXES, NIFTI_SUFFIXES
from inrseg.data.sitk_io import SITK_SUFFIXES

__all__ = ["IGNORE_KEY", "MAX_JSON_BYTES", "SPLITS_KEYS", "channel_names_from_json", "check_dataset_json",
           "ignore_label_from_json", "label_names_from_json", "read_dataset_json", "read_json_document",
           "read_splits"]

#: the largest JSON file inrseg reads (a splits file of a million cases is about 40 MB)
MAX_JSON_BYTES = 256 * 2**20
#: the ``dataset.json`` key (top level, or a name in ``labels``) of the ignore value
IGNORE_KEY = "ignore"
#: the keys a splits file may hold
SPLITS_KEYS = ("subjects", "train", "val", "test")


class _Refused(Exception):
    """A problem found while parsing (a duplicate key, ``NaN``), reported with the file's name."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    """How a JSON value is called in an error: ``"a list"``, ``"the number 5"``..."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


def read_json_document(path: str | Path, what: str = "JSON file") -> dict:
    """The JSON object stored in ``path``, read strictly (see the module doc).

    Raises:
        InputError: naming ``path``: missing, not a regular file, too large, not UTF-8, not
            JSON, nested too deeply, a duplicate key, or something other than an object.
    """
    path = Path(path)
    st = require_regular_file(path, what)
    if st.st_size > MAX_JSON_BYTES:
        raise InputError(path, f"is {st.st_size / 2**20:.0f} MiB, more than any {what} needs "
                               f"({MAX_JSON_BYTES // 2**20} MiB at most)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise InputError(path, "invalid JSON: nested too deeply to read") from None
    except _Refused as exc:
        raise InputError(path, f"invalid JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputError(path, f"invalid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a JSON object, not {_kind(obj)}")
    return obj


# --------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def label_names_from_json(labels: Any, path: Path) -> list[str]:
    """nnU-Net ``labels`` ({name: value}) -> names indexed by value; values must be the integers
    0..K-1, each named once. An entry named ``"ignore"`` (nnU-Net v2's ignore label) is not a
    class and is left out (:func:`ignore_label_from_json` reads it)."""
    if not isinstance(labels, dict):
        raise InputError(path, f"'labels' must be an object mapping names to values, e.g. "
                               f"{{\"background\": 0, \"tumour\": 1}}, not {_kind(labels)}")
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == IGNORE_KEY:
            continue
        if not name.strip():
            raise InputError(path, "'labels' has an empty name")
        if isinstance(value, list):
            raise InputError(path, f"'labels' -> {name!r} is a list of values: region-based labels are not "
                                   f"supported")
        if not _is_int(value):
            raise InputError(path, f"'labels' -> {name!r} must be an integer label value, not {_kind(value)}")
        if value in by_value:
            raise InputError(path, f"'labels' gives value {value} two names, {by_value[value]!r} and {name!r}")
        by_value[value] = name
    if not by_value or sorted(by_value) != list(range(len(by_value))):
        raise InputError(path, f"label values {sorted(by_value)} must be consecutive from 0")
    return [by_value[i] for i in range(len(by_value))]


def ignore_label_from_json(meta: dict, path: Path, num_classes: int | None = None) -> int | None:
    """The ignore value of a ``dataset.json``: ``meta["ignore"]`` or ``meta["labels"]["ignore"]``
    (nnU-Net v2), or ``None``. It must be a non-negative integer that is not a class value."""
    found = []
    for where, value in (("'ignore'", meta.get(IGNORE_KEY)),
                         ("'labels' -> 'ignore'", (meta.get("labels") or {}).get(IGNORE_KEY)
                          if isinstance(meta.get("labels"), dict) else None)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
            raise InputError(path, f"{where} must be a non-negative integer label value, got {value!r}")
        found.append(int(value))
    if not found:
        return None
    if len(set(found)) > 1:
        raise InputError(path, f"'ignore' ({found[0]}) and 'labels' -> 'ignore' ({found[1]}) disagree")
    if num_classes is not None and found[0] < num_classes:
        raise InputError(path, f"the ignore value {found[0]} is also a class value (0..{num_classes - 1})")
    return found[0]


def channel_names_from_json(channels: Any, path: Path) -> list[str]:
    """nnU-Net ``channel_names`` ({"0": "T1", "1": "T2"}) -> names in channel order; the keys
    must be the channel indices 0..C-1 written as strings, the values non-empty strings."""
    example = 'nnU-Net wants {"0": "T1"}'
    if not isinstance(channels, dict):
        raise InputError(path, f"'channel_names' must be an object mapping channel indices to names "
                               f"({example}), not {_kind(channels)}")
    if not channels:
        raise InputError(path, f"'channel_names' is empty ({example})")
    by_index: dict[int, str] = {}
    for key, name in channels.items():
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key:
            raise InputError(path, f"'channel_names' key {key!r} is not a channel index ({example})")
        if not isinstance(name, str) or not name.strip():
            raise InputError(path, f"'channel_names' -> {key!r} must be a channel name, not {_kind(name)}")
        by_index[int(key)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise InputError(path, f"'channel_names' indices {sorted(by_index)} must be consecutive from 0")
    return [by_index[i] for i in range(len(by_index))]


def _check_optional(meta: dict, path: Path) -> None:
    """Types and values of the optional ``dataset.json`` fields inrseg reads."""
    if "file_ending" in meta and meta["file_ending"] not in IMAGE_SUFFIXES:
        raise InputError(path, f"'file_ending' must be {' or '.join(map(repr, NIFTI_SUFFIXES))} (NIfTI) or "
                               f"{', '.join(map(repr, SITK_SUFFIXES))} (read through SimpleITK), not "
                               f"{_kind(meta['file_ending'])}")
    if "name" in meta and not (isinstance(meta["name"], str) and meta["name"].strip()):
        raise InputError(path, f"'name' must be a non-empty string, not {_kind(meta['name'])}")
    if "numTraining" in meta and not (_is_int(meta["numTraining"]) and meta["numTraining"] >= 0):
        raise InputError(path, f"'numTraining' must be a non-negative integer, not {_kind(meta['numTraining'])}")
    if "time_axis" in meta and not isinstance(meta["time_axis"], bool):
        raise InputError(path, f"'time_axis' must be true or false, not {_kind(meta['time_axis'])}")


def check_dataset_json(meta: dict, path: Path, required: Sequence[str] = ()) -> dict:
    """``meta`` (a ``dataset.json``'s object) if every field inrseg reads has its type and value
    (see the module doc) and the ``required`` keys are present; else an :class:`InputError`
    naming ``path`` and the field. Keys inrseg does not read are left alone."""
    for key in required:
        if key not in meta:
            hint = " (nnU-Net v1's 'modality' is 'channel_names' in v2)" if key == "channel_names" and \
                "modality" in meta else ""
            raise InputError(path, f"needs {' and '.join(map(repr, required))}: {key!r} is missing{hint}")
    names = label_names_from_json(meta["labels"], path) if "labels" in meta else None
    ignore_label_from_json(meta, path, None if names is None else len(names))
    if "channel_names" in meta:
        channel_names_from_json(meta["channel_names"], path)
    _check_optional(meta, path)
    return meta


def read_dataset_json(path: str | Path, required: Sequence[str] = ()) -> dict:
    """:func:`read_json_document` then :func:`check_dataset_json` of a ``dataset.json``."""
    return check_dataset_json(read_json_document(path, "JSON file"), Path(path), required)


# --------------------------------------------------------------------------------------------
# the splits file
# --------------------------------------------------------------------------------------------

def _subject_list(spec: dict, key: str, path: Path) -> list[str]:
    value = spec[key]
    if not isinstance(value, list):
        raise InputError(path, f"{key!r} must be a list of subject ids, not {_kind(value)}")
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not item:
            raise InputError(path, f"{key!r} must list subject ids (strings), not {_kind(item)}")
        if item in seen:
            raise InputError(path, f"{key!r} lists subject {item!r} twice")
        seen.add(item)
    return value


def read_splits(path: str | Path) -> dict:
    """A splits file's object, every field checked (see the module doc).

    Raises:
        InputError: naming the file and the field: an unknown key, a field of the wrong type,
            an empty or duplicate id, a subject in two of ``train`` / ``val`` / ``test``,
            ``train`` without ``val``, a file that gives nothing.
    """
    path = Path(path)
    spec = read_json_document(path, "splits file")
    unknown = [k for k in spec if k not in SPLITS_KEYS]
    if unknown:
        raise InputError(path, f"unknown key {unknown[0]!r} (a splits file holds {', '.join(map(repr, SPLITS_KEYS))})")
    if not spec:
        raise InputError(path, f"is empty: a splits file gives {', '.join(map(repr, SPLITS_KEYS))}")
    if "subjects" in spec:
        subjects = spec["subjects"]
        if not isinstance(subjects, dict):
            raise InputError(path, f"'subjects' must be an object mapping case ids to subject ids, not "
                                   f"{_kind(subjects)}")
        for case, subject in subjects.items():
            if not case or not isinstance(subject, str) or not subject:
                raise InputError(path, f"'subjects' -> {case!r} must be a subject id (a non-empty string), "
                                       f"not {_kind(subject)}")
    lists = {k: set(_subject_list(spec, k, path)) for k in ("train", "val", "test") if k in spec}
    if "train" in lists and "val" not in lists:
        raise InputError(path, "'train' is given without 'val' (give both, or 'val' alone: the rest trains)")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(lists.get(a, set()) & lists.get(b, set()))
        if both:
            raise InputError(path, f"subject {both[0]!r} is in both {a!r} and {b!r}")
    return spec
