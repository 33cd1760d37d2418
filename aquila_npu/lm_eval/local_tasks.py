"""Local lm-evaluation-harness tasks: a task YAML over a file on disk, for offline runs (no hub).

``write_boolq_task(folder, data)`` writes lm-eval's ``super_glue/boolq`` task (its prompt, choices and metric) over a
local BoolQ JSONL (``question``, ``passage``, ``answer``: bool), as ``folder/NAME.yaml`` for ``--include_path folder``.
The quickstart, the benchmarks and the tests use it; the README shows the same file.
"""

from __future__ import annotations

from pathlib import Path

BOOLQ = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{answer | int}}}}"
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
"""


def write_boolq_task(folder, data, name: str = "boolq_local") -> Path:
    """``folder/NAME.yaml``: lm-eval's BoolQ task reading ``data`` (a BoolQ JSONL file)."""
    path = Path(folder) / f"{name}.yaml"
    path.write_text(BOOLQ.format(name=name, data=Path(data).resolve()), encoding="utf-8")
    return path
