"""lm-evaluation-harness with our model ``aquila-npu`` against lm-eval's own ``hf`` model on the same weights.

A tiny random Aquila2-shaped HF model; our side loads its Megatron conversion (TP=2 files, loaded at TP=1). Four
local tasks (``lm_eval_tasks``: BoolQ, MMLU, a GSM8K-style ``generate_until`` task, a ``loglikelihood_rolling``
perplexity task), offline. Per-request log-likelihoods must agree to 1e-4 (fp32), greedy flags, generations and
the task metrics exactly (perplexities to 1e-6 relative: they are exponentials of sums of those log-likelihoods).
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pytest
from conftest import BUNDLED_DATA, convert_to_megatron, make_hf_checkpoint, run_python

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'aquila-npu[lm-eval]')")

from lm_eval_tasks import write_tasks

TASKS = ["boolq_local", "mmlu_local", "gsm8k_local", "text_local"]
MAX_LENGTH = 128  # below the model's 256 positions, so the rolling task needs several windows per text
TOLERANCE = 1e-4
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_spec):
    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("lm-eval-hf") / "model", seed=5)


@pytest.fixture(scope="module")
def mg_dir(hf_dir, tmp_path_factory):
    return convert_to_megatron(hf_dir, tmp_path_factory.mktemp("lm-eval-mg") / "tp2", tensor_parallel=2)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"), BUNDLED_DATA / "boolq" / "dev_300.jsonl", 12,
                       BUNDLED_DATA / "alpaca" / "alpaca_300.json")


def _evaluate(model, task_dir, tasks=TASKS, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, verbosity="ERROR", **kwargs)


@pytest.fixture(scope="module")
def ours(megatron_world, mg_dir, tokenizer_dir):
    from aquila_npu.lm_eval.model import AquilaNpuLM

    return AquilaNpuLM(load=str(mg_dir), tokenizer=str(tokenizer_dir), micro_batch_size=8, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours_results(ours, task_dir):
    return _evaluate(ours, task_dir)


@pytest.fixture(scope="module")
def hf_results(hf_dir, tokenizer_dir, task_dir):
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(hf_dir), tokenizer=str(tokenizer_dir), dtype="float32", device="cpu", batch_size=8,
                  max_length=MAX_LENGTH)
    return _evaluate(theirs, task_dir)


def _samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if k not in ("alias", "name")}


def assert_same_loglikelihoods(ours: list[dict], theirs: list[dict], tolerance: float = TOLERANCE) -> None:
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs]
    for mine, hf in zip(ours, theirs):
        assert len(mine["resps"]) == len(hf["resps"])
        for [(ll, greedy)], [(hf_ll, hf_greedy)] in zip(mine["resps"], hf["resps"]):
            # (written to --output_path, lm-eval's samples hold these as strings)
            assert float(ll) == pytest.approx(float(hf_ll), abs=tolerance)
            assert str(greedy) == str(hf_greedy)


@pytest.mark.parametrize("task", ["boolq_local", "mmlu_local"])
def test_loglikelihoods_and_accuracy_equal_lm_eval_hf(task, ours_results, hf_results):
    assert len(_samples(ours_results, task)) == len(_samples(hf_results, task)) > 0
    assert_same_loglikelihoods(_samples(ours_results, task), _samples(hf_results, task))
    assert _metrics(ours_results, task) == _metrics(hf_results, task)


def test_mmlu_prompt_is_the_task_s(ours_results):
    """The prompt lm-eval built from the task YAML (description, question, lettered choices) is what was scored."""
    first = _samples(ours_results, "mmlu_local")[0]
    context, continuation = first["arguments"][0]
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert context.endswith("D. 6\nAnswer:") and continuation == " A"


def test_greedy_generations_equal_lm_eval_hf(ours_results, hf_results):
    ours, theirs = _samples(ours_results, "gsm8k_local"), _samples(hf_results, "gsm8k_local")
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert any(s["resps"][0][0] for s in ours)  # something was generated
    assert _metrics(ours_results, "gsm8k_local") == _metrics(hf_results, "gsm8k_local")


def test_rolling_loglikelihood_equals_lm_eval_hf(ours_results, hf_results, ours, task_dir):
    ours_s, theirs_s = _samples(ours_results, "text_local"), _samples(hf_results, "text_local")
    for mine, hf in zip(ours_s, theirs_s):
        # a sum over ~1,500 tokens: lm-eval's hf model adds them in fp32, whose spacing there is ~5e-4
        assert mine["resps"][0][0] == pytest.approx(hf["resps"][0][0], rel=1e-7)
    # every text needs more than one window at this max_length, so the windowing itself is compared
    assert all(len(ours.tok_encode(json.loads(line)["text"])) > 2 * MAX_LENGTH
               for line in (task_dir / "text.jsonl").read_text(encoding="utf-8").splitlines())
    for metric, value in _metrics(ours_results, "text_local").items():
        if isinstance(value, float):
            assert value == pytest.approx(_metrics(hf_results, "text_local")[metric], rel=1e-6)


def test_sampling_arguments_reach_the_engine(ours):
    """top_k=1 sampling is argmax: it must give the greedy text; a seeded sample is reproducible."""
    from lm_eval.api.instance import Instance

    def generate(**gen_kwargs):
        kwargs = {"until": ["\n\n"], "max_gen_toks": 12, **gen_kwargs}
        requests = [Instance("generate_until", {}, (prompt, kwargs), i)
                    for i, prompt in enumerate(["Question: 1 + 1 =", "中国的首都是"])]
        return ours.generate_until(requests, disable_tqdm=True)

    greedy = generate(do_sample=False)
    assert generate(do_sample=True, temperature=1.0, top_k=1) == greedy
    assert generate(do_sample=True, temperature=1.5) == generate(do_sample=True, temperature=1.5)


# --------------------------------------------------------------------------------------------- command lines
def _read_output(folder: Path) -> dict:
    """lm-eval's ``--output_path`` files: the results JSON and every task's samples."""
    [results_file] = glob.glob(str(folder / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text(encoding="utf-8"))
    results["samples"] = {}
    for path in glob.glob(str(folder / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(path).name.removeprefix("samples_").rsplit("_", 1)[0]
        results["samples"][task] = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return results


def _normalise_resps(samples: list[dict]) -> list[dict]:
    """Samples as written to JSON (tuples become lists), for comparing with in-process results."""
    return json.loads(json.dumps(samples, default=str))


@pytest.mark.slow
def test_tp2_launch_gives_the_tp1_results(mg_dir, tokenizer_dir, task_dir, ours_results, tmp_path):
    out = tmp_path / "out"
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.lm_eval",
               "--model", "aquila-npu", "--model_args",
               f"load={mg_dir},tokenizer={tokenizer_dir},tensor_model_parallel_size=2,micro_batch_size=8,"
               f"max_length={MAX_LENGTH}",
               "--tasks", ",".join(TASKS), "--include_path", str(task_dir), "--output_path", str(out),
               "--log_samples", env=OFFLINE, check=True, timeout=900)
    tp2 = _read_output(out)
    for task in TASKS:
        mine = _samples(tp2, task)
        tp1 = _normalise_resps(_samples(ours_results, task))
        assert len(mine) == len(tp1) > 0
        if task == "gsm8k_local":
            assert [s["resps"] for s in mine] == [s["resps"] for s in tp1]
        elif task == "text_local":
            for a, b in zip(mine, tp1):
                assert float(a["resps"][0][0]) == pytest.approx(float(b["resps"][0][0]), rel=1e-7)
        else:
            assert_same_loglikelihoods(mine, tp1, tolerance=1e-5)
        for metric, value in _metrics(tp2, task).items():
            expected = _metrics(ours_results, task)[metric]
            if isinstance(value, float):
                assert value == pytest.approx(float(expected), rel=1e-6), (task, metric)


@pytest.mark.slow
def test_plain_lm_eval_command_finds_the_model(mg_dir, tokenizer_dir, task_dir, ours_results, tmp_path):
    """``lm_eval --model aquila-npu`` (lm-eval's own console script): the autoload registers the model."""
    lm_eval_script = Path(sys.executable).parent / "lm_eval"
    if not lm_eval_script.exists():
        pytest.skip(f"no lm_eval console script next to {sys.executable}")
    out = tmp_path / "out"
    result = run_python(str(lm_eval_script), "--model", "aquila-npu", "--model_args",
                        f"load={mg_dir},tokenizer={tokenizer_dir},max_length={MAX_LENGTH}",
                        "--tasks", "boolq_local", "--limit", "3", "--include_path", str(task_dir), "--output_path",
                        str(out), "--log_samples", env=OFFLINE, check=True)
    plain = _read_output(out)
    assert_same_loglikelihoods(_normalise_resps(_samples(plain, "boolq_local")),
                               _normalise_resps(_samples(ours_results, "boolq_local")[:3]))
    assert "aquila2-tiny" in result.stderr  # our loader's line: the model is ours, not a fallback


@pytest.mark.parametrize("model_args, message", [
    ("load=/nowhere,tokenizer={tok}", "aquila-npu lm_eval: error: --load /nowhere: no such checkpoint folder"),
    ("load={mg},tokenizer={tok},micro_batch=3", ("aquila-npu lm_eval: error: --model_args: unknown argument(s) "
                                                 "micro_batch for --model aquila-npu")),
    ("load={mg}", "aquila-npu lm_eval: error: --model_args: give tokenizer=PATH"),
])
def test_bad_model_args_are_one_line(model_args, message, mg_dir, tokenizer_dir, task_dir):
    result = run_python("-m", "aquila_npu.lm_eval", "--model", "aquila-npu", "--model_args",
                        model_args.format(tok=tokenizer_dir, mg=mg_dir), "--tasks", "boolq_local", "--include_path",
                        str(task_dir), env=OFFLINE)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------- aquila_npu.evaluate
def test_evaluate_prompts_are_lm_eval_s_own_task_definitions(tmp_path):
    """``python -m aquila_npu.evaluate``'s three tasks read the public raw formats; their prompts must be what
    lm-eval's installed task definitions (boolq, mmlu_*, ceval-valid_*) render for the same question: description,
    ``doc_to_text``, ``doc_to_choice`` after the target delimiter."""
    import csv

    from lm_eval.tasks import TaskManager
    from lm_eval.utils import apply_template
    from lm_eval_tasks import MMLU_RECORDS

    from aquila_npu.evaluate import EvaluateOptions, build_examples

    index = TaskManager().task_index

    def ours(task, path):
        return build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task=task, task_data_path=str(path)))[1]

    def theirs(name, doc):
        cfg = index[name].cfg
        choices = cfg["doc_to_choice"]
        return (apply_template(cfg.get("description", ""), doc) + apply_template(cfg["doc_to_text"], doc),
                tuple(" " + c for c in choices))

    boolq = BUNDLED_DATA / "boolq" / "dev_300.jsonl"
    records = [json.loads(line) for line in boolq.read_text(encoding="utf-8").splitlines()[:5]]
    for example, record in zip(ours("boolq", boolq), records):
        assert (example.context, example.continuations) == theirs("boolq", record)
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps(r) + "\n" for r in MMLU_RECORDS))
    for example, record in zip(ours("mmlu", mmlu), MMLU_RECORDS):
        assert (example.context, example.continuations) == theirs(f"mmlu_{record['subject']}", record)
    ceval = tmp_path / "accountant_val.csv"
    row = {"id": "1", "question": "下列属于流动资产的是？", "A": "厂房", "B": "存货", "C": "商誉", "D": "专利",
           "answer": "B", "explanation": ""}
    with open(ceval, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    [example] = ours("ceval", tmp_path)
    assert (example.context, example.continuations) == theirs("ceval-valid_accountant", row)
