"""``torchrun --nproc-per-node N -m aquila_npu.pretrain --plugin FAMILY --model NAME ...`` (also
``aquila-npu pretrain``): pretrain or fine-tune on megatron-core alone, with Megatron-LM's flags.

Fine-tuning is the same command with ``--load CKPT --finetune`` and, for instruction data, ``--is-instruction-dataset``
(loss on response tokens only). See ``aquila_npu.training``.
"""

import sys

from aquila_npu.training.loop import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
