"""lm-evaluation-harness on our inference: every lm-eval task on a Megatron checkpoint, at any tensor-parallel size.

* ``aquila_npu.lm_eval.model``: the lm-eval model ``aquila-npu`` (``loglikelihood``, ``loglikelihood_rolling``,
  ``generate_until``), registered with lm-eval's ``register_model`` when imported;
* ``python -m aquila_npu.lm_eval <lm_eval's arguments>``: lm-eval's own command line with that model registered
  (``torchrun --nproc-per-node N -m aquila_npu.lm_eval ... tensor_model_parallel_size=N`` for TP);
* ``aquila_npu.lm_eval.autoload``: makes plain ``lm_eval --model aquila-npu`` find the model too (imported by
  ``aquila_npu-autoload.pth`` only when ``aquila-npu`` is on the command line);
* ``aquila_npu.lm_eval.lockstep``: how the other tensor-parallel ranks follow rank 0.

lm-eval is an optional extra (``pip install 'aquila-npu[lm-eval]'``); nothing here imports it at package import.
"""

MODEL_NAME = "aquila-npu"
MODEL_TARGET = "aquila_npu.lm_eval.model:AquilaNpuLM"
