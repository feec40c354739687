"""Networks as safetensors files: the round trip from a network pickle gives the same images bit for
bit, every tool that takes a network pickle takes such a file, and bad files and foreign classes are
refused with one line."""

import json
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import count_flops
import generate_images as gi
import reconstruct_phema
from tests.conftest import assert_ok, assert_one_line_error
from tests.test_generate_images import make_net, read_images, write_snapshot
from tests.test_reconstruct_phema import write_snapshot as write_phema_snapshot
from torch_utils import persistence, weight_files
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.networks_edm2 import Precond


@pytest.fixture
def run_cli(single_process_cli):
    return lambda *args: single_process_cli(gi.cmdline, *args)


@pytest.fixture(scope="module")
def pkl_and_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    pkl = write_snapshot(root / "cond.pkl", make_net(label_dim=4, seed=1))
    out = root / "cond.safetensors"
    weight_files.save_network(persistence.load_network_pickle(pkl, verbose=False), str(out))
    return pkl, str(out)


def raw_header(path):
    blob = open(path, "rb").read()
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def write_with_header(path, header, body):
    data = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(data)) + data + body)
    return str(path)


def test_file_holds_weights_and_construction_arguments(pkl_and_file):
    pkl, path = pkl_and_file
    header, _ = raw_header(path)
    meta = header.pop("__metadata__")
    assert meta["edm2.format"] == "network/1"
    assert meta["edm2.ema.class_name"] == "Precond" and meta["edm2.encoder.class_name"] == "StandardRGBEncoder"
    kwargs = json.loads(meta["edm2.ema.init_kwargs"])
    assert kwargs["label_dim"] == 4 and kwargs["model_channels"] == 8 and kwargs["channel_mult"] == [1, 2]
    assert json.loads(meta["edm2.encoder.init_kwargs"]) == {}
    original = persistence.load_network_pickle(pkl, verbose=False)["ema"]
    assert set(header) == set(original.state_dict())
    assert all(entry["dtype"] == "F16" for entry in header.values())  # float16 as in the pickle

    loaded = persistence.load_network_pickle(path, verbose=False)
    assert set(loaded) == {"ema", "encoder"}
    assert isinstance(loaded["ema"], Precond) and isinstance(loaded["encoder"], StandardRGBEncoder)
    assert not loaded["ema"].training and not any(p.requires_grad for p in loaded["ema"].parameters())
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded["ema"].state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_sampling_from_the_file_gives_bit_identical_images(pkl_and_file, run_cli, tmp_path):
    pkl, path = pkl_and_file
    for name, net in [("pkl", pkl), ("st", path)]:
        assert_ok(run_cli("--net", net, "--outdir", tmp_path / name, "--seeds", "0-5", "--steps", 4, "--batch", 3))
    a, b = read_images(tmp_path / "pkl"), read_images(tmp_path / "st")
    assert list(a) == list(b) and len(a) == 6
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # Guided sampling: a file as the guiding network too.
    for name, net in [("gpkl", pkl), ("gst", path)]:
        args = ("--net", path, "--gnet", net, "--guidance", 1.5, "--seeds", "0-1", "--steps", 3)
        assert_ok(run_cli(*args, "--outdir", tmp_path / name))
    a, b = read_images(tmp_path / "gpkl"), read_images(tmp_path / "gst")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_encoder_settings_travel_with_the_file(tmp_path):
    enc = StabilityVAEEncoder(vae_name="some/vae", raw_mean=np.float32([1, 2, 3]), raw_std=[4.0, 5.0, 6.0])
    data = dict(ema=make_net(img_channels=3), encoder=enc)
    weight_files.save_network(data, str(tmp_path / "vae.safetensors"))
    loaded = persistence.load_network_pickle(str(tmp_path / "vae.safetensors"), verbose=False)["encoder"]
    assert isinstance(loaded, StabilityVAEEncoder) and loaded.vae_name == "some/vae"
    assert np.array_equal(loaded.scale, enc.scale) and np.array_equal(loaded.bias, enc.bias)


def test_count_flops_takes_the_file(pkl_and_file):
    pkl, path = pkl_and_file
    a = CliRunner().invoke(count_flops.main, [pkl])
    b = CliRunner().invoke(count_flops.main, [path])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    # The totals; the op table may differ in its bookkeeping ops (constants are cached after the first run).
    assert a.output.splitlines()[:2] == b.output.splitlines()[:2] and "41667 parameters" in a.output


def test_malformed_and_truncated_files_give_one_line(pkl_and_file, run_cli, tmp_path):
    _, path = pkl_and_file
    blob = open(path, "rb").read()
    header, body = raw_header(path)
    cases = {
        "empty": b"",
        "short": blob[:5],
        "truncated-header": blob[:40],
        "truncated-tensors": blob[: len(blob) - 100],
        "noise": np.random.RandomState(0).bytes(300),
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    no_format = dict(header, __metadata__={})
    write_with_header(tmp_path / "foreign.safetensors", no_format, body)
    missing = {k: v for k, v in header.items() if not k.endswith("emb_gain")}
    write_with_header(tmp_path / "missing.safetensors", missing, body)
    for name in [*cases, "foreign", "missing"]:
        source = tmp_path / f"{name}.safetensors"
        line = assert_one_line_error(run_cli("--net", source, "--outdir", tmp_path / "out"), str(source))
        assert "Cannot load network file" in line
        with pytest.raises(persistence.NetworkPickleError):
            persistence.load_network_pickle(str(source), verbose=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["ema", "encoder"])
def test_a_class_outside_the_allow_list_is_refused(pkl_and_file, tmp_path, what):
    _, path = pkl_and_file
    header, body = raw_header(path)
    for bad in ["os.system", "Fraction", "training.networks_edm2.Precond", ""]:
        meta = dict(header["__metadata__"], **{f"edm2.{what}.class_name": bad})
        source = write_with_header(tmp_path / "bad.safetensors", dict(header, __metadata__=meta), body)
        with pytest.raises(persistence.NetworkPickleError, match=f"refusing to construct class '{bad}'"):
            persistence.load_network_pickle(source, verbose=False)


def test_exporting_a_foreign_class_is_refused(tmp_path):
    with pytest.raises(weight_files.WeightFileError, match="Linear"):
        weight_files.save_network(dict(ema=torch.nn.Linear(2, 2)), str(tmp_path / "x.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_reconstruct_phema_writes_safetensors(tmp_path):
    (tmp_path / "in").mkdir()
    for nimg in [4096, 8192]:
        for std in [0.05, 0.1]:
            write_phema_snapshot(str(tmp_path / "in"), nimg, std)
    for fmt in ["pkl", "safetensors"]:
        args = ["--indir", tmp_path / "in", "--outdir", tmp_path / fmt, "--outstd", "0.07,0.12", "--format", fmt]
        result = CliRunner().invoke(reconstruct_phema.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "safetensors").iterdir())
    assert names == ["phema-0000008-0.070.safetensors", "phema-0000008-0.120.safetensors"]
    for name in names:
        a = persistence.load_network_pickle(str(tmp_path / "pkl" / name.replace(".safetensors", ".pkl")))
        b = persistence.load_network_pickle(str(tmp_path / "safetensors" / name))
        assert isinstance(b["encoder"], StandardRGBEncoder)
        for (key, x), (_, y) in zip(a["ema"].state_dict().items(), b["ema"].state_dict().items()):
            assert x.dtype == y.dtype and torch.equal(x, y), key
