"""``python -m aquila_npu.evaluate TASK`` / ``aquila-npu evaluate TASK``: BoolQ, MMLU or C-Eval accuracy of a
checkpoint (``torchrun`` for TP > 1).

    python -m aquila_npu.evaluate boolq --load CKPT --tokenizer-name-or-path TOK --task-data-path dev.jsonl \\
        [--limit N] [--micro-batch-size 8] [--num-fewshot 0] [--scoring loglikelihood|first-token] \\
        [--output results.json]
    python -m aquila_npu.evaluate mmlu --task-data-path mmlu/test/ ...   # {subject}_test.csv files
    python -m aquila_npu.evaluate ceval --task-data-path ceval/val/ ...  # {subject}_val.csv files

The seed's evaluation flags (``--task boolq``, ``--task-data-path``, ``--max-new-tokens``, ``--seq-length``, ...)
are accepted too.
"""

from __future__ import annotations

import argparse
import json
import sys

from aquila_npu.errors import AquilaNpuError
from aquila_npu.inference import add_model_arguments, model_options_from_args


def build_parser() -> argparse.ArgumentParser:
    from aquila_npu.evaluate import SCORINGS
    from aquila_npu.evaluate.tasks import TASKS

    parser = argparse.ArgumentParser(prog="python -m aquila_npu.evaluate",
                                     description="Multiple-choice accuracy of an Aquila2 checkpoint, computed as "
                                                 "lm-evaluation-harness computes it.")
    parser.add_argument("task_name", nargs="?", choices=sorted(TASKS), help="the task")
    add_model_arguments(parser)
    t = parser.add_argument_group("task")
    t.add_argument("--task", dest="task_flag", choices=sorted(TASKS), help="the task (the seed's spelling)")
    t.add_argument("--task-data-path", required=True, help="the task's file, or a folder of them")
    t.add_argument("--limit", type=int, default=None, help="only the first N examples")
    t.add_argument("--num-fewshot", type=int, default=0)
    t.add_argument("--scoring", choices=SCORINGS, default="loglikelihood",
                   help="loglikelihood: lm-evaluation-harness's; first-token: ModelLink's")
    t.add_argument("--micro-batch-size", type=int, default=8, help="forward-pass rows at a time")
    t.add_argument("--output", default=None, help="write the result (accuracy, stderr, every example) as JSON")
    t.add_argument("--no-progress", action="store_true")
    seed = parser.add_argument_group("seed (ModelLink) compatibility: accepted, not needed")
    seed.add_argument("--max-new-tokens", type=int, default=None)
    seed.add_argument("--seq-length", type=int, default=None)
    seed.add_argument("--max-position-embeddings", type=int, default=None)
    return parser


def write_json(path: str, value) -> None:
    """``value`` as JSON; the file appears only when complete."""
    from aquila_npu.files import atomic_text_file

    with atomic_text_file(path, "--output") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from aquila_npu import distributed

    return distributed.run_command("evaluate", lambda: _run(args))


def _run(args) -> None:
    task = args.task_name or args.task_flag
    if not task:
        raise AquilaNpuError("name the task: python -m aquila_npu.evaluate boolq|mmlu|ceval ...")
    if args.task_name and args.task_flag and args.task_name != args.task_flag:
        raise AquilaNpuError(f"two tasks given: {args.task_name} and --task {args.task_flag}")
    from aquila_npu.evaluate import EvaluateOptions, build_examples, evaluate

    options = EvaluateOptions(**model_options_from_args(args), task=task, task_data_path=args.task_data_path,
                              limit=args.limit, micro_batch_size=args.micro_batch_size,
                              num_fewshot=args.num_fewshot, scoring=args.scoring, progress=not args.no_progress)
    prepared = build_examples(options)  # read before the model loads: bad data fails fast
    if args.output:
        from aquila_npu.files import check_writable_file

        check_writable_file(args.output, "--output")
    result = evaluate(options, prepared=prepared)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        rate = result["examples_per_second"]
        print(f"{result['task']} ({result['scoring']}, {result['num_fewshot']}-shot): accuracy "
              f"{result['accuracy']:.4f} ± {result['stderr']:.4f} over {result['n']} examples"
              + (f" ({rate:.2f} examples/s)" if rate else ""), flush=True)
        for subject, figures in result.get("subjects", {}).items():
            print(f"  {subject}: {figures['accuracy']:.4f} ({figures['n']})")
        if args.output:
            write_json(args.output, result)
            print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
