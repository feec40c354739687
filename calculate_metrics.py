"""Calculate evaluation metrics (FID and FD_DINOv2): the command line over ``training.metrics``.

Subcommands: ``calc`` (a folder or ZIP of images), ``gen`` (images generated on the fly from a
network pickle) and ``ref`` (reference statistics of a dataset). The detectors, the statistics and the
Fréchet distance live in ``training/metrics.py``; this script re-exports them, so that scripts written
against the reference (``calculate_metrics.calculate_stats_for_iterable``, ...) keep working.
"""

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import click
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import cli, posthoc
from training import sweep as sweep_lib
from training.metrics import (  # noqa: F401 -- re-exported: the names of the reference's calculate_metrics.py
    DINOV2_WEIGHTS_URL,
    INCEPTION_URL,
    Detector,
    DetectorUnavailableError,
    DINOv2Detector,
    InceptionV3Detector,
    ModuleDetector,
    _image_file_batches,
    append_json_line,
    calculate_fd,
    calculate_metrics_from_stats,
    calculate_stats_for_files,
    calculate_stats_for_iterable,
    dinov2_preprocess,
    disjoint_subsets,
    format_repeat_summary,
    get_detector,
    known_metrics,
    load_stats,
    parse_metric_list,
    read_json_lines,
    register_detector,
    repeat_seeds,
    save_stats,
    summarize_repeats,
)
from training.sampling import generate_images

# ----------------------------------------------------------------------------
# Command line.


def _load_ref(ref_path: str) -> Optional[dict]:
    """The reference statistics (rank 0 only), loaded before any detector or network."""
    return load_stats(ref_path) if dist.get_rank() == 0 else None


def _run(stats_iter: Iterable[dnnlib.EasyDict], ref: Optional[dict] = None, metrics: Sequence[str] = ()) -> dict:
    """Compute the statistics; with ``ref``, print the metrics and return them (rank 0; else {})."""
    for r in tqdm.tqdm(stats_iter, unit="batch", disable=(dist.get_rank() != 0)):
        stats = r.stats  # set by the last batch
    results = calculate_metrics_from_stats(stats, ref, metrics=metrics) if ref is not None else {}
    dist.barrier()
    return results


def _check_out(out_path: Optional[str]) -> None:
    if out_path is not None:
        dnnlib.util.check_output_file(out_path, "--out", what="results file")


def _run_repeats(
    make_stats_iter: Callable, labels: Sequence[dict], ref: dict, metrics: Sequence[str], out_path: Optional[str]
) -> None:
    """Evaluate each repeat (``make_stats_iter(k)``), then print the minimum, mean and standard deviation over
    them (rank 0). With one repeat the output is that of a single evaluation. ``out_path`` receives one JSON
    line per repeat as soon as it is known and a summary line at the end."""
    results = []
    for k, label in enumerate(labels):
        if len(labels) > 1:
            dist.print0(f"Repeat {k + 1}/{len(labels)}: {', '.join(f'{n} {v}' for n, v in label.items())}")
        results.append(_run(make_stats_iter(k), ref, metrics))
        if out_path is not None and dist.get_rank() == 0:
            append_json_line(out_path, dict(repeat=k, **label, results=results[-1]))
    if dist.get_rank() != 0:
        return
    summary = summarize_repeats(results)
    if len(labels) > 1:
        print(f"Summary over {len(labels)} repeats:")
        print(format_repeat_summary(summary))
    if out_path is not None:
        append_json_line(out_path, dict(repeats=len(labels), summary=summary))


# fmt: off
@click.group()
# fmt: on
def cmdline() -> None:
    """Calculate evaluation metrics (FID and FD_DINOv2).

    Examples:

    \b
    # Generate 50000 images and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img512-s-guid-fid --outdir=out --subdirs --seeds=0-49999

    \b
    # Calculate metrics for a random subset of 50000 images in out/
    python calculate_metrics.py calc --images=out \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl

    \b
    # Calculate metrics directly for a given model without saving any images
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen \\
        --net=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
        --seed=123456789

    \b
    # Compute dataset reference statistics
    python calculate_metrics.py ref --data=datasets/img512.zip --dest=dataset-refs/img512.pkl
    """


# Options shared by the commands.
# fmt: off
_ref_option = click.option("--ref", "ref_path", help="Dataset reference statistics", metavar="PKL|NPZ|URL", type=str, required=True)
_metrics_option = click.option("--metrics", help="List of metrics to compute", metavar="LIST", type=cli.ParsedParam(parse_metric_list), default="fid,fd_dinov2", show_default=True)
_file_batch_option = click.option("--batch", "max_batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True)
_workers_option = click.option("--workers", "num_workers", help="Subprocesses to use for data loading", metavar="INT", type=click.IntRange(min=0), default=2, show_default=True)
_repeats_option = click.option("--repeats", help="Evaluate this many disjoint sets of --num images; report each, the min, mean and std", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
_out_option = click.option("--out", "out_path", help="Append the results as JSON lines to this file", metavar="JSONL")
# fmt: on


# fmt: off
@cmdline.command()
@click.option("--images", "image_path", help="Path to the images", metavar="PATH|ZIP", required=True)
@_ref_option
@_metrics_option
@click.option("--num", "num_images", help="Number of images to use", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Random seed for selecting the images", metavar="INT", type=int, default=0, show_default=True)
@_file_batch_option
@_workers_option
@_repeats_option
@_out_option
# fmt: on
def calc(image_path, ref_path, metrics, num_images, seed, max_batch_size, num_workers, repeats, out_path):
    """Calculate metrics for a given set of images.

    With --repeats=K, K disjoint random subsets of --num images each: one seeded shuffle of all
    the images cut into K consecutive runs (the first is the subset that --repeats=1 uses).
    """
    with cli.one_line_errors():
        dnnlib.util.check_input_file(ref_path, "--ref", what="feature statistics")
        _check_out(out_path)
        dist.init()
        batch_sets = [
            _image_file_batches(image_path, num_images, seed, max_batch_size, num_workers, repeat=k, repeats=repeats)
            for k in range(repeats)
        ]
        ref = _load_ref(ref_path)
        labels = [dict(images=image_path, subset=k, num=num_images, seed=seed) for k in range(repeats)]

        def stats_iter(k):
            return calculate_stats_for_iterable(batch_sets[k], metrics=metrics)

        _run_repeats(stats_iter, labels, ref, metrics, out_path)


# fmt: off
@cmdline.command()
@click.option("--net", help="Network pickle filename or URL", metavar="PATH|URL", required=True)
@_ref_option
@_metrics_option
@click.option("--num", "num_images", help="Number of images to generate", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Random seed for the first image", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch", "max_batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--gnet", help="Guiding network pickle filename or URL", metavar="PATH|URL")
@click.option("--guidance", help="Guidance strength  [default: 1; no guidance]", metavar="FLOAT", type=float, default=1)
@cli.guidance_interval_option
@cli.sampler_option
@click.option("--steps", "num_steps", help="Number of sampling steps", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@cli.sampling_options
@_repeats_option
@_out_option
# fmt: on
def gen(
    net,
    ref_path,
    metrics,
    num_images,
    seed,
    max_batch_size,
    gnet,
    guidance,
    trust_embedded_code,
    compile,
    precision,
    tf32,
    repeats,
    out_path,
    **sampler_opts,
):
    """Calculate metrics for a given network pickle.

    With --repeats=K, K disjoint seed sets: repeat k generates the seeds
    seed+k*num .. seed+(k+1)*num-1 (e.g. 0-49999, 50000-99999, 100000-149999).
    """
    if guidance != 1 and gnet is None:
        raise click.UsageError(f"--guidance={guidance:g} needs a guiding network: please specify --gnet")
    with cli.one_line_errors():
        dnnlib.util.check_input_file(ref_path, "--ref", what="feature statistics")
        dnnlib.util.check_input_file(net, "--net", what="network pickle")
        gnet = None if guidance == 1 else gnet  # never loaded when it would not be used
        if gnet is not None:
            dnnlib.util.check_input_file(gnet, "--gnet", what="network pickle")
        _check_out(out_path)
        misc.resolve_precision(precision, None, misc.default_device(), tf32, cpu_bf16=True)  # before the statistics
        dist.init()
        ref = _load_ref(ref_path)
        seed_sets = repeat_seeds(seed, num_images, repeats)
        labels = [dict(net=net, seeds=f"{s[0]}-{s[-1]}", guidance=guidance) for s in seed_sets]

        def stats_iter(k):
            image_iter = generate_images(
                net,
                gnet=gnet,
                guidance=guidance,
                seeds=seed_sets[k],
                max_batch_size=max_batch_size,
                trust_embedded_code=trust_embedded_code,
                compile=compile,
                precision=precision,
                tf32=tf32,
                **sampler_opts,
            )
            return calculate_stats_for_iterable(image_iter, metrics=metrics)

        _run_repeats(stats_iter, labels, ref, metrics, out_path)


# fmt: off
@cmdline.command()
# fmt: off
@click.option("--net", help="Folder of raw snapshots (with --ema), or a network pickle", metavar="DIR|PKL", required=True)
@click.option("--ema", "ema_stds", help="EMA lengths sigma_rel to reconstruct, e.g. 0.010,0.015,...,0.250", metavar="LIST", type=cli.ParsedParam(posthoc.parse_std_list, quote=True))
@click.option("--inprefix", help="Use only raw snapshots with this file name prefix", metavar="STR")
@click.option("--kimg", help="Training time to reconstruct at; must match a snapshot  [default: latest]", metavar="KIMG", type=click.IntRange(min=1))
@click.option("--gnet", help="Guiding network: a pickle, or a folder of raw snapshots with --gnet-std", metavar="PKL|DIR")
@click.option("--gnet-std", help="EMA length of the guiding network reconstructed from --gnet", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True, max=posthoc.MAX_STD, max_open=True))
@click.option("--gnet-kimg", help="Training time of the guiding network  [default: latest]", metavar="KIMG", type=click.IntRange(min=1))
@click.option("--guidance", "guidances", help="Guidance strengths to try (1 = no guidance)", metavar="LIST", type=cli.ParsedParam(sweep_lib.parse_float_list), default="1", show_default=True)
@click.option("--guidance-interval", "intervals", help="Guidance interval to try, repeatable; 'all' guides every step  [default: all]", metavar="LO,HI|all", type=cli.ParsedParam(sweep_lib.parse_interval_choice, "LO,HI"), multiple=True)
@_ref_option
@_metrics_option
@click.option("--num", "num_images", help="Images per combination", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Random seed for the first image", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch", "max_batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--ema-batch", help="EMA lengths reconstructed per pass over the snapshots (bounds memory)", metavar="INT", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--outdir", help="Where to write sweep.jsonl (results, resumable) and sweep.png", metavar="DIR", required=True)
@click.option("--save", "save_dir", help="Also save the reconstructed network pickles here", metavar="DIR")
@cli.sampler_option
@click.option("--steps", "num_steps", help="Number of sampling steps", metavar="INT", type=click.IntRange(min=1), default=32, show_default=True)
@cli.sampling_options
# fmt: on
# fmt: on
def sweep(outdir, save_dir, ref_path, metrics, **opts):
    """Calculate metrics over EMA lengths and guidance settings.

    Every combination of --ema, --guidance and --guidance-interval is evaluated with the
    seeds --seed .. --seed+--num-1, as 'gen' does. Each result is appended to
    OUTDIR/sweep.jsonl as soon as it is known; a rerun skips the finished combinations.
    At the end: a table, the best setting per metric and OUTDIR/sweep.png.
    """
    with cli.one_line_errors():
        plan = _sweep_plan(opts)
        dnnlib.util.check_input_file(ref_path, "--ref", what="feature statistics")
        dnnlib.util.check_output_dir(outdir, "--outdir")
        if save_dir is not None:
            dnnlib.util.check_output_dir(save_dir, "--save")
        misc.resolve_precision(opts["precision"], None, misc.default_device(), opts["tf32"], cpu_bf16=True)
        dist.init()
        out_path = sweep_lib.results_path(outdir)
        settings = dict(plan.settings, ref=ref_path, metrics=list(metrics))
        done = sweep_lib.finished_results(out_path, settings)
        dist.barrier()  # every process has read the finished points before rank 0 appends new ones
        pending = [p for p in plan.points if sweep_lib.point_key(p) not in done]
        dist.print0(f"Sweep: {len(plan.points)} combinations, {len(plan.points) - len(pending)} finished in {out_path}")
        ref = _load_ref(ref_path) if pending else None
        gnet = None
        if any(p["guidance"] != 1 for p in pending):
            gnet = sweep_lib.load_guiding_network(
                opts["gnet"], opts["gnet_std"], opts["gnet_kimg"], opts["trust_embedded_code"]
            )
        pending_emas = list(dict.fromkeys(p["ema"] for p in pending))
        networks = (
            sweep_lib.iterate_networks(
                opts["net"],
                pending_emas,
                opts["ema_batch"],
                plan.out_nimg,
                opts["inprefix"],
                save_dir,
                opts["trust_embedded_code"],
            )
            if pending
            else iter(())
        )
        records = sweep_lib.run_sweep(
            plan.points, networks, gnet, ref, metrics, plan.gen_kwargs, out_path, settings, done
        )
        if dist.get_rank() == 0:
            print(sweep_lib.format_table(records, metrics))
            print(f"Saved {sweep_lib.plot_sweep(records, metrics, os.path.join(outdir, 'sweep.png'))}")


def _sweep_plan(opts: dict) -> dnnlib.EasyDict:
    """The combinations, the settings that identify the sweep's results, and generate_images()'s arguments;
    bad combinations of options fail here, before anything is loaded."""
    is_dir = os.path.isdir(opts["net"])
    if is_dir and opts["ema_stds"] is None:
        raise click.UsageError("--net names a folder of raw snapshots: please specify the EMA lengths with --ema")
    if not is_dir and opts["ema_stds"] is not None:
        raise click.UsageError("--ema needs --net to be a folder of raw snapshots")
    if not is_dir:
        dnnlib.util.check_input_file(opts["net"], "--net", what="network pickle")
    guided = any(g != 1 for g in opts["guidances"])
    if guided and opts["gnet"] is None:
        raise click.UsageError("--guidance other than 1 needs a guiding network: please specify --gnet")
    if opts["gnet"] is not None and os.path.isdir(opts["gnet"]) != (opts["gnet_std"] is not None):
        raise click.UsageError("--gnet-std goes with --gnet naming a folder of raw snapshots (and only then)")
    out_nimg = None
    if is_dir:
        in_pkls = sweep_lib.list_snapshots(opts["net"], opts["inprefix"])
        out_nimg = max(p.nimg for p in in_pkls) if opts["kimg"] is None else posthoc.kimg_to_nimg(opts["kimg"])
    emas = opts["ema_stds"] or [None]
    points = sweep_lib.plan_sweep(emas, opts["guidances"], list(opts["intervals"]) or [None])
    keys = ["net", "inprefix", "num_images", "seed", "sampler_fn", "num_steps", "precision"]
    settings = {k: opts[k] for k in keys}
    settings.update(kimg=None if out_nimg is None else out_nimg // 1000)
    if guided:
        settings.update(gnet=opts["gnet"], gnet_std=opts["gnet_std"], gnet_kimg=opts["gnet_kimg"])
    gen_keys = ["max_batch_size", "sampler_fn", "num_steps", "trust_embedded_code", "compile", "precision", "tf32"]
    gen_kwargs = {k: opts[k] for k in gen_keys}
    gen_kwargs["seeds"] = range(opts["seed"], opts["seed"] + opts["num_images"])
    return dnnlib.EasyDict(points=points, settings=settings, gen_kwargs=gen_kwargs, out_nimg=out_nimg)


# fmt: off
@cmdline.command()
@click.option("--data", "image_path", help="Path to the dataset", metavar="PATH|ZIP", required=True)
@click.option("--dest", "dest_path", help="Destination file", metavar="PKL", required=True)
@_metrics_option
@_file_batch_option
@_workers_option
# fmt: on
def ref(image_path, dest_path, metrics, max_batch_size, num_workers):
    """Calculate dataset reference statistics for 'calc' and 'gen'."""
    with cli.one_line_errors():
        dnnlib.util.check_output_file(dest_path, "--dest", what="statistics file")
        dist.init()
        batches = _image_file_batches(image_path, None, 0, max_batch_size, num_workers)
        _run(calculate_stats_for_iterable(batches, metrics=metrics, dest_path=dest_path))


# ----------------------------------------------------------------------------


if __name__ == "__main__":
    cmdline()

# ----------------------------------------------------------------------------
