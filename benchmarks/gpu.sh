#!/usr/bin/env bash
# The figures only a GPU can give (issue 18), in one JSON file; under 8 minutes on one GPU.
#
#   benchmarks/gpu.sh --output gpu.json                       # on a machine with one GPU
#   benchmarks/gpu.sh --output gpu.json --device cpu --tiny   # tiny settings on the CPU (the slow tests)
#
# Each script below writes its rows with --json into a temporary folder; merge_json.py gathers them.
set -euo pipefail

output=""
device=cuda
tiny=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --output) output="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --tiny) tiny=true; shift ;;
        *) echo "gpu.sh: unknown argument $1 (use --output FILE [--device DEV] [--tiny])" >&2; exit 2 ;;
    esac
done
[[ -n "$output" ]] || { echo "gpu.sh: --output FILE is required" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
parts="$(mktemp -d)"
trap 'rm -rf "$parts"' EXIT

if $tiny; then
    saliency=(--models small_cnn --batch-size 4 --loop-samples 2 --repeats 1)
    pca=(--models small_cnn --batch-size 4 --loop-samples 2 --repeats 1)
    step=(--models small_cnn --batch-size 8 --repeats 1 --warmup 0)
    epoch=(--model small_cnn --samples 32 --batch-size 16)
    modes=(--modes input_grad pgd --steps 1 --warmup 0 --repeats 1 --batch-size 8)
    captum=(--models small_cnn --batch-size 2 --n-steps 2 --n-samples 2 --repeats 1)
else
    saliency=(--batch-size 128 --loop-samples 128 --repeats 3)
    pca=(--batch-size 128 --loop-samples 128 --repeats 3)
    step=(--models cifar_resnet18 --resnet-repeats 7)
    epoch=()
    modes=(--steps 4 --warmup 1 --repeats 1)
    captum=(--repeats 30)  # calls of a few milliseconds: enough rounds for a stable median
fi

run() {  # run SCRIPT NAME ARGS...: one script on the device, its rows into $parts/NAME.json
    local script="$1" name="$2"
    shift 2
    echo "== $name" >&2
    "$python" "$here/$script" --device "$device" --threads 0 --json "$parts/$name.json" "$@"
}

run saliency_throughput.py saliency_throughput "${saliency[@]}"
run upi_pca_rows.py upi_pca_rows "${pca[@]}"
run upi_step_cost.py upi_step_cost "${step[@]}"
run upi_epoch.py upi_epoch "${epoch[@]}"
run training_modes.py training_modes "${modes[@]}"
if "$python" -c "import captum" 2>/dev/null; then  # a benchmark extra: pip install -e ".[bench]"
    run captum_peer.py captum_peer "${captum[@]}"
else
    echo "== captum_peer skipped: Captum is not installed (pip install -e \".[bench]\")" >&2
fi
"$python" "$here/merge_json.py" --output "$output" "$parts"/*.json
