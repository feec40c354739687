"""Sweeps of EMA length and guidance, the library under ``calculate_metrics.py sweep``.

The EMA length sigma_rel and the guidance (strength w and interval) are tuned after training by
measuring the metrics at every combination (Sections 3.3 and 5 of Karras et al. 2024): each EMA
profile is reconstructed in memory from the raw snapshots (``training.posthoc``), a few at a time,
and each combination is one evaluation of ``num`` seeds. Every result is appended to
``sweep.jsonl`` as one JSON line as soon as it is known, so that a rerun of an interrupted sweep
skips the finished combinations; the table, the best setting per metric and ``sweep.png`` are
made from that file.
"""

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from training import posthoc
from training.metrics import (
    append_json_line,
    calculate_metrics_from_stats,
    calculate_stats_for_iterable,
    read_json_lines,
)
from training.sampling import generate_images, parse_guidance_interval

Interval = Optional[tuple[float, float]]

# ----------------------------------------------------------------------------
# The plan: one point per combination, and what identifies it in the results file.


def parse_interval_choice(s: Union[str, Sequence[float], None]) -> Interval:
    """``'LO,HI'`` as for ``--guidance-interval``, or ``'all'`` (guide every step) for None."""
    if s is None or (isinstance(s, str) and s.strip().lower() == "all"):
        return None
    return parse_guidance_interval(s)


def parse_float_list(s: Union[str, float, Sequence[float]]) -> list[float]:
    """``'1,1.2,1.4'`` -> ``[1.0, 1.2, 1.4]`` (finite numbers, each once, in the given order)."""
    tokens = [s] if isinstance(s, (int, float)) else s.split(",") if isinstance(s, str) else list(s)
    values = []
    for token in tokens:
        value = posthoc.parse_number(str(token).strip())
        if value not in values:
            values.append(value)
    if not values:
        raise ValueError("empty list")
    return values


def plan_sweep(
    ema_stds: Sequence[Optional[float]], guidances: Sequence[float], intervals: Sequence[Interval] = (None,)
) -> list[dnnlib.EasyDict]:
    """Every combination as EasyDict(ema, guidance, interval), EMA lengths outermost (in reconstruction order).
    Guidance 1 is no guidance, so it is one point per EMA length whatever the intervals."""
    points = []
    for ema in ema_stds:
        for guidance in guidances:
            for interval in [None] if guidance == 1 else intervals:
                iv = None if interval is None else [float(interval[0]), float(interval[1])]
                point = dnnlib.EasyDict(ema=None if ema is None else float(ema), guidance=float(guidance), interval=iv)
                if point not in points:
                    points.append(point)
    return points


def point_key(point: Mapping[str, Any]) -> str:
    """What identifies a combination in the results file (the EMA length to the 1e-6 of its file names)."""
    ema = None if point["ema"] is None else round(float(point["ema"]), 6)
    interval = None if point["interval"] is None else [round(float(x), 9) for x in point["interval"]]
    return json.dumps([ema, round(float(point["guidance"]), 9), interval])


def finished_results(path: str, settings: Mapping[str, Any]) -> dict[str, dict]:
    """The records of ``path`` computed with the same ``settings`` (network, reference, seeds, sampler, ...),
    by ``point_key``; records of other settings stay in the file but do not count as finished."""
    wanted = json.loads(json.dumps(settings))  # the settings as they read back from JSON
    done = {}
    for record in read_json_lines(path):
        if record.get("settings") == wanted and "results" in record:
            done[point_key(record)] = record
    return done


# ----------------------------------------------------------------------------
# The networks: a pickle, or EMA profiles reconstructed from raw snapshots a batch at a time.


def list_snapshots(in_dir: str, in_prefix: Optional[str] = None) -> list[dnnlib.EasyDict]:
    in_pkls = posthoc.list_input_pickles(in_dir, in_prefix=in_prefix)
    if not in_pkls:
        where = f" with prefix '{in_prefix}'" if in_prefix else ""
        raise FileNotFoundError(f"No raw snapshots named PREFIX-KIMG-STD.pkl in '{in_dir}'{where}")
    return in_pkls


def iterate_networks(
    source: str,
    ema_stds: Sequence[Optional[float]],
    ema_batch: int = 8,
    out_nimg: Optional[int] = None,
    in_prefix: Optional[str] = None,
    save_dir: Optional[str] = None,
    trust_embedded_code: bool = False,
) -> Iterator[tuple[Optional[float], dict]]:
    """``(ema, pkl_data)`` per EMA length: the pickle ``source`` itself (``ema_stds == [None]``), or profiles
    reconstructed in memory from the raw snapshots in the folder ``source``, ``ema_batch`` at a time, saved
    to ``save_dir`` if given (rank 0). A batch is released before the next one is reconstructed."""
    if list(ema_stds) == [None]:
        yield None, persistence.load_network_pickle(source, trust_embedded_code=trust_embedded_code, verbose=False)
        return
    steps = posthoc.reconstruct_phema(
        list_snapshots(source, in_prefix),
        out_std=list(ema_stds),
        out_nimg=out_nimg,
        out_dir=save_dir if dist.get_rank() == 0 else None,
        out_prefix="phema",
        max_batch_size=ema_batch,
        verbose=False,
        trust_embedded_code=trust_embedded_code,
    )
    for step in steps:
        outputs, step = step.outputs, None
        while outputs:
            out = outputs.pop(0)
            yield out.std, out.pkl_data
            del out


def load_guiding_network(
    source: str, std: Optional[float], kimg: Optional[int], trust_embedded_code: bool = False
) -> dnnlib.EasyDict:
    """The guiding network: a pickle, or (``std`` given) that EMA profile of the raw snapshots in ``source``."""
    if std is None:
        return persistence.load_network_pickle(source, trust_embedded_code=trust_embedded_code, verbose=False)["ema"]
    out_nimg = None if kimg is None else posthoc.kimg_to_nimg(kimg)
    steps = posthoc.reconstruct_phema(
        list_snapshots(source), [std], out_nimg, verbose=False, trust_embedded_code=trust_embedded_code
    )
    for step in steps:
        if step.outputs:
            return step.outputs[0].net
    raise ValueError(f"No guiding network reconstructed from '{source}'")


# ----------------------------------------------------------------------------
# One evaluation and the loop over the plan.


def evaluate_point(
    pkl_data: Mapping[str, Any],
    gnet: Any,
    point: Mapping[str, Any],
    ref: Optional[Mapping[str, Any]],
    metrics: Sequence[str],
    gen_kwargs: Mapping[str, Any],
) -> dict[str, float]:
    """The metrics of one combination (rank 0; the other processes return {}), as ``calculate_metrics.py gen``
    computes them for the same network: the guiding network is not used at guidance 1."""
    guided = point["guidance"] != 1
    image_iter = generate_images(
        pkl_data["ema"],
        gnet=gnet if guided else None,
        encoder=pkl_data.get("encoder"),
        guidance=point["guidance"],
        guidance_interval=point["interval"] if guided else None,
        verbose=False,
        **gen_kwargs,
    )
    for r in calculate_stats_for_iterable(image_iter, metrics=metrics, verbose=False):
        stats = r.stats  # set by the last batch
    return calculate_metrics_from_stats(stats, ref, metrics, verbose=False) if dist.get_rank() == 0 else {}


def run_sweep(
    points: Sequence[Mapping[str, Any]],
    networks: Iterator[tuple[Optional[float], dict]],
    gnet: Any,
    ref: Optional[Mapping[str, Any]],
    metrics: Sequence[str],
    gen_kwargs: Mapping[str, Any],
    out_path: str,
    settings: Mapping[str, Any],
    done: Mapping[str, dict],
) -> list[dict]:
    """Evaluate the points not in ``done``, network by network (``networks`` yields only the EMA lengths that
    have unfinished points), appending each record to ``out_path`` (rank 0) as soon as it is known. Returns the
    records of every point of the plan, in plan order (rank 0)."""
    records = {point_key(p): done[point_key(p)] for p in points if point_key(p) in done}
    bar = tqdm.tqdm(total=len(points), initial=len(records), unit="point", disable=dist.get_rank() != 0)
    for ema, pkl_data in networks:
        todo = [p for p in points if p["ema"] == ema and point_key(p) not in records]
        for point in todo:
            bar.set_postfix_str(f"ema={'-' if ema is None else f'{ema:.3f}'} guidance={point['guidance']:g}")
            results = evaluate_point(pkl_data, gnet, point, ref, metrics, gen_kwargs)
            record = dict(ema=point["ema"], guidance=point["guidance"], interval=point["interval"], results=results)
            record["settings"] = dict(settings)
            records[point_key(point)] = record
            if dist.get_rank() == 0:
                append_json_line(out_path, record)
            bar.update(1)
        del pkl_data  # hold one batch of networks at most
    bar.close()
    dist.barrier()
    return [records[point_key(p)] for p in points if point_key(p) in records]


# ----------------------------------------------------------------------------
# Reporting: the table, the best setting per metric, the figure.


def describe_guidance(record: Mapping[str, Any]) -> str:
    if record["guidance"] == 1:
        return "no guidance"
    iv = record["interval"]
    return f"guidance {record['guidance']:g}" + ("" if iv is None else f", interval [{iv[0]:g}, {iv[1]:g}]")


def best_settings(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict]:
    """Per metric, the record with the lowest value (the first in plan order among equals)."""
    best = {}
    for metric in metrics:
        scored = [r for r in records if metric in r["results"]]
        if scored:
            best[metric] = min(scored, key=lambda r: r["results"][metric])
    return best


def format_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """One row per combination, then the best setting per metric."""
    lines = [f"{'ema':>7}  {'guidance':<34}" + "".join(f"{m:>12}" for m in metrics)]
    for r in records:
        ema = "-" if r["ema"] is None else f"{r['ema']:.3f}"
        values = "".join(f"{r['results'][m]:>12.6g}" if m in r["results"] else f"{'-':>12}" for m in metrics)
        lines.append(f"{ema:>7}  {describe_guidance(r):<34}{values}")
    for metric, r in best_settings(records, metrics).items():
        ema = "" if r["ema"] is None else f"ema {r['ema']:.3f}, "
        lines.append(f"Best {metric} = {r['results'][metric]:.6g} at {ema}{describe_guidance(r)}")
    return "\n".join(lines)


def plot_sweep(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str) -> str:
    """``path`` (PNG): per metric, the metric against the EMA length, one curve per guidance setting, each
    curve's minimum marked and the overall best circled. Without EMA lengths, against the guidance strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_ema = any(r["ema"] is not None for r in records)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        scored = [r for r in records if metric in r["results"]]
        curves: dict[str, list] = {}
        for r in scored:
            label = (
                describe_guidance(r)
                if by_ema
                else ("every step" if r["interval"] is None else f"interval {r['interval']}")
            )
            curves.setdefault(label, []).append((r["ema"] if by_ema else r["guidance"], r["results"][metric]))
        for label, xy in curves.items():
            xy.sort()
            (line,) = ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=label)
            x_min, y_min = min(xy, key=lambda p: p[1])
            ax.plot([x_min], [y_min], marker="v", markersize=9, color=line.get_color())
        best = best_settings(scored, [metric]).get(metric)
        if best is not None:
            x_best = best["ema"] if by_ema else best["guidance"]
            ax.plot([x_best], [best["results"][metric]], "o", ms=14, mfc="none", mec="black", label="best")
        ax.set_xlabel("EMA length sigma_rel" if by_ema else "guidance strength")
        ax.set_ylabel(metric.upper() if metric == "fid" else metric)
        ax.set_title(f"{metric} (triangles: minimum of each curve)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def results_path(out_dir: str) -> str:
    return os.path.join(out_dir, "sweep.jsonl")
