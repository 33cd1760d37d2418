"""Evaluation against an independent reference: a tiny random Aquila2-shaped HF model scored the way
lm-evaluation-harness scores (written out here from its definition), and lm-evaluation-harness itself.

The Megatron side loads the checkpoint converted from the same weights; per-example log-likelihoods must agree to
1e-4 and predictions and accuracy exactly.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import BUNDLED_DATA, convert_to_megatron, make_hf_checkpoint, run_python

LIMIT = 200
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def boolq_file():
    return BUNDLED_DATA / "boolq" / "dev_300.jsonl"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_spec):
    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("eval-hf") / "model", seed=5)


@pytest.fixture(scope="module")
def mg_dir(hf_dir, tmp_path_factory):
    return convert_to_megatron(hf_dir, tmp_path_factory.mktemp("eval-mg") / "tp2", tensor_parallel=2)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def lm_eval_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int) -> float:
    """lm-evaluation-harness's HFLM.loglikelihood for one request, written out from its definition (v0.4):
    trailing context whitespace moves to the continuation; continuation ids = ids(context + continuation) after
    len(ids(context)); input = (context + continuation)[-(max_length + 1):][:-1]; sum of log-softmax."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    cont = whole[len(ctx):]
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        log_probs = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
    positions = range(len(inp) - len(cont), len(inp))
    return sum(log_probs[p, t].item() for p, t in zip(positions, cont))


@pytest.fixture(scope="module")
def evaluator(megatron_world, mg_dir, tokenizer_dir):
    from aquila_npu.evaluate import Evaluator
    from aquila_npu.inference import ModelOptions

    return Evaluator(ModelOptions(load=str(mg_dir), tokenizer_name_or_path=str(tokenizer_dir), model="aquila2-tiny"))


@pytest.fixture(scope="module")
def boolq_result(evaluator, boolq_file, mg_dir, tokenizer_dir):
    from aquila_npu.evaluate import EvaluateOptions, evaluate

    options = EvaluateOptions(load=str(mg_dir), tokenizer_name_or_path=str(tokenizer_dir), task="boolq",
                              task_data_path=str(boolq_file), limit=LIMIT, micro_batch_size=8, progress=False)
    return evaluate(options, evaluator)


def test_boolq_loglikelihoods_match_transformers_the_lm_eval_way(boolq_result, boolq_file, hf_model, hf_tokenizer,
                                                                  tiny_spec):
    docs = [json.loads(line) for line in boolq_file.read_text(encoding="utf-8").splitlines()[:LIMIT]]
    assert boolq_result["n"] == LIMIT == len(docs)
    correct, worst = [], 0.0
    for doc, example in zip(docs, boolq_result["examples"]):
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        expected = {choice: lm_eval_loglikelihood(hf_model, hf_tokenizer, context, " " + choice,
                                                  tiny_spec.max_position_embeddings) for choice in ("no", "yes")}
        for choice in ("no", "yes"):
            worst = max(worst, abs(example["scores"][choice] - expected[choice]))
        prediction = int(expected["yes"] > expected["no"])
        assert example["label"] == int(doc["answer"])
        assert example["prediction"] == prediction, (example, expected)
        correct.append(prediction == example["label"])
    assert worst <= TOLERANCE
    assert boolq_result["accuracy"] == sum(correct) / len(correct)
    p = boolq_result["accuracy"]
    assert boolq_result["stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)


def test_long_passages_are_truncated_from_the_left_like_lm_eval(boolq_result, boolq_file, hf_tokenizer, tiny_spec):
    # the tiny model has 256 positions: some BoolQ prompts are longer, and those must have been cut, not failed
    lengths = [len(hf_tokenizer(json.loads(line)["passage"])["input_ids"])
               for line in boolq_file.read_text(encoding="utf-8").splitlines()[:LIMIT]]
    assert max(lengths) > tiny_spec.max_position_embeddings


def test_rows_are_batched_longest_first_with_little_padding(boolq_file):
    from aquila_npu.evaluate.scoring import MAX_PADDING, length_batches

    # BoolQ passages (in characters) and one outlier three times the longest: a fixed row count would pad seven
    # rows to the outlier's width
    lengths = [len(json.loads(line)["passage"]) for line in boolq_file.read_text(encoding="utf-8").splitlines()]
    lengths.append(3 * max(lengths))
    batches = length_batches(lengths, 8)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0] == [len(lengths) - 1]
    for batch in batches:
        assert 1 <= len(batch) <= 8
        assert lengths[batch[0]] * len(batch) <= (1 + MAX_PADDING) * sum(lengths[i] for i in batch)
    # rows of one length fill whole batches; without the padding bound, batches are plain slices of 8
    assert [len(b) for b in length_batches([50] * 20, 8)] == [8, 8, 4]
    assert [len(b) for b in length_batches(lengths, 8, max_padding=float("inf"))] == \
        [8] * (len(lengths) // 8) + ([len(lengths) % 8] if len(lengths) % 8 else [])


def test_first_token_scoring_is_modellink_s(evaluator, boolq_file, hf_model, hf_tokenizer):
    from aquila_npu.evaluate import EvaluateOptions, evaluate

    result = evaluate(EvaluateOptions(load="", tokenizer_name_or_path="", task="boolq", task_data_path=str(boolq_file),
                                      limit=20, scoring="first-token", progress=False), evaluator)
    yes, no = (hf_tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("Yes", "No"))
    for line, example in zip(boolq_file.read_text(encoding="utf-8").splitlines(), result["examples"]):
        doc = json.loads(line)
        ids = hf_tokenizer(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
                           add_special_tokens=False)["input_ids"][-256:]
        with torch.no_grad():
            probs = hf_model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        assert example["scores"]["yes"] == pytest.approx(probs[yes].item(), abs=1e-5)
        assert example["scores"]["no"] == pytest.approx(probs[no].item(), abs=1e-5)
        assert example["prediction"] == int(probs[yes] > probs[no])


def test_multi_token_continuations_match_transformers(evaluator, hf_model, hf_tokenizer):
    from aquila_npu.evaluate.tasks import Example

    contexts = ["The capital of France is", "北京是中国的首都，上海是", "Answer: "]
    continuations = (" Paris, of course", " the largest city", "maybe not")
    examples = [Example(i, c, continuations, ("a", "b", "c"), 0) for i, c in enumerate(contexts)]
    scored = evaluator.score(examples, "loglikelihood", micro_batch_size=4, progress=False)["examples"]
    for context, result in zip(contexts, scored):
        for name, continuation in zip(("a", "b", "c"), continuations):
            expected = lm_eval_loglikelihood(hf_model, hf_tokenizer, context, continuation, 256)
            assert result["scores"][name] == pytest.approx(expected, abs=TOLERANCE)


# --------------------------------------------------------------------------------------------- MMLU and C-Eval
MMLU_ROWS = {"abstract_algebra": [["Find the degree of Q(sqrt(2)) over Q.", "0", "4", "2", "6", "C"],
                                  ["Is Z a field?", "Yes", "No", "Only mod 2", "Never", "B"]],
             "college_biology": [["Which organelle makes ATP?", "Ribosome", "Mitochondrion", "Golgi", "Nucleus", "B"]]}
CEVAL_ROWS = {"accountant": [["1", "下列属于流动资产的是？", "厂房", "存货", "商誉", "专利", "B", ""]]}


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    import csv

    root = tmp_path_factory.mktemp("mmlu")
    for split in ("test", "dev"):
        (root / split).mkdir()
        for subject, rows in MMLU_ROWS.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    import csv

    root = tmp_path_factory.mktemp("ceval")
    for split in ("val", "dev"):
        with open(root / f"accountant_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            writer.writerows(CEVAL_ROWS["accountant"])
    return root


def test_mmlu_and_ceval_prompts_are_lm_eval_s(mmlu_dir, ceval_dir):
    from aquila_npu.evaluate import EvaluateOptions, build_examples

    _, mmlu = build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task="mmlu",
                                             task_data_path=str(mmlu_dir / "test")))
    assert [e.subject for e in mmlu] == ["abstract_algebra", "abstract_algebra", "college_biology"]
    assert mmlu[0].context == ("The following are multiple choice questions (with answers) about abstract algebra."
                               "\n\nFind the degree of Q(sqrt(2)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mmlu[0].continuations == (" A", " B", " C", " D") and mmlu[0].label == 2
    _, shots = build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task="mmlu", num_fewshot=1,
                                              task_data_path=str(mmlu_dir / "test")))
    assert shots[2].context == ("The following are multiple choice questions (with answers) about college biology."
                                "\n\nWhich organelle makes ATP?\nA. Ribosome\nB. Mitochondrion\nC. Golgi\nD. Nucleus"
                                "\nAnswer: B\n\nWhich organelle makes ATP?\nA. Ribosome\nB. Mitochondrion\nC. Golgi"
                                "\nD. Nucleus\nAnswer:")
    _, ceval = build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task="ceval",
                                              task_data_path=str(ceval_dir)))
    assert ceval[0].context == ("以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n下列属于流动资产的是？\n"
                                "A. 厂房\nB. 存货\nC. 商誉\nD. 专利\n答案：")
    assert ceval[0].label == 1


def test_mmlu_scores_match_transformers(evaluator, mmlu_dir, hf_model, hf_tokenizer):
    from aquila_npu.evaluate import EvaluateOptions, evaluate

    result = evaluate(EvaluateOptions(load="", tokenizer_name_or_path="", task="mmlu", progress=False,
                                      task_data_path=str(mmlu_dir / "test")), evaluator)
    assert set(result["subjects"]) == {"abstract_algebra", "college_biology"}
    from aquila_npu.evaluate.tasks import get_task

    docs = get_task("mmlu").read(str(mmlu_dir / "test"))
    for doc, example in zip(docs, result["examples"]):
        context = get_task("mmlu").description(doc.subject) + doc.text
        for letter in "ABCD":
            expected = lm_eval_loglikelihood(hf_model, hf_tokenizer, context, " " + letter, 256)
            assert example["scores"][letter] == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("content, match", [
    ('{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "passage": "p"\n', r"line 2: invalid JSON"),
    ('{"question": "q", "passage": "p", "answer": "yes"}\n', r"line 1: 'answer' must be bool"),
    ('{"question": "q", "answer": true}\n', r"line 1: no 'passage' field"),
])
def test_malformed_boolq_names_file_and_line(tmp_path, content, match):
    from aquila_npu.errors import AquilaNpuError
    from aquila_npu.evaluate import EvaluateOptions, build_examples

    path = tmp_path / "dev.jsonl"
    path.write_text(content)
    with pytest.raises(AquilaNpuError, match=match) as info:
        build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task="boolq", task_data_path=str(path)))
    assert str(path) in str(info.value)


def test_malformed_mmlu_row_names_file_and_line(tmp_path):
    from aquila_npu.errors import AquilaNpuError
    from aquila_npu.evaluate import EvaluateOptions, build_examples

    (tmp_path / "x_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(AquilaNpuError, match=r"x_test.csv, line 2: answer 'E' is not one of A, B, C, D"):
        build_examples(EvaluateOptions(load="", tokenizer_name_or_path="", task="mmlu", task_data_path=str(tmp_path)))


# --------------------------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_tp2_gives_the_tp1_scores(mg_dir, tokenizer_dir, boolq_file, boolq_result, tmp_path):
    out = tmp_path / "boolq.json"
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.evaluate",
               "boolq", "--plugin", "aquila2", "--model", "aquila2-tiny", "--load", str(mg_dir),
               "--tokenizer-name-or-path", str(tokenizer_dir), "--tensor-model-parallel-size", "2",
               "--task-data-path", str(boolq_file), "--limit", str(LIMIT), "--output", str(out), "--no-progress",
               check=True)
    result = json.loads(out.read_text())
    assert set(result) >= {"task", "accuracy", "stderr", "n", "examples"}
    assert result["accuracy"] == boolq_result["accuracy"] and result["n"] == LIMIT
    for ours, tp1 in zip(result["examples"], boolq_result["examples"]):
        assert ours["prediction"] == tp1["prediction"]
        for choice in ("no", "yes"):
            assert ours["scores"][choice] == pytest.approx(tp1["scores"][choice], abs=1e-5)


def test_aquila_npu_evaluate_is_the_same_command(tokenizer_dir, boolq_file):
    """``aquila-npu evaluate`` (the console script's verb) runs ``python -m aquila_npu.evaluate``."""
    result = run_python("-m", "aquila_npu", "evaluate", "boolq", "--load", "/nowhere", "--tokenizer-name-or-path",
                        str(tokenizer_dir), "--task-data-path", str(boolq_file))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("aquila-npu evaluate: error: --load /nowhere: no such "
                                                      "checkpoint folder")


@pytest.mark.parametrize("args, message", [
    (["boolq", "--task-data-path", "/nowhere/dev.jsonl"], "--task-data-path /nowhere/dev.jsonl: no such file"),
    (["boolq", "--load", "/nowhere"], "no such checkpoint folder"),
    (["--task-data-path", "x"], "name the task"),
])
def test_cli_bad_input_is_one_line(args, message, hf_dir, tokenizer_dir, boolq_file):
    base = {"--load": str(hf_dir), "--task-data-path": str(boolq_file)}
    for flag, value in zip(args, args[1:]):
        if flag in base:
            base[flag] = value
    argv = [a for a in args if not a.startswith("--") and a not in base.values()][:1]
    for flag, value in base.items():
        argv += [flag, value]
    result = run_python("-m", "aquila_npu.evaluate", *argv, "--load-model-type", "hf", "--tokenizer-name-or-path",
                        str(tokenizer_dir), "--limit", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("aquila-npu evaluate: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed "
                                                                          "(pip install 'aquila-npu[lm-eval]')")
def test_lm_evaluation_harness_gives_the_same_accuracy(boolq_result, boolq_file, hf_dir, tokenizer_dir, tmp_path):
    """lm-evaluation-harness itself (HF backend) on the HF model, BoolQ from the same local file."""
    data = tmp_path / "boolq.jsonl"
    data.write_text("\n".join(boolq_file.read_text(encoding="utf-8").splitlines()[:LIMIT]) + "\n", encoding="utf-8")
    from aquila_npu.lm_eval.local_tasks import write_boolq_task

    write_boolq_task(tmp_path, data)
    script = (
        "import json, sys, lm_eval\nfrom lm_eval.tasks import TaskManager\n"
        "r = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={sys.argv[1]},tokenizer={sys.argv[2]},"
        "dtype=float32', tasks=['boolq_local'], task_manager=TaskManager(include_path=sys.argv[3]), device='cpu', "
        "batch_size=8, log_samples=True)\n"
        "s = sorted(r['samples']['boolq_local'], key=lambda x: x['doc_id'])\n"
        "print(json.dumps({'acc': r['results']['boolq_local']['acc,none'], "
        "'lls': [[float(v[0]) for v in x['filtered_resps']] for x in s]}))\n")
    result = run_python("-c", script, str(hf_dir), str(tokenizer_dir), str(tmp_path), check=True,
                        env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs["acc"] == boolq_result["accuracy"]
    for lls, ours in zip(theirs["lls"], boolq_result["examples"]):
        assert [ours["scores"]["no"], ours["scores"]["yes"]] == pytest.approx(lls, abs=TOLERANCE)
