#!/usr/bin/env bash
# The default chat adapter end to end on one GPU (experiments/chat_distill.py says why self-distillation):
#
#   GGUF=.../SmolLM2-135M-Instruct.Q4_1.gguf OUT=dir experiments/chat_adapter_gpu.sh data 8 32
#
# `data`: the parent's answers (fp32, greedy) to the training prompts -> experiments/data, and $OUT/chat_data.tgz.
# A number B: `efficient-dlm train` of a LoRA adapter at block B, then its evaluation against the parent;
# the adapter folder (with train.out and eval/) -> $OUT/adapter-bB.tgz.
set -euo pipefail
: "${GGUF:?set GGUF to the SmolLM2 GGUF}" "${OUT:?set OUT to the result folder}"
STEPS=${STEPS:-300}
WORK=${WORK:-/root/adapters}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
for stage in "$@"; do
  if [ "$stage" = data ]; then
    python experiments/chat_distill.py data --gguf "$GGUF" --out experiments/data --batch-size 128 \
      --max-new-tokens 256 2>&1 | grep -v "de-quantizing\|Loading weights" | tee "$OUT/data.out"
    tar -czf "$OUT/chat_data.tgz" -C experiments data
    continue
  fi
  block=$stage
  adapter="$WORK/b$block"
  python -m efficient_dlm.cli train --base "$GGUF" --data experiments/data/chat_train.jsonl --sft --lora \
    --lora-r 8 --block-size "$block" --shift-logits --seq-len 384 --batch-size 32 --lr 2e-4 --warmup-steps 0.05 \
    --max-steps "$STEPS" --complementary --bf16 --no-progress --logging-steps 10 --output "$adapter" --overwrite \
    2>&1 | grep -v "de-quantizing\|Loading weights" | tee "$WORK/train-b$block.out"
  cp "$WORK/train-b$block.out" "$adapter/train.out"
  python experiments/chat_distill.py eval --gguf "$GGUF" --adapter "$adapter" --out "$adapter/eval" \
    2>&1 | grep -v "de-quantizing\|Loading weights" | tee "$OUT/eval-b$block.out"
  tar -czf "$OUT/adapter-b$block.tgz" -C "$WORK" "b$block"
done
