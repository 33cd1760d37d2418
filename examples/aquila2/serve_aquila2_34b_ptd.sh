#!/bin/bash
# Aquila2-34B / AquilaChat2-34B served by Megatron-LM's own REST server (tools/run_text_generation_server.py,
# unmodified) through the aquila2 plugin, on 8 NPUs of one node (TP8; its 8 query groups split 8 ways).
# CKPT_LOAD_DIR: a converted or trained Megatron checkpoint (torch_dist at any split, or torch saved at TP8: the
# format is detected). MEGATRON_LM_PATH: a Megatron-LM checkout.
# PORT: default 5000; HOST: default 0.0.0.0 (Megatron-LM's: every interface), HOST=127.0.0.1 keeps it on this machine.
# Then, from another shell (Megatron-LM's client: python $MEGATRON_LM_PATH/tools/text_generation_cli.py HOST:PORT):
#   curl -X PUT http://127.0.0.1:5000/api -H 'Content-Type: application/json' \
#        -d '{"prompts": ["北京是中国的"], "tokens_to_generate": 64, "top_k": 1}'
source "$(dirname "$0")/common.sh"

serve aquila2-34b --bf16 "$@"
