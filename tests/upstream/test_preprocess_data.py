"""Our preprocessing against Megatron-LM's own tools/preprocess_data.py: the same records and tokenizer give the
same bytes. Needs a Megatron-LM checkout at MEGATRON_LM_PATH; skipped otherwise (CI runs without it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from conftest import BUNDLED_DATA, run_python

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")


def test_same_bytes_as_megatron_lm_preprocess_data(tmp_path, tokenizer_dir):
    tool = Path(MEGATRON_LM_PATH) / "tools" / "preprocess_data.py"
    assert tool.is_file(), f"{tool} not found: MEGATRON_LM_PATH must be a Megatron-LM checkout"
    parquet = BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n"
                             for t in pq.read_table(parquet).column("text").to_pylist()))
    theirs = run_python("-m", "aquila_npu.megatron_lm.tool", str(tool), "--input", str(lines), "--output-prefix",
                        str(tmp_path / "theirs"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                        str(tokenizer_dir), "--workers", "2", "--append-eod")
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    ours = run_python("-m", "aquila_npu.preprocess", "--input", str(parquet), "--tokenizer-name-or-path",
                      str(tokenizer_dir), "--output-prefix", str(tmp_path / "ours"), "--workers", "2", "--append-eod")
    assert ours.returncode == 0, ours.stderr[-3000:]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours_text_document{suffix}").read_bytes() == \
            (tmp_path / f"theirs_text_document{suffix}").read_bytes()
