"""Checkpoints: one safetensors file holding the weights, with a JSON description in its header.

Layout of a checkpoint file ``model.safetensors``:

* tensors: the model's weights (and, for training-state files, optimizer moments);
* header metadata ``"inrseg"``: a JSON object ``{"format": "inrseg", "format_version": 1,
  "method": "metaseg", "inrseg_version": "0.1.0", "config": {...}, "label_names": [...],
  ...method-specific fields such as chosen step counts}``.

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
from inrseg.core.files import atomic_path
from inrseg.core.errors import InputError

FORMAT_VERSION = 1


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: stored in the
    header by :func:`save_checkpoint` and checked by :func:`load_checkpoint`, so a flipped or
    zeroed weight byte is caught before the weights are used."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """Write ``tensors`` and the JSON ``meta`` (config, label names, ...) to ``path`` atomically."""
    header = {"format": "inrseg", "format_version": FORMAT_VERSION, "method": method,
              "inrseg_version": __version__, **meta}
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header["sha256"] = tensors_digest(clean)
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"inrseg": json.dumps(header)})
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of an inrseg checkpoint, without reading the weights.

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
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise InputError(path, "corrupt checkpoint metadata (no format_version)")
    if version > FORMAT_VERSION:
        raise InputError(path, f"checkpoint format {version} is newer than this inrseg "
                               f"({__version__}) reads (format {FORMAT_VERSION}); upgrade inrseg")
    return meta


def load_checkpoint(path: str | Path, method: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors and metadata; check it belongs to ``method`` when given."""
    meta = read_metadata(path)
    if method is not None and meta.get("method") != method:
        raise InputError(path, f"is a {meta.get('method')!r} checkpoint, not {method!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(path, f"corrupt checkpoint weights ({type(exc).__name__})") from None
    digest = meta.get("sha256")
    if digest is not None and digest != tensors_digest(tensors):
        raise InputError(path, "corrupt checkpoint weights (their SHA-256 does not match the header's)")
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


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_train_state(path: str | Path, method: str, state: dict[str, Any]) -> Path:
    """Atomically write a resumable training state (nested dict of tensors and numbers)."""
    skeleton, tensors = flatten_state(state)
    return save_checkpoint(path, method, tensors, {"kind": "train-state", "state": skeleton})


def load_train_state(path: str | Path, method: str) -> dict[str, Any]:
    """Read a state written by :func:`save_train_state` for ``method``."""
    tensors, meta = load_checkpoint(path, method)
    if meta.get("kind") != "train-state":
        raise InputError(path, "is not a training-state file")
    return unflatten_state(meta["state"], tensors)
