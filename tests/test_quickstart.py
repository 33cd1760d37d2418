"""The README's quickstart runs end to end on this machine and reports its stages."""

from __future__ import annotations

import pytest

from conftest import run_python


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    result = run_python("-m", "aquila_npu", "quickstart", "--workdir", str(tmp_path / "qs"), check=True)
    out = result.stdout
    for stage in ("model", "tokenize", "transformers", "megatron-core TP=1", "fused kernels", "megatron-core TP=2",
                  "convert", "load converted TP=2", "preprocess", "pretrain", "finetune", "convert trained",
                  "generate", "chat", "evaluate"):
        assert f"[ok] {stage}:" in out
    assert out.strip().endswith("quickstart passed")


def test_quickstart_with_a_missing_tokenizer_fails_with_one_line(tmp_path):
    result = run_python("-m", "aquila_npu", "quickstart", "--workdir", str(tmp_path / "qs"),
                        "--tokenizer", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("aquila-npu: error: no tokenizer.json in ")
