#!/bin/bash
# Aquila2-34B evaluation on 8 NPUs of one node (TP8), the seed's evaluation step: TASK (boolq | mmlu | ceval,
# default boolq) on EVAL_DATA_PATH, lm-evaluation-harness's scoring. Published BoolQ: 88.0% (ModelLink on NPU) /
# 87.0% (reference). Extra flags pass through (--scoring first-token, --num-fewshot, --limit, --output).
source "$(dirname "$0")/common.sh"
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${CHECKPOINT:-}}
require TOKENIZER_PATH CKPT_LOAD_DIR EVAL_DATA_PATH

torchrun $DISTRIBUTED_ARGS -m aquila_npu.evaluate "${TASK:-boolq}" --plugin aquila2 --model aquila2-34b \
    --load "$CKPT_LOAD_DIR" --tokenizer-name-or-path "$TOKENIZER_PATH" --tokenizer-type PretrainedFromHF \
    --task-data-path "$EVAL_DATA_PATH" --tensor-model-parallel-size 8 --bf16 --micro-batch-size 4 "$@"
