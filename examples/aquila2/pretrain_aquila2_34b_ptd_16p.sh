#!/bin/bash
# Aquila2-34B pretraining on 16 NPUs, 2 nodes (TP8/PP2), the seed guide's settings. Run on each node with
# NODE_RANK=0/1 and MASTER_ADDR of node 0; NNODES defaults to 2 here. ROUTE=megatron-lm for Megatron-LM.
NNODES=${NNODES:-2}
source "$(dirname "$0")/common.sh"

launch aquila2-34b $AQUILA2_ARGS $OUTPUT_ARGS \
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 \
    --num-layers 60 --hidden-size 6144 --ffn-hidden-size 24576 --num-attention-heads 48 \
    --group-query-attention --num-query-groups 8 \
    --seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 2 --global-batch-size 1024 \
    --lr 8.0e-8 --min-lr 1.0e-8 --train-iters 2000 --bf16 \
    --tokenizer-name-or-path "$TOKENIZER_PATH" --data-path "$DATA_PATH" \
    --load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" "$@"
