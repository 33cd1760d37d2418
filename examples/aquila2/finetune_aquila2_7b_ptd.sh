#!/bin/bash
# Aquila2-7B full-parameter instruction fine-tuning on 8 NPUs (TP8/PP1). DATA_PATH is the --output-prefix of the
# GeneralInstructionHandler preprocessing run (e.g. ./dataset/Aquila2-7B/alpaca). ROUTE=megatron-lm for Megatron-LM.
exec "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" --finetune --is-instruction-dataset "$@"
