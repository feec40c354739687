"""Networks as safetensors files: weights as plain tensors, construction arguments as JSON, no code.

A network pickle stores its classes' source and is rebuilt by running (or, in the safe loader,
checking) that source. A ``.safetensors`` file written here holds only the ``ema`` network's state
dict, and in the file's metadata (a JSON string map) what is needed to build the network again:

    edm2.format            "network/1"
    edm2.ema.class_name    persistent class name of the network, e.g. "Precond"
    edm2.ema.init_args     JSON list of its positional construction arguments
    edm2.ema.init_kwargs   JSON object of its keyword construction arguments
    edm2.encoder.class_name, edm2.encoder.init_kwargs   the same for the encoder (absent if none)

Loading constructs the classes named in ``persistence.SAFE_PERSISTENT_CLASSES`` only, with this
project's code, then loads the weights with ``load_state_dict(strict=True)``. Nothing is unpickled.
"""

import importlib
import json
import struct
from typing import Any, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

FORMAT = "network/1"
_PREFIX = "edm2."


class WeightFileError(ValueError):
    """A safetensors file that is malformed, truncated, not a network, or names a class we do not build."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _class_name(obj: Any) -> str:
    name = getattr(obj, "_orig_class_name", type(obj).__name__)
    if name not in persistence.SAFE_PERSISTENT_CLASSES:
        raise WeightFileError(f"cannot export a {name}: only {', '.join(persistence.SAFE_PERSISTENT_CLASSES)} can")
    return name


def network_metadata(ema: torch.nn.Module, encoder: Optional[Any] = None) -> dict[str, str]:
    """The metadata strings that describe how to construct ``ema`` and ``encoder``."""
    meta = {
        f"{_PREFIX}format": FORMAT,
        f"{_PREFIX}ema.class_name": _class_name(ema),
        f"{_PREFIX}ema.init_args": json.dumps(list(ema.init_args), default=_json_default),
        f"{_PREFIX}ema.init_kwargs": json.dumps(dict(ema.init_kwargs), default=_json_default),
    }
    if encoder is not None:
        meta[f"{_PREFIX}encoder.class_name"] = _class_name(encoder)
        meta[f"{_PREFIX}encoder.init_kwargs"] = json.dumps(dict(encoder.init_kwargs), default=_json_default)
    return meta


def save_network(data: dict, path: str) -> None:
    """Write a network pickle's contents (``{'ema': net, 'encoder': enc, ...}``) as a safetensors file,
    atomically. Only ``ema`` and ``encoder`` are kept; the weights keep their dtype."""
    import safetensors.torch

    ema, encoder = data["ema"], data.get("encoder")
    metadata = network_metadata(ema, encoder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in ema.state_dict().items()}
    blob = safetensors.torch.save(tensors, metadata=metadata)
    with dnnlib.util.atomic_write(path) as f:
        f.write(blob)


def read_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(blob) < 8:
        raise WeightFileError(f"the file is too short for a safetensors header ({len(blob)} bytes)")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise WeightFileError(f"the header claims {size} bytes but the file has {len(blob) - 8} after it (truncated?)")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise WeightFileError(f"the header is not JSON: {dnnlib.util.one_line(err)}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get(f"{_PREFIX}format") != FORMAT:
        raise WeightFileError(f'it is not an EDM2 network file (no "{_PREFIX}format": "{FORMAT}" in its metadata)')
    return meta


def _construct(meta: dict[str, str], what: str) -> Any:
    """Construct the persistent class that the metadata names for ``what`` ('ema' or 'encoder')."""
    name = meta.get(f"{_PREFIX}{what}.class_name")
    if name not in persistence.SAFE_PERSISTENT_CLASSES:
        known = ", ".join(persistence.SAFE_PERSISTENT_CLASSES)
        raise WeightFileError(f"refusing to construct class {name!r} for {what}: only {known} are allowed")
    try:
        args = json.loads(meta.get(f"{_PREFIX}{what}.init_args", "[]"))
        kwargs = json.loads(meta.get(f"{_PREFIX}{what}.init_kwargs", "{}"))
    except ValueError as err:
        raise WeightFileError(f"malformed construction arguments of {what}: {dnnlib.util.one_line(err)}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise WeightFileError(f"malformed construction arguments of {what}: expected a JSON list and object")
    cls = getattr(importlib.import_module(persistence.SAFE_PERSISTENT_CLASSES[name]), name)
    try:
        with torch.device("meta"):  # no memory and no random initialisation: the weights come from the file
            return cls(*args, **kwargs)
    except Exception as err:
        raise WeightFileError(
            f"cannot construct {name} from the file's arguments: {dnnlib.util.one_line(err)}"
        ) from None


def load_network(blob: bytes) -> dict:
    """Rebuild ``{'ema': net, 'encoder': enc}`` from the bytes of a file written by ``save_network``
    (``encoder`` only if the file names one). Raises WeightFileError for anything else."""
    import safetensors.torch

    meta = read_metadata(blob)
    net = _construct(meta, "ema")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as err:  # safetensors raises its own error type for malformed data
        raise WeightFileError(f"cannot read the tensors: {dnnlib.util.one_line(err)}") from None
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightFileError(f"the weights do not fit the network: {dnnlib.util.one_line(err)}") from None
    left = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise WeightFileError(f"the file has no values for {', '.join(left[:5])}")
    data = dict(ema=net.eval().requires_grad_(False))
    if f"{_PREFIX}encoder.class_name" in meta:
        data["encoder"] = _construct(meta, "encoder")
    return data
