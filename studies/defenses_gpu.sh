#!/usr/bin/env bash
# Issue 15's study in one call on one GPU machine: train every training mode (and the UPI-adversarial
# variants) for --epochs on MNIST and on the CIFAR-10 subset with `studies/training_modes.py --stages test`
# (clean and PGD robust accuracy), several processes side by side; as each group of modes finishes, run the
# comparison protocol (compare.py) on its checkpoints; stop starting work at --deadline seconds; pack what
# exists into --out (checkpoints without optimizer state, logs, tables, the protocol's folders), in
# pieces under 15 MB. Everything is resumable: the same commands on any machine finish what is missing.
#
#   studies/defenses_gpu.sh --out OUT --mnist-root data --cifar path/to/cifar10-subset.npz [--epochs 3]
#       [--deadline 470] [--tiny]      # --tiny: 2 batches an epoch and tiny attacks (a CPU smoke run)
set -uo pipefail

out="" mnist="data" cifar="" epochs=3 deadline=470 tiny=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --mnist-root) mnist="$2"; shift 2 ;;
        --cifar) cifar="$2"; shift 2 ;;
        --epochs) epochs="$2"; shift 2 ;;
        --deadline) deadline="$2"; shift 2 ;;
        --tiny) tiny=true; shift ;;
        *) echo "defenses_gpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n "$out" && -n "$cifar" ]] || { echo "defenses_gpu.sh: --out DIR and --cifar FILE are required" >&2; exit 2; }
python="${PYTHON:-python}"
start=$(date +%s)
runs=runs/study15
state="$runs/.state"
mkdir -p "$state" "$out"
left() { echo $((deadline - ($(date +%s) - start))); }

study=(--epochs "$epochs" --stages test --threads 0)
protocol=()
if $tiny; then
    study+=(--limit-batches 2 --robust-samples 20)
    protocol=(--attack.fit_samples 32 --attack.eval_samples 32 --attack.upi_grad.epochs 1 --attack.upi_pca.n_iter 1
        --attack.baselines.per_sample_steps 2 --attack.baselines.random_draws 2 --robust.samples 32 --robust.steps 2
        --progress false)
fi

strip() {  # strip DATASET MODE: drop the optimizer state of MODE's checkpoint, in place (it is then final)
    "$python" - "$runs/$1/$2/fit/checkpoints" <<'EOF'
import sys
from pathlib import Path

import torch

for path in Path(sys.argv[1]).glob("*.ckpt"):
    if path.name != "last.ckpt":
        path.unlink()
        continue
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "loops"):
        checkpoint.pop(key, None)
    torch.save(checkpoint, path)
EOF
}

group() {  # group DATASET ROOT NAME MODE... [-- STUDY OPTIONS]: train the modes, strip them, compare them
    local dataset="$1" root="$2" name="$3"
    shift 3
    local modes=() options=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do modes+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift && options=("$@")
    timeout "$(left)" "$python" studies/training_modes.py --dataset "$dataset" --data-root "$root" \
        --output "$runs/$dataset" --modes "${modes[@]}" "${study[@]}" "${options[@]}" > "$runs/$dataset-$name.log" 2>&1
    local done_modes=()
    for mode in "${modes[@]}"; do
        if [[ -f "$runs/$dataset/$mode/test.json" ]]; then
            strip "$dataset" "$mode" && touch "$state/$dataset-$mode" && done_modes+=("$mode")
        fi
    done
    echo "[$(($(date +%s) - start)) s] $dataset $name trained: ${done_modes[*]:-none}"
    compare "$dataset" "$root" "$name" "${done_modes[@]}"
}

compare() {  # compare DATASET ROOT NAME MODE...: the protocol on these (finished) modes
    local dataset="$1" root="$2" name="$3" option
    shift 3
    [[ $# -ge 2 && $(left) -gt 30 ]] || return 0
    local models=()
    for mode in "$@"; do models+=("$mode=$runs/$dataset/$mode/fit/checkpoints/last.ckpt"); done
    [[ "$dataset" == mnist ]] && option=--data.init_args.root || option=--data.init_args.path
    timeout "$(left)" "$python" compare.py --config "configs/compare_$dataset.yaml" "$option" "$root" \
        --models "${models[@]}" --output "$runs/protocol_$dataset" "${protocol[@]}" \
        > "$runs/protocol_$dataset-$name.log" 2>&1
    echo "[$(($(date +%s) - start)) s] $dataset $name protocol rc=$?"
}

ig_group() {  # ig_group DATASET ROOT MODE [OPTIONS]: one IG mode; the second to finish compares both
    local dataset="$1" root="$2" mode="$3"
    shift 3
    group "$dataset" "$root" "$mode" "$mode" -- "$@"
    if [[ -e "$state/$dataset-ig_norm" && -e "$state/$dataset-ig_sum_norm" ]] && mkdir "$state/$dataset-ig" 2>/dev/null; then
        compare "$dataset" "$root" ig ig_norm ig_sum_norm
    fi
}

# MNIST unpacked once, before processes that would all unpack it at the same time
"$python" -c "import sys, torchvision; [torchvision.datasets.MNIST(sys.argv[1], train=t, download=True) for t in (True, False)]" \
    "$mnist" > /dev/null || exit 1
# IG-NORM and IG-SUM-NORM at fewer PGD steps and IG points than their configs (MNIST: about 60 units a step
# instead of 1,351; CIFAR: about 90 instead of 256), so that they train the same epochs in the time
ig_mnist=(--pgd-train-steps 5 --ig-steps 5 --attack-ig-steps 3)
ig_cifar=(--ig-steps 8 --attack-ig-steps 3)
group mnist "$mnist" base standard ir input_grad softplus gradient_consistency consistency &
group mnist "$mnist" pgd pgd attributional_adv &
ig_group mnist "$mnist" ig_norm "${ig_mnist[@]}" &
ig_group mnist "$mnist" ig_sum_norm "${ig_mnist[@]}" &
group mnist "$mnist" upi_a upi_adv upi_adv_l2 &
group mnist "$mnist" upi_b upi_adv_relu upi_adv_every_step &
group cifar10_subset "$cifar" base standard ir input_grad softplus gradient_consistency consistency upi_adv &
group cifar10_subset "$cifar" pgd pgd attributional_adv &
ig_group cifar10_subset "$cifar" ig_norm "${ig_cifar[@]}" &
ig_group cifar10_subset "$cifar" ig_sum_norm "${ig_cifar[@]}" &
wait
echo "[$(($(date +%s) - start)) s] all groups ended"

# pack: no TensorBoard images of the protocol, pieces of 15 MB
tar czf "$state/study15.tgz" --exclude='*/tensorboard/*' --exclude='.state' "$runs"
split -b 15M "$state/study15.tgz" "$out/study15.tgz."
ls -la "$out"
