"""Tests of the precision options: torch_utils.misc's precision helpers, train_edm2.py --precision/--tf32
(resolution, training_options.json, resume rules, refusals on a CPU), generate_images(precision=) and
calculate_metrics.py gen --precision."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import calculate_metrics as cm
import generate_images as gi
import train_edm2
from tests.conftest import REPO_ROOT, assert_one_line_error, subprocess_env
from tests.scripts import train_helpers
from tests.test_generate_images import make_net
from torch_utils import misc
from training import training_loop


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return train_helpers.random_dataset_zip(
        str(tmp_path_factory.mktemp("precision") / "rgb.zip"), num_images=16, resolution=8, num_classes=4
    )


@pytest.fixture
def on_cuda(monkeypatch):
    """Pretend that the default device is a CUDA device that supports bfloat16 (nothing runs on it)."""
    monkeypatch.setattr(misc, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def config(data, **opts):
    return train_edm2.setup_training_config(preset="cpu-16", data=data, **opts)


# ----------------------------------------------------------------------------
# The shared helpers.


def test_resolve_precision(monkeypatch):
    assert misc.resolve_precision(None, True, "cpu") == "fp32"  # use_fp16 takes effect on CUDA only
    assert misc.resolve_precision(None, True, "cuda") == "fp16"
    assert misc.resolve_precision(None, False, "cuda") == "fp32"
    assert misc.resolve_precision("fp32", True, "cpu") == "fp32"
    assert misc.resolve_precision("fp16", None, "cuda:0", tf32=True) == "fp16"  # None: no use_fp16 to agree with
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for precision, use_fp16 in [("fp16", False), ("fp32", True), ("bf16", True)]:  # the networks' float16 disagrees
        with pytest.raises(ValueError, match=f"^precision {precision} contradicts network_kwargs.use_fp16={use_fp16}"):
            misc.resolve_precision(precision, use_fp16, "cuda")
    assert misc.resolve_precision("fp32", True, "cpu") == "fp32"  # use_fp16 has no effect on a CPU
    for precision, tf32, what in [
        ("fp16", False, "precision fp16"),
        ("bf16", False, "precision bf16"),
        (None, True, "tf32"),
    ]:
        with pytest.raises(ValueError, match=f"^{what} needs a CUDA device, not cpu$"):
            misc.resolve_precision(precision, True, "cpu", tf32=tf32)
    with pytest.raises(ValueError, match='unknown precision "fp8"'):
        misc.resolve_precision("fp8", True, "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        misc.resolve_precision("bf16", True, "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert misc.resolve_precision("bf16", None, "cuda") == "bf16"


def test_precision_is_one_value(monkeypatch):
    """A resolved precision: the name as a string, the networks' use_fp16, bf16 autocast and TF32 in one scope."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    p = misc.resolve_precision("bf16", None, "cuda", tf32=True)
    assert isinstance(p, misc.Precision) and p == "bf16" and json.loads(json.dumps({"p": p})) == {"p": "bf16"}
    assert (p.use_fp16, p.tf32, p.device_type) == (False, True, "cuda")
    assert misc.resolve_precision(p, True, "cpu") is p  # resolved once: passes through
    assert (
        misc.resolve_precision(None, True, "cuda").use_fp16 and not misc.resolve_precision(None, True, "cpu").use_fp16
    )
    before = misc.set_tf32(False)
    try:
        with misc.Precision("bf16", tf32=True, device_type="cpu").scope():  # autocast is testable on a CPU
            assert torch.backends.cuda.matmul.allow_tf32 and torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.is_autocast_enabled("cpu")
        with misc.resolve_precision("fp32", None, "cpu").scope():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.is_autocast_enabled("cpu")
    finally:
        misc.set_tf32(*before)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # only built here, never entered
def test_set_tf32_and_autocast():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert misc.set_tf32(True) == before
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        assert misc.set_tf32(False, True) == (True, True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
    finally:
        misc.set_tf32(*before)
    cast = misc.autocast("bf16")
    assert isinstance(cast, torch.autocast) and (cast.device, cast.fast_dtype) == ("cuda", torch.bfloat16)
    for precision in ("fp32", "fp16", None):
        assert not isinstance(misc.autocast(precision), torch.autocast)


# ----------------------------------------------------------------------------
# train_edm2.py: resolution and training_options.json.


def test_training_precision_resolves_like_the_reference_on_a_cpu(data):
    c = config(data)
    assert (c.precision, c.tf32, c.network_kwargs.use_fp16) == ("fp32", False, True)  # the reference's options
    assert list(c)[-3:] == ["precision", "tf32", "compile"]  # extra keys after the reference's
    c = config(data, precision="fp32")
    assert (c.precision, c.network_kwargs.use_fp16) == ("fp32", False)
    assert config(data, fp16=False, precision="fp32").network_kwargs.use_fp16 is False


def test_training_precision_on_cuda(data, on_cuda):
    assert (config(data).precision, config(data).network_kwargs.use_fp16) == ("fp16", True)  # the paper's default
    assert config(data, fp16=False).precision == "fp32"
    assert config(data, fp16=True, precision="fp16").precision == "fp16"
    c = config(data, precision="bf16", tf32=True)
    assert (c.precision, c.tf32, c.network_kwargs.use_fp16) == ("bf16", True, False)


@pytest.mark.parametrize(
    "opts,message",
    [
        (dict(precision="fp32", fp16=True), "--precision=fp32 contradicts --fp16=True"),
        (dict(precision="bf16", fp16=True), "--precision=bf16 contradicts --fp16=True"),
        (dict(precision="fp16", fp16=False), "--precision=fp16 contradicts --fp16=False"),
    ],
)
def test_training_precision_contradicting_fp16(opts, message, data, on_cuda):
    with pytest.raises(ValueError, match=message):
        config(data, **opts)


def test_dry_run_prints_and_records_precision(data, tmp_path):
    result = CliRunner().invoke(
        train_edm2.cmdline, ["--outdir", str(tmp_path / "run"), "--data", data, "--preset", "cpu-16", "-n"]
    )
    assert result.exit_code == 0, result.output
    assert "Precision:               fp32\n" in result.output
    text = result.output.split("Training config:\n", 1)[1]
    c = json.loads(text[: text.index("\n}\n") + 2])
    assert (c["precision"], c["tf32"], c["network_kwargs"]["use_fp16"]) == ("fp32", False, True)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--precision", "fp16"], "--precision: precision fp16 needs a CUDA device, not cpu"),
        (["--precision", "bf16"], "--precision: precision bf16 needs a CUDA device, not cpu"),
        (["--tf32"], "--tf32: tf32 needs a CUDA device, not cpu"),
        (["--precision", "fp32", "--tf32"], "--tf32: tf32 needs a CUDA device"),
        (["--precision", "fp32", "--fp16", "True"], "--precision=fp32 contradicts --fp16=True"),
    ],
)
def test_training_refusals_on_a_cpu(args, fragment, tmp_path, monkeypatch):
    """Refused before anything is read or written: the dataset does not even exist."""
    monkeypatch.setattr(training_loop, "training_loop", lambda **kwargs: pytest.fail("training started"))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        train_edm2.cmdline,
        ["--outdir", str(run_dir), "--data", str(tmp_path / "missing.zip"), "--preset", "cpu-16"] + args,
    )
    assert_one_line_error(result, fragment)
    assert os.listdir(tmp_path) == []


def test_training_loop_refuses_precision_it_cannot_run(tmp_path):
    """The library raises ValueError before it creates the run directory."""
    run_dir = str(tmp_path / "run")
    net = dict(class_name="training.networks_edm2.Precond", use_fp16=True)
    cases = [
        (dict(precision="bf16", device="cpu"), "precision bf16 needs a CUDA device"),
        (dict(tf32=True, device="cpu"), "tf32 needs a CUDA device"),
        (
            dict(precision="fp32", device="cuda", network_kwargs=net),
            "precision fp32 contradicts network_kwargs.use_fp16=True",
        ),
        (dict(precision="fp16", device="cuda", network_kwargs={**net, "use_fp16": False}), "contradicts"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            training_loop.training_loop(run_dir=run_dir, **kwargs)
    assert not os.path.exists(run_dir)


# ----------------------------------------------------------------------------
# Resuming: precision is part of the math, tf32 a run-time option.


def test_resume_refuses_a_different_precision(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with monkeypatch.context() as m:  # a run created on a GPU with bf16
        m.setattr(misc, "default_device", lambda: torch.device("cuda"))
        m.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        stored = config(data, precision="bf16")
    (run_dir / "training_options.json").write_text(json.dumps(stored, indent=2))
    current = config(data, fp16=False)  # the same on a CPU, but fp32
    with pytest.raises(ValueError, match='different options \\(precision: "bf16" -> "fp32"\\); rerun'):
        train_edm2.check_run_dir(str(run_dir), current)
    result = CliRunner().invoke(
        train_edm2.cmdline, ["--outdir", str(run_dir), "--data", data, "--preset", "cpu-16", "--fp16", "False"]
    )
    assert_one_line_error(result, '(precision: "bf16" -> "fp32")')
    assert os.listdir(run_dir) == ["training_options.json"]
    # tf32 only changes the rounding of float32 matmuls: a run-time option.
    assert train_edm2.check_run_dir(str(run_dir), {**current, "precision": "bf16", "tf32": True}) == {
        "tf32": (False, True)
    }


def test_resume_of_a_run_without_precision_keys(data, tmp_path, monkeypatch):
    """The reference's training_options.json (no precision, tf32 or compile): its use_fp16 decides, on this device."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    c = config(data)
    (run_dir / "training_options.json").write_text(
        json.dumps({k: v for k, v in c.items() if k not in ("precision", "tf32", "compile")})
    )
    assert train_edm2.check_run_dir(str(run_dir), c) == {}
    monkeypatch.setattr(misc, "default_device", lambda: torch.device("cuda"))
    assert train_edm2.check_run_dir(str(run_dir), config(data)) == {}  # fp16 there, as the reference
    with pytest.raises(ValueError, match='\\(precision: "fp16" -> "fp32"\\)'):
        train_edm2.check_run_dir(str(run_dir), {**config(data), "precision": "fp32"})


# ----------------------------------------------------------------------------
# Sampling.


def test_generate_fp32_restores_use_fp16_and_equals_the_default_on_a_cpu():
    net = make_net(label_dim=4, seed=1)
    assert net.use_fp16 is True
    seen = []

    def sampler(net, **kwargs):
        seen.append(net.use_fp16)
        return gi.edm_sampler(net=net, **kwargs)

    def images(**kwargs):
        batches = gi.generate_images(
            net, seeds=[3, 4], num_steps=3, sampler_fn=sampler, verbose=False, device="cpu", **kwargs
        )
        return torch.cat([r.images for r in batches])

    default = images()
    assert seen == [True] and net.use_fp16 is True
    assert torch.equal(images(precision="fp32"), default)  # use_fp16 has no effect on a CPU
    assert seen == [True, False] and net.use_fp16 is True
    with pytest.raises(ZeroDivisionError):  # also restored when sampling fails
        for _ in gi.generate_images(net, seeds=[1], sampler_fn=lambda **kwargs: 1 / 0, verbose=False, precision="fp32"):
            pass
    assert net.use_fp16 is True


def test_generate_refuses_before_loading(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.pkl")  # loading it would fail with "Cannot open"
    monkeypatch.setattr(misc, "cpu_has_bf16", lambda: False)
    for kwargs, message in [(dict(precision="bf16"), "precision bf16 needs"), (dict(tf32=True), "tf32 needs")]:
        with pytest.raises(ValueError, match=message):
            gi.generate_images(missing, device="cpu", verbose=False, **kwargs)
    monkeypatch.setattr(misc, "cpu_has_bf16", lambda: True)  # a CPU with native bfloat16 may sample in bf16
    with pytest.raises(Exception, match="missing.pkl") as failure:
        gi.generate_images(missing, device="cpu", verbose=False, precision="bf16")
    assert not isinstance(failure.value, ValueError) or "precision" not in str(failure.value)
    with pytest.raises(ValueError, match="precision bf16 needs"):  # training on a CPU stays refused
        misc.resolve_precision("bf16", False, "cpu")


def test_generate_bf16_on_a_cpu_is_close_to_fp32(monkeypatch):
    """bf16 autocast on a CPU (allowed where the CPU has native bfloat16; emulated anywhere else)."""
    monkeypatch.setattr(misc, "cpu_has_bf16", lambda: True)
    net = make_net(label_dim=4, seed=1)

    def images(**kwargs):
        kwargs = dict(seeds=list(range(8)), num_steps=4, verbose=False, device="cpu", **kwargs)
        return torch.cat([r.images for r in gi.generate_images(net, **kwargs)]).int()

    fp32, bf16 = images(precision="fp32"), images(precision="bf16")
    diff = (bf16 - fp32).abs().float()
    assert diff.max() > 0  # bfloat16 was used: 8-bit mantissas change some pixels
    assert diff.mean() < 2.0 and diff.max() <= 48, (diff.mean(), diff.max())


def test_generate_cli_refuses_on_a_cpu(tmp_path, single_process_cli):
    net = tmp_path / "net.pkl"
    net.write_bytes(b"not a pickle")
    for args, fragment in [(["--precision", "fp16"], "precision fp16 needs a CUDA device"), (["--tf32"], "tf32 needs")]:
        result = single_process_cli(gi.cmdline, "--net", net, "--outdir", tmp_path / "out", *args)
        assert_one_line_error(result, fragment)
        assert "Loading" not in result.output and not (tmp_path / "out").exists()


def test_calculate_metrics_gen_passes_precision_through(tmp_path, single_process_cli, monkeypatch):
    (tmp_path / "ref.pkl").write_bytes(b"not read")
    (tmp_path / "net.pkl").write_bytes(b"not read")
    args = ["gen", "--net", tmp_path / "net.pkl", "--ref", tmp_path / "ref.pkl", "--num", 2]
    monkeypatch.setattr(misc, "cpu_has_bf16", lambda: False)
    result = single_process_cli(cm.cmdline, *args, "--precision", "bf16")
    assert_one_line_error(result, "precision bf16 needs a CUDA device")  # before the statistics are read
    seen = {}

    def fake_generate_images(net, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop")

    monkeypatch.setattr(cm, "_load_ref", lambda ref_path: None)
    monkeypatch.setattr(cm, "generate_images", fake_generate_images)
    assert_one_line_error(single_process_cli(cm.cmdline, *args, "--precision", "fp32"), "stop")
    assert (seen["precision"], seen["tf32"]) == ("fp32", False)


# ----------------------------------------------------------------------------
# Slow: whole runs and subprocesses.


TINY_RUN = ["--preset", "cpu-16", "--channels", "8", "--batch", "32", "--duration", "1Ki", "--status", "1Ki"]
TINY_RUN += ["--snapshot", "0", "--checkpoint", "1Ki", "--grid", "0", "--no-tensorboard"]


@pytest.mark.slow
def test_fp32_training_equals_the_default_on_a_cpu_bit_for_bit(data, tmp_path):
    states = []
    for extra in ([], ["--precision", "fp32"]):
        run_dir = tmp_path / f"run{len(states)}"
        cmd = [sys.executable, str(REPO_ROOT / "train_edm2.py"), "--outdir", str(run_dir), "--data", data] + TINY_RUN
        result = subprocess.run(cmd + extra, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        options = json.loads((run_dir / "training_options.json").read_text())
        assert (options["precision"], options["tf32"]) == ("fp32", False)
        states.append(torch.load(run_dir / "training-state-0000001.pt", map_location="cpu", weights_only=True))
    del states[0]["state"]["total_elapsed_time"], states[1]["state"]["total_elapsed_time"]
    assert_identical(*states)


def assert_identical(a, b, where="checkpoint"):
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for idx, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{idx}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_refusals_on_a_cpu_in_subprocesses(data, tmp_path):
    net = tmp_path / "net.pkl"
    net.write_bytes(b"not a pickle")
    out = tmp_path / "out"
    commands = [
        ["train_edm2.py", "--outdir", str(out), "--data", data, "--preset", "cpu-16", "--precision", "bf16"],
        ["generate_images.py", "--net", str(net), "--outdir", str(out), "--tf32"],
        ["calculate_metrics.py", "gen", "--net", str(net), "--ref", str(net), "--precision", "fp16"],
    ]
    for args in commands:
        cmd = [sys.executable, str(REPO_ROOT / args[0])] + args[1:]
        result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert lines[-1].startswith("Error: ") and "needs a CUDA device" in lines[-1], result.stderr
        assert sum(line.startswith("Error") for line in lines) == 1
    assert sorted(os.listdir(tmp_path)) == ["net.pkl"]
