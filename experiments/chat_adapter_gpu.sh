#!/usr/bin/env bash
# The default chat adapter end to end on one GPU (experiments/chat_distill.py says why self-distillation):
#
#   GGUF=.../SmolLM2-135M-Instruct.Q4_1.gguf OUT=dir experiments/chat_adapter_gpu.sh [data] VARIANT ...
#
# `data`: the parent's answers (fp32, greedy) to the training prompts -> experiments/data, and $OUT/chat_data.tgz.
# A VARIANT (name from the table below): `efficient-dlm train` of a LoRA adapter, then its evaluation against the
# parent; the adapter folder (train.out and eval/ inside; tokenizer.json left out of the archive, it is the base's)
# -> $OUT/adapter-NAME.tgz. Variants run side by side (two fit in 80 GB at 16 rows per micro-batch).
set -euo pipefail
: "${GGUF:?set GGUF to the SmolLM2 GGUF}" "${OUT:?set OUT to the result folder}"
WORK=${WORK:-/root/adapters}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$WORK"

common="--sft --lora --shift-logits --seq-len 384 --batch-size 16 --grad-accum 2 --warmup-steps 0.05 --complementary --bf16"
declare -A VARIANTS=(
  [b8-r8-elbo]="--block-size 8 --lora-r 8 --lr 2e-4 --max-steps 300 --weighting elbo"
  [b8-r12-none]="--block-size 8 --lora-r 12 --lr 5e-4 --max-steps 400 --weighting none"
  [b8-r12-elbo]="--block-size 8 --lora-r 12 --lr 5e-4 --max-steps 400 --weighting elbo"
  [b4-r12-none]="--block-size 4 --lora-r 12 --lr 5e-4 --max-steps 400 --weighting none"
)

train_and_evaluate() {
  local name=$1 adapter="$WORK/$1"
  # shellcheck disable=SC2086
  python -m efficient_dlm.cli train --base "$GGUF" --data experiments/data/chat_train.jsonl $common ${VARIANTS[$name]} \
    --no-progress --logging-steps 10 --output "$adapter" --overwrite > "$WORK/train-$name.out" 2>&1
  grep -v "de-quantizing\|Loading weights" "$WORK/train-$name.out" > "$adapter/train.out"
  python experiments/chat_distill.py eval --gguf "$GGUF" --adapter "$adapter" --out "$adapter/eval" \
    2>&1 | grep -v "de-quantizing\|Loading weights" > "$OUT/eval-$name.out"
  tar -czf "$OUT/adapter-$name.tgz" --exclude tokenizer.json -C "$WORK" "$name"
}

pids=()
for stage in "$@"; do
  if [ "$stage" = data ]; then
    python experiments/chat_distill.py data --gguf "$GGUF" --out experiments/data --batch-size 128 \
      --max-new-tokens 256 2>&1 | grep -v "de-quantizing\|Loading weights" | tee "$OUT/data.out"
    tar -czf "$OUT/chat_data.tgz" -C experiments data
    continue
  fi
  [ -n "${VARIANTS[$stage]:-}" ] || { echo "unknown variant $stage: ${!VARIANTS[*]}"; exit 2; }
  train_and_evaluate "$stage" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for f in "$OUT"/eval-*.out; do [ -e "$f" ] && { echo "== $f"; head -8 "$f"; }; done
exit $status
