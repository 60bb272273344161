"""Checkpoints: one safetensors file holding the weights, with a JSON description in its header.

Layout of a checkpoint file ``model.safetensors``:

* tensors: the model's weights (and, for training-state files, optimizer moments);
* header metadata ``"inrseg"``: a JSON object ``{"format": "inrseg", "format_version": 2,
  "method": "metaseg", "inrseg_version": "0.1.0", "config": {...}, "label_names": [...],
  ...method-specific fields such as chosen step counts, "tensors_sha256": ..., "sha256": ...}``.

Integrity (format 2): ``tensors_sha256`` is :func:`tensors_digest` of the tensors and ``sha256``
the SHA-256 of the canonical JSON of the whole header but ``sha256`` (:func:`header_digest`), so
it covers every field the checkpoint states (config, normalisation, label names and their order,
format version) and, through ``tensors_sha256``, every weight. A checkpoint without ``sha256``
is refused. Format 1 (inrseg before format 2) stored ``sha256`` of the tensors only: it is still
read when that digest is present and right, with a one-line hint that its header is not covered.
The digests catch damage and careless edits; they are no signature (whoever edits a file on
purpose can recompute them).

No pickles are ever read or written: safetensors stores raw tensors, and everything else is
JSON. ``inrseg info CKPT`` prints the JSON. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from inrseg import __version__
from inrseg.core.errors import InputError
from inrseg.core.files import atomic_path
from inrseg.core.progress import status

FORMAT_VERSION = 2
#: the oldest format this version reads: format 1, whose SHA-256 covers the tensors only
OLDEST_FORMAT = 1
#: header keys :func:`save_checkpoint` sets itself (a ``meta`` argument cannot override them)
_OWN_KEYS = ("format", "format_version", "method", "inrseg_version", "tensors_sha256", "sha256")
#: the keys of a training state (:func:`save_train_state`) and the types of their values
_STATE_SCHEMA: dict[str, tuple[type, ...]] = {
    "weights": (dict,), "optimizers": (list,), "schedulers": (list,), "extra": (dict,), "step": (int,),
    "best": (dict, type(None)), "best_score": (int, float), "best_step": (int, type(None)), "history": (list,)}
_hinted: set[str] = set()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: stored in the
    header (``tensors_sha256``) by :func:`save_checkpoint` and checked by :func:`load_checkpoint`,
    so a flipped or zeroed weight byte is caught before the weights are used."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value whatever its key order or spacing: sorted keys, no
    spaces, ASCII escapes (NaN and infinities spelled as Python's ``json`` writes them)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode("ascii")


def header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``header`` without its ``sha256`` key (format 2's
    ``sha256``; the header holds ``tensors_sha256``, so this covers the weights too)."""
    return hashlib.sha256(canonical_json({k: v for k, v in header.items() if k != "sha256"})).hexdigest()


def _need(path: Path, meta: dict, key: str, kinds: type | tuple, what: str) -> Any:
    value = meta.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is not bool:
        raise InputError(path, f"corrupt checkpoint metadata ({key!r} should be {what}, is {value!r:.60})")
    return value


def validate_model_header(path: str | Path, meta: dict) -> None:
    """Check the JSON header of a model checkpoint against the schema every method writes:
    ``method`` (str), ``config`` (object), ``label_names`` (>= 2 distinct strings),
    ``spatial_ndim`` (2, 3 or 4), ``in_channels`` (>= 1). Raises :class:`InputError`."""
    path = Path(path)
    _need(path, meta, "method", str, "a method name")
    _need(path, meta, "config", dict, "an object")
    names = _need(path, meta, "label_names", list, "a list of class names")
    if len(names) < 2 or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise InputError(path, f"corrupt checkpoint metadata ('label_names' should be >= 2 distinct "
                               f"strings, is {names!r:.60})")
    if _need(path, meta, "spatial_ndim", int, "2, 3 or 4") not in (2, 3, 4):
        raise InputError(path, f"corrupt checkpoint metadata ('spatial_ndim' is {meta['spatial_ndim']})")
    if _need(path, meta, "in_channels", int, "a channel count") < 1:
        raise InputError(path, f"corrupt checkpoint metadata ('in_channels' is {meta['in_channels']})")


def save_checkpoint(path: str | Path, method: str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON ``meta`` (config, label names, ...) to ``path`` atomically,
    in format :data:`FORMAT_VERSION` with both digests (``meta``'s own ``format*``, ``method``,
    version and digest keys are replaced)."""
    header = {"format": "inrseg", "format_version": FORMAT_VERSION, "method": method,
              "inrseg_version": __version__, **{k: v for k, v in meta.items() if k not in _OWN_KEYS}}
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header["tensors_sha256"] = tensors_digest(clean)
    header = json.loads(json.dumps(header))  # the header as it reads back (tuples as lists...)
    header["sha256"] = header_digest(header)
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"inrseg": json.dumps(header)})
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of an inrseg checkpoint, without reading the weights (and without
    checking its digest: :func:`load_checkpoint` does, before anything is used).

    Raises:
        InputError: missing file, not a safetensors file, not an inrseg checkpoint, or a
            checkpoint format newer than this version of inrseg understands.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("inrseg")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(path, f"not an inrseg checkpoint (unreadable safetensors file: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if raw is None:
        raise InputError(path, "not an inrseg checkpoint (safetensors file without inrseg metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(path, "corrupt checkpoint metadata (invalid JSON)") from None
    except RecursionError:
        raise InputError(path, "corrupt checkpoint metadata (JSON nested too deeply)") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"corrupt checkpoint metadata (a JSON {type(meta).__name__}, not an object)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < OLDEST_FORMAT:
        raise InputError(path, f"corrupt checkpoint metadata (format_version {version!r:.40}: expected "
                               f"{OLDEST_FORMAT} to {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise InputError(path, f"checkpoint format {version} is newer than this inrseg "
                               f"({__version__}) reads (format {FORMAT_VERSION}); upgrade inrseg")
    return meta


def _check_header(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a header without a checksum, and a format-2 header that changed since it was
    written (any field: config, normalisation, label names, format version...)."""
    if not isinstance(meta.get("sha256"), str):
        raise InputError(path, "checkpoint without a checksum ('sha256' missing from its header): refused, "
                               "its header and weights cannot be verified")
    edited = (header_digest(meta) != meta["sha256"] if meta["format_version"] >= 2
              else "tensors_sha256" in meta)  # a format-2 header that claims format 1
    if edited:
        raise InputError(path, "checkpoint header does not match its weights (the SHA-256 over header and "
                               "weights differs from the one it was written with: edited since)")


def _check_tensors(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The tensors' digest against the header's (format 1: ``sha256``, format 2:
    ``tensors_sha256``); a one-line hint for format 1, whose header no digest covers."""
    old = meta["format_version"] < 2
    stored = meta["sha256"] if old else meta.get("tensors_sha256")
    if stored != tensors_digest(tensors):
        raise InputError(path, "corrupt checkpoint weights (their SHA-256 does not match the header's)")
    if old and str(path) not in _hinted:
        _hinted.add(str(path))
        how = ("the next state this run writes is" if meta.get("kind") == "train-state"
               else "`load_segmenter(path).save(path)` (inrseg.methods.registry) re-saves it in")
        status(f"{path}: format-{meta['format_version']} checkpoint: its SHA-256 covers the weights, not the "
               f"header; {how} format {FORMAT_VERSION}")


def load_checkpoint(path: str | Path, method: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and metadata, verified: the header's checksum (format 2), the
    tensors' checksum, finite weights; check it belongs to ``method`` when given.

    Raises:
        InputError: anything :func:`read_metadata` refuses, no checksum, a header or tensors that
            changed since they were written, NaN / Inf weights, a checkpoint of another method.
    """
    path = Path(path)
    meta = read_metadata(path)
    _check_header(path, meta)
    if method is not None and meta.get("method") != method:
        raise InputError(path, f"is a {meta.get('method')!r} checkpoint, not {method!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(path, f"corrupt checkpoint weights ({type(exc).__name__})") from None
    _check_tensors(path, meta, tensors)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(path, f"corrupt checkpoint weights (tensor {name!r} holds NaN or Inf)")
    return tensors, meta


# --------------------------------------------------------------------------------------------
# Nested training state (model + optimizer + counters) <-> flat tensors + JSON skeleton.
# Written by hand because safetensors stores only a flat name -> tensor map, and optimizer
# state dicts are nested dicts/lists mixing tensors and numbers.
# --------------------------------------------------------------------------------------------

def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None,
                  prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": name}``.

    Returns:
        ``(skeleton, tensors)``: a JSON-serialisable skeleton and the name -> tensor map.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}"
        tensors[name] = obj
        return {"__tensor__": name}, tensors
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{i}")[0]]
                             for i, (k, v) in enumerate(obj.items())]}, tensors
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor], path: Path | None = None,
                    used: set[str] | None = None) -> Any:
    """Inverse of :func:`flatten_state`; the names of the tensors it took are added to ``used``.

    Raises:
        InputError: (naming ``path``) a skeleton :func:`flatten_state` does not write, or one
            that names a tensor ``tensors`` does not hold.
    """
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"} and isinstance(skeleton["__tensor__"], str):
            name = skeleton["__tensor__"]
            if name not in tensors:
                raise InputError(path, f"not a valid training state (it names tensor {name!r}, which the file "
                                       f"does not hold)")
            if used is not None:
                used.add(name)
            return tensors[name]
        pairs = skeleton.get("__dict__") if set(skeleton) == {"__dict__"} else None
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(
                p[0], (str, int)) and not isinstance(p[0], bool) for p in pairs):
            raise InputError(path, f"not a valid training state (an object that is neither a tensor nor a "
                                   f"dict: {json.dumps(skeleton)[:60]})")
        return {k: unflatten_state(v, tensors, path, used) for k, v in pairs}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors, path, used) for v in skeleton]
    return skeleton


def save_train_state(path: str | Path, method: str, state: dict[str, Any]) -> Path:
    """Atomically write a resumable training state (nested dict of tensors and numbers)."""
    skeleton, tensors = flatten_state(state)
    return save_checkpoint(path, method, tensors, {"kind": "train-state", "state": skeleton})


def check_train_state(path: str | Path, state: Any) -> None:
    """Refuse (naming ``path``) a training state whose keys and value types are not those the
    engine's resume state has (:data:`_STATE_SCHEMA`: ``step`` an integer >= 0, ``weights`` and
    ``best`` names -> tensors, ``optimizers`` / ``schedulers`` / ``history`` lists of objects...).
    Whether it fits the run that resumes it (steps, network) is
    :func:`inrseg.engine.loop.run_training`'s check."""
    if not isinstance(state, dict):
        raise InputError(path, f"not a valid training state (a {type(state).__name__}, not an object)")
    missing, unknown = sorted(set(_STATE_SCHEMA) - set(state)), sorted(map(str, set(state) - set(_STATE_SCHEMA)))
    if missing or unknown:
        raise InputError(path, f"not a valid training state ({len(missing)} keys missing {missing[:3]}, "
                               f"{len(unknown)} unknown {unknown[:3]!s:.60})")
    for key, kinds in _STATE_SCHEMA.items():
        value = state[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise InputError(path, f"not a valid training state ({key!r} is {value!r:.40}, expected "
                                   f"{' or '.join(k.__name__ for k in kinds)})")
    for key in ("weights", "best"):
        if state[key] is not None and not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state[key].items()):
            raise InputError(path, f"not a valid training state ({key!r} should map names to tensors)")
    for key in ("optimizers", "schedulers", "history"):
        if not all(isinstance(v, dict) for v in state[key]):
            raise InputError(path, f"not a valid training state ({key!r} should be a list of objects)")
    if state["step"] < 0:
        raise InputError(path, f"not a valid training state (step {state['step']})")


def load_train_state(path: str | Path, method: str) -> dict[str, Any]:
    """Read a state written by :func:`save_train_state` for ``method``, verified like any
    checkpoint (:func:`load_checkpoint`), its skeleton naming exactly the tensors the file holds.

    Raises:
        InputError: naming ``path``, for all of the above.
    """
    path = Path(path)
    tensors, meta = load_checkpoint(path, method)
    if meta.get("kind") != "train-state":
        raise InputError(path, "is not a training-state file")
    used: set[str] = set()
    state = unflatten_state(meta.get("state"), tensors, path, used)
    if set(tensors) - used:
        raise InputError(path, f"not a valid training state (tensors {sorted(set(tensors) - used)[:3]} belong to "
                               f"no part of it)")
    return state
