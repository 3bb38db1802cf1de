#!/usr/bin/env bash
# Two AV-HuBERT iterations on the demo corpus, with the modality-dropout ablation and unit quality:
#   1. MFCC k-means targets (iteration 1)                      -> data/demo/labels/iter1
#   2. tiny pretraining with and without modality dropout       -> runs/pretrain/tiny/{iter1,iter1_no_md}
#   3. k-means on layer 3 of each model (iteration-2 targets)  -> data/demo/labels/iter2{,_no_md}
#   4. the same quantizer on audio-only and video-only input   -> cross-modal agreement
#   5. PNMI / purity / agreement table on the validation split
# Usage: bash experiments/pretrain/iterate_demo.sh   (after `make demo`; about half an hour on 2 CPU cores)
# FIT_ARGS are added to both training runs, e.g. on a GPU (about 19 steps/s for tiny on an H100):
#   FIT_ARGS="--trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_epochs 40 --data.num_workers 12" \
#       bash experiments/pretrain/iterate_demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AV2AV=${AV2AV:-.venv/bin/av2av}
CORPUS=${CORPUS:-data/demo}
LABELS=$CORPUS/labels
TRAIN="$CORPUS/sentences/train-*.tar"
VALID="$CORPUS/sentences/valid-*.tar"
K=50
LAYER=3

[ -f "$LABELS/iter1/valid.km$K.npz" ] || $AV2AV cluster mfcc --shards "$TRAIN" --k $K --out "$LABELS/iter1" \
    --label train="$TRAIN" --label valid="$VALID" --sample-fraction 0.1

train() {  # name, extra config
    [ -f "runs/pretrain/tiny/$1/last.ckpt" ] && return
    $AV2AV fit --config experiments/pretrain/tiny.yaml ${2:+--config "$2"} \
        --trainer.logger.init_args.name "$1" --trainer.callbacks.init_args.dirpath "runs/pretrain/tiny/$1" ${FIT_ARGS:-}
}
train iter1
train iter1_no_md experiments/ablations/pretrain/no_modality_dropout.yaml

for run in iter1 iter1_no_md; do
    out=$LABELS/iter2${run#iter1}
    ckpt=runs/pretrain/tiny/$run/last.ckpt
    [ -f "$out/valid.km$K.npz" ] || $AV2AV cluster layer --checkpoint "$ckpt" --layer $LAYER --k $K --out "$out" \
        --shards "$TRAIN" --label valid="$VALID" --sample-fraction 0.1
    for modality in audio video; do
        [ -f "$out/$modality/valid.km$K.npz" ] || $AV2AV cluster layer --checkpoint "$ckpt" --layer $LAYER \
            --modality $modality --quantizer "$out/kmeans.npz" --out "$out/$modality" --label valid="$VALID"
    done
done

echo "== unit quality on the validation split (iteration 1: MFCC; iteration 2: layer $LAYER of the tiny model)"
$AV2AV cluster quality --shards "$VALID" --labels "$LABELS/iter1/valid.km$K.npz" --quiet
for run in "" _no_md; do
    $AV2AV cluster quality --shards "$VALID" --labels "$LABELS/iter2$run/valid.km$K.npz" --quiet
    $AV2AV cluster quality --shards "$VALID" --labels "$LABELS/iter2$run/audio/valid.km$K.npz" \
        --compare "$LABELS/iter2$run/video/valid.km$K.npz" --quiet
done
