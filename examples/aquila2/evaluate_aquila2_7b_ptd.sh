#!/bin/bash
# Aquila2-7B evaluation on 8 NPUs (TP8), the seed's evaluation step: TASK (boolq | mmlu | ceval, default boolq) on
# EVAL_DATA_PATH (a BoolQ dev.jsonl, or the folder of the task's files), lm-evaluation-harness's scoring. Published
# BoolQ: 77.8% (ModelLink on NPU) / 77.6% (reference). Extra flags pass through, e.g. --scoring first-token
# (ModelLink's), --num-fewshot 5, --limit 200, --output boolq.json.
source "$(dirname "$0")/common.sh"
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${CHECKPOINT:-}}
require TOKENIZER_PATH CKPT_LOAD_DIR EVAL_DATA_PATH

torchrun $DISTRIBUTED_ARGS -m aquila_npu.evaluate "${TASK:-boolq}" --plugin aquila2 --model aquila2-7b \
    --load "$CKPT_LOAD_DIR" --tokenizer-name-or-path "$TOKENIZER_PATH" --tokenizer-type PretrainedFromHF \
    --task-data-path "$EVAL_DATA_PATH" --tensor-model-parallel-size 8 --fp16 --micro-batch-size 8 "$@"
