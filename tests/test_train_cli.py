"""Tests of train_edm2.py: image-count parsing, the presets (the README's example and the CPU
presets), overrides, one-line errors for bad input, resuming (with changed run-time options, with
reference checkpoints, refusing changed math and unreadable checkpoints), and a complete short run
through the command line."""

import contextlib
import copy
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import count_flops
import dnnlib
import train_edm2
from tests.conftest import REPO_ROOT, subprocess_env
from tests.scripts import train_helpers
from torch_utils import persistence
from training import training_loop

Ki, Mi = 1 << 10, 1 << 20

OPTION_KEYS = [
    "dataset_kwargs",
    "encoder_kwargs",
    "total_nimg",
    "batch_size",
    "network_kwargs",
    "loss_kwargs",
    "lr_kwargs",
    "batch_gpu",
    "loss_scaling",
    "cudnn_benchmark",
    "status_nimg",
    "snapshot_nimg",
    "checkpoint_nimg",
    "seed",
    "precision",  # not in the reference's options
    "tf32",
    "compile",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Small dataset ZIPs: labelled RGB, unlabelled RGB, greyscale, and a file that is not a ZIP."""
    root = tmp_path_factory.mktemp("cli-data")
    paths = dnnlib.EasyDict(
        rgb=train_helpers.random_dataset_zip(str(root / "rgb.zip"), num_images=16, resolution=8, num_classes=4),
        unlabelled=train_helpers.random_dataset_zip(
            str(root / "unlabelled.zip"), num_images=8, resolution=8, num_classes=None
        ),
        grey=train_helpers.random_dataset_zip(str(root / "grey.zip"), num_images=8, resolution=8, channels=1),
        rgba=train_helpers.random_dataset_zip(str(root / "rgba.zip"), num_images=8, resolution=8, channels=4),
        garbage=str(root / "garbage.zip"),
    )
    with open(paths.garbage, "wb") as f:
        f.write(b"this is not a zip archive" * 10)
    return paths


def invoke(args):
    return CliRunner().invoke(train_edm2.cmdline, args)


def dry_run_config(result) -> dict:
    """The JSON configuration that --dry-run printed."""
    assert result.exit_code == 0, result.output
    text = result.output.split("Training config:\n", 1)[1]
    return json.loads(text[: text.index("\n}\n") + 2])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    # The message is that one line: nothing follows it.
    assert result.stderr.rstrip().splitlines()[-1] == errors[0], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------
# Parsing, presets, overrides.


@pytest.mark.parametrize(
    "text,value",
    [("0", 0), ("1000", 1000), ("1Ki", 1024), ("128Ki", 128 * 1024), ("8Mi", 8 * 1024**2), ("2Gi", 2 * 1024**3)],
)
def test_parse_nimg(text, value):
    assert train_edm2.parse_nimg(text) == value


@pytest.mark.parametrize("text", ["1K", "1ki", "abc", "-5", "1.5Mi", "Mi", ""])
def test_parse_nimg_rejects(text, datasets, tmp_path):
    with pytest.raises(ValueError):
        train_edm2.parse_nimg(text)
    result = invoke(["--outdir", str(tmp_path / "run"), "--data", datasets.rgb, "--duration", text, "-n"])
    assert result.exit_code == 2 and "Error" in result.output and "Traceback" not in result.output


def test_readme_example_resolves_to_the_paper_recipe(tmp_path):
    """The README's example: XS for ImageNet-512 latents on 8 GPUs with --batch-gpu=32, i.e. a
    total batch of 2048, 256 per GPU in 8 accumulation rounds of 32; 2048Mi images in all."""
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"))
    c = train_edm2.setup_training_config(preset="edm2-img512-xs", world_size=8, data=data, batch_gpu=32)
    assert list(c) == OPTION_KEYS
    assert (c.batch_size, c.batch_gpu, c.total_nimg) == (2048, 32, 2048 * Mi)
    assert training_loop.check_training_config(batch_size=c.batch_size, world_size=8, batch_gpu=c.batch_gpu) == (32, 8)
    assert c.encoder_kwargs == dict(class_name="training.encoders.StabilityVAEEncoder")
    assert list(c.network_kwargs) == ["class_name", "model_channels", "dropout", "use_fp16"]
    assert list(c.lr_kwargs) == ["func_name", "ref_lr", "ref_batches"]  # the reference's 10M-image ramp-up
    assert (c.batch_gpu, c.loss_scaling, c.cudnn_benchmark, c.seed) == (32, 1, True, 0)
    assert (c.status_nimg, c.snapshot_nimg, c.checkpoint_nimg) == (128 * Ki, 8 * Mi, 128 * Mi)


@pytest.mark.parametrize("preset", ["edm2-img512-xxs", "edm2-img512-m", "edm2-img64-xl"])
def test_count_flops_sizes_the_network_that_trains(preset, tmp_path):
    """count_flops.py's presets (whose parameters and flops tests/test_count_flops.py checks against
    the paper) are the networks that train_edm2.py builds."""
    c = train_edm2.setup_training_config(
        preset=preset, data=train_helpers.latent_dataset_dir(str(tmp_path / "latents"))
    )
    flops_kwargs = dict(count_flops.PRESETS[preset])
    for key in ["img_resolution", "img_channels", "label_dim"]:
        del flops_kwargs[key]
    assert flops_kwargs == {key: value for key, value in c.network_kwargs.items() if key != "use_fp16"}


def test_default_preset_is_img512_s(datasets, tmp_path):
    c = dry_run_config(invoke(["--outdir", str(tmp_path / "run"), "--data", datasets.rgb, "-n"]))
    assert c["network_kwargs"]["model_channels"] == 192 and c["lr_kwargs"]["ref_lr"] == 0.0100


def test_overrides_win_over_presets(datasets, tmp_path):
    result = invoke(
        [
            "--outdir",
            str(tmp_path / "run"),
            "--data",
            datasets.unlabelled,
            "--preset",
            "edm2-img64-m",
            "--cond",
            "False",
            "--duration",
            "3Mi",
            "--batch",
            "1Ki",
            "--channels",
            "96",
            "--dropout",
            "0.25",
            "--P_mean",
            "-1.5",
            "--P_std",
            "2.5",
            "--lr",
            "0.5",
            "--decay",
            "123",
            "--batch-gpu",
            "32",
            "--fp16",
            "False",
            "--ls",
            "4",
            "--bench",
            "False",
            "--status",
            "2Ki",
            "--snapshot",
            "4Ki",
            "--checkpoint",
            "8Ki",
            "--seed",
            "7",
            "-n",
        ]
    )
    c = dry_run_config(result)
    assert "Dry run; exiting." in result.output
    assert c["dataset_kwargs"]["use_labels"] is False
    assert (c["total_nimg"], c["batch_size"], c["batch_gpu"]) == (3 * Mi, 1024, 32)
    assert c["network_kwargs"] == dict(
        class_name="training.networks_edm2.Precond", model_channels=96, dropout=0.25, use_fp16=False
    )
    assert (c["loss_kwargs"]["P_mean"], c["loss_kwargs"]["P_std"]) == (-1.5, 2.5)
    assert (c["lr_kwargs"]["ref_lr"], c["lr_kwargs"]["ref_batches"]) == (0.5, 123)
    assert (c["loss_scaling"], c["cudnn_benchmark"], c["seed"]) == (4, False, 7)
    assert (c["status_nimg"], c["snapshot_nimg"], c["checkpoint_nimg"]) == (2 * Ki, 4 * Ki, 8 * Ki)
    assert not os.path.exists(tmp_path / "run")  # a dry run creates nothing


def test_vae_latent_dataset_selects_the_vae_encoder(tmp_path):
    data = train_helpers.latent_dataset_dir(str(tmp_path / "latents"))
    c = dry_run_config(invoke(["--outdir", str(tmp_path / "run"), "--data", data, "--preset", "edm2-img512-xs", "-n"]))
    assert c["encoder_kwargs"] == dict(class_name="training.encoders.StabilityVAEEncoder")


def test_zero_disables_status_snapshot_checkpoint(datasets, tmp_path):
    c = dry_run_config(
        invoke(
            [
                "--outdir",
                str(tmp_path / "run"),
                "--data",
                datasets.rgb,
                "--status",
                "0",
                "--snapshot",
                "0",
                "--checkpoint",
                "0",
                "-n",
            ]
        )
    )
    assert (c["status_nimg"], c["snapshot_nimg"], c["checkpoint_nimg"]) == (None, None, None)


@pytest.mark.parametrize("preset,resolution", [("cpu-16", 16), ("cpu-32", 32)])
def test_cpu_presets_are_small_conditional_models(preset, resolution, tmp_path):
    data = train_helpers.random_dataset_zip(
        str(tmp_path / "data.zip"), num_images=10, resolution=resolution, num_classes=10
    )
    c = dry_run_config(invoke(["--outdir", str(tmp_path / "run"), "--data", data, "--preset", preset, "-n"]))
    assert c["dataset_kwargs"]["use_labels"] is True
    assert c["network_kwargs"]["model_channels"] < 64
    # Short runs: the learning rate ramps up and decays within the run; frequent status and snapshots.
    assert c["lr_kwargs"]["rampup_Mimg"] * 1e6 < c["total_nimg"] / 10
    assert c["lr_kwargs"]["ref_batches"] * c["batch_size"] < c["total_nimg"]
    assert c["status_nimg"] <= c["total_nimg"] / 10 and c["snapshot_nimg"] <= c["total_nimg"] / 3
    # A few hundred thousand parameters.
    net = dnnlib.util.construct_class_by_name(
        **c["network_kwargs"], img_resolution=resolution, img_channels=3, label_dim=10
    )
    num_params = sum(p.numel() for p in net.parameters())
    assert 100_000 <= num_params <= 900_000, num_params
    # Attention only at the lowest resolution, and there it has heads.
    attention = [name for name, m in net.named_modules() if getattr(m, "num_heads", 0) > 0]
    assert attention and all("4x4" in name for name in attention), attention


def test_cpu_preset_accepts_narrow_channels_but_paper_presets_do_not(datasets, tmp_path):
    c = dry_run_config(
        invoke(
            ["--outdir", str(tmp_path / "run"), "--data", datasets.rgb, "--preset", "cpu-16", "--channels", "8", "-n"]
        )
    )
    assert c["network_kwargs"]["model_channels"] == 8
    assert_one_line_error(
        invoke(
            [
                "--outdir",
                str(tmp_path / "run"),
                "--data",
                datasets.rgb,
                "--preset",
                "edm2-img64-s",
                "--channels",
                "32",
                "-n",
            ]
        ),
        "--channels",
        "64",
    )


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "case",
    [
        "missing-data",
        "garbage-data",
        "grey",
        "rgba",
        "cond-unlabelled",
        "batch-gpu",
        "duration",
        "status",
        "checkpoint-batch",
        "snapshot-1024",
        "checkpoint",
        "preset",
        "dropout",
        "lr",
    ],
)
def test_bad_input_gets_one_line_error(case, datasets, tmp_path):
    base = ["--outdir", str(tmp_path / "run"), "--data", datasets.rgb, "--preset", "cpu-16"]
    args, fragments = {
        "missing-data": (["--data", str(tmp_path / "nowhere.zip")], ["--data", "nowhere.zip"]),
        "garbage-data": (["--data", datasets.garbage], ["--data", "garbage.zip"]),
        "grey": (["--data", datasets.grey], ["channel count 1"]),
        "rgba": (["--data", datasets.rgba], ["channel count 4"]),
        "cond-unlabelled": (["--data", datasets.unlabelled], ["--cond=True", "no labels"]),
        "batch-gpu": (["--batch", "64", "--batch-gpu", "24"], ["64", "24"]),
        "duration": (["--batch", "64", "--duration", "1000"], ["duration", "1000", "batch size 64"]),
        "status": (["--batch", "64", "--status", "100"], ["status", "100"]),
        "checkpoint-batch": (["--batch", "64", "--snapshot", "1Ki", "--checkpoint", "1000"], ["checkpoint", "1000"]),
        "snapshot-1024": (["--batch", "64", "--snapshot", "640"], ["snapshot", "640", "1024"]),
        "checkpoint": (
            ["--batch", "48", "--duration", "3Ki", "--status", "48", "--snapshot", "3Ki", "--checkpoint", "1Ki"],
            ["checkpoint", "1024", "48"],
        ),
        "preset": (["--preset", "edm2-img512-huge"], ["edm2-img512-huge"]),
        "dropout": (["--dropout", "1.5"], ["--dropout"]),
        "lr": (["--lr", "0"], ["--lr"]),
    }[case]
    result = invoke(base + args + ["--dry-run"])
    assert_one_line_error(result, *fragments)
    assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_processes(datasets):
    with pytest.raises(ValueError, match="processes"):
        train_edm2.setup_training_config(preset="cpu-16", world_size=3, data=datasets.rgb, batch=64)
    with pytest.raises(ValueError, match="processes x batch-gpu"):
        train_edm2.setup_training_config(preset="cpu-16", world_size=2, data=datasets.rgb, batch=64, batch_gpu=12)
    c = train_edm2.setup_training_config(preset="cpu-16", world_size=2, data=datasets.rgb, batch=64, batch_gpu=16)
    assert c.batch_gpu == 16


def test_rerun_with_different_options_fails_and_names_them(datasets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    c = train_edm2.setup_training_config(preset="cpu-16", data=datasets.rgb)
    (run_dir / "training_options.json").write_text(json.dumps(c, indent=2))
    train_edm2.check_run_dir(str(run_dir), c)  # the same options are fine
    result = invoke(
        ["--outdir", str(run_dir), "--data", datasets.rgb, "--preset", "cpu-16", "--lr", "0.02", "--batch", "32"]
    )
    line = assert_one_line_error(result, "different options", "batch_size: 64 -> 32", "lr_kwargs.ref_lr: 0.01 -> 0.02")
    assert "seed" not in line and "P_mean" not in line  # only what differs
    assert sorted(os.listdir(run_dir)) == ["training_options.json"]  # nothing started
    # A dry run only notes it.
    result = invoke(["--outdir", str(run_dir), "--data", datasets.rgb, "--preset", "cpu-16", "--seed", "5", "-n"])
    assert result.exit_code == 0 and "Note:" in result.output and "seed: 0 -> 5" in result.output


def test_diff_options_names_every_differing_key_path():
    old = dict(a=1, b=dict(c=[1, 2], d=dict(e="x", f=0.5)), g=None, h=2)
    new = dict(a=1, b=dict(c=[1, 2, 3], d=dict(e="y", f=0.5), k=True), h=2, i=dict(j=1))
    assert train_edm2.diff_options(old, new) == {
        "b.c": ([1, 2], [1, 2, 3]),
        "b.d.e": ("x", "y"),
        "b.k": (None, True),  # a key on one side only: None on the other
        "i": (None, {"j": 1}),
    }
    assert train_edm2.diff_options(old, copy.deepcopy(old)) == {}
    assert train_edm2.diff_options(dict(a=dict(b=1)), dict(a=2)) == {"a": ({"b": 1}, 2)}


def test_refusal_names_each_key_path_with_both_values(datasets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    c = train_edm2.setup_training_config(preset="cpu-16", data=datasets.rgb)
    (run_dir / "training_options.json").write_text(json.dumps(c, indent=2))
    changed = train_edm2.setup_training_config(
        preset="cpu-16", data=datasets.rgb, dropout=0.1, channels=32, duration=128
    )
    with pytest.raises(ValueError) as info:
        train_edm2.check_run_dir(str(run_dir), changed)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--outdir: {run_dir} holds a run with different options")
    assert "(network_kwargs.model_channels: 16 -> 32; network_kwargs.dropout: 0.0 -> 0.1); rerun" in message
    assert "total_nimg" not in message  # a run-time option


def test_moved_dataset_is_compared_by_content(datasets, tmp_path):
    """A changed --data path is a run-time option while the dataset's content (image count, shape,
    labels) stays the same: checked against dataset_identity.json, or, for a run directory without
    one (the reference's), against the old path while it exists."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = shutil.copy(datasets.rgb, tmp_path / "old.zip")
    moved = shutil.copy(datasets.rgb, tmp_path / "moved.zip")
    other = train_helpers.random_dataset_zip(str(tmp_path / "other.zip"), num_images=16, resolution=8, num_classes=3)
    stored = train_edm2.setup_training_config(preset="cpu-16", data=str(old))
    (run_dir / "training_options.json").write_text(json.dumps(stored, indent=2))

    def check(data):
        return train_edm2.check_run_dir(
            str(run_dir), {**stored, "dataset_kwargs": {**stored.dataset_kwargs, "path": data}}
        )

    for has_identity_file in (False, True):
        if has_identity_file:  # as written at creation
            identity = train_edm2.dataset_identity(stored.dataset_kwargs)
            (run_dir / "dataset_identity.json").write_text(json.dumps(identity))
        assert check(str(moved)) == {"dataset_kwargs.path": (str(old), str(moved))}
        with pytest.raises(ValueError, match="dataset_identity.labels_sha256: "):
            check(other)
    os.remove(old)  # the dataset moved: the identity file still tells
    assert check(str(moved)) == {"dataset_kwargs.path": (str(old), str(moved))}
    with pytest.raises(ValueError, match=r"\(dataset_identity.labels_sha256: \"[0-9a-f]{64}\" -> \"[0-9a-f]{64}\"\)"):
        check(other)
    os.remove(run_dir / "dataset_identity.json")  # a reference run whose dataset is gone: nothing to compare with
    assert check(other) == {"dataset_kwargs.path": (str(old), other)}


# ----------------------------------------------------------------------------
# Resuming (in-process runs of a tiny cpu-16 model: 32 steps of 32 images).


RUN_ARGS = [
    "--preset",
    "cpu-16",
    "--channels",
    "8",
    "--batch",
    "32",
    "--duration",
    "1Ki",
    "--status",
    "512",
    "--snapshot",
    "1Ki",
    "--checkpoint",
    "1Ki",
]


_DIST_ENV = ["MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"]


@contextlib.contextmanager
def in_process_group_of_one():
    """In-process runs make a process group of one (and set its environment): leave neither behind."""
    was_initialized = torch.distributed.is_initialized()
    saved_env = {key: os.environ.get(key) for key in _DIST_ENV}
    try:
        yield
    finally:
        if not was_initialized and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def no_leftover_process_group():
    with in_process_group_of_one():
        yield


def train(run_dir, data, *extra):
    return invoke(["--outdir", str(run_dir), "--data", str(data)] + RUN_ARGS + list(extra))  # later options win


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    """A run directory trained to its 1Ki-image checkpoint; tests copy it."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    with in_process_group_of_one():
        result = train(run_dir, datasets.rgb)
    assert result.exit_code == 0, result.output
    assert (run_dir / "training-state-0000001.pt").is_file() and (run_dir / "dataset_identity.json").is_file()
    return run_dir


def copy_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,option",
    [
        (["--lr", "0.02"], "(lr_kwargs.ref_lr: 0.01 -> 0.02)"),
        (["--decay", "10"], "(lr_kwargs.ref_batches: 1000 -> 10.0)"),
        (["--batch", "64"], "(batch_size: 32 -> 64)"),
        (["--seed", "1"], "(seed: 0 -> 1)"),
        (["--dropout", "0.1"], "(network_kwargs.dropout: 0.0 -> 0.1)"),
        (["--channels", "16"], "(network_kwargs.model_channels: 8 -> 16)"),
        (["--P_mean", "-1"], "(loss_kwargs.P_mean: -0.8 -> -1.0)"),
        (["--P_std", "1"], "(loss_kwargs.P_std: 1.6 -> 1.0)"),
        (["--fp16", "False"], "(network_kwargs.use_fp16: true -> false)"),
        (["--ls", "2"], "(loss_scaling: 1.0 -> 2.0)"),
        (["--cond", "False"], "(dataset_kwargs.use_labels: true -> false)"),
        (["--preset", "cpu-32"], "network_kwargs.channel_mult: [1, 2, 2] -> [1, 2, 2, 2]"),
        (["--data", "other-labels"], '(dataset_identity.labels_sha256: "'),
        (["--data", "fewer-images"], "(dataset_identity.num_images: 16 -> 12; dataset_identity.labels_sha256: "),
    ],
)
def test_resume_refuses_changed_math(args, option, finished_run, tmp_path, no_leftover_process_group):
    if args[0] == "--data":
        num_images, num_classes = (16, 3) if args[1] == "other-labels" else (12, 4)
        args = [
            "--data",
            train_helpers.random_dataset_zip(
                str(tmp_path / "other.zip"), num_images=num_images, resolution=8, num_classes=num_classes
            ),
        ]
    before = {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)}
    result = invoke(["--outdir", str(finished_run), "--data", _data_of(finished_run)] + RUN_ARGS + args)
    assert_one_line_error(result, "different options", option)
    assert {name: (finished_run / name).read_bytes() for name in os.listdir(finished_run)} == before  # nothing changed


def _data_of(run_dir):
    return json.loads((run_dir / "training_options.json").read_text())["dataset_kwargs"]["path"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,key",
    [
        (["--duration", "2Ki"], "total_nimg"),
        (["--batch-gpu", "16"], "batch_gpu"),
        (["--status", "256"], "status_nimg"),
        (["--snapshot", "2Ki"], "snapshot_nimg"),
        (["--checkpoint", "2Ki"], "checkpoint_nimg"),
        (["--bench", "False"], "cudnn_benchmark"),
        (["--compile"], "compile"),
        (["--data", "moved"], "dataset_kwargs.path"),
    ],
)
def test_resume_accepts_changed_runtime_options(args, key, finished_run, tmp_path):
    if args == ["--data", "moved"]:
        args = ["--data", str(shutil.copy(_data_of(finished_run), tmp_path / "moved.zip"))]
    result = invoke(["--outdir", str(finished_run), "--data", _data_of(finished_run)] + RUN_ARGS + args + ["-n"])
    assert result.exit_code == 0 and "different options" not in result.output, result.output
    assert f"Note: changed run-time options: {key}: " in result.output and result.output.count(" -> ") == 1


@pytest.mark.slow
def test_resume_with_changed_runtime_options_trains_on_and_records_them(
    finished_run, tmp_path, no_leftover_process_group
):
    run_dir = copy_run(finished_run, tmp_path)
    original = (run_dir / "training_options.json").read_bytes()
    moved = shutil.copy(_data_of(run_dir), tmp_path / "moved.zip")
    result = train(
        run_dir,
        moved,
        "--duration",
        "2Ki",
        "--batch-gpu",
        "16",
        "--status",
        "256",
        "--snapshot",
        "2Ki",
        "--checkpoint",
        "2Ki",
    )
    assert result.exit_code == 0, result.output
    line = next(
        line
        for line in result.output.splitlines()
        if line.startswith("Resuming on 1 process with changed run-time options: ")
    )
    assert line.endswith(  # in the order of training_options.json
        f"dataset_kwargs.path: {json.dumps(_data_of(finished_run))} -> {json.dumps(str(moved))}; "
        "total_nimg: 1024 -> 2048; batch_gpu: null -> 16; status_nimg: 512 -> 256; snapshot_nimg: 1024 -> 2048; "
        "checkpoint_nimg: 1024 -> 2048"
    )
    assert (run_dir / "log.txt").read_text().splitlines().count(line) == 1  # the record of this invocation
    assert (run_dir / "training-state-0000002.pt").is_file() and (
        run_dir / "network-snapshot-0000002-0.050.pkl"
    ).is_file()
    assert (run_dir / "training_options.json").read_bytes() == original  # the record of the run's creation


@pytest.mark.slow
def test_compiled_run_records_compile_and_trains_as_eager(finished_run, datasets, tmp_path, no_leftover_process_group):
    run_dir = tmp_path / "run"
    result = train(run_dir, datasets.rgb, "--compile")
    assert result.exit_code == 0 and "torch.compile failed" not in result.output, result.output
    options = json.loads((run_dir / "training_options.json").read_text())
    assert (
        options["compile"] is True
        and json.loads((finished_run / "training_options.json").read_text())["compile"] is False
    )
    compiled, eager = [
        torch.load(d / "training-state-0000001.pt", weights_only=True)["net"] for d in (run_dir, finished_run)
    ]
    for name, value in eager.items():  # 32 Adam steps: the fp32 differences of compiled code grow a little
        torch.testing.assert_close(compiled[name], value, rtol=1e-3, atol=1e-4, msg=name)


def write_reference_style_checkpoint(path):
    """Rewrite a checkpoint as the reference writes one: ``state`` an EasyDict and Adam's lr a
    numpy float64 (the reference's learning-rate schedule divides by np.sqrt)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["state"] = dnnlib.EasyDict(ckpt["state"])
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = np.float64(group["lr"])
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what torch refuses without the allow-list


@pytest.mark.slow
def test_resume_from_reference_checkpoint_trains_to_the_end(finished_run, tmp_path, no_leftover_process_group):
    ours = copy_run(finished_run, tmp_path / "ours")
    assert train(ours, _data_of(ours), "--duration", "2Ki").exit_code == 0
    reference = copy_run(finished_run, tmp_path / "reference")
    write_reference_style_checkpoint(reference / "training-state-0000001.pt")
    result = train(reference, _data_of(reference), "--duration", "2Ki")
    assert result.exit_code == 0, result.output
    assert "Loading" in result.output and "training-state-0000001.pt" in result.output
    a, b = [torch.load(run / "training-state-0000002.pt", weights_only=True) for run in (ours, reference)]
    assert a["state"]["cur_nimg"] == b["state"]["cur_nimg"] == 2048
    for name in a["net"]:  # the learning rate is set anew before every step, so the runs agree bitwise
        assert torch.equal(a["net"][name], b["net"][name]), name


class RunsCode:
    """A pickle payload that runs a shell command when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_refuses_checkpoint_that_runs_code(finished_run, tmp_path, no_leftover_process_group):
    run_dir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "marker"
    ckpt = torch.load(run_dir / "training-state-0000001.pt", weights_only=True)
    torch.save(dict(ckpt, state=RunsCode(marker)), run_dir / "training-state-0000002.pt")
    result = train(run_dir, _data_of(run_dir), "--duration", "3Ki")
    assert_one_line_error(result, "training-state-0000002.pt", "system")
    assert not marker.exists()


# ----------------------------------------------------------------------------
# A complete short run through the command line (one process, its own interpreter).


STATUS_RE = re.compile(
    r"Status: kimg (?P<kimg>[ \d.]{9}) time (?P<time>.{12}) sec/tick [ \d.]{8} sec/kimg [ \d.]{7} "
    r"maintenance [ \d.-]{7} cpumem [ \d.]{6} gpumem [ \d.]{6} reserved [ \d.]{6}"
)
STATS_KEYS = [
    "Progress/kimg",
    "Timing/total_sec",
    "Timing/sec_per_tick",
    "Timing/sec_per_kimg",
    "Timing/maintenance_sec",
    "Resources/cpu_mem_gb",
    "Resources/peak_gpu_mem_gb",
    "Resources/peak_gpu_mem_reserved_gb",
]
BAND_KEYS = [f"Loss/loss_sigma_q{k}" for k in range(4)]  # added by training.monitoring


@pytest.mark.slow
def test_cli_run_writes_the_run_directory(datasets, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train_edm2.py"),
        "--outdir",
        str(run_dir),
        "--data",
        datasets.rgb,
        "--preset",
        "cpu-16",
        "--channels",
        "8",
        "--batch",
        "32",
        "--duration",
        "1Ki",
        "--status",
        "256",
        "--snapshot",
        "1Ki",
        "--checkpoint",
        "1Ki",
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    names = sorted(os.listdir(run_dir))
    events = [name for name in names if name.startswith("events.")]
    assert len(events) == 1 and re.fullmatch(r"events\.out\.tfevents\..+", events[0])  # TensorBoard (on by default)
    names.remove(events[0])
    # The kimg-1 grid when it fits its budget (10% of the training time), else one line saying why not.
    log = (run_dir / "log.txt").read_text()
    grids = ["samples-0000001.png"] if "Saved samples-0000001.png" in log else []
    assert grids or re.search(r"^Sample grid at kimg 1 skipped: one column \(4 images\) would take", log, re.M)
    assert names == [
        "dataset_identity.json",
        "log.txt",
        "network-snapshot-0000000-0.050.pkl",
        "network-snapshot-0000000-0.100.pkl",
        "network-snapshot-0000001-0.050.pkl",
        "network-snapshot-0000001-0.100.pkl",
        *grids,  # sample grids (on by default; none at kimg 0)
        "stats.jsonl",
        "training-state-0000001.pt",
        "training_options.json",
    ]

    # training_options.json: the resolved configuration, keys in the reference order.
    options = json.loads((run_dir / "training_options.json").read_text())
    assert list(options) == OPTION_KEYS
    assert options["batch_size"] == 32 and options["network_kwargs"]["model_channels"] == 8

    # log.txt: what training printed (not the configuration dump before it), status lines included.
    assert "Training config:" not in log and "Training from 0 kimg to 1 kimg" in log
    status = [STATUS_RE.match(line) for line in log.splitlines() if line.startswith("Status:")]
    assert all(status) and [float(m["kimg"]) for m in status] == [0.0, 0.3, 0.5, 0.8, 1.0]
    assert log.index("network-snapshot-0000001-0.100.pkl") < log.index("training-state-0000001.pt")

    # stats.jsonl: one JSON object per status tick, keys in the order first reported.
    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    stats = [json.loads(line) for line in lines]
    assert [s["Progress/kimg"] for s in stats] == [0.0, 0.256, 0.512, 0.768, 1.024]
    assert list(stats[0]) == STATS_KEYS + ["timestamp"]
    for s in stats[1:]:
        assert list(s) == STATS_KEYS + ["Loss/loss"] + BAND_KEYS + [
            "Loss/learning_rate",
            "Loss/grad_norm",
            "timestamp",
        ]
        assert 0 < s["Loss/loss"] < 10 and 0 < s["Loss/learning_rate"] <= 0.01
    assert re.search(r'"Progress/kimg": 0\.512, ', lines[2]) and re.search(r'"timestamp": \d+\.\d{3}}$', lines[2])

    # Snapshots: the reference's pickle format, float16 EMA in eval mode on the CPU, loadable both ways.
    path = run_dir / "network-snapshot-0000001-0.050.pkl"
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert type(data) is dnnlib.EasyDict and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    assert data.dataset_kwargs == dict(
        class_name="training.dataset.ImageFolderDataset", path=datasets.rgb, use_labels=True
    )
    assert type(data.encoder).__name__ == "StandardRGBEncoder"
    assert type(data.loss_fn).__name__ == "EDM2Loss" and (data.loss_fn.P_mean, data.loss_fn.P_std) == (-0.8, 1.6)
    ema = data.ema
    assert type(ema).__name__ == "Precond" and not ema.training and all(not m.training for m in ema.modules())
    tensors = list(ema.parameters()) + list(ema.buffers())
    assert len(list(ema.buffers())) > 0
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in tensors)
    assert all(not p.requires_grad for p in ema.parameters())
    safe = persistence.safe_load(str(path))
    assert list(safe) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    for a, b in zip(tensors, list(safe["ema"].parameters()) + list(safe["ema"].buffers())):
        assert torch.equal(a, b)

    # Checkpoints: tensors, state dicts and plain types only.
    ckpt = torch.load(run_dir / "training-state-0000001.pt", map_location="cpu", weights_only=True)
    assert list(ckpt) == ["state", "net", "loss_fn", "optimizer", "ema"]
    assert ckpt["state"]["cur_nimg"] == 1024 and ckpt["state"]["total_elapsed_time"] > 0
    assert ckpt["ema"]["stds"] == [0.050, 0.100]
    assert (ckpt["loss_fn"]["P_mean"], ckpt["loss_fn"]["P_std"], ckpt["loss_fn"]["sigma_data"]) == (-0.8, 1.6, 0.5)
