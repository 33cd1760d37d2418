#!/bin/bash
# Aquila2-34B full-parameter instruction fine-tuning on 16 NPUs, 2 nodes (TP8/PP2). DATA_PATH is the --output-prefix
# of the GeneralInstructionHandler preprocessing run. ROUTE=megatron-lm for Megatron-LM.
exec "$(dirname "$0")/pretrain_aquila2_34b_ptd_16p.sh" --finetune --is-instruction-dataset "$@"
