#!/bin/bash
# Aquila2-7B LoRA instruction fine-tuning on 8 NPUs (TP8/PP1), on either route (ROUTE=megatron-lm for Megatron-LM). CKPT_LOAD_DIR: the converted base, which stays
# frozen; CKPT_SAVE_DIR receives adapter-only checkpoints (a few MB); LORA_LOAD_DIR (optional) resumes a LoRA run's
# adapters, optimizer and iteration. DATA_PATH as for finetune_aquila2_7b_ptd.sh. Export when done:
#   python -m aquila_npu.convert --load-dir $CKPT_LOAD_DIR --lora-load $CKPT_SAVE_DIR --save-model-type hf|peft \
#       --save-dir OUT   (hf: the adapters merged into a full model; peft: an adapter folder for peft)
source "$(dirname "$0")/common.sh"

LORA_ARGS=(--lora-r "${LORA_R:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-dropout 0.05
           --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2)
if [ -n "${LORA_LOAD_DIR:-}" ]; then
    LORA_ARGS+=(--lora-load "$LORA_LOAD_DIR")
fi

# the seed's flags, except that a resumed LoRA run loads its optimizer and RNG state (--load is the base's weights)
launch aquila2-7b ${AQUILA2_ARGS/--no-load-optim --no-load-rng /} $OUTPUT_ARGS \
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 \
    --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 8 --global-batch-size 64 \
    --lr 1.0e-4 --min-lr 1.0e-5 --train-iters 2000 --fp16 --is-instruction-dataset \
    --tokenizer-name-or-path "$TOKENIZER_PATH" --data-path "$DATA_PATH" \
    --load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" "${LORA_ARGS[@]}" "$@"
