"""Evaluation throughput: ``aquila_npu.evaluate`` and lm-evaluation-harness with our model ``aquila-npu`` (both on
megatron-core) against lm-evaluation-harness's ``hf`` model, side by side in one process: same weights, BoolQ
examples, dtype and threads; the accuracy must agree.

Each side's model is loaded first and not timed; timed is the whole evaluation of the examples (reading them,
building the prompts, tokenising, scoring, the accuracy), the median of ``--repeat`` runs taken in turns.
lm-evaluation-harness's ``hf`` model runs at its default batch size (1) and at ours. Targets: ours / lm-eval's ``hf``
>= 2.0, for ``aquila_npu.evaluate`` (issue 7) and for the ``aquila-npu`` lm-eval model (issue 19).

    python benchmarks/evaluate.py [--models aquila2-tiny,small] [--limit 200] [--batch-size 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sample_data import REPO, sample

SIZES = {"small": dict(name="aquila2-small", num_layers=8, hidden_size=1024, ffn_hidden_size=2816,
                       num_attention_heads=8, num_query_groups=8, seq_length=1024, max_position_embeddings=1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="aquila2-tiny,small")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sdpa", action="store_true", help="ours with PyTorch's SDPA attention (use_flash_attn=True), "
                                                            "transformers' default")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    sys.path.insert(0, str(REPO))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from aquila_npu import parity, plugin_manager
    from aquila_npu.evaluate import EvaluateOptions, Evaluator, evaluate
    from aquila_npu.inference import ModelOptions
    from aquila_npu.lm_eval.local_tasks import write_boolq_task
    from aquila_npu.lm_eval.model import AquilaNpuLM

    # HF's models use PyTorch's SDPA by default; --sdpa gives ours the same (one process: both of ours take it)
    kernel_args = {"use_flash_attn": True} if args.sdpa else {}

    tokenizer = str(sample("aquila2_tokenizer"))
    work = Path(tempfile.mkdtemp(prefix="evaluate-bench-"))
    data = work / "boolq.jsonl"
    data.write_text("\n".join(sample("boolq/dev.jsonl", "boolq/dev_300.jsonl").read_text(encoding="utf-8").splitlines()[:args.limit]) + "\n", "utf-8")
    write_boolq_task(work, data)
    tasks = TaskManager(include_path=str(work))
    tiny = plugin_manager.get().find_model("aquila2-tiny")[1]
    rows = []
    for name in args.models.split(","):
        spec = tiny if name == "aquila2-tiny" else tiny.replace(**SIZES[name])
        folder = str(work / spec.name)
        parity.save_random_hf_model(spec, folder)
        evaluator = Evaluator(ModelOptions(load=folder, load_model_type="hf", tokenizer_name_or_path=tokenizer,
                                           kernels={"attention": True} if args.sdpa else None))
        options = EvaluateOptions(load=folder, tokenizer_name_or_path=tokenizer, task="boolq",
                                  task_data_path=str(data), micro_batch_size=args.batch_size, progress=False)
        runs = {"ours": lambda options=options, evaluator=evaluator: evaluate(options, evaluator)["accuracy"]}
        ours_lm = AquilaNpuLM(load=folder, load_model_type="hf", tokenizer=tokenizer,
                              micro_batch_size=args.batch_size, **kernel_args)
        runs["aquila-npu"] = (lambda model=ours_lm: lm_eval.simple_evaluate(
            model=model, tasks=["boolq_local"], task_manager=tasks, verbosity="ERROR")[
                "results"]["boolq_local"]["acc,none"])
        for batch in sorted({1, args.batch_size}):
            model = HFLM(pretrained=folder, tokenizer=tokenizer, dtype="float32", device="cpu", batch_size=batch)
            runs[f"lm-eval batch {batch}"] = (lambda model=model: lm_eval.simple_evaluate(
                model=model, tasks=["boolq_local"], task_manager=tasks, verbosity="ERROR")[
                "results"]["boolq_local"]["acc,none"])
        for run in runs.values():
            run()  # warm-up
        seconds: dict = {key: [] for key in runs}
        accuracy = {}
        for _ in range(args.repeat):
            for key, run in runs.items():
                started = time.perf_counter()
                accuracy[key] = run()
                seconds[key].append(time.perf_counter() - started)
        rate = {key: args.limit / statistics.median(values) for key, values in seconds.items()}
        for key in runs:
            rows.append((spec.name, key, rate[key], rate["ours"] / rate[key], rate["aquila-npu"] / rate[key],
                         accuracy[key]))
            print(f"{spec.name} {key}: {rate[key]:.2f} examples/s, accuracy {accuracy[key]:.4f}", flush=True)
        del evaluator, ours_lm
    print(f"\ncpu, {torch.get_num_threads()} threads, fp32, BoolQ dev first {args.limit}, 0-shot, "
          f"median of {args.repeat}\n")
    print("| model | run | examples/s | aquila_npu.evaluate / this | lm-eval `aquila-npu` / this | accuracy |")
    print("|---|---|---|---|---|---|")
    labels = {"ours": f"**aquila_npu.evaluate** (batch {args.batch_size}" + (", SDPA)" if args.sdpa else ")"),
              "aquila-npu": f"**lm-eval, model `aquila-npu`** (micro-batch {args.batch_size}"
                            + (", SDPA)" if args.sdpa else ")")}
    for model, key, value, ratio, lm_ratio, acc in rows:
        theirs = key.startswith("lm-eval")
        label = labels.get(key, key.replace("lm-eval", "lm-eval, model `hf`"))
        print(f"| {model} | {label} | {value:.2f} | {f'**{ratio:.2f}**' if theirs else ''} | "
              f"{f'**{lm_ratio:.2f}**' if theirs else ''} | {acc:.4f} |")


if __name__ == "__main__":
    main()
