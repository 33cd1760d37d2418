"""The small samples the quickstart and the tests run on: the real Aquila2 tokenizer, 300 Alpaca records, 200
conversations made from them and 300 BoolQ dev questions, each with its licence (``README.md`` here). In a source
checkout this folder is ``examples/data``; it installs with the package as ``aquila_npu.sample_data``, so the quickstart runs in any folder
after ``pip install aquila-npu``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """A file or folder of the samples, e.g. ``path("alpaca", "alpaca_300.parquet")``."""
    return ROOT.joinpath(*parts)
