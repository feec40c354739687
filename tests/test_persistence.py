"""Network pickles: the persistence format, loading through the embedded source, and the safe loader."""

import copy
import hashlib
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from tests.conftest import REPO_ROOT, subprocess_env
from torch_utils import persistence
from training import encoders
from training import networks_edm2 as N

NET_KWARGS = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=10,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
)
NETWORK_CLASSES = [N.MPFourier, N.MPConv, N.Block, N.UNet, N.Precond]


def make_snapshot(seed=0):
    torch.manual_seed(seed)
    net = N.Precond(**NET_KWARGS).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # Non-zero gains, so every parameter influences the output.
    ema = net.to(torch.float16)
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="data.zip", use_labels=True)
    return dnnlib.EasyDict(encoder=encoders.StandardRGBEncoder(), dataset_kwargs=dataset_kwargs, loss_fn=None, ema=ema)


def reference_output(net):
    torch.manual_seed(123)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(10)[[2, 7]]
    with torch.no_grad():
        return net.float()(x, sigma, labels)


class MetaRecorder(pickle.Unpickler):
    """Unpickler that records every persistent-object meta instead of rebuilding it."""

    def __init__(self, file):
        super().__init__(file)
        self.metas = []

    def find_class(self, module, name):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return lambda meta: self.metas.append(meta) or meta
        return super().find_class(module, name)


def test_pickled_meta_has_exactly_the_spec_fields():
    data = pickle.dumps(make_snapshot())
    recorder = MetaRecorder(io.BytesIO(data))
    snapshot = recorder.load()
    assert type(snapshot) is dnnlib.EasyDict and list(snapshot.keys()) == [
        "encoder",
        "dataset_kwargs",
        "loss_fn",
        "ema",
    ]
    network_src = (REPO_ROOT / "training" / "networks_edm2.py").read_text()
    encoder_src = (REPO_ROOT / "training" / "encoders.py").read_text()
    names = set()
    for meta in recorder.metas:
        assert set(meta.keys()) == {"type", "version", "module_src", "class_name", "state"}
        assert meta["type"] == "class" and meta["version"] == 6
        assert meta["module_src"] in (network_src, encoder_src)
        names.add(meta["class_name"])
    assert names == {"MPFourier", "MPConv", "Block", "UNet", "Precond", "StandardRGBEncoder"}
    precond = recorder.metas[-1]
    assert precond["class_name"] == "Precond"
    state = precond["state"]
    assert state["_init_args"] == () and state["_init_kwargs"] == NET_KWARGS
    for key in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "_modules", "training"):
        assert key in state
    assert state["training"] is False


@pytest.mark.slow
def test_loads_in_fresh_process_through_embedded_source(tmp_path):
    snapshot = make_snapshot()
    expected = reference_output(snapshot.ema)
    pkl = tmp_path / "snapshot.pkl"
    pkl.write_bytes(pickle.dumps(make_snapshot()))
    torch.save(expected, tmp_path / "expected.pt")
    # A `training` package whose modules raise on import shadows the real one in the child process.
    fake = tmp_path / "fake_tree" / "training"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    for name in ("networks_edm2.py", "encoders.py"):
        (fake / name).write_text("raise ImportError('the original module must not be imported')\n")
    script = textwrap.dedent(f"""
        import pickle, sys, torch
        sys.path[:0] = [{str(tmp_path / "fake_tree")!r}, {str(REPO_ROOT)!r}]
        with open({str(pkl)!r}, 'rb') as f:
            data = pickle.load(f)
        net = data['ema']
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        assert 'training.networks_edm2' not in sys.modules
        torch.manual_seed(123)
        x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(10)[[2, 7]]
        with torch.no_grad():
            out = net.float()(x, sigma, labels)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(out, expected), (out - expected).abs().max()
        print('OK', type(data['encoder']).__name__)
    """)
    env = subprocess_env()
    env.pop("PYTHONPATH")  # Only the paths the script sets up.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK StandardRGBEncoder" in result.stdout


def test_import_hook_rewrites_meta():
    data = pickle.dumps(make_snapshot())

    def hook(meta):
        if meta.class_name == "Precond":
            meta.state["sigma_data"] = 0.25
        return meta

    persistence.import_hook(hook)
    try:
        assert pickle.loads(data).ema.sigma_data == 0.25
        assert persistence.safe_load(io.BytesIO(data)).ema.sigma_data == 0.25
    finally:
        persistence._import_hooks.remove(hook)
    assert pickle.loads(data).ema.sigma_data == 0.5


def test_safe_load_never_runs_embedded_source(monkeypatch, tmp_path):
    snapshot = make_snapshot()
    expected = reference_output(make_snapshot().ema)
    poison = "raise RuntimeError('embedded source was executed')\n"
    for cls in NETWORK_CLASSES + [encoders.StandardRGBEncoder]:
        monkeypatch.setattr(cls, "_orig_module_src", poison)
    data = pickle.dumps(snapshot)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="embedded source was executed"):
        pickle.loads(data)  # The trusting path really would run it ...
    path = tmp_path / "net.pkl"
    path.write_bytes(data)
    loaded = persistence.safe_load(str(path))  # ... the safe loader does not.
    assert type(loaded.ema) is N.Precond and type(loaded.encoder) is encoders.StandardRGBEncoder
    assert loaded.ema.unet.enc["16x16_conv"].weight.dtype == torch.float16
    assert not loaded.ema.training
    assert torch.equal(reference_output(loaded.ema), expected)
    assert loaded.dataset_kwargs == snapshot.dataset_kwargs
    # Re-saved, the rebuilt objects embed the (poisoned) source they came with, and load safely again.
    resaved = pickle.dumps(loaded)
    recorder = MetaRecorder(io.BytesIO(resaved))
    recorder.load()
    assert {meta["module_src"] for meta in recorder.metas} == {poison}
    assert all("_orig_module_src" not in meta["state"] for meta in recorder.metas)
    again = persistence.safe_load(io.BytesIO(resaved))
    assert torch.equal(reference_output(again.ema), expected)
    with open(path, "rb") as f:
        assert type(persistence.load_pickle(f).ema) is N.Precond


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_safe_load_refuses_code_execution_payload(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(dnnlib.EasyDict(ema=_SystemCall(f"touch {marker}")))
    with pytest.raises(persistence.UnsafePickleError) as info:
        persistence.safe_load(io.BytesIO(payload))
    message = str(info.value)
    assert "system" in message and "\n" not in message
    assert not marker.exists()
    # The payload is also refused when hidden inside a persistent object's state.
    meta = dict(
        type="class", version=6, module_src="", class_name="Precond", state=dict(x=_SystemCall(f"touch {marker}"))
    )
    hidden = pickle.dumps(_Reduce(persistence._reconstruct_persistent_obj, (meta,)))
    with pytest.raises(persistence.UnsafePickleError):
        persistence.safe_load(io.BytesIO(hidden))
    assert not marker.exists()


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_safe_load_refuses_unknown_persistent_class():
    meta = dict(
        type="class",
        version=6,
        module_src="import os\nos.system('true')\nclass Evil: pass\n",
        class_name="Evil",
        state={},
    )
    data = pickle.dumps(_Reduce(persistence._reconstruct_persistent_obj, (meta,)))
    with pytest.raises(persistence.UnsafePickleError, match="'Evil'"):
        persistence.safe_load(io.BytesIO(data))


def test_persistent_class_records_init_args_and_detects_persistence():
    conv = N.MPConv(3, 5, kernel=[1, 1])
    assert persistence.is_persistent(conv) and persistence.is_persistent(N.MPConv)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert conv.init_args == (3, 5) and conv.init_kwargs == {"kernel": [1, 1]}
    copy_ = pickle.loads(pickle.dumps(conv))
    assert torch.equal(copy_.weight, conv.weight) and copy_.init_kwargs == conv.init_kwargs


@pytest.mark.parametrize("module", ["training/networks_edm2.py", "training/encoders.py", "training/training_loop.py"])
def test_embedded_modules_import_only_what_the_reference_tree_has(module):
    # These sources ride along in every snapshot and are executed by the reference tools against
    # their own packages, so their module-level imports are limited to this list.
    import ast

    allowed = {
        "numpy",
        "torch",
        "psutil",
        "dnnlib",
        "torch_utils.persistence",
        "torch_utils.misc",
        "torch_utils.distributed",
        "torch_utils.training_stats",
    }
    stdlib = getattr(
        sys, "stdlib_module_names", {"copy", "os", "pickle", "re", "sys", "time", "typing", "warnings", "weakref"}
    )
    tree = ast.parse((REPO_ROOT / module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [
                f"{node.module}.{alias.name}" if node.module == "torch_utils" else node.module for alias in node.names
            ]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert name in allowed or top in stdlib, f"{module} imports {name}"


# ----------------------------------------------------------------------------
# Embedded sources the safe loader does not know, and states that do not fit the standard network.

# A harmless edit of the network module (same math) that leaves a marker we can observe when it runs.
EDITED_NETWORK_SRC = N.Precond._orig_module_src + "\n# An edited revision (σ unchanged).\nEDITED_REVISION_RAN = True\n"


def pickle_with_network_source(monkeypatch, src):
    for cls in NETWORK_CLASSES:
        monkeypatch.setattr(cls, "_orig_module_src", src)
    data = pickle.dumps(make_snapshot())
    monkeypatch.undo()
    return data


def embedded_sources(data):
    recorder = MetaRecorder(io.BytesIO(data))
    recorder.load()
    return {meta["class_name"]: meta["module_src"] for meta in recorder.metas}


def test_our_pickle_loads_without_warning(capsys):
    persistence.safe_load(io.BytesIO(pickle.dumps(make_snapshot())))
    assert capsys.readouterr().err == ""


def test_edited_source_warns_once_and_is_kept_when_resaved(monkeypatch, capsys):
    data = pickle_with_network_source(monkeypatch, EDITED_NETWORK_SRC)
    loaded = persistence.safe_load(io.BytesIO(data))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # One line per distinct source, not one per object.
    digest = hashlib.sha256(EDITED_NETWORK_SRC.encode("utf-8")).hexdigest()
    for text in ("training.networks_edm2", "Precond", "standard code", "--trust-embedded-code", digest[:12]):
        assert text in lines[0]
    assert "training.encoders" not in lines[0]  # The encoder carries our own source.
    assert type(loaded.ema) is N.Precond
    assert torch.equal(reference_output(loaded.ema), reference_output(make_snapshot().ema))

    # Re-saved, directly or through a deep copy (as reconstruct_phema makes its outputs), the
    # network embeds the input's source again, and the copy did not execute it.
    for obj in (loaded, copy.deepcopy(loaded)):
        sources = embedded_sources(pickle.dumps(obj))
        assert {
            name: hashlib.sha256(src.encode("utf-8")).hexdigest()
            for name, src in sources.items()
            if name != "StandardRGBEncoder"
        } == dict.fromkeys(["MPFourier", "MPConv", "Block", "UNet", "Precond"], digest)
        assert sources["StandardRGBEncoder"] == encoders.StandardRGBEncoder._orig_module_src
    assert EDITED_NETWORK_SRC not in persistence._src_to_module_dict

    # Trusting the re-saved pickle runs the edited code.
    trusted = persistence.load_pickle(io.BytesIO(pickle.dumps(loaded)), trust_embedded_code=True)
    module = sys.modules[type(trusted.ema).__module__]
    assert module.__name__.startswith("_imported_module_") and module.EDITED_REVISION_RAN
    assert torch.equal(reference_output(trusted.ema), reference_output(make_snapshot().ema))


def test_official_source_is_known_by_its_sha256(monkeypatch, capsys):
    data = pickle_with_network_source(monkeypatch, EDITED_NETWORK_SRC)
    # Stand in for the release's text (not available here) with the edited one: known hash, no warning.
    digest = hashlib.sha256(EDITED_NETWORK_SRC.encode("utf-8")).hexdigest()
    monkeypatch.setitem(persistence.OFFICIAL_SOURCE_SHA256, "training.networks_edm2", digest)
    persistence.safe_load(io.BytesIO(data))
    assert capsys.readouterr().err == ""
    # The hash is looked up per module: the same text as the encoders' source is unknown.
    monkeypatch.setitem(persistence.OFFICIAL_SOURCE_SHA256, "training.networks_edm2", "0" * 64)
    monkeypatch.setitem(persistence.OFFICIAL_SOURCE_SHA256, "training.encoders", digest)
    persistence.safe_load(io.BytesIO(data))
    assert "training.networks_edm2" in capsys.readouterr().err


def _replace_weight(net):
    net.unet.enc["16x16_block0"].conv_res0.weight = torch.nn.Parameter(torch.zeros(32, 16, 3, 3))


def _drop_attention(net):
    del net.unet.enc["8x8_block0"]._modules["attn_qkv"]


MISMATCHES = [
    (
        _replace_weight,
        "Precond: parameter unet.enc.16x16_block0.conv_res0.weight has shape [32, 16, 3, 3] in the pickle, "
        "[32, 32, 3, 3] in the standard network",
    ),
    (lambda net: net.unet._parameters.pop("out_gain"), "Precond: parameter unet.out_gain is missing from the pickle"),
    (
        lambda net: net.logvar_fourier._buffers.pop("phases"),
        "Precond: buffer logvar_fourier.phases is missing from the pickle",
    ),
    (_drop_attention, "Precond: submodule unet.enc.8x8_block0.attn_qkv is missing from the pickle"),
    (
        lambda net: net.unet.dec.add_module("extra", N.MPConv(1, 1, kernel=[])),
        "Precond: the pickle has an extra submodule unet.dec.extra",
    ),
    (
        lambda net: delattr(net.unet.enc["16x16_block0"], "res_balance"),
        "Precond: attribute unet.enc.16x16_block0.res_balance is missing from the pickle",
    ),
    (lambda net: setattr(net.unet, "skip_scale", 0.5), "Precond: the pickle has an extra attribute unet.skip_scale"),
    (
        lambda net: net._init_kwargs.update(unet_depth=3),
        "Precond: the standard Precond cannot be built from the pickle's init arguments",
    ),
]


@pytest.mark.parametrize("mutate,message", MISMATCHES)
def test_state_that_does_not_fit_the_standard_network_is_refused(mutate, message, capsys):
    # A fitting pickle with the same init arguments loads first, as in a run's series of snapshots:
    # what the loader remembers of the standard network must not let the next one through.
    persistence.safe_load(io.BytesIO(pickle.dumps(make_snapshot())))
    snapshot = make_snapshot()
    mutate(snapshot.ema)
    data = pickle.dumps(snapshot)
    for _ in range(2):  # The same refusal again, now from what was remembered.
        with pytest.raises(persistence.UnsafePickleError) as info:
            persistence.safe_load(io.BytesIO(data))
        text = str(info.value)
        assert text.startswith(f"Refusing to load {message}") and "\n" not in text, text
        assert "--trust-embedded-code" in text
    assert capsys.readouterr().err == ""  # Our source: nothing to warn about, only the refusal.


def test_remembered_standard_does_not_let_another_architecture_pass():
    small, large = dict(NET_KWARGS, model_channels=16), NET_KWARGS
    nets = {}
    for name, kwargs in (("small", small), ("large", large)):
        torch.manual_seed(0)
        nets[name] = N.Precond(**kwargs).eval().requires_grad_(False)
        persistence.safe_load(io.BytesIO(pickle.dumps(nets[name])))  # Both standards are now remembered.
    for name, claimed in (("small", large), ("large", small)):  # Each state claims the other's arguments.
        net = copy.deepcopy(nets[name])
        net._init_kwargs = dict(claimed)
        with pytest.raises(persistence.UnsafePickleError) as info:
            persistence.safe_load(io.BytesIO(pickle.dumps(net)))
        text = str(info.value)
        assert text.startswith("Refusing to load Precond: ") and "in the standard network" in text, text
    # Equal values of another type (a tuple for a list) are other arguments, and still fit.
    net = copy.deepcopy(nets["large"])
    net._init_kwargs = dict(large, channel_mult=tuple(large["channel_mult"]))
    assert type(persistence.safe_load(io.BytesIO(pickle.dumps(net)))) is N.Precond


def test_standard_network_is_built_once_per_distinct_arguments(monkeypatch):
    monkeypatch.setattr(persistence, "_standard_cache", type(persistence._standard_cache)())
    monkeypatch.setattr(persistence, "_STANDARD_CACHE_SIZE", 2)
    snapshots = [pickle.dumps(make_snapshot())] + [
        pickle.dumps(N.Precond(**dict(NET_KWARGS, model_channels=c))) for c in (8, 16)
    ]
    built = []
    for cls in (N.Precond, encoders.StandardRGBEncoder):
        init = cls.__init__
        monkeypatch.setattr(
            cls, "__init__", lambda self, *a, init=init, **k: built.append(type(self)) or init(self, *a, **k)
        )
    for _ in range(3):
        persistence.safe_load(io.BytesIO(snapshots[0]))
    assert built == [N.Precond, encoders.StandardRGBEncoder]  # Once each, not once per load.
    for data in snapshots[1:]:
        persistence.safe_load(io.BytesIO(data))
    assert len(persistence._standard_cache) == 2  # Bounded: the oldest description was dropped ...
    built.clear()
    persistence.safe_load(io.BytesIO(snapshots[-1]))
    assert built == []
    persistence.safe_load(io.BytesIO(snapshots[0]))
    assert built == [N.Precond, encoders.StandardRGBEncoder]  # ... and is built again when needed.


@persistence.persistent_class
class _InitialisedInPlace(torch.nn.Module):
    """Writes into its weights at construction (torch.nn.init), which shape-only tensors cannot take."""

    def __init__(self, features=3):
        super().__init__()
        self.linear = torch.nn.Linear(features, 2 * features)
        self.scale = torch.nn.Parameter(torch.ones(features))
        torch.nn.init.normal_(self.scale)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (N.Precond, NET_KWARGS),
        (N.Precond, dict(NET_KWARGS, label_dim=0, logvar_channels=8)),
        (N.MPFourier, dict(num_channels=5)),
        (encoders.StandardRGBEncoder, {}),
        (encoders.StabilityVAEEncoder, {}),
        (_InitialisedInPlace, dict(features=4)),
    ],
)
def test_standard_structure_is_that_of_the_network_built_on_the_meta_device(cls, kwargs):
    with torch.device("meta"):
        expected = persistence._describe(cls(**kwargs))
    assert persistence._describe(persistence._build_standard(cls, (), kwargs)) == expected
    if cls is N.Precond:  # Built on the CPU, with weights: the same names, types and shapes.
        assert persistence._describe(cls(**kwargs)) == expected


def test_tensors_load_as_plain_pickle_loads_them():
    torch.manual_seed(0)
    base = torch.randn(6, 5) * 100
    data = {str(dtype): base.to(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    data.update(
        ints=base.to(torch.int64),
        bools=base > 0,
        bytes=base.to(torch.uint8),
        view=base[1:4, ::2],
        transposed=base.t(),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 7, dtype=torch.float16),
        parameter=torch.nn.Parameter(base.clone(), requires_grad=False),
    )
    pickled = pickle.dumps(data)
    safe, plain = persistence.safe_load(io.BytesIO(pickled)), pickle.loads(pickled)
    assert list(safe) == list(plain)
    for key, expected in plain.items():
        tensor = safe[key]
        assert type(tensor) is type(expected) and tensor.dtype == expected.dtype, key
        assert tensor.shape == expected.shape and tensor.stride() == expected.stride(), key
        assert torch.equal(tensor, expected) and torch.equal(tensor, data[key]), key


def _legacy_storage_blob(main):
    """Bytes in torch's per-storage format with ``main`` as its middle pickle (no storages, no data)."""
    header = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, dict(little_endian=True)]
    return b"".join(pickle.dumps(obj, protocol=2) for obj in [*header, main, []])


def test_storage_blob_with_a_code_execution_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = _legacy_storage_blob(_SystemCall(f"touch {marker}"))
    payload = pickle.dumps(dict(weight=_Reduce(torch.storage._load_from_bytes, (blob,))))
    with pytest.raises(persistence.UnsafePickleError, match="system.*tensor storage") as info:
        persistence.safe_load(io.BytesIO(payload))
    assert "\n" not in str(info.value)
    assert not marker.exists()
