#!/usr/bin/env bash
# The main job on a fresh clone: install what is missing, then run the whole pipeline with the
# project's own command-line tools on real images that need no download, and print where each
# output is.
#
#   bash scripts/demo.sh                     # Fashion-MNIST where installable, else scikit-learn's digits
#   DEMO_DATA=digits bash scripts/demo.sh    # force the digits (DEMO_DATA=auto|fashion-mnist|digits)
#   DEMO_SMALL=1 bash scripts/demo.sh        # the same pipeline in under a minute (what tests/test_demo.py runs)
#
# Steps: dataset_tool.py convert -> train_edm2.py (CPU-scale preset) -> reconstruct_phema.py ->
# a class-conditional grid sampled with generate_images (library and CLI). It takes a few minutes
# on a 2-core CPU. Every run starts afresh: it replaces what an earlier run left in the output folder.
#
# Environment: PYTHON (default python3), DEMO_OUT (default demo-output), DEMO_DATA (default auto),
# DEMO_SMALL (0/1), DEMO_THREADS (threads for training and sampling; default: measure 1 vs 2),
# DEMO_APT (0 = never apt-get install the Fashion-MNIST package), DEMO_FASHION_ROOT (where its
# IDX files are; default /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${DEMO_OUT:-demo-output}"
DATA="${DEMO_DATA:-auto}"
SMALL="${DEMO_SMALL:-0}"
FASHION_PACKAGE_ROOT=/usr/share/datasets/fashion-mnist  # where Debian's package puts it
FASHION_ROOT="${DEMO_FASHION_ROOT:-$FASHION_PACKAGE_ROOT}"
start_time=$SECONDS

step() { echo; echo "=== [$(( SECONDS - start_time ))s] $* ==="; }

case "$DATA" in
    auto|fashion-mnist|digits) ;;
    *) echo "Error: DEMO_DATA must be auto, fashion-mnist or digits, not \"$DATA\"" >&2; exit 2 ;;
esac

# Sizes. The full demo: 600 images per class at 16x16, 64Ki training images (1024 steps of 64)
# with snapshots at 32Ki and 64Ki for the post-hoc EMA. The small one only checks the plumbing.
if [[ "$SMALL" == 1 ]]; then
    PER_CLASS=20; BATCH=64; CHANNELS=8
    TRAIN_OPTS=(--batch=$BATCH --duration=1Ki --status=1Ki --snapshot=1Ki --checkpoint=1Ki --channels=$CHANNELS --grid=4 --grid-at-start)
    GRID_OPTS=(--cols=2 --steps=4); SAMPLE_OPTS=(--seeds=0-1 --steps=4)
else
    PER_CLASS=600; BATCH=64; CHANNELS=16
    TRAIN_OPTS=(--batch=$BATCH --channels=$CHANNELS --duration=64Ki --status=8Ki --snapshot=32Ki --checkpoint=32Ki --grid-at-start)
    GRID_OPTS=(--cols=8 --steps=32); SAMPLE_OPTS=(--seeds=0-9 --steps=32)
fi
RESOLUTION=16
PRESET=cpu-16
PHEMA_STD=0.100

step "1/7 Installing what is missing"
bash scripts/install.sh

step "2/7 Data"
fashion_installed() { [[ -f "$FASHION_ROOT/train-images-idx3-ubyte.gz" && -f "$FASHION_ROOT/train-labels-idx1-ubyte.gz" ]]; }
if [[ "$DATA" != digits && "$FASHION_ROOT" == "$FASHION_PACKAGE_ROOT" && "${DEMO_APT:-1}" != 0 ]] && ! fashion_installed; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        echo "Installing Debian's dataset-fashion-mnist package..."
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
            || echo "Could not install dataset-fashion-mnist."
    else
        echo "Fashion-MNIST is not installed and apt-get is unavailable (or we are not root)."
    fi
fi
if [[ "$DATA" == digits ]] || { [[ "$DATA" == auto ]] && ! fashion_installed; }; then
    if ! "$PYTHON" -c "import sklearn" >/dev/null 2>&1; then
        echo "Installing scikit-learn for its bundled digits..."
        "$PYTHON" -m pip install --quiet --disable-pip-version-check scikit-learn
    fi
fi
rm -rf "$OUT/images" "$OUT/dataset.zip" "$OUT/run" "$OUT/phema" "$OUT/grid.png" "$OUT/samples" "$OUT/data.txt" "$OUT/progress.png"
mkdir -p "$OUT"
"$PYTHON" scripts/demo_data.py --dest="$OUT/images" --data="$DATA" --per-class="$PER_CLASS" \
    --fashion-root="$FASHION_ROOT" | tee "$OUT/data.txt"

step "3/7 Dataset: dataset_tool.py convert"
"$PYTHON" dataset_tool.py convert --source="$OUT/images" --dest="$OUT/dataset.zip" \
    --resolution="${RESOLUTION}x${RESOLUTION}" 2>&1 | tr '\r' '\n' | grep -v '^convert: .*%' || true
[[ -f "$OUT/dataset.zip" ]] || { echo "Error: dataset_tool.py convert failed" >&2; exit 1; }

# Threads: on two idle cores two threads are faster, but when other work shares the cores a
# second thread makes each step many times slower (the threads wait for each other). Measure.
if [[ -z "${DEMO_THREADS:-}" ]]; then
    DEMO_THREADS=$("$PYTHON" - "$PRESET" "$RESOLUTION" "$CHANNELS" "$BATCH" <<'EOF'
import os, sys, time
import torch
import train_edm2
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss
preset, (res, channels, batch) = train_edm2.config_presets[sys.argv[1]], map(int, sys.argv[2:])
shape = {key: preset[key] for key in ['channel_mult', 'num_blocks', 'attn_resolutions', 'channels_per_head'] if key in preset}
net = Precond(img_resolution=res, img_channels=3, label_dim=10, model_channels=channels, **shape).train()
x, labels = torch.randn([batch, 3, res, res]), torch.eye(10)[torch.arange(batch) % 10]
def step_time(threads, limit=float('inf')):
    torch.set_num_threads(threads)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        EDM2Loss()(net=net, images=x, labels=labels).sum().backward()
        times.append(time.perf_counter() - t)
        if times[-1] > limit:
            break  # clearly slower: no need to wait for more
    return min(times[1:] or times)
one = step_time(1)
two = step_time(2, limit=2 * one) if (os.cpu_count() or 1) >= 2 else float('inf')
print(2 if two < 0.9 * one else 1)
EOF
    ) || DEMO_THREADS=1
fi
export OMP_NUM_THREADS="$DEMO_THREADS" MKL_NUM_THREADS="$DEMO_THREADS"

step "4/7 Training: train_edm2.py --preset=$PRESET (OMP_NUM_THREADS=$DEMO_THREADS)"
"$PYTHON" train_edm2.py --outdir="$OUT/run" --data="$OUT/dataset.zip" --preset="$PRESET" "${TRAIN_OPTS[@]}"

# The run's sample grids (samples-*.png, one per snapshot) side by side.
"$PYTHON" scripts/demo_progress.py --run="$OUT/run" --out="$OUT/progress.png"

step "5/7 Post-hoc EMA: reconstruct_phema.py --outstd=$PHEMA_STD"
"$PYTHON" reconstruct_phema.py --indir="$OUT/run" --outdir="$OUT/phema" --outstd="$PHEMA_STD" 2>&1 \
    | tr '\r' '\n' | grep -v '%|' || true
PHEMA_PKL=$(ls "$OUT"/phema/phema-*-"$PHEMA_STD".pkl 2>/dev/null | sort | tail -n 1)
[[ -n "$PHEMA_PKL" ]] || { echo "Error: reconstruct_phema.py wrote no phema-*-$PHEMA_STD.pkl" >&2; exit 1; }

step "6/7 Class-conditional grid: generate_images (library), one row per class"
"$PYTHON" scripts/demo_grid.py --net="$PHEMA_PKL" --classes="$OUT/images" --out="$OUT/grid.png" "${GRID_OPTS[@]}"

step "7/7 A few samples with the generate_images.py command line"
rm -rf "$OUT/samples"
"$PYTHON" generate_images.py --net="$PHEMA_PKL" --outdir="$OUT/samples" "${SAMPLE_OPTS[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v '%|' || true
ls "$OUT"/samples/*.png >/dev/null

echo
echo "Done in $(( SECONDS - start_time ))s. $(grep -m 1 '^Data:' "$OUT/data.txt")"
echo "Outputs:"
echo "  Images (PNG per class):  $OUT/images"
echo "  Dataset:                 $OUT/dataset.zip"
echo "  Training run:            $OUT/run  (TensorBoard logs, stats.jsonl, samples-*.png per snapshot)"
echo "  Training progress:       $OUT/progress.png"
echo "  Post-hoc EMA:            $PHEMA_PKL"
echo "  Class grid:              $OUT/grid.png"
echo "  Samples (CLI):           $OUT/samples"
echo
echo "Watch the training curves, the loss by noise level and the sample grids with:"
echo "  tensorboard --logdir $OUT/run"
