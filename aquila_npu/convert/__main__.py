"""``python -m aquila_npu.convert`` / ``aquila-npu convert``: Hugging Face <-> Megatron checkpoint conversion.

Our flags::

    --load-dir D --save-dir D --load-model-type hf|mg --save-model-type hf|mg
    --target-tensor-parallel-size N --target-pipeline-parallel-size N [--num-layers-per-virtual-pipeline-stage N]
    [--params-dtype fp32|fp16|bf16] [--ckpt-format torch] [--model NAME] [--tokenizer-model PATH] [--verify]
    [--lora-load ADAPTERS]  (merged into an hf / mg output; --save-model-type peft writes a PEFT adapter folder)

The seed guide's (ModelLink) flag sets work unchanged::

    --model-type GPT --loader llama2_hf --saver megatron --target-tensor-parallel-size 8 ...
    --model-type GPT --loader megatron --saver megatron --save-model-type save_huggingface_llama ...
      (writes the Hugging Face model to <save-dir>/mg2hg/, as the seed does)
"""

from __future__ import annotations

import argparse
import os
import sys

LOADERS = {"hf": "hf", "llama2_hf": "hf", "huggingface": "hf", "mg": "mg", "megatron": "mg"}
SAVERS = {"hf": "hf", "save_huggingface_llama": "hf", "mg": "mg", "megatron": "mg", "peft": "peft"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aquila_npu.convert",
                                     description="Convert Aquila2 checkpoints between Hugging Face and Megatron.")
    parser.add_argument("--load-dir", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--load-model-type", choices=sorted(LOADERS))
    parser.add_argument("--save-model-type", choices=sorted(SAVERS))
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    parser.add_argument("--params-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="dtype of the output weights (default: the source's)")
    parser.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch")
    parser.add_argument("--model", default=None, help="a named model spec (default: from config.json / saved args)")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer folder or tokenizer.json to copy next "
                                                                "to a Hugging Face output")
    parser.add_argument("--lora-load", default=None,
                        help="a LoRA run's --save folder: its adapters merged into the output (hf, mg), or written "
                             "alone as a PEFT adapter folder (--save-model-type peft)")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--verify", action="store_true", help="compare source and output logits on a fixed prompt "
                                                              "(fp32, one process) before keeping the output")
    seed = parser.add_argument_group("seed (ModelLink) compatibility")
    seed.add_argument("--model-type", choices=["GPT"], default="GPT")
    seed.add_argument("--loader", choices=sorted(LOADERS))
    seed.add_argument("--saver", choices=sorted(SAVERS))
    return parser


def options_from_args(args: argparse.Namespace):
    from aquila_npu.convert import ConvertOptions

    load = LOADERS[args.load_model_type or args.loader or "hf"]
    save = SAVERS[args.save_model_type or args.saver or "mg"]
    save_dir = args.save_dir
    if args.save_model_type == "save_huggingface_llama":
        save_dir = os.path.join(args.save_dir, "mg2hg")  # where the seed's Megatron -> HF step writes
    return ConvertOptions(
        load_dir=args.load_dir, save_dir=save_dir, load_model_type=load, save_model_type=save,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        params_dtype=args.params_dtype, ckpt_format=args.ckpt_format, model=args.model,
        tokenizer_model=args.tokenizer_model, max_shard_bytes=int(args.max_shard_size_gb * 2**30),
        overwrite=args.overwrite, progress=not args.no_progress, verify=args.verify, lora_load=args.lora_load)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from aquila_npu import distributed

    def run() -> None:
        from aquila_npu.convert import convert

        result = convert(options_from_args(args))
        print(f"converted {result.tensors} tensors ({result.bytes_read / 1e9:.2f} GB read) in {result.seconds:.1f} "
              f"s ({result.bytes_read / max(result.seconds, 1e-9) / 1e9:.2f} GB/s) -> {result.save_dir}")

    return distributed.run_command("convert", run, interrupted="nothing was written to --save-dir")


if __name__ == "__main__":
    sys.exit(main())
