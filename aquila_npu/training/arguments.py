"""Command-line arguments of the megatron-core training driver, with Megatron-LM's names and meanings.

The seed guide's Aquila2 flag set parses as written. Three kinds of flags:

* flags the driver implements (model, parallelism, batch, optimizer, schedule, data, checkpoints, logging);
* the kernel switches (``--use-fused-rmsnorm``, ``--use-flash-attn``, ``--use-fused-rotary-pos-emb``,
  ``--use-fused-swiglu`` and their ``--no-`` forms; ``aquila_npu.kernels``), default: the device's choice;
* flags that choose what is already fixed here, accepted so existing scripts run (fusion switches for kernels the
  local implementation does not have; ``--distributed-backend``, which the device plugin decides, turning the
  seed's ``nccl`` into ``hccl`` on Ascend and ``gloo`` on a CPU);
* anything else: argparse's one-line "unrecognized arguments" error, never silently ignored.
"""

from __future__ import annotations

import argparse

from aquila_npu import device_options, lora, plugin_manager
from aquila_npu.errors import AquilaNpuError
from aquila_npu.kernels import seams as kernels

# flags accepted for compatibility: what they ask for is what the driver does anyway (see the module docstring)
ACCEPTED_SWITCHES = (
    "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--attention-softmax-in-fp32",
    "--use-mcore-models", "--use-cpu-initialization", "--tokenizer-not-use-fast",
)
ACCEPTED_VALUES = {"--distributed-backend": None, "--transformer-impl": "local", "--tokenizer-type": None,
                   "--position-embedding-type": "rope", "--normalization": "RMSNorm"}
# architecture flags -> ModelSpec fields (an explicit flag overrides the --model spec)
ARCHITECTURE = {"num_layers": int, "hidden_size": int, "ffn_hidden_size": int, "num_attention_heads": int,
                "num_query_groups": int, "max_position_embeddings": int, "rotary_base": float,
                "rotary_seq_len_interpolation_factor": float,
                "norm_epsilon": float, "init_method_std": float, "make_vocab_size_divisible_by": int}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aquila_npu.pretrain", allow_abbrev=False,
                                description="Pretrain or fine-tune a model family's model on megatron-core.")
    g = p.add_argument_group("model")
    g.add_argument("--plugin", action="append", default=[], help="model-family plugin(s) to use (default: all)")
    g.add_argument("--model", default=None, help="a named model spec (see aquila-npu plugins; architecture flags override)")
    for field, kind in ARCHITECTURE.items():
        g.add_argument("--" + field.replace("_", "-"), type=kind, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--attention-dropout", type=float, default=None, help="default: the spec's (0 for Aquila2)")
    g.add_argument("--hidden-dropout", type=float, default=None, help="default: the spec's (0 for Aquila2)")
    g.add_argument("--device", default=None, help="cpu, cuda or npu (default: automatic)")
    for flag, required in ACCEPTED_VALUES.items():
        g.add_argument(flag, default=None, help=f"accepted for Megatron-LM scripts{f' (must be {required})' if required else ''}")
    for flag in ACCEPTED_SWITCHES:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    kernels.add_arguments(p)
    device_options.add_arguments(p, plugin_manager.get().device_options())

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefixes, optionally weighted: [W1] PREFIX1 [W2 PREFIX2 ...]")
    g.add_argument("--mock-data", action="store_true", help="random tokens instead of --data-path")
    g.add_argument("--split", default="969, 30, 1")
    g.add_argument("--tokenizer-name-or-path", default=None)
    g.add_argument("--tokenizer-model", default=None, help="the same as --tokenizer-name-or-path (Megatron-LM)")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="--data-path is a GeneralInstructionHandler output prefix: loss on response tokens only")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes (Megatron-LM's default)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--no-shared-storage", action="store_true",
                   help="nodes do not share a filesystem: each node builds the dataset index caches it needs")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="packed instruction data (--pack): positions restart at each document")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="packed instruction data (--pack): no token attends to another document")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="the loss is the mean over the global batch's loss tokens, not the mean of the micro-batches' "
                        "means (Megatron-LM's flag; always so for packed data)")
    g.add_argument("--eod-mask-loss", action="store_true")

    lora.add_arguments(p)

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load the model weights only; start at iteration 0")
    g.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist",
                   help="the format --save writes (--load reads either)")
    g.add_argument("--exit-interval", type=int, default=None)

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-throughput", action="store_true", help="accepted; tokens/s per device is always logged")
    return p


def instruction_prefix(data_path: list[str] | None) -> str:
    """The one prefix --is-instruction-dataset reads (both routes check it the same way)."""
    if not data_path or len(data_path) != 1:
        raise AquilaNpuError("--is-instruction-dataset: give exactly one --data-path PREFIX (the --output-prefix "
                             "of the GeneralInstructionHandler preprocessing run)")
    return data_path[0]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, required in ACCEPTED_VALUES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if required and value not in (None, required):
            raise AquilaNpuError(f"{flag} {value}: the driver trains with {flag} {required} only")
    if args.fp16 and args.bf16:
        raise AquilaNpuError("--fp16 and --bf16: choose one")
    if args.tokenizer_name_or_path is None:
        args.tokenizer_name_or_path = args.tokenizer_model
    if not args.mock_data and not args.data_path:
        raise AquilaNpuError("--data-path: give the preprocessed dataset prefix(es), or --mock-data")
    if args.is_instruction_dataset:
        instruction_prefix(None if args.mock_data else args.data_path)
    if not args.mock_data and not args.tokenizer_name_or_path:
        raise AquilaNpuError("--tokenizer-name-or-path: needed to read the dataset (its end-of-document id)")
    return args
