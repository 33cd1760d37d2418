#!/bin/bash
# Aquila2-7B pretraining on 8 NPUs (TP8/PP1), the seed guide's settings. ROUTE=megatron-lm for Megatron-LM.
source "$(dirname "$0")/common.sh"

launch aquila2-7b $AQUILA2_ARGS $OUTPUT_ARGS \
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 \
    --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 8 --global-batch-size 64 \
    --lr 1.0e-7 --min-lr 1.0e-8 --train-iters 2000 --fp16 \
    --tokenizer-name-or-path "$TOKENIZER_PATH" --data-path "$DATA_PATH" \
    --load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" "$@"
