#!/bin/bash
# AquilaChat2-7B full-parameter fine-tuning on multi-turn conversations, 8 NPUs (TP8/PP1). CONVERSATIONS: ShareGPT
# (`conversations`) or OpenAI (`messages`) records, JSON lines or parquet; they are rendered in AquilaChat2-7B's
# template (PROMPT_TYPE, default aquila-v1; aquila for AquilaChat2-7B-16K) with the loss on the replies only, written
# to DATA_PATH (default ./dataset/AquilaChat2-7B/chat), then fine-tuned from CKPT_LOAD_DIR. ROUTE=megatron-lm for
# Megatron-LM. Other field names: MAP_KEYS='{"messages": "dialog", "tags": {...}}' (see README).
source "$(dirname "$0")/common.sh"
require CONVERSATIONS TOKENIZER_PATH
DATA_PATH=${DATA_PATH:-./dataset/AquilaChat2-7B/chat}

python -m aquila_npu.preprocess --input "$CONVERSATIONS" --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --output-prefix "$DATA_PATH" --handler-name SharegptStyleInstructionHandler \
    --prompt-type "${PROMPT_TYPE:-aquila-v1}" --seq-length 2048 --workers 4 ${MAP_KEYS:+--map-keys "$MAP_KEYS"}
DATA_PATH=$DATA_PATH exec "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" --finetune --is-instruction-dataset "$@"
