# Shared by the Aquila2 example scripts: the seed guide's flags, launched on either route.
#   ROUTE=driver       (default) torchrun -m aquila_npu.pretrain         -- megatron-core from pip, nothing else
#   ROUTE=megatron-lm  torchrun $MEGATRON_LM_PATH/pretrain_gpt.py --plugin aquila2  -- unmodified Megatron-LM
# Variables as in the seed: TOKENIZER_PATH, DATA_PATH, CKPT_LOAD_DIR, CKPT_SAVE_DIR; cluster: NPUS_PER_NODE,
# MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK. The device (npu, cuda, cpu) is chosen automatically.
# generate_*, evaluate_* and serve_* scripts need TOKENIZER_PATH and CKPT_LOAD_DIR (evaluate_*: EVAL_DATA_PATH,
# TASK; serve_*: MEGATRON_LM_PATH) and run on one node (tensor parallel).
set -euo pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
ROUTE=${ROUTE:-driver}

require() {  # require VAR...: the seed's path variables a script needs
    local name
    for name in "$@"; do
        if [ -z "${!name:-}" ]; then
            echo "$(basename "$0"): set $name (TOKENIZER_PATH: the tokenizer folder; DATA_PATH: the dataset prefix;" \
                 "CKPT_LOAD_DIR: the converted checkpoint; CKPT_SAVE_DIR: where to save;" \
                 "EVAL_DATA_PATH: the task's data file or folder; CONVERSATIONS: the conversation records)" >&2
            exit 2
        fi
    done
}
DISTRIBUTED_ARGS="--nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

# the seed's Aquila2 training flags (ModelLink examples/aquila2), shared by every size
AQUILA2_ARGS="--sequence-parallel --tokenizer-type PretrainedFromHF --make-vocab-size-divisible-by 1 \
    --untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0.0 --init-method-std 0.01 \
    --hidden-dropout 0.0 --position-embedding-type rope --normalization RMSNorm --use-fused-rmsnorm --swiglu \
    --use-flash-attn --no-masked-softmax-fusion --attention-softmax-in-fp32 --weight-decay 1e-1 \
    --lr-decay-style cosine --lr-warmup-fraction 0.01 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \
    --initial-loss-scale 65536 --no-gradient-accumulation-fusion --no-load-optim --no-load-rng \
    --use-mcore-models --split 100,0,0 --distributed-backend nccl"
OUTPUT_ARGS="--log-interval 1 --save-interval 1000 --eval-interval 1000 --eval-iters 0"

launch() {  # launch MODEL_NAME ARGS...: a training run on either route
    require TOKENIZER_PATH DATA_PATH CKPT_LOAD_DIR CKPT_SAVE_DIR
    local model=$1; shift
    if [ "$ROUTE" = "megatron-lm" ]; then
        : "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1)}"
        cd "$MEGATRON_LM_PATH"
        # Megatron-LM names the tokenizer folder --tokenizer-model and its type HuggingFaceTokenizer
        local args=("$@")
        args=("${args[@]/#--tokenizer-name-or-path/--tokenizer-model}")
        args=("${args[@]/#PretrainedFromHF/HuggingFaceTokenizer}")
        torchrun $DISTRIBUTED_ARGS pretrain_gpt.py --plugin aquila2 --model "$model" "${args[@]}"
    else
        torchrun $DISTRIBUTED_ARGS -m aquila_npu.pretrain --plugin aquila2 --model "$model" "$@"
    fi
}

serve() {  # serve MODEL_NAME DTYPE_FLAG ARGS...: Megatron-LM's REST server (TP8 on one node) through the plugin
    CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${CHECKPOINT:-}}
    require TOKENIZER_PATH CKPT_LOAD_DIR
    : "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1)}"
    local model=$1 dtype=$2; shift 2
    cd "$MEGATRON_LM_PATH"
    torchrun $DISTRIBUTED_ARGS tools/run_text_generation_server.py --plugin aquila2 --model "$model" \
        --load "$CKPT_LOAD_DIR" --auto-detect-ckpt-format --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model "$TOKENIZER_PATH" --tensor-model-parallel-size 8 "$dtype" --micro-batch-size 1 \
        --port "${PORT:-5000}" --host "${HOST:-0.0.0.0}" "$@"
}
