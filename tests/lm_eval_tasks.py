"""Local lm-evaluation-harness tasks for the tests and benchmarks (offline: JSONL files and task YAML, no hub).

``write_tasks(folder, boolq_file, limit)`` writes four tasks into ``folder`` (lm-eval's ``--include_path``):
* ``boolq_local``: lm-eval's ``super_glue/boolq`` prompt over the bundled BoolQ dev records
  (``aquila_npu.lm_eval.local_tasks``);
* ``mmlu_local``: lm-eval's ``mmlu/default`` prompt and description over a few records of two subjects;
* ``gsm8k_local``: a GSM8K-style ``generate_until`` task (lm-eval's ``gsm8k`` prompt, stop strings and
  ``strict-match`` filter) over a few local word problems;
* ``text_local``: ``loglikelihood_rolling`` (word / byte perplexity) over Alpaca outputs, as ``wikitext`` is scored.
"""

from __future__ import annotations

import json
from pathlib import Path

from aquila_npu.lm_eval.local_tasks import write_boolq_task

MMLU_RECORDS = [
    {"subject": "abstract_algebra", "question": "Find the degree of Q(sqrt(2)) over Q.",
     "choices": ["0", "4", "2", "6"], "answer": 2},
    {"subject": "abstract_algebra", "question": "Is Z a field?", "choices": ["Yes", "No", "Only mod 2", "Never"],
     "answer": 1},
    {"subject": "college_biology", "question": "Which organelle makes ATP?",
     "choices": ["Ribosome", "Mitochondrion", "Golgi", "Nucleus"], "answer": 1},
    {"subject": "college_biology", "question": "Which molecule carries genetic information in most organisms?",
     "choices": ["Lipid", "Glucose", "DNA", "Collagen"], "answer": 2},
]
GSM8K_RECORDS = [
    {"question": "Tom has 3 apples and buys 5 more. How many apples does he have?",
     "answer": "He has 3 + 5 = 8 apples.\n#### 8"},
    {"question": "A train travels 60 km in one hour. How far does it travel in 3 hours?",
     "answer": "60 * 3 = 180 km.\n#### 180"},
    {"question": "小明有10本书，送给朋友4本，还剩几本？", "answer": "10 - 4 = 6\n#### 6"},
]

MMLU = """task: mmlu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
description: "The following are multiple choice questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""
GSM8K = """task: gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TEXT = """task: text_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_tasks(folder: Path, boolq_file: Path, limit: int, alpaca_file: Path | None = None,
                max_gen_toks: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    boolq = folder / "boolq.jsonl"
    boolq.write_text("\n".join(boolq_file.read_text(encoding="utf-8").splitlines()[:limit]) + "\n", encoding="utf-8")
    write_boolq_task(folder, boolq)
    (folder / "mmlu_local.yaml").write_text(MMLU.format(data=_jsonl(folder / "mmlu.jsonl", MMLU_RECORDS)))
    (folder / "gsm8k_local.yaml").write_text(GSM8K.format(data=_jsonl(folder / "gsm8k.jsonl", GSM8K_RECORDS),
                                                          max_gen_toks=max_gen_toks))
    if alpaca_file is not None:
        records = json.loads(alpaca_file.read_text(encoding="utf-8"))
        texts = [{"text": " ".join(r["instruction"] + " " + r["output"] for r in records[i:i + 6])}
                 for i in range(0, 18, 6)]
        (folder / "text_local.yaml").write_text(TEXT.format(data=_jsonl(folder / "text.jsonl", texts)))
    return folder
