#!/bin/bash
# AquilaChat2-7B full-parameter fine-tuning on multi-turn conversations, 8 NPUs (TP8/PP1). CONVERSATIONS: ShareGPT
# (`conversations`) or OpenAI (`messages`) records, JSON lines or parquet; they are rendered in AquilaChat2-7B's
# template (PROMPT_TYPE, default aquila-v1; aquila for AquilaChat2-7B-16K) with the loss on the replies only, packed
# into 2,048-token sequences (PACK=0: one conversation a sequence, padded), written to DATA_PATH (default
# ./dataset/AquilaChat2-7B/chat), then fine-tuned from CKPT_LOAD_DIR (packed: one sequence a micro-batch, GBS
# sequences a step, default 64). ROUTE=megatron-lm for Megatron-LM. Other field names: MAP_KEYS='{"messages":
# "dialog", "tags": {...}}' (see README).
source "$(dirname "$0")/common.sh"
require CONVERSATIONS TOKENIZER_PATH
DATA_PATH=${DATA_PATH:-./dataset/AquilaChat2-7B/chat}
PACKED_ARGS=()
if [ "${PACK:-1}" != 0 ]; then
    PACKED_ARGS=(--micro-batch-size 1 --global-batch-size "${GBS:-64}" --reset-position-ids --reset-attention-mask
                 --calculate-per-token-loss)
fi

python -m aquila_npu.preprocess --input "$CONVERSATIONS" --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --output-prefix "$DATA_PATH" --handler-name SharegptStyleInstructionHandler \
    --prompt-type "${PROMPT_TYPE:-aquila-v1}" --seq-length 2048 --workers 4 ${MAP_KEYS:+--map-keys "$MAP_KEYS"} \
    $([ "${PACK:-1}" != 0 ] && echo --pack)
DATA_PATH=$DATA_PATH exec "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" --finetune --is-instruction-dataset \
    "${PACKED_ARGS[@]}" "$@"
