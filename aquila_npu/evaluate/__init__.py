"""Evaluation: multiple-choice tasks (BoolQ, MMLU, C-Eval) scored with megatron-core, as lm-evaluation-harness does.

``evaluate(EvaluateOptions(...))`` loads the model once (``aquila_npu.inference``: any checkpoint, any
tensor-parallel size), reads the task's local files (``aquila_npu.evaluate.tasks``), scores every choice
(``aquila_npu.evaluate.scoring``) and returns the result: accuracy, its standard error (lm-evaluation-harness's:
the sample standard deviation over the square root of n) and every example's scores. ``python -m
aquila_npu.evaluate TASK`` is the command line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aquila_npu.errors import AquilaNpuError
from aquila_npu.inference import ModelOptions, open_model

SCORINGS = ("loglikelihood", "first-token")


@dataclass
class EvaluateOptions(ModelOptions):
    task: str = "boolq"
    task_data_path: str = ""
    limit: int | None = None  # the first N examples
    micro_batch_size: int = 8  # rows (contexts, or context + choice) per forward pass
    num_fewshot: int = 0
    scoring: str = "loglikelihood"  # | first-token (ModelLink's)
    progress: bool = True


def accuracy_and_stderr(correct: list[bool]) -> tuple[float, float]:
    """Mean and lm-evaluation-harness's ``mean_stderr`` (sample standard deviation / sqrt(n))."""
    n = len(correct)
    accuracy = sum(correct) / n
    if n < 2:
        return accuracy, float("nan")
    variance = sum((float(c) - accuracy) ** 2 for c in correct) / (n - 1)
    return accuracy, math.sqrt(variance) / math.sqrt(n)


def build_examples(options: EvaluateOptions):
    from aquila_npu.evaluate.tasks import get_task

    if options.scoring not in SCORINGS:
        raise AquilaNpuError(f"--scoring must be one of {', '.join(SCORINGS)}, not {options.scoring!r}")
    if options.num_fewshot < 0 or (options.limit is not None and options.limit < 1):
        raise AquilaNpuError("--num-fewshot must be >= 0 and --limit >= 1")
    task = get_task(options.task)
    docs = task.read(options.task_data_path)
    if not docs:
        raise AquilaNpuError(f"--task-data-path {options.task_data_path}: no examples in it")
    docs = docs[:options.limit] if options.limit else docs
    fewshot = task.fewshot_docs(options.task_data_path) if options.num_fewshot else []
    return task, task.examples(docs, fewshot, options.num_fewshot)


class Evaluator:
    """A loaded model that scores tasks (one per process; under torchrun every rank builds one)."""

    def __init__(self, options: ModelOptions) -> None:
        opened = open_model(options, purpose="evaluation")
        self.model, self.spec, self.tokenizer = opened.model, opened.spec, opened.tokenizer
        self.max_length = self.spec.max_position_embeddings

    def score(self, examples, scoring: str, micro_batch_size: int, progress: bool = True) -> dict:
        from aquila_npu.evaluate.scoring import first_token_row, loglikelihood_rows, score_rows

        tokenize = self.tokenizer.tokenize
        rows = []
        for example in examples:
            if scoring == "first-token":
                rows.append(first_token_row(example.index, example.context, example.first_token_choices, tokenize,
                                            self.max_length))
            else:
                rows += loglikelihood_rows(example.index, example.context, example.continuations, tokenize,
                                           self.max_length)
        meter = _Progress(examples, rows, progress)
        started = time.perf_counter()
        scored = score_rows(self.model, rows, self.tokenizer.vocab_size, self.tokenizer.pad, micro_batch_size,
                            on_batch=meter.update)
        meter.close()
        seconds = time.perf_counter() - started
        results = []
        for example in examples:
            values = [sum(scored[(example.index, c)]) for c in range(len(example.choice_names))]
            if scoring == "first-token":
                values = [math.exp(v) for v in values]  # probabilities, as ModelLink compares them
            prediction = max(range(len(values)), key=lambda c: (values[c], -c))  # first of equal maxima
            results.append({"index": example.index, "label": example.label, "prediction": prediction,
                            "scores": dict(zip(example.choice_names, values)),
                            **({"subject": example.subject} if example.subject else {})})
        return {"examples": results, "seconds": seconds}


class _Progress:
    """A progress bar over examples, with examples/s and the running accuracy (rank 0 only)."""

    def __init__(self, examples, rows, enabled: bool) -> None:
        import torch.distributed as dist

        self.bar = None
        if not enabled or (dist.is_initialized() and dist.get_rank() != 0):
            return
        from tqdm import tqdm

        self.rows_left: dict[int, int] = {}
        for row in rows:
            self.rows_left[row.example] = self.rows_left.get(row.example, 0) + 1
        self.bar = tqdm(total=len(examples), desc="evaluating", unit="ex")

    def update(self, batch) -> None:
        if self.bar is None:
            return
        done = 0
        for row in batch:
            self.rows_left[row.example] -= 1
            done += self.rows_left[row.example] == 0
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(options: EvaluateOptions, evaluator: Evaluator | None = None, prepared=None) -> dict:
    """The task's result: ``{"task", "scoring", "num_fewshot", "accuracy", "stderr", "n", "examples_per_second",
    "subjects" (per subject, where the task has them), "examples": [{"index", "label", "prediction", "scores"}]}``.
    ``prepared``: what ``build_examples(options)`` returned, when the caller has read the data already."""
    task, examples = prepared or build_examples(options)
    evaluator = evaluator or Evaluator(options)
    scored = evaluator.score(examples, options.scoring, options.micro_batch_size, options.progress)
    results = scored["examples"]
    accuracy, stderr = accuracy_and_stderr([r["prediction"] == r["label"] for r in results])
    summary = {"task": task.name, "scoring": options.scoring, "num_fewshot": options.num_fewshot,
               "accuracy": accuracy, "stderr": stderr, "n": len(results),
               "examples_per_second": len(results) / scored["seconds"] if scored["seconds"] else None}
    subjects = sorted({r["subject"] for r in results if "subject" in r})
    if subjects:
        summary["subjects"] = {}
        for subject in subjects:
            own = [r["prediction"] == r["label"] for r in results if r.get("subject") == subject]
            summary["subjects"][subject] = {"accuracy": sum(own) / len(own), "n": len(own)}
    summary["examples"] = results
    return summary
