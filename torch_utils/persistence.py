"""Pickles that carry the source code of the classes they contain, and a loader that does not run it.

Every instance of a *persistent class* is pickled as ``_reconstruct_persistent_obj(meta)``, ``meta`` holding the
defining module's full source, the class name and the state (the StyleGAN/EDM2 format, version 6). Plain
``pickle.load`` executes that source: a network outlives the code that made it, and whoever loads it runs whatever
code it carries. ``safe_load`` instead rebuilds the known classes of this project from their state with our own
code, refuses every other global, refuses a state that does not fit the standard class, and warns when the embedded
source is neither ours nor the official release's (keeping it, so that re-saving embeds it again).
``trust_embedded_code=True`` opts in to the trusting path.
"""

import collections
import contextlib
import contextvars
import copy
import functools
import hashlib
import importlib
import inspect
import io
import os
import pickle
import sys
import types
import uuid
import warnings
from typing import Any, BinaryIO, Callable, NamedTuple, Optional, Union

import numpy as np
import torch

import dnnlib

_version = 6  # Format version written into (and required from) every pickle.
_decorators = set()  # Every class produced by persistent_class().
_import_hooks = []  # Functions meta -> meta applied before reconstruction.
_module_to_src_dict = {}  # Module object -> its source text.
_src_to_module_dict = {}  # Source text -> module object (so equal sources share one module).
_check_pickleable_at_init = contextvars.ContextVar("check_pickleable_at_init", default=True)
PathOrFile = Union[str, os.PathLike, BinaryIO]

# ----------------------------------------------------------------------------
# Writing: the persistent_class decorator.


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances record their constructor arguments (``init_args``, ``init_kwargs``) and
    pickle with their module's source; an instance's ``_orig_module_src`` (set by the safe loader) wins."""
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
            if _check_pickleable_at_init.get():  # Off while the safe loader builds a standard object to compare.
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
                state = fields[2]
                if isinstance(state, dict) and "_orig_module_src" in state:  # Recorded source: meta, not state.
                    state = {key: value for key, value in state.items() if key != "_orig_module_src"}
                src, name = self._orig_module_src, self._orig_class_name
                meta = dict(type="class", version=_version, module_src=src, class_name=name, state=state)
                fields[:3] = [_reconstruct_persistent_obj, (meta,), None]
            return tuple(fields)

        # Copies keep the class and any recorded source: __reduce__ would rebuild them by executing that source.
        def __copy__(self):
            return _restore_instance(type(self), dict(self.__getstate__()))

        def __deepcopy__(self, memo):
            obj = memo[id(self)] = type(self).__new__(type(self))
            _set_state(obj, copy.deepcopy(dict(self.__getstate__()), memo))
            return obj

    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(Decorator, attr, getattr(orig_class, attr))
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """Whether an object (or a class) was made with persistent_class()."""
    return (isinstance(obj, type) and obj in _decorators) or type(obj) in _decorators


def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> None:
    """Register ``hook(meta) -> meta``, applied to every persistent object before it is rebuilt (e.g. to
    let old pickles load after the code changed, by editing ``meta.module_src`` or ``meta.state``)."""
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
    _set_state(obj, state)
    return obj


def _set_state(obj: Any, state: dict) -> None:
    setstate = getattr(obj, "__setstate__", None)  # torch.nn.Module's also fills in hook dicts of newer torch.
    (setstate if callable(setstate) else obj.__dict__.update)(state)


def _module_to_src(module: types.ModuleType) -> str:
    if module not in _module_to_src_dict:
        src = _module_to_src_dict[module] = inspect.getsource(module)
        _src_to_module_dict[src] = module
    return _module_to_src_dict[module]


def _src_to_module(src: str) -> types.ModuleType:
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        # Register before executing, so that persistent_class() inside the source finds the module.
        sys.modules[module_name] = _src_to_module_dict[src] = module
        _module_to_src_dict[module] = src
        try:
            exec(src, module.__dict__)  # noqa: S102 -- this is the trusting path by definition.
        except BaseException:
            del sys.modules[module_name], _module_to_src_dict[module], _src_to_module_dict[src]  # No half-built module.
            raise
    return module


def _check_pickleable(obj: Any) -> None:
    """Fail early, at construction, if an object could not be pickled later."""

    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)) or obj is None:
            return None
        name = f"{type(obj).__module__}.{type(obj).__name__}"
        if name in ("numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter") or is_persistent(obj):
            return None  # Persistent objects check themselves.
        return obj

    pickle.dumps(recurse(obj))


# ----------------------------------------------------------------------------
# Reading: the safe loader (never executes the embedded source).


class UnsafePickleError(pickle.UnpicklingError):
    """Raised by safe_load for anything it does not know how to rebuild without running code."""


# Persistent classes the safe loader rebuilds with this project's code: class name -> module.
SAFE_PERSISTENT_CLASSES = {
    **dict.fromkeys(["MPFourier", "MPConv", "Block", "UNet", "Precond"], "training.networks_edm2"),
    **dict.fromkeys(["Encoder", "StandardRGBEncoder", "StabilityVAEEncoder"], "training.encoders"),
    "EDM2Loss": "training.training_loop",
}

_TRUST_HINT = "load it with trust_embedded_code=True (--trust-embedded-code) only if you trust its source"


def _safe_load_storage_from_bytes(data: bytes) -> Any:
    """torch pickles each storage as a nested ``torch.save`` blob in the legacy format: three header pickles,
    a pickle naming the storage by a persistent id, a pickle of the storage keys, then the raw bytes. Read it
    with the restricted unpickler (torch.storage._load_from_bytes would allow any global); torch's own
    weights-only unpickler would do too, but it runs in Python and costs more than the rest of the load."""
    f = io.BytesIO(data)
    try:
        header = [load_data_pickle(f, what="a tensor storage") for _ in range(3)]
    except Exception:
        header = None
    if header is None or header[:2] != [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION]:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")  # Another format: torch decides.
    storages = {}  # key -> the storage it names, still to be filled in.

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6 and saved_id[0] == "storage"):
            raise UnsafePickleError(f"Refusing to load a tensor storage with persistent id {saved_id!r}")
        _, dtype, key, _location, numel, view = saved_id  # Always loaded to the CPU.
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0 or view is not None:
            raise UnsafePickleError(f"Refusing to load a tensor storage with persistent id {saved_id!r}")
        if key not in storages:
            untyped = torch.UntypedStorage(numel * torch._utils._element_size(dtype))
            storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return storages[key]

    unpickler = RestrictedUnpickler(f, _storage_globals(), what="a tensor storage")
    unpickler.persistent_load = persistent_load
    storage = unpickler.load()
    keys = load_data_pickle(f, what="a tensor storage")
    if (
        not isinstance(storage, torch.storage.TypedStorage)
        or not isinstance(keys, list)
        or sorted(keys) != sorted(storages)
    ):
        raise UnsafePickleError("Refusing to load a malformed tensor storage")
    for key in keys:  # Each: its element count, then its bytes (torch checks the count against the storage).
        typed = storages[key]
        typed._untyped_storage._set_from_file(f, None, False, torch._utils._element_size(typed.dtype))
    return storage


# sha256 of the UTF-8 text of the embedded modules of the official EDM2 release (commit 4bf8162).
# Our own modules' sources are known too (computed at run time); any other source gets a warning.
OFFICIAL_SOURCE_SHA256 = {
    "training.networks_edm2": "7298880db4bf955d2941496cce3a554a970867b3eae4d22276cb1c293c131fa2",
    "training.encoders": "889cd0f7f0c59beaa373f928f5aa5e83c1865595e330a32eca8daa810afba50c",
    "training.training_loop": "eb070f85cb46012bbe549402d8721f5997bbd73c23a2db157eaf88de1b1b95e2",
}


def source_sha256(src: str) -> str:
    """The sha256 (hex) by which embedded module sources are identified."""
    return hashlib.sha256(src.encode("utf-8")).hexdigest()


class _SafeReconstructor:
    """The safe unpickler's ``_reconstruct_persistent_obj`` (one per load): each call rebuilds one object with
    our class; ``finish()`` warns once per unknown source and refuses states that do not fit the standard class."""

    def __init__(self, extra_classes: Optional[dict[str, type]]):
        self.extra_classes = extra_classes or {}
        self.rebuilt = []  # Every rebuilt object, innermost first (the order pickle builds them).
        self.unknown_sources = {}  # (module name, sha256) -> class names, for sources we do not know.
        self._sha256 = {}  # Source text -> its sha256 (snapshots repeat a few sources many times).

    def __call__(self, meta: dict) -> Any:
        if not isinstance(meta, dict):
            raise UnsafePickleError("Refusing to load pickle: malformed persistent object")
        meta = _apply_import_hooks(meta)
        class_name = meta.get("class_name")
        name = class_name if isinstance(class_name, str) else None
        cls = self.extra_classes.get(name)
        if cls is None:
            if name not in SAFE_PERSISTENT_CLASSES:
                known = sorted(set(SAFE_PERSISTENT_CLASSES) | set(self.extra_classes))
                raise UnsafePickleError(
                    f"Refusing to load class {class_name!r} from the pickle's embedded source: the safe loader knows "
                    f"only {', '.join(known)}; {_TRUST_HINT}"
                )
            cls = getattr(importlib.import_module(SAFE_PERSISTENT_CLASSES[name]), name)
        if not isinstance(meta.get("module_src"), str):
            raise UnsafePickleError(f"Refusing to load pickle: {class_name} has no embedded source text")
        for key, value in meta.state.items():  # Data only: a function or class attribute could shadow a method.
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
                raise UnsafePickleError(f"Refusing to load pickle: attribute {key!r} of {class_name} is a callable")
        self._note_source(meta.module_src, cls)
        obj = _restore_instance(cls, meta.state)
        if is_persistent(cls) and meta.module_src != cls._orig_module_src:
            obj._orig_module_src = meta.module_src  # Re-saving the object embeds the source it came with.
        self.rebuilt.append(obj)
        return obj

    def _note_source(self, src: str, cls: type) -> None:
        digest = self._sha256.get(src)
        if digest is None:
            digest = self._sha256[src] = source_sha256(src)
        ours = cls._orig_module_src if is_persistent(cls) else None
        if digest != OFFICIAL_SOURCE_SHA256.get(cls.__module__) and src != ours:
            names = self.unknown_sources.setdefault((cls.__module__, digest), [])
            if cls.__name__ not in names:
                names.append(cls.__name__)

    def finish(self) -> None:
        for (module_name, digest), names in self.unknown_sources.items():
            print(
                f"Warning: the pickle embeds a source of {module_name} (for {', '.join(reversed(names))}) that is "
                f"neither this version's nor the official release's (sha256 {digest[:12]}); rebuilding with the "
                f"standard code (--trust-embedded-code runs the pickle's own code instead)",
                file=sys.stderr,
            )
        checked = set()  # ids of objects already compared as part of an enclosing one.
        for obj in reversed(self.rebuilt):  # Outermost first, so that a mismatch is named by its full path.
            if id(obj) not in checked:
                mismatch = _standard_mismatch(obj, checked)
                if mismatch is not None:
                    raise UnsafePickleError(f"Refusing to load {type(obj).__name__}: {mismatch}; {_TRUST_HINT}")


# Attributes of every torch.nn.Module: torch's own bookkeeping, which differs between torch versions.
_TORCH_MODULE_ATTRIBUTES = frozenset(vars(torch.nn.Module())) | {"_orig_module_src"}


class _Standard(NamedTuple):
    """What the safe loader compares of a standard object: its type, its attribute names and, for a module, its
    submodules (name -> _Standard) and its parameters and buffers (name -> (type, shape), shape None for a value
    that is no tensor). No tensors: the description of a network is small and can be kept."""

    cls: type
    attributes: frozenset
    members: Optional[dict[str, dict[str, Any]]]  # "_modules", "_parameters", "_buffers" -> name -> description.


def _describe(obj: Any) -> Optional[_Standard]:
    """The description of a (freshly built) standard object, or None for None."""
    if obj is None:
        return None
    if not isinstance(obj, torch.nn.Module):
        return _Standard(type(obj), frozenset(vars(obj)) - _TORCH_MODULE_ATTRIBUTES, None)
    members = {"_modules": {name: _describe(module) for name, module in obj._modules.items()}}
    for kind in ("_parameters", "_buffers"):
        members[kind] = {
            name: (type(t), tuple(t.shape) if isinstance(t, torch.Tensor) else None)
            for name, t in vars(obj)[kind].items()
        }
    return _Standard(type(obj), frozenset(vars(obj)) - _TORCH_MODULE_ATTRIBUTES, members)


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Tensor factories (randn, zeros, ...) return a zero-stride view of a single zero: an object built in this
    mode has the names, types and shapes of the real one without the time and memory of its weights."""

    factories = frozenset([torch.randn, torch.rand, torch.zeros, torch.ones, torch.empty])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.factories or "out" in kwargs:
            return func(*args, **kwargs)
        size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
        return torch.zeros((), dtype=kwargs.get("dtype")).expand(size)  # Inside the handler the mode is off.


def _build_standard(cls: type, args: Any, kwargs: Any) -> Any:
    """A standard object for its structure only. On the meta device every arithmetic operation on a tensor
    would run torch's Python kernels, whose first use imports torch._dynamo (seconds, once per process); so
    try shape-only tensors first, and the meta device for code that writes into them (e.g. torch.nn.init)."""
    token = _check_pickleable_at_init.set(False)  # It would pickle the whole network: never saved, no need.
    try:
        with _ShapesOnly():
            return cls(*args, **kwargs)
    except Exception:
        with torch.device("meta"):
            return cls(*args, **kwargs)
    finally:
        _check_pickleable_at_init.reset(token)


_STANDARD_CACHE_SIZE = 8  # Distinct (class, init arguments) whose standard description is kept.
_standard_cache = collections.OrderedDict()  # (class, pickled args) -> _Standard, or why it cannot be built.


def _standard_description(obj: Any) -> Union[_Standard, str]:
    """The description of the standard object that ``obj``'s init arguments build (on the meta device: no
    memory, no initialisation), or why it cannot be built. Snapshots of one training run share their
    arguments, so each distinct (class, arguments) is built once; the key is their pickle, so that only
    equal arguments share an entry."""
    try:
        args, kwargs = obj._init_args, obj._init_kwargs
        key = (type(obj), pickle.dumps((args, kwargs)))
    except Exception:
        key = None  # Uncacheable (or missing) arguments: build, or fail to, every time.
    if key is not None and key in _standard_cache:
        _standard_cache.move_to_end(key)
        return _standard_cache[key]
    try:
        description = _describe(_build_standard(type(obj), obj._init_args, obj._init_kwargs))
    except Exception as err:
        why = f"{type(err).__name__}: {dnnlib.util.one_line(err)}"
        description = f"the standard {type(obj).__name__} cannot be built from the pickle's init arguments ({why})"
    if key is not None:
        _standard_cache[key] = description
        while len(_standard_cache) > _STANDARD_CACHE_SIZE:
            _standard_cache.popitem(last=False)
    return description


def _standard_mismatch(obj: Any, checked: set) -> Optional[str]:
    """The first way ``obj`` differs from the standard object its init arguments describe, or None. Names, types
    and shapes are compared; values are not."""
    standard = _standard_description(obj)
    return standard if isinstance(standard, str) else _compare(obj, standard, "", checked)


def _differ(what: str, theirs: str, ours: Any) -> str:
    return f"{what} {theirs} in the pickle, {ours} in the standard network"


def _compare(obj: Any, standard: Optional[_Standard], path: str, checked: set) -> Optional[str]:
    checked.add(id(obj))
    what = f"submodule {path[:-1]}" if path else "the object"
    ours_type = type(None) if standard is None else standard.cls
    if type(obj) is not ours_type:
        return _differ(what, f"is a {type(obj).__name__}", f"a {ours_type.__name__}")
    if standard is None:
        return None
    ours, theirs = standard.attributes, set(vars(obj)) - _TORCH_MODULE_ATTRIBUTES
    for name in sorted(ours - theirs):
        return f"attribute {path}{name} is missing from the pickle"
    for name in sorted(theirs - ours):
        if not name.startswith("_"):  # Private extras are harmless bookkeeping (e.g. of another torch).
            return f"the pickle has an extra attribute {path}{name}"
    if standard.members is None:
        return None
    for kind, label in (("_modules", "submodule"), ("_parameters", "parameter"), ("_buffers", "buffer")):
        mine, pickled = standard.members[kind], vars(obj).get(kind)
        if not isinstance(pickled, dict):
            return f"{what} has a malformed {kind} in the pickle"
        for name in [*mine, *(name for name in pickled if name not in mine)]:
            if name not in pickled:
                return f"{label} {path}{name} is missing from the pickle"
            if name not in mine:
                return f"the pickle has an extra {label} {path}{name}"
            p, m = pickled[name], mine[name]
            if kind == "_modules":
                mismatch = _compare(p, m, f"{path}{name}.", checked)
                if mismatch is not None:
                    return mismatch
            elif not (isinstance(p, torch.Tensor) and m[1] is not None):
                if type(p) is not m[0]:
                    return _differ(f"{label} {path}{name}", f"is a {type(p).__name__}", f"a {m[0].__name__}")
            elif p.shape != m[1]:
                return _differ(f"{label} {path}{name}", f"has shape {list(p.shape)}", list(m[1]))
    return None


@functools.cache
def _data_globals() -> dict:
    """(module, name) -> object for plain data: containers, numpy arrays, scalars and dtypes."""
    allowed = {
        ("dnnlib.util", "EasyDict"): dnnlib.EasyDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
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


@functools.cache
def _storage_globals() -> dict:
    """(module, name) -> dtype for the legacy typed storage classes (torch.HalfStorage, ...) by which a storage
    blob names its dtype: the unpickler hands out the dtype itself, never the class."""
    allowed = {}
    with warnings.catch_warnings():  # Touching the legacy classes warns that TypedStorage is deprecated.
        warnings.simplefilter("ignore")
        for name in dir(torch):
            dtype = getattr(getattr(torch, name, None), "dtype", None)
            if name.endswith("Storage") and isinstance(dtype, torch.dtype):
                allowed[("torch", name)] = dtype
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that hands out only the globals in ``allowed`` ((module, name) -> object) and
    numpy's dtype classes; any other global raises UnsafePickleError naming it, before it is used."""

    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any], what: str = "the pickle"):
        super().__init__(file)
        self._allowed, self._what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None and module.startswith("numpy") and name.endswith("DType"):
            obj = getattr(importlib.import_module("numpy.dtypes"), name, None)  # NumPy 2 dtype classes.
        if obj is None:
            raise UnsafePickleError(
                f"Refusing to load global '{module}.{name}' from {self._what}: "
                f"it is not a known EDM2 class or tensor type; {_TRUST_HINT}"
            )
        return obj


def load_data_pickle(file: BinaryIO, what: str = "the pickle") -> Any:
    """Unpickle plain data only (dicts, lists, numbers, strings, numpy arrays), e.g. statistics files."""
    return RestrictedUnpickler(file, _data_globals(), what=what).load()


def _open(file: PathOrFile) -> Any:
    return open(file, "rb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file)


def safe_load(file: PathOrFile, extra_classes: Optional[dict[str, type]] = None) -> Any:
    """Unpickle a network pickle (path or binary file) without running its code: the persistent classes of
    ``SAFE_PERSISTENT_CLASSES`` and ``extra_classes`` (name -> class) are rebuilt, the rest is refused."""
    reconstruct = _SafeReconstructor(extra_classes)
    allowed = {**_data_globals(), **_tensor_globals()}
    allowed[("torch_utils.persistence", "_reconstruct_persistent_obj")] = reconstruct
    with _open(file) as f:
        data = RestrictedUnpickler(f, allowed).load()
    reconstruct.finish()
    return data


def load_pickle(
    file: PathOrFile, trust_embedded_code: bool = False, extra_classes: Optional[dict[str, type]] = None
) -> Any:
    """Load a network pickle: safely by default, or by executing its embedded source when asked to."""
    if not trust_embedded_code:
        return safe_load(file, extra_classes=extra_classes)
    with _open(file) as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------
# Network pickles as the tools open them: one loader, one error type.


class NetworkPickleError(ValueError):
    """A network pickle that could not be opened, was refused, or holds no network (one-line message)."""


def load_network_pickle(source: str, trust_embedded_code: bool = False, verbose: bool = True) -> dict:
    """Load a network pickle (a snapshot dict with a ``torch.nn.Module`` under ``ema``) from a path, a
    ``file://`` or an http(s) URL (cached), safely unless ``trust_embedded_code``; failures raise NetworkPickleError.
    A ``.safetensors`` source is read by ``torch_utils.weight_files`` instead (never unpickled)."""
    try:
        f = dnnlib.util.open_url(source, verbose=verbose)
    except Exception as err:  # OSError, requests errors, malformed URLs, ...
        raise NetworkPickleError(f'Cannot open network pickle "{source}": {dnnlib.util.one_line(err)}') from err
    if str(source).lower().endswith(".safetensors"):  # weights and JSON arguments: nothing to unpickle
        from torch_utils import weight_files

        with f:
            try:
                return weight_files.load_network(f.read())
            except (weight_files.WeightFileError, OSError) as err:
                raise NetworkPickleError(f'Cannot load network file "{source}": {dnnlib.util.one_line(err)}') from err
    with f:
        try:
            data = load_pickle(f, trust_embedded_code=trust_embedded_code)
        except UnsafePickleError as err:  # names the refused global and the --trust-embedded-code option
            raise NetworkPickleError(f'Cannot load network pickle "{source}": {dnnlib.util.one_line(err)}') from err
        except Exception as err:  # a truncated or foreign file fails in many ways
            raise NetworkPickleError(f'"{source}" is not a network pickle: {dnnlib.util.one_line(err)}') from err
    if not isinstance(data, dict) or not isinstance(data.get("ema"), torch.nn.Module):
        raise NetworkPickleError(f"\"{source}\" is not a network pickle: there is no 'ema' network in it")
    return data
