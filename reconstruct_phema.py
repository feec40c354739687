"""Post-hoc EMA reconstruction: build networks with any power-function EMA length from snapshots.

Training stores, at regular times t_i, snapshots of a few power-function EMAs (sigma_rel 0.050
and 0.100 by default). Each is the trajectory of weights averaged with a known profile p_i.
Any other profile p_o (sigma_rel, end time) is approximated by the least-squares combination
sum_i X[i, o] p_i (training/phema.py), and since averaging is linear, the network with that EMA
is sum_i X[i, o] w_i (Algorithm 3 and Appendix C.2 of Karras et al. 2024).

The library lives in ``training/posthoc.py``; this script is its command line and re-exports its
names (``reconstruct_phema.reconstruct_phema``, ``list_input_pickles``, ``parse_std_list``, ...), so
that scripts written against the reference keep working.
"""

import click
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import cli
from training.posthoc import (  # noqa: F401 -- re-exported: the names of the reference's reconstruct_phema.py
    MAX_STD,
    OUTPUT_FORMATS,
    kimg_to_nimg,
    list_input_pickles,
    output_path,
    parse_std_list,
    reconstruct_phema,
)

# ----------------------------------------------------------------------------
# Command line.


# fmt: off
@click.command()
@click.option("--indir", help="Directory with the input snapshots", metavar="DIR", type=str, required=True)
@click.option("--inprefix", help="Use only inputs with this file name prefix", metavar="STR", type=str, default=None)
@click.option("--instd", help="Use only inputs with these sigma_rel values", metavar="LIST", type=cli.ParsedParam(parse_std_list, quote=True))
@click.option("--outdir", help="Where to save the reconstructed network pickles", metavar="DIR", required=True)
@click.option("--outprefix", help="Output file name prefix", metavar="STR", default="phema", show_default=True)
@click.option("--outstd", help="sigma_rel of the outputs, e.g. 0.150 or 0.010,0.015,...,0.250", metavar="LIST", type=cli.ParsedParam(parse_std_list, quote=True), required=True)
@click.option("--outkimg", help="Output time; must match an input  [default: latest]", metavar="KIMG", type=click.IntRange(1))
@click.option("--skip", help="Skip outputs that already exist", is_flag=True)
@click.option("--batch", help="Outputs per pass over inputs", metavar="INT", type=click.IntRange(1), default=8, show_default=True)
@click.option("--format", "out_format", help="Output format: network pickles, or safetensors files (weights and JSON settings, no code)", type=click.Choice(OUTPUT_FORMATS), default="pkl", show_default=True)
@click.option("--trust-embedded-code", help="Load inputs by running their embedded code (trusted only)", is_flag=True)
# fmt: on
def main(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, out_format, trust_embedded_code):
    """Perform post-hoc EMA reconstruction.

    Examples:

    \b
    # Reconstruct a new EMA profile with std=0.150
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
        --outdir=out --outstd=0.150

    \b
    # Reconstruct a set of 49 EMA profiles, streaming over the input data 7 times
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
        --outdir=out --outstd=0.010,0.015,...,0.250 --batch=8

    \b
    # Perform reconstruction for the latest snapshot of a given training run
    python reconstruct_phema.py --indir=training-runs/00000-edm2-img512-xs \\
        --outdir=out --outstd=0.150 --inprefix=network-snapshot

    \b
    # The same as a safetensors file (loads anywhere a network pickle does, without unpickling)
    python reconstruct_phema.py --indir=training-runs/00000-edm2-img512-xs \\
        --outdir=out --outstd=0.150 --inprefix=network-snapshot --format=safetensors
    """
    out_nimg = None if outkimg is None else kimg_to_nimg(outkimg)
    if out_nimg is not None and out_nimg // 1000 != outkimg:
        raise click.BadParameter(f"{outkimg} is not the time of a snapshot", param_hint="'--outkimg'")
    with cli.one_line_errors():
        dist.refuse_torchrun("reconstruct_phema.py")
        dnnlib.util.check_input_dir(indir, "--indir")
        dnnlib.util.check_output_dir(outdir, "--outdir")
        in_pkls = list_input_pickles(indir, in_prefix=inprefix, in_std=instd, verbose=True)
        if len(in_pkls) == 0:
            filters = [
                f"prefix '{inprefix}'" if inprefix is not None else None,
                f"sigma_rel {', '.join(f'{s:.3f}' for s in instd)}" if instd is not None else None,
            ]
            filters = " and ".join(f for f in filters if f)
            raise FileNotFoundError(
                f"No input snapshots named PREFIX-KIMG-STD.pkl in '{indir}'" + (f" with {filters}" if filters else "")
            )
        steps = reconstruct_phema(
            in_pkls,
            out_std=outstd,
            out_nimg=out_nimg,
            out_dir=outdir,
            out_prefix=outprefix,
            skip_existing=skip,
            max_batch_size=batch,
            trust_embedded_code=trust_embedded_code,
            out_format=out_format,
        )
        saved = []
        for step in tqdm.tqdm(steps, total=len(steps), unit="step", disable=len(steps) == 0):
            saved += [out.pkl_path for out in step.outputs]
    for path in saved:
        print(f"Saved {path}")
    print("Done.")


if __name__ == "__main__":
    main()
