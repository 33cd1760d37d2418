#!/bin/bash
# Aquila2-34B / AquilaChat2-34B generation on 8 NPUs of one node (TP8; the 34B's 8 query groups split 8 ways),
# the seed's inference step. CKPT_LOAD_DIR: a converted (or trained) Megatron checkpoint, either format, any split
# (a TP8/PP2 training checkpoint loads here too); a Hugging Face folder with --load-model-type hf.
# With no arguments: an interactive chat with AquilaChat2-34B's template ('clear' resets, 'exit' quits).
source "$(dirname "$0")/common.sh"
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${CHECKPOINT:-}}
require TOKENIZER_PATH CKPT_LOAD_DIR

torchrun $DISTRIBUTED_ARGS -m aquila_npu.generate --plugin aquila2 --model aquila2-34b \
    --load "$CKPT_LOAD_DIR" --tokenizer-name-or-path "$TOKENIZER_PATH" --tokenizer-type PretrainedFromHF \
    --tensor-model-parallel-size 8 --bf16 --max-new-tokens 512 "${@:---chat}"
