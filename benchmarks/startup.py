"""What installing aquila-npu adds to every Python start-up that does not ask for a plugin.

The start-up hook is one `.pth` line that Python runs in every interpreter. Target (issue 2): under 5 ms added,
and no torch / megatron / aquila_npu import without `--plugin`. Prints a table:

    python benchmarks/startup.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time
import timeit
from pathlib import Path

PTH = Path(sysconfig.get_paths()["purelib"]) / "aquila_npu-autoload.pth"
TARGET_MS = 5.0


def interpreter_start_ms(args: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if not PTH.is_file():
        sys.exit(f"{PTH} not found: install aquila-npu first (pip install -e .)")
    line = PTH.read_text().strip()
    per_run = min(timeit.repeat(line, number=10000, repeat=5)) / 10000 * 1000  # ms
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    heavy = sorted({row.split("|")[-1].strip().split(".")[0] for row in imports.stderr.splitlines() if "|" in row}
                   & {"aquila_npu", "torch", "megatron", "pluggy"})
    plain = interpreter_start_ms(["-c", "pass"], args.repeat)
    isolated = interpreter_start_ms(["-S", "-c", "pass"], args.repeat)
    rows = [
        ("`.pth` line, executed in-process (no --plugin)", f"{per_run * 1000:.2f} us", f"{per_run / TARGET_MS:.5f}"),
        ("heavy imports at start-up without --plugin", ", ".join(heavy) or "none", ""),
        ("`python -c pass`, median wall time", f"{plain:.1f} ms", ""),
        ("`python -S -c pass` (no site at all), median", f"{isolated:.1f} ms", ""),
    ]
    print(f"start-up cost of aquila-npu's hook (python {sys.version.split()[0]}, {args.repeat} runs)")
    print(f"{'measure':50} {'value':>14} {'ratio to 5 ms target':>22}")
    for name, value, ratio in rows:
        print(f"{name:50} {value:>14} {ratio:>22}")


if __name__ == "__main__":
    main()
