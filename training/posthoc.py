"""Post-hoc EMA reconstruction, the library under ``reconstruct_phema.py``: snapshot names and times,
the sigma_rel list syntax, and ``reconstruct_phema()``, which builds networks with any power-function
EMA length from the snapshots training stores (Algorithm 3 and Appendix C.2 of Karras et al. 2024).

Any profile p_o (sigma_rel, end time) is approximated by the least-squares combination
sum_i X[i, o] p_i of the stored profiles (``training.phema.solve_posthoc_coefficients``), and since
averaging is linear, the network with that EMA is sum_i X[i, o] w_i. The inputs are streamed: a
batch of outputs is accumulated in float32 while each input pickle is read once, so memory holds
the batch's accumulators and one input at a time. With ``out_dir=None`` the networks stay in memory
(``calculate_metrics.py sweep`` evaluates them without writing pickles).
"""

import copy
import math
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import numpy as np
import torch

import dnnlib
from torch_utils import persistence, weight_files
from training import phema

MAX_STD = 0.289  # sigma_rel of a flat average is sqrt(1/12) ~= 0.2887; longer profiles do not exist.
_INPUT_NAME = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl")

# ----------------------------------------------------------------------------
# Names, times and the sigma_rel list syntax.


def kimg_to_nimg(kimg: int) -> int:
    """Image count of a snapshot named by ``kimg`` (snapshot times are multiples of 1024 images)."""
    return (kimg * 1000 + 999) // 1024 * 1024


# A network pickle, or the ema's weights and settings without code (torch_utils.weight_files).
OUTPUT_FORMATS = ("pkl", "safetensors")


def output_path(out_dir: str, out_prefix: str, out_nimg: int, std: float, out_format: str = "pkl") -> str:
    return os.path.join(out_dir, f"{out_prefix}-{out_nimg // 1000:07d}-{std:.3f}.{out_format}")


def parse_number(token: str) -> float:
    """A finite number, or ValueError naming the token."""
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"'{token}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"'{token}' is not a finite number")
    return value


def parse_std_list(s: Union[str, float, Sequence[float]]) -> list[float]:
    """Parse a comma-separated sigma_rel list; ``a,b,...,c`` means a, b, b+(b-a), ..., c.

    The result is deduplicated and sorted; every value must lie in (0, 0.289), and no two
    values may share an output name (``{std:.3f}``). Raises ValueError with a one-line reason.
    """
    if isinstance(s, (int, float)):
        tokens = [str(s)]
    elif isinstance(s, str):
        tokens = [t.strip() for t in s.split(",")]
    else:
        tokens = [str(x) for x in s]
    if not tokens or tokens == [""]:
        raise ValueError("empty list")
    values: list[float] = []
    for idx, token in enumerate(tokens):
        if token == "":
            raise ValueError("empty entry in list")
        if token != "...":
            if idx > 0 and tokens[idx - 1] == "...":
                continue  # Consumed as the end of the range below.
            values.append(parse_number(token))
            continue
        # A range 'a,b,...,c': two values before, one after.
        if idx == 0:
            raise ValueError("'...' cannot come first; write a,b,...,c")
        if idx == len(tokens) - 1:
            raise ValueError("'...' cannot come last; write a,b,...,c")
        if idx < 2 or tokens[idx - 2] == "..." or tokens[idx + 1] == "...":
            raise ValueError("'...' needs two values before it and one after it, as in a,b,...,c")
        a, b = values[-2], values[-1]
        c = parse_number(tokens[idx + 1])
        step = b - a
        if step == 0:
            raise ValueError(f"'{tokens[idx - 2]},{tokens[idx - 1]},...' has equal values, so no step")
        count = (c - b) / step
        if count < -1e-9:
            raise ValueError(f"range {tokens[idx - 2]},{tokens[idx - 1]},...,{tokens[idx + 1]} never reaches its end")
        if abs(count - round(count)) > 1e-6 * max(1.0, abs(count)):
            raise ValueError(
                f"range {tokens[idx - 2]},{tokens[idx - 1]},...,{tokens[idx + 1]} is unevenly spaced: "
                f"{tokens[idx + 1]} is not {tokens[idx - 1]} plus a whole number of steps of {step:g}"
            )
        # Round away the float noise of a + k * step (e.g. 0.30000000000000004).
        values += [round(a + (k + 2) * step, 12) for k in range(int(round(count)))]
    for value in values:
        if not 0 < value < MAX_STD:
            raise ValueError(f"{value:g} is outside (0, {MAX_STD})")
    values = sorted(set(values))
    names = [f"{v:.3f}" for v in values]
    for v0, v1, n0, n1 in zip(values, values[1:], names, names[1:]):
        if n0 == n1:
            raise ValueError(f"{v0:g} and {v1:g} would both be saved as '-{n0}.pkl'")
    return values


# ----------------------------------------------------------------------------
# Listing the inputs.


def list_input_pickles(
    in_dir: str, in_prefix: Optional[str] = None, in_std: Optional[Sequence[float]] = None, verbose: bool = False
) -> list[dnnlib.EasyDict]:
    """Snapshots ``{prefix}-{kimg}-{std}.pkl`` in ``in_dir``, sorted by (nimg, std).

    Each entry is an EasyDict(path, prefix, nimg, std). ``in_prefix`` and ``in_std`` filter by
    name; files whose kimg does not map back to an exact image count are not snapshots and are
    ignored. Two inputs with the same time and sigma_rel (e.g. from different prefixes) are an
    error, since their profiles would be identical.
    """
    wanted_std = None if in_std is None else [float(s) for s in in_std]
    pkls = []
    with os.scandir(in_dir) as entries:
        for entry in entries:
            m = _INPUT_NAME.fullmatch(entry.name)
            if m is None or not entry.is_file():
                continue
            prefix, kimg, std = m.group(1), int(m.group(2)), float(m.group(3))
            nimg = kimg_to_nimg(kimg)
            if nimg // 1000 != kimg:
                if verbose:
                    print(f"Ignoring {entry.name}: {kimg} kimg is not a whole number of 1024-image steps")
                continue
            if in_prefix is not None and prefix != in_prefix:
                continue
            if wanted_std is not None and not any(abs(std - s) < 5e-7 for s in wanted_std):
                continue
            pkls.append(dnnlib.EasyDict(path=entry.path, prefix=prefix, nimg=nimg, std=std))
    pkls.sort(key=lambda p: (p.nimg, p.std, p.path))
    for a, b in zip(pkls, pkls[1:]):
        if a.nimg == b.nimg and a.std == b.std:
            raise ValueError(
                f"Inputs {os.path.basename(a.path)} and {os.path.basename(b.path)} have the same time "
                f"and sigma_rel; choose one set with --inprefix"
            )
    return pkls


# ----------------------------------------------------------------------------
# The reconstruction: per batch of outputs, one pass over the inputs.


def _accumulate_pass(in_pkls: Sequence[dnnlib.EasyDict], coefs: np.ndarray, trust_embedded_code: bool) -> Iterator:
    """Read the inputs one at a time, adding ``coefs[i, o] * w_i`` into a float32 sum per output o.

    Yields ``(in_pkl, None)`` after each input but the last, then ``(in_pkl, outputs)``: per output,
    a copy of the first input's snapshot dict whose float16 ``ema`` holds the sums (buffers from
    the last input).
    """
    accum = template = shapes = None  # accum[o][k]: the sum for output o, parameter k
    for i, in_pkl in enumerate(in_pkls):
        data = persistence.load_network_pickle(in_pkl.path, trust_embedded_code=trust_embedded_code, verbose=False)
        params = [p.detach() for p in data["ema"].parameters()]
        if template is None:
            template, shapes = data, [p.shape for p in params]
            accum = [[None] * len(shapes) for _ in range(coefs.shape[1])]
        elif [p.shape for p in params] != shapes:
            raise ValueError(
                f"Input pickle {in_pkl.path} holds a network with different parameters from {in_pkls[0].path}"
            )
        with torch.no_grad():
            for k, p in enumerate(params):
                p32 = p.to(device="cpu", dtype=torch.float32)  # One converted tensor at a time.
                for o, out_sums in enumerate(accum):
                    if out_sums[k] is None:  # The first input starts the sum: no pass over a tensor of zeros.
                        out_sums[k] = p32 * float(coefs[i, o])
                    else:
                        out_sums[k].add_(p32, alpha=float(coefs[i, o]))
        if i < len(in_pkls) - 1:
            if data is template:  # Keep its dictionary for the outputs, but not its weights.
                for p in template["ema"].parameters():
                    p.data = torch.empty(0, dtype=p.dtype)
            del data, params  # Only one input is in memory at a time.
            yield in_pkl, None
            continue
        buffers = [b.detach().clone() for b in data["ema"].buffers()]
        del data, params
        outputs = []
        for o in range(len(accum)):
            outputs.append(_make_output(template, accum[o], buffers))
            accum[o] = None  # Free the float32 sums as soon as they are stored.
        yield in_pkl, outputs


def _make_output(template: dict, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> dict:
    """A deep copy of ``template`` whose ``ema`` has the given parameters and buffers, in float16."""
    ema = template["ema"]
    # Pre-seeding deepcopy's memo swaps the tensors in without ever copying the template's own.
    memo = {}
    for p, value in zip(ema.parameters(), params):
        memo[id(p)] = torch.nn.Parameter(value.to(torch.float16), requires_grad=False)
    for b, value in zip(ema.buffers(), buffers):
        memo[id(b)] = value.to(torch.float16) if value.is_floating_point() else value.clone()
    out = copy.deepcopy(template, memo)
    out["ema"].eval().requires_grad_(False)
    return out


def reconstruct_phema(
    in_pkls: Sequence[dnnlib.EasyDict],
    out_std: Union[float, Sequence[float]],
    out_nimg: Optional[int] = None,
    out_dir: Optional[str] = None,
    out_prefix: str = "phema",
    skip_existing: bool = False,
    max_batch_size: int = 8,
    verbose: bool = True,
    trust_embedded_code: bool = False,
    out_format: str = "pkl",
) -> Iterable[dnnlib.EasyDict]:
    """Reconstruct power-function EMAs with the given sigma_rel values at time ``out_nimg``.

    ``in_pkls`` comes from ``list_input_pickles``; ``out_nimg`` must be one of their times
    (default: the latest), and only inputs with 0 < nimg <= out_nimg are used. Outputs are built
    ``max_batch_size`` at a time (``ceil(n / max_batch_size)`` near-equal groups), reading every
    input once per group, and saved as ``{out_prefix}-{kimg:07d}-{std:.3f}.pkl`` in ``out_dir``
    (or as ``.safetensors`` with ``out_format='safetensors'``: the ``ema`` and the encoder's settings,
    see torch_utils/weight_files.py)
    (if given); ``skip_existing`` leaves existing outputs alone. Bad arguments raise ValueError at
    once; the work happens while iterating over the returned iterable (it has a ``len``).

    Each step (one input read) yields an EasyDict with the reference's ``step_idx``, ``num_steps``
    and ``out`` (this batch's outputs: EasyDict(net, pkl_data, pkl_path, nimg, std), with ``net``
    and ``pkl_data`` filled in at the batch's last step), and ``batch_idx``, ``num_batches``,
    ``in_pkl`` (the input just read), ``out_std`` and ``outputs`` (``out`` at a batch's last step,
    else empty; its entries also name ``pkl_path`` and ``pkl_data`` as ``path`` and ``data``).
    """
    in_pkls = sorted(in_pkls, key=lambda p: (p.nimg, p.std))
    if len(in_pkls) == 0:
        raise ValueError("No input pickles to reconstruct from")
    times = sorted({p.nimg for p in in_pkls})
    if out_nimg is None:
        out_nimg = times[-1]
    elif out_nimg not in times:
        raise ValueError(
            f"Output time {out_nimg // 1000} kimg does not match any input snapshot "
            f"(inputs exist at kimg {', '.join(str(t // 1000) for t in times)})"
        )
    in_pkls = [p for p in in_pkls if 0 < p.nimg <= out_nimg]
    if len(in_pkls) == 0:
        raise ValueError(f"No usable inputs: every snapshot up to {out_nimg // 1000} kimg is at time 0")
    try:
        out_std = parse_std_list(out_std)
    except ValueError as e:
        raise ValueError(f"Invalid output sigma_rel: {e}") from None
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    if out_format not in OUTPUT_FORMATS:
        raise ValueError(f"Unknown output format {out_format!r}; expected one of {', '.join(OUTPUT_FORMATS)}")

    def path_of(std):
        return None if out_dir is None else output_path(out_dir, out_prefix, out_nimg, std, out_format)

    if skip_existing and out_dir is not None:
        existing = [s for s in out_std if os.path.isfile(path_of(s))]
        if verbose and existing:
            print(f"Skipping {len(existing)} existing output(s): {', '.join(f'{s:.3f}' for s in existing)}")
        out_std = [s for s in out_std if s not in existing]
    in_paths = {os.path.realpath(p.path) for p in in_pkls}
    for s in out_std:
        if out_dir is not None and os.path.realpath(path_of(s)) in in_paths:
            raise ValueError(
                f"Output {path_of(s)} would overwrite one of the inputs; choose another --outprefix or --outdir"
            )
    num_batches = math.ceil(len(out_std) / max_batch_size)
    batches = [list(b) for b in np.array_split(np.array(out_std, dtype=np.float64), num_batches)] if num_batches else []
    if verbose:
        _print_plan(in_pkls, out_nimg, out_std, out_dir, num_batches)

    in_nimg = np.array([p.nimg for p in in_pkls], dtype=np.float64)
    in_std = np.array([p.std for p in in_pkls], dtype=np.float64)
    num_steps = len(batches) * len(in_pkls)

    def run() -> Iterator[dnnlib.EasyDict]:
        for batch_idx, batch_std in enumerate(batches):
            coefs = phema.solve_posthoc_coefficients(in_nimg, in_std, out_nimg, batch_std)
            out = [
                dnnlib.EasyDict(net=None, pkl_data=None, pkl_path=path_of(std), nimg=out_nimg, std=float(std))
                for std in batch_std
            ]
            for i, (in_pkl, outputs) in enumerate(_accumulate_pass(in_pkls, coefs, trust_embedded_code)):
                for o, pkl_data in enumerate(outputs or []):
                    out[o].update(net=pkl_data["ema"], pkl_data=pkl_data, data=pkl_data, path=out[o].pkl_path)
                    if out[o].pkl_path is not None:
                        _save_output(pkl_data, out[o].pkl_path, out_format)
                yield dnnlib.EasyDict(
                    step_idx=batch_idx * len(in_pkls) + i,
                    num_steps=num_steps,
                    out=out,
                    batch_idx=batch_idx,
                    num_batches=len(batches),
                    in_pkl=in_pkl,
                    out_std=list(batch_std),
                    outputs=out if outputs else [],
                )
            out = outputs = None  # Hold no finished networks while the next pass reads its inputs.

    return dnnlib.util.SizedIterable(run, num_steps)


def _save_output(pkl_data: dict, path: str, out_format: str) -> None:
    if out_format == "safetensors":
        weight_files.save_network(pkl_data, path)
        return
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(pkl_data, f)


def _print_plan(in_pkls, out_nimg, out_std, out_dir, num_batches) -> None:
    stds = sorted({p.std for p in in_pkls})
    print(
        f"Inputs: {len(in_pkls)} snapshots from kimg {in_pkls[0].nimg // 1000} to {out_nimg // 1000}, "
        f"sigma_rel {', '.join(f'{s:.3f}' for s in stds)}"
    )
    if not out_std:
        print("Nothing to do: every output exists")
        return
    where = f" in {out_dir}" if out_dir is not None else ""
    print(
        f"Outputs: {len(out_std)} at kimg {out_nimg // 1000}{where}, "
        f"{num_batches} pass(es) over the inputs: sigma_rel {', '.join(f'{s:.3f}' for s in out_std)}"
    )
