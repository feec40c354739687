"""The import layers of docs/architecture.md, and the script names that code written against the reference uses.

Every import is found by walking the syntax tree, so imports inside function bodies count too: a library module that
imports a script lazily still stands above that script.
"""

import ast
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

SCRIPTS = sorted(path.stem for path in REPO_ROOT.glob("*.py"))
LIBRARY_PACKAGES = ("training", "torch_utils", "dnnlib")
LAYER = {"dnnlib": 0, "torch_utils": 1, "training": 2}  # scripts: 3


def imported_modules(path) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def library_modules() -> list:
    return sorted(path for package in LIBRARY_PACKAGES for path in (REPO_ROOT / package).glob("*.py"))


def test_the_walk_finds_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import generate_images\n    from calculate_metrics import load_stats\n")
    assert {"generate_images", "calculate_metrics"} <= imported_modules(module)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_modules_import_no_script_and_nothing_above_them(path):
    own_layer = LAYER[path.parent.name]
    for name in imported_modules(path):
        top = name.split(".")[0]
        assert top not in SCRIPTS, f"{path.parent.name}/{path.name} imports the script {top}.py"
        if top in LAYER:
            assert LAYER[top] <= own_layer, f"{path.parent.name}/{path.name} imports {name}, a layer above it"


def test_scripts_import_no_other_script():
    for script in SCRIPTS:
        imported = {name.split(".")[0] for name in imported_modules(REPO_ROOT / f"{script}.py")}
        others = sorted(imported & set(SCRIPTS) - {script})
        assert not others, f"{script}.py imports the scripts {others}"


def test_reference_style_script_runs_unchanged(tmp_path):
    """A script written against the reference's library functions: it imports them from the scripts."""
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from generate_images import generate_images, edm_sampler, StackedRandomGenerator, parse_int_list
        import calculate_metrics
        from training.networks_edm2 import Precond

        torch.manual_seed(0)
        net = Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], use_fp16=False).eval()
        seeds = parse_int_list("0-5")
        batches = [r.images for r in generate_images(net, seeds=seeds, max_batch_size=4, num_steps=3,
                                                      verbose=False, device="cpu")]
        images = torch.cat(batches)
        assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8

        # The sampler and generators by hand give the same first image.
        rnd = StackedRandomGenerator("cpu", [0])
        noise = rnd.randn([1, 3, 8, 8])
        with torch.no_grad():
            x = edm_sampler(net, noise, num_steps=3, randn_like=rnd.randn_like)
        by_hand = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
        assert torch.equal(by_hand[0], images[0])

        # Statistics and the Frechet distance through calculate_metrics's names.
        calculate_metrics.register_detector("fid", calculate_metrics.ModuleDetector(torch.nn.Flatten(), feature_dim=192))
        stats = None
        for r in calculate_metrics.calculate_stats_for_iterable([images[:3], images[3:]], metrics=["fid"],
                                                                verbose=False, device="cpu"):
            stats = r.stats
        assert stats["num_images"] == 6 and stats["fid"]["mu"].shape == (192,)
        fd = calculate_metrics.calculate_metrics_from_stats(stats, stats, metrics=["fid"], verbose=False)["fid"]
        assert abs(fd) < 1e-6
        assert abs(calculate_metrics.calculate_fd(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)) - 2) < 1e-9
        print("ok")
        """
    )
    script = tmp_path / "my_eval.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ----------------------------------------------------------------------------
# Size limits that keep the code readable top to bottom.

CORE = sorted(
    [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "scripts").glob("*.py")]
    + [path for package in LIBRARY_PACKAGES for path in (REPO_ROOT / package).glob("*.py")]
)


def functions(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_over_100_lines():
    long = [
        f"{path.relative_to(REPO_ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path in CORE
        for fn in functions(path)
        if fn.end_lineno - fn.lineno + 1 > 100
    ]
    assert not long, long


def test_training_step_takes_at_most_8_parameters():
    (step,) = [fn for fn in functions(REPO_ROOT / "training" / "training_loop.py") if fn.name == "_optimization_step"]
    args = step.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    assert count <= 8, count
