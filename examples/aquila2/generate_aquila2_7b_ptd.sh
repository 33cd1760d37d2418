#!/bin/bash
# Aquila2-7B / AquilaChat2-7B generation on 8 NPUs (TP8), the seed's inference step. CKPT_LOAD_DIR: a converted
# (or trained) Megatron checkpoint, either format, any split; a Hugging Face folder with --load-model-type hf.
# With no arguments: an interactive chat ('clear' resets, 'exit' quits). Otherwise pass prompts and options, e.g.
#   generate_aquila2_7b_ptd.sh --prompt "..." --max-new-tokens 512 --output results.jsonl
source "$(dirname "$0")/common.sh"
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${CHECKPOINT:-}}
require TOKENIZER_PATH CKPT_LOAD_DIR

torchrun $DISTRIBUTED_ARGS -m aquila_npu.generate --plugin aquila2 --model aquila2-7b \
    --load "$CKPT_LOAD_DIR" --tokenizer-name-or-path "$TOKENIZER_PATH" --tokenizer-type PretrainedFromHF \
    --tensor-model-parallel-size 8 --fp16 --max-new-tokens 512 "${@:---chat}"
