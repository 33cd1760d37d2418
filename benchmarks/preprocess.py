"""Preprocessing speed: ours against Megatron-LM's tools/preprocess_data.py and the tokenizer's own batch speed.

On the Alpaca records repeated to >= 50,000 documents, with the same Aquila2 tokenizer and 2 workers, side by side in
one run:

* tokenizer alone: ``encode_batch`` and ``encode_batch_fast``, over every text at once and 1,000 at a time, all
  its threads, texts already in memory; the fastest of the four is the practical limit;
* ours: ``python -m aquila_npu.preprocess --workers 2 --append-eod`` on the parquet;
* Megatron-LM (when ``MEGATRON_LM_PATH`` is set): ``tools/preprocess_data.py --workers 2 --append-eod
  --tokenizer-type HuggingFaceTokenizer`` on the same records as JSON lines. Its module imports Triton through
  ``megatron.training``; a CPU machine has none, so it runs through ``python -m aquila_npu.megatron_lm.tool`` under our
  CPU plugin's patches (they stand in for the Triton-importing module and touch nothing on the tokenising path).
  Its output must be byte-identical to ours.

Processing rates exclude interpreter and import start-up (ours from its summary line, Megatron-LM's from its last
progress line); wall rates include it. Targets (issue 4): >= 3x Megatron-LM, >= 80% of the tokenizer's own speed.

    python benchmarks/preprocess.py [--documents 50000] [--workers 2] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sample_data import sample

PEAK_OF_CHILD = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "sys.stdout.write(r.stdout + r.stderr); "
                 "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")

TOKENIZER_ALONE = """
import sys, time, pyarrow.parquet as pq
from transformers import AutoTokenizer
texts = pq.read_table(sys.argv[1], columns=['text']).column('text').to_pylist()
backend = AutoTokenizer.from_pretrained(sys.argv[2]).backend_tokenizer
for method in ('encode_batch', 'encode_batch_fast'):
    for batch in (len(texts), 1000):
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(texts), batch):
            tokens += sum(len(e.ids) for e in getattr(backend, method)(texts[i:i + batch]))
        print('METHOD', method, 'BATCH', batch, 'TOKENS', tokens, 'SECONDS', time.perf_counter() - start)
"""


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, output) of one command, measured by a fresh parent."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, *command], capture_output=True,
                            text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}")
    peak = int(re.findall(r"PEAK (\d+)", result.stdout)[-1]) / 2**20
    return seconds, peak, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(args.workdir or tempfile.mkdtemp(prefix="preprocess-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = sample("aquila2_tokenizer")
    source = pq.read_table(sample("alpaca/alpaca_5000.parquet", "alpaca/alpaca_300.parquet"), columns=["text"])
    table = pa.concat_tables([source] * -(-args.documents // source.num_rows)).slice(0, args.documents)
    parquet, lines = work / "alpaca.parquet", work / "alpaca.jsonl"
    pq.write_table(table, parquet)
    import json

    with open(lines, "w", encoding="utf-8") as f:
        for text in table.column("text").to_pylist():
            f.write(json.dumps({"text": text}) + "\n")
    print(f"{table.num_rows:,} documents ({source.num_rows:,} Alpaca records repeated), tokenizer {tokenizer}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs", flush=True)

    rows = []
    _, _, out = timed(["-c", TOKENIZER_ALONE, str(parquet), str(tokenizer)])
    # the tokenizer's own speed, all its threads: both batch methods, one call over every text and calls of 1,000;
    # the fastest of the four is the limit
    for method, batch, count, seconds in re.findall(r"METHOD (\w+) BATCH (\d+) TOKENS (\d+) SECONDS ([\d.]+)", out):
        label = "all texts" if int(batch) == table.num_rows else f"{int(batch):,} a call"
        rows.append((f"tokenizer alone ({method}, {label})", float(seconds), float(seconds), None))
    tokens = int(count)
    tokenizer_seconds = min(r[2] for r in rows)

    ours = work / "ours"
    wall, peak, out = timed(["-m", "aquila_npu.preprocess", "--input", str(parquet), "--tokenizer-name-or-path",
                             str(tokenizer), "--output-prefix", str(ours / "alpaca"), "--workers", str(args.workers),
                             "--append-eod", "--no-progress"])
    ours_seconds = float(re.search(r"; ([\d.]+) s \(", out).group(1))
    ours_tokens = int(re.search(r"samples, ([\d,]+) tokens", out).group(1).replace(",", ""))
    rows.append(("aquila_npu.preprocess", wall, ours_seconds, peak))
    ours_wall = wall

    megatron_lm = os.environ.get("MEGATRON_LM_PATH")
    identical = None
    if megatron_lm:
        theirs = work / "megatron-lm"
        theirs.mkdir(exist_ok=True)
        wall_mlm, peak_mlm, out = timed(["-m", "aquila_npu.megatron_lm.tool",
                                         f"{megatron_lm}/tools/preprocess_data.py", "--input", str(lines),
                                         "--output-prefix", str(theirs / "alpaca"), "--tokenizer-type",
                                         "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer), "--workers",
                                         str(args.workers), "--append-eod", "--log-interval", "1000"])
        done, rate = re.findall(r"Processed (\d+) documents \(([\d.]+) docs/s", out)[-1]
        rows.append(("Megatron-LM tools/preprocess_data.py", wall_mlm, int(done) / float(rate), peak_mlm))
        mlm_wall, mlm_proc = rows[-1][1], rows[-1][2]
        identical = all((ours / f"alpaca_text_document{s}").read_bytes() ==
                        (theirs / f"alpaca_text_document{s}").read_bytes() for s in (".bin", ".idx"))

    # every rate counts the tokenizer's tokens (the eod ids the tools append are not tokenising work)
    assert ours_tokens == tokens + table.num_rows, (ours_tokens, tokens)
    print(f"\n{'step':50} {'wall s':>7} {'proc s':>7} {'tokens/s (proc)':>16} {'tokens/s (wall)':>16} "
          f"{'peak RSS GB':>12}")
    for name, wall_s, proc_s, rss in rows:
        print(f"{name:50} {wall_s:7.1f} {proc_s:7.1f} {tokens / proc_s:16,.0f} {tokens / wall_s:16,.0f} "
              f"{'' if rss is None else f'{rss:.2f}':>12}")
    print(f"\nours / tokenizer alone, its fastest form (processing): {tokenizer_seconds / ours_seconds:.2f}  "
          f"(target >= 0.80)")
    if megatron_lm:
        print(f"ours / Megatron-LM: processing {mlm_proc / ours_seconds:.2f}x, wall {mlm_wall / ours_wall:.2f}x  "
              f"(target >= 3x); outputs byte-identical: {identical}")
    else:
        print("Megatron-LM: not measured (set MEGATRON_LM_PATH to a Megatron-LM checkout)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
