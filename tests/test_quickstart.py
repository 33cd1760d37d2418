"""The README's quickstart runs end to end on this machine and reports its stages."""

from __future__ import annotations

import re

import pytest

from conftest import run_python


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    result = run_python("-m", "aquila_npu", "quickstart", "--workdir", str(tmp_path / "qs"), check=True)
    out = result.stdout
    for stage in ("model", "tokenize", "transformers", "megatron-core TP=1", "fused kernels", "megatron-core TP=2",
                  "convert", "load converted TP=2", "preprocess", "pretrain", "finetune", "chat fine-tune",
                  "LoRA fine-tune", "convert trained",
                  "generate", "chat", "evaluate", "lm-eval"):
        assert f"[..] {stage}:" in out and f"[ok] {stage}:" in out  # announced when it starts, then its result
        assert out.index(f"[..] {stage}:") < out.index(f"[ok] {stage}:")
    assert out.strip().endswith("quickstart passed")
    # the long stages show their progress; no upstream notice that does not concern the user comes in between
    for stage in ("pretrain", "finetune"):
        assert re.search(rf"{stage}: +\d+%.*\d+/20 ", result.stderr), stage
    for noise in ("Transformer Engine and Apex are not installed", "full scope is deprecated", "Loading weights",
                  "Writing model shards", "`load_state_dict` is deprecated"):
        assert noise not in out + result.stderr, noise


def test_quickstart_with_a_missing_tokenizer_fails_with_one_line(tmp_path):
    result = run_python("-m", "aquila_npu", "quickstart", "--workdir", str(tmp_path / "qs"),
                        "--tokenizer", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("aquila-npu: error: no tokenizer.json in ")
