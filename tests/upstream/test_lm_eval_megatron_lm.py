"""lm-evaluation-harness's own ``megatron_lm`` model (it builds Megatron-LM's arguments itself and calls
``initialize_megatron`` from the checkout at ``MEGATRON_PATH``) running Aquila2 on the CPU through our plugin:
``AQUILA_NPU_PLUGINS=aquila2`` and ``extra_args=--model aquila2-tiny``, no edit to lm-eval or Megatron-LM.

Its BoolQ log-likelihoods must equal our ``aquila-npu`` model's on the same ``torch_dist`` checkpoint. lm-eval's
``megatron_lm`` always runs in bf16 (it passes ``--bf16``), so ours runs in bf16 too and they agree to 1e-2 (two
bf16 models of different layer specs; ~0.003 seen). Passages are kept short enough that neither side truncates:
lm-eval's ``megatron_lm`` cuts a long input one token differently from its ``hf`` model (and ours).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import BUNDLED_DATA, make_hf_checkpoint, run_python

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'aquila-npu[lm-eval]')")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_spec, tokenizer_dir):
    from transformers import AutoTokenizer

    from aquila_npu.convert import ConvertOptions, convert
    from aquila_npu.lm_eval.local_tasks import write_boolq_task

    root = tmp_path_factory.mktemp("lm-eval-megatron-lm")
    hf = make_hf_checkpoint(tiny_spec, root / "hf", seed=7)
    checkpoint = root / "dist"
    convert(ConvertOptions(load_dir=str(hf), save_dir=str(checkpoint), ckpt_format="torch_dist", progress=False))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    short = []
    for line in (BUNDLED_DATA / "boolq" / "dev_300.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if len(tokenizer.encode(f"{record['passage']}\nQuestion: {record['question']}?\nAnswer: yes")) < 200:
            short.append(line)
        if len(short) == 8:
            break
    (root / "boolq.jsonl").write_text("\n".join(short) + "\n", encoding="utf-8")
    write_boolq_task(root, root / "boolq.jsonl", name="boolq_short")
    return root, checkpoint


def _loglikelihoods(folder: Path) -> list[list[float]]:
    [path] = glob.glob(str(folder / "**" / "samples_boolq_short_*.jsonl"), recursive=True)
    samples = sorted((json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()),
                     key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in s["resps"]] for s in samples]


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_lm_eval_megatron_lm_model_runs_aquila2_through_the_plugin(setup, tokenizer_dir, tensor_parallel):
    root, checkpoint = setup
    common = ["--tasks", "boolq_short", "--include_path", str(root), "--log_samples"]
    theirs_out, ours_out = root / f"megatron_lm-tp{tensor_parallel}", root / f"aquila-npu-tp{tensor_parallel}"
    lm_eval_args = (f"load={checkpoint},tokenizer_model={tokenizer_dir},seq_length=256,micro_batch_size=4,"
                    f"devices={tensor_parallel},tensor_model_parallel_size={tensor_parallel},"
                    f"extra_args=--model aquila2-tiny")
    # (without the plugin, Megatron-LM's parser refuses --model, and CUDA is asked for)
    run_python("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tensor_parallel}",
                        "-m", "lm_eval", "--model", "megatron_lm", "--model_args", lm_eval_args, *common,
                        "--output_path", str(theirs_out),
                        env={**OFFLINE, "AQUILA_NPU_PLUGINS": "aquila2",
                             "MEGATRON_PATH": os.environ["MEGATRON_LM_PATH"]}, check=True, timeout=900)
    run_python("-m", "aquila_npu.lm_eval", "--model", "aquila-npu", "--model_args",
               f"load={checkpoint},tokenizer={tokenizer_dir},params_dtype=bf16", *common, "--output_path",
               str(ours_out), env=OFFLINE, check=True)
    theirs, ours = _loglikelihoods(theirs_out), _loglikelihoods(ours_out)
    assert len(theirs) == len(ours) == 8
    for mine, lm_eval_s in zip(ours, theirs):
        assert mine == pytest.approx(lm_eval_s, abs=1e-2)
    print(f"largest difference: {max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)):.2e}",
          file=sys.stderr)
