"""Pickles that carry the source code of the classes they contain, and a loader that does not run it.

Network pickles store every instance of a *persistent class* as a call
``_reconstruct_persistent_obj(meta)``, where ``meta`` holds the complete source of the defining
module, the class name and the instance state (spec §2, format version 6). Loading such a pickle
with plain ``pickle.load`` executes that embedded source, so a network keeps working even after the
code that created it has changed or disappeared -- and, equally, whoever loads it runs whatever code
it carries.

``safe_load`` is the alternative: it rebuilds the known classes of this project (the network of
``training/networks_edm2.py``, the encoders and the loss) from their pickled *state* with this
project's own code, never executes ``module_src``, and refuses every other global with a one-line
error. ``load_pickle(file, trust_embedded_code=True)`` is the explicit opt-in to the trusting path.
"""

import copy
import functools
import importlib
import inspect
import io
import os
import pickle
import sys
import types
import uuid
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

import dnnlib

_version = 6                  # Format version written into (and required from) every pickle.
_decorators = set()           # Every class produced by persistent_class().
_import_hooks = []            # Functions meta -> meta applied before reconstruction.
_module_to_src_dict = {}      # Module object -> its source text.
_src_to_module_dict = {}      # Source text -> module object (so equal sources share one module).

# ----------------------------------------------------------------------------
# Writing: the persistent_class decorator.


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances record their constructor arguments and pickle with their module's source.

    The returned class derives from ``orig_class`` and keeps its name and module. Its instances get
    ``init_args`` / ``init_kwargs`` (stored as ``_init_args`` / ``_init_kwargs``) and are pickled as
    ``_reconstruct_persistent_obj(meta)`` with ``meta`` laid out as in spec §2.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    assert orig_class.__module__ in sys.modules
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)
            assert orig_class.__name__ in orig_module.__dict__, "persistent classes must be defined at module level"
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self) -> tuple:
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """Whether an object (or a class) was made with persistent_class()."""
    try:
        if obj in _decorators:
            return True
    except TypeError:  # unhashable objects
        pass
    return type(obj) in _decorators


def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> None:
    """Register ``hook(meta) -> meta``, applied to every persistent object before it is rebuilt.

    Hooks let old pickles load after the code changed, e.g. by editing ``meta.module_src`` or
    renaming entries of ``meta.state``.
    """
    assert callable(hook)
    _import_hooks.append(hook)


# ----------------------------------------------------------------------------
# Reading: the trusting reconstruction (executes the embedded source).


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object by executing its embedded module source. Called by pickle."""
    meta = _apply_import_hooks(meta)
    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__[meta.class_name]
    return _restore_instance(persistent_class(orig_class), meta.state)


def _apply_import_hooks(meta: dict) -> dnnlib.EasyDict:
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state if meta.get("state") is not None else {})
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, "import hooks must return the (possibly modified) meta"
    assert meta.version == _version, f"unsupported persistence format version {meta.version}"
    assert meta.type == "class", f"unsupported persistent object type {meta.type!r}"
    return meta


def _restore_instance(cls: type, state: dict) -> Any:
    obj = cls.__new__(cls)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(state)  # torch.nn.Module.__setstate__ also fills in hook dicts added by newer torch.
    else:
        obj.__dict__.update(state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src: str) -> types.ModuleType:
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        # Register before executing, so that persistent_class() inside the source finds the module.
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # noqa: S102 -- this is the trusting path by definition.
    return module


def _check_pickleable(obj: Any) -> None:
    """Fail early, at construction, if an object could not be pickled later."""

    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)) or obj is None:
            return None  # Python primitive types are pickleable.
        if f"{type(obj).__module__}.{type(obj).__name__}" in ("numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter"):
            return None  # Tensors and arrays are pickleable.
        if is_persistent(obj):
            return None  # Persistent objects check themselves.
        return obj

    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)


# ----------------------------------------------------------------------------
# Reading: the safe loader (never executes the embedded source).


class UnsafePickleError(pickle.UnpicklingError):
    """Raised by safe_load for anything it does not know how to rebuild without running code."""


# Persistent classes the safe loader rebuilds with this project's code: class name -> module.
SAFE_PERSISTENT_CLASSES = {
    "MPFourier": "training.networks_edm2",
    "MPConv": "training.networks_edm2",
    "Block": "training.networks_edm2",
    "UNet": "training.networks_edm2",
    "Precond": "training.networks_edm2",
    "Encoder": "training.encoders",
    "StandardRGBEncoder": "training.encoders",
    "StabilityVAEEncoder": "training.encoders",
    "EDM2Loss": "training.training_loop",
}

_TRUST_HINT = "load it with trust_embedded_code=True (--trust-embedded-code) only if you trust its source"


def _safe_load_storage_from_bytes(data: bytes) -> Any:
    # torch pickles each storage as a nested torch.save blob; read it with torch's own restricted
    # unpickler instead of torch.storage._load_from_bytes (which would allow arbitrary globals).
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _make_safe_reconstructor(extra_classes: Optional[Dict[str, type]]) -> Callable[[dict], Any]:
    """The stand-in for ``_reconstruct_persistent_obj`` that the safe unpickler hands out."""

    def reconstruct(meta: dict) -> Any:
        if not isinstance(meta, dict):
            raise UnsafePickleError("Refusing to load pickle: malformed persistent object")
        meta = _apply_import_hooks(meta)
        class_name = meta.get("class_name")
        cls = (extra_classes or {}).get(class_name) if isinstance(class_name, str) else None
        if cls is None:
            module_name = SAFE_PERSISTENT_CLASSES.get(class_name) if isinstance(class_name, str) else None
            if module_name is None:
                known = sorted(set(SAFE_PERSISTENT_CLASSES) | set(extra_classes or {}))
                raise UnsafePickleError(
                    f"Refusing to load class {class_name!r} from the pickle's embedded source: the safe loader knows "
                    f"only {', '.join(known)}; {_TRUST_HINT}")
            cls = getattr(importlib.import_module(module_name), class_name)
        for key, value in meta.state.items():
            # State holds data only: a function or class stored as an attribute could shadow a method.
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
                raise UnsafePickleError(f"Refusing to load pickle: attribute {key!r} of {class_name} is a callable")
        return _restore_instance(cls, meta.state)

    return reconstruct


@functools.cache
def _data_globals() -> dict:
    """(module, name) -> object for plain data: containers, numpy arrays, scalars and dtypes."""
    allowed = {
        ("dnnlib.util", "EasyDict"): dnnlib.EasyDict,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array reconstructor, wherever it lives.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = reconstruct
        allowed[(mod, "scalar")] = type(np.float32(0)).__reduce__(np.float32(0))[0]
    return allowed


@functools.cache
def _tensor_globals() -> dict:
    """(module, name) -> object for torch tensors, parameters and module containers."""
    allowed = {
        ("torch.nn.modules.container", "ModuleDict"): torch.nn.ModuleDict,
        ("torch.nn.modules.container", "ModuleList"): torch.nn.ModuleList,
        ("torch.nn.modules.container", "Sequential"): torch.nn.Sequential,  # e.g. ToyModel.layers of toy_example.py
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _safe_load_storage_from_bytes,
        ("torch", "Size"): torch.Size,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that hands out only the globals in ``allowed`` ((module, name) -> object) and
    numpy's dtype classes; any other global raises UnsafePickleError naming it, before it is used."""

    def __init__(self, file: BinaryIO, allowed: Dict[Tuple[str, str], Any], what: str = "the pickle"):
        super().__init__(file)
        self._allowed = allowed
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None and module.startswith("numpy") and name.endswith("DType"):
            obj = getattr(importlib.import_module("numpy.dtypes"), name, None)  # NumPy 2 dtype classes.
        if obj is None:
            raise UnsafePickleError(f"Refusing to load global '{module}.{name}' from {self._what}: "
                                    f"it is not a known EDM2 class or tensor type; {_TRUST_HINT}")
        return obj


def load_data_pickle(file: BinaryIO, what: str = "the pickle") -> Any:
    """Unpickle plain data only (dicts, lists, numbers, strings, numpy arrays), e.g. statistics files."""
    return RestrictedUnpickler(file, _data_globals(), what=what).load()


def safe_load(file: Union[str, os.PathLike, BinaryIO], extra_classes: Optional[Dict[str, type]] = None) -> Any:
    """Unpickle a network pickle without executing any code it carries.

    ``file`` is a path or a binary file object. Returns the unpickled object (e.g. the snapshot
    EasyDict). Known persistent classes (``SAFE_PERSISTENT_CLASSES``, plus ``extra_classes``:
    class name -> class) are rebuilt from their pickled state with this project's code; anything
    else raises UnsafePickleError with a one-line message naming it.
    """
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return safe_load(f, extra_classes=extra_classes)
    allowed = {**_data_globals(), **_tensor_globals(),
               ("torch_utils.persistence", "_reconstruct_persistent_obj"): _make_safe_reconstructor(extra_classes)}
    return RestrictedUnpickler(file, allowed).load()


def load_pickle(file: Union[str, os.PathLike, BinaryIO], trust_embedded_code: bool = False,
                extra_classes: Optional[Dict[str, type]] = None) -> Any:
    """Load a network pickle: safely by default, or by executing its embedded source when asked to."""
    if not trust_embedded_code:
        return safe_load(file, extra_classes=extra_classes)
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return pickle.load(f)
    return pickle.load(file)
