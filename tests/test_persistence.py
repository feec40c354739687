"""Network pickles: the spec §2 format, loading through the embedded source, and the safe loader."""

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

NET_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[8])
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
    assert type(snapshot) is dnnlib.EasyDict and list(snapshot.keys()) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
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
        sys.path[:0] = [{str(tmp_path / 'fake_tree')!r}, {str(REPO_ROOT)!r}]
        with open({str(pkl)!r}, 'rb') as f:
            data = pickle.load(f)
        net = data['ema']
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        assert 'training.networks_edm2' not in sys.modules
        torch.manual_seed(123)
        x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(10)[[2, 7]]
        with torch.no_grad():
            out = net.float()(x, sigma, labels)
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
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
    # The rebuilt objects are ordinary objects of this project: they pickle again with our own source.
    again = pickle.loads(pickle.dumps(loaded))
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
    meta = dict(type="class", version=6, module_src="", class_name="Precond", state=dict(x=_SystemCall(f"touch {marker}")))
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
    meta = dict(type="class", version=6, module_src="import os\nos.system('true')\nclass Evil: pass\n",
                class_name="Evil", state={})
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
    # their own packages (spec §2), so their module-level imports are limited to this list.
    import ast

    allowed = {"numpy", "torch", "psutil", "dnnlib", "torch_utils.persistence", "torch_utils.misc",
               "torch_utils.distributed", "torch_utils.training_stats"}
    stdlib = getattr(sys, "stdlib_module_names", {"copy", "os", "pickle", "re", "sys", "time", "typing", "warnings", "weakref"})
    tree = ast.parse((REPO_ROOT / module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{alias.name}" if node.module == "torch_utils" else node.module for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert name in allowed or top in stdlib, f"{module} imports {name}"
