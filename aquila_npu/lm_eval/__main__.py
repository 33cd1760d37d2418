"""``python -m aquila_npu.lm_eval <lm_eval's arguments>``: lm-evaluation-harness's command line, unchanged, with the
``aquila-npu`` model registered.

    python -m aquila_npu.lm_eval --model aquila-npu \\
        --model_args load=CKPT,tokenizer=TOK[,model=NAME,load_model_type=hf,params_dtype=bf16,micro_batch_size=8] \\
        --tasks boolq --include_path my_tasks/ --output_path results/
    torchrun --nproc-per-node 2 -m aquila_npu.lm_eval --model aquila-npu \\
        --model_args load=CKPT,tokenizer=TOK,tensor_model_parallel_size=2 --tasks ...

Every rank starts lm-eval; rank 0 runs it and the others serve its model's batches (``aquila_npu.lm_eval.lockstep``)
and exit with it. Our errors (a missing checkpoint, a tokenizer that does not fit) are one line and exit status 2.
"""

from __future__ import annotations

import importlib.util
import sys

from aquila_npu.errors import AquilaNpuError


def main(argv=None) -> int:
    from aquila_npu import distributed

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m aquila_npu.lm_eval"
    return distributed.run_command("lm_eval", _run)


def _run() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise AquilaNpuError("lm-evaluation-harness is not installed: pip install 'aquila-npu[lm-eval]'")
    from lm_eval.__main__ import cli_evaluate

    import aquila_npu.lm_eval.model  # noqa: F401  (registers the model)
    from aquila_npu.lm_eval import lockstep

    try:
        cli_evaluate()
    finally:
        lockstep.release_all()  # before the megatron world is torn down: the followers are waiting on it


if __name__ == "__main__":
    sys.exit(main())
