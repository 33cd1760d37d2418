"""Generation throughput: ``aquila_npu.generate`` (megatron-core's inference engine) against ``transformers``'
``generate`` with its KV cache, side by side in one process: same weights, prompts, dtype, device and threads.

Both decode greedily for exactly ``--new-tokens`` tokens per prompt (no end-of-sequence stop, so both do the same
work); ``transformers`` gets the batch left-padded with an attention mask, as its docs prescribe. tokens/s is
generated tokens over the wall time of the generate call (the model already loaded), the median of ``--repeat``
timed calls (taken in turns) after one warm-up call each. Target (issue 6): ours / transformers >= 1.0.

    python benchmarks/generate.py [--device cpu|cuda] [--models aquila2-tiny,small,medium] [--batches 1,8]
        [--new-tokens 64] [--dtype fp32|bf16] [--repeat 3] [--fused-kernels]

``--decode-step``: instead, the time of one decode step at KV-cache lengths 64 and 1024 (``--cache-lengths``), for
both: a prompt of that many tokens, generated with 40 new tokens; a step is the time from one forward call of the
model to the next (the forward, sampling and each side's bookkeeping), so the prefill stays out. Per run: the median
of its 38 decode steps; reported: the best of ``--repeat`` runs, all lengths and both sides in turns in each round
(the best, because on a shared machine a run only ever gets slower, never faster, than what the code costs).
Target (issue 16): ours does not grow from 64 to 1024 faster than transformers: no more milliseconds added to a
step (printed with the ratio, which also depends on how long each side's step is to begin with).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from sample_data import REPO, sample

# Aquila2-shaped models (Aquila2's head size 128 and vocabulary) beside aquila2-tiny: "small" (~0.3B), where
# matmuls rather than Python decide the speed on a few CPU cores, and "medium" (~1.2B) for accelerators
SIZES = {
    "small": dict(name="aquila2-small", num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                  num_query_groups=8, seq_length=1024, max_position_embeddings=1024),
    "medium": dict(name="aquila2-medium", num_layers=16, hidden_size=2048, ffn_hidden_size=5632,
                   num_attention_heads=16, num_query_groups=16, seq_length=1024, max_position_embeddings=1024),
}


def prompts(count: int) -> list[str]:
    import pyarrow.parquet as pq

    path = sample("alpaca/alpaca_5000.parquet", "alpaca/alpaca_300.parquet")
    return pq.read_table(path, columns=["instruction"]).column("instruction").to_pylist()[:count]


def timed(run) -> tuple[float, object]:
    """(wall seconds of ``run()``, waiting for the GPU's queued work where there is one; what it returned)."""
    started = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def median_rates(runs: dict, repeat: int) -> dict:
    """tokens/s of each runner: the median of ``repeat`` timed calls, taken in turns (ABAB...) so that drift in the
    machine's speed falls on both alike; one warm-up call each first."""
    for run in runs.values():
        run()  # warm-up: allocations, first-call paths
    rates: dict = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            seconds, tokens = timed(run)
            rates[name].append((tokens / seconds, tokens))
    return {name: (statistics.median(r for r, _ in values), values[-1][1]) for name, values in rates.items()}


def ours_runner(generator, texts: list[str], new_tokens: int):
    from aquila_npu.generate import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=new_tokens, greedy=True)
    generator.tokenizer.eod = -1  # no end-of-sequence stop: exactly new_tokens per prompt, as for transformers

    def run() -> int:
        return sum(len(c.tokens) for c in generator.generate(texts, sampling))

    return run


def hf_runner(model, tokenizer, texts: list[str], new_tokens: int, bos: int, device: str):
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=0)
        return (out.shape[1] - width) * out.shape[0]

    return run


def decode_step_seconds(models: dict, runs: dict, repeat: int) -> dict:
    """Seconds per decode step of each key of ``runs`` (``key -> run``, generating with ``models[key]``): in each
    run, the median interval between the model's successive forward calls after the first (the prefill); over
    ``repeat`` rounds, the best. Every key is run in each round, in turns (every other round in reverse), so that a
    drift in the machine's speed falls on all cache lengths and both sides alike."""
    starts: list = []

    def stamp(*_unused):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the previous step's queued work belongs to the previous step
        starts.append(time.perf_counter())

    hooks = {id(model): model.register_forward_pre_hook(stamp) for model in models.values()}
    try:
        for run in runs.values():
            run()  # warm-up
        steps: dict = {key: [] for key in runs}
        order = list(runs.items())
        for _ in range(repeat):
            for key, run in order:
                starts.clear()
                run()
                intervals = [later - earlier for earlier, later in zip(starts[1:], starts[2:])]
                steps[key].append(statistics.median(intervals))
            # the next round in reverse, so that no key always follows the same one (a run can leave the caches
            # and the clock in a state that favours or hampers the next)
            order.reverse()
    finally:
        for hook in hooks.values():
            hook.remove()
    return {key: min(values) for key, values in steps.items()}


def decode_step_table(args, generator, hf, tokenizer, bos: int, name: str) -> list[tuple]:
    runs = {}
    lengths = [int(c) for c in args.cache_lengths.split(",")]
    for length in lengths:
        text = " ".join(["Aquila"] * 4 * length)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length - 1]
        text = tokenizer.decode(ids)
        assert len(generator.encode(text)) == length, "the prompt must tokenise back to the same length"
        runs[("ours", length)] = ours_runner(generator, [text], 40)
        runs[("hf", length)] = hf_runner(hf, tokenizer, [text], 40, bos, args.device)
    models = {key: generator.model if key[0] == "ours" else hf for key in runs}
    per_step = decode_step_seconds(models, runs, args.repeat)
    rows = []
    for length in lengths:
        ours, theirs = per_step[("ours", length)], per_step[("hf", length)]
        rows.append((name, length, ours, theirs))
        print(f"{name} cache {length}: ours {1e3 * ours:.2f} ms/step, transformers {1e3 * theirs:.2f} ms/step",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="aquila2-tiny,small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--decode-step", action="store_true",
                        help="time one decode step at each --cache-lengths instead of tokens/s")
    parser.add_argument("--cache-lengths", default="64,1024")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="ours with every fused kernel the device has (default: the device's defaults)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer, LlamaForCausalLM

    from aquila_npu import parity, plugin_manager
    from aquila_npu.generate import GenerateOptions, TextGenerator

    tokenizer_dir = str(sample("aquila2_tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    plugins = plugin_manager.get()
    family, tiny = plugins.find_model("aquila2-tiny")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    texts = prompts(max(batches))
    # --fused-kernels: every fused kernel the device has; otherwise the device's defaults
    kernels = {op: True for op in plugins.fused_kernels(plugins.select_device(args.device))} \
        if args.fused_kernels else None
    # positions each model needs: room for the longest cache and its 40 new tokens, or for the longest prompt
    # (BOS and its text, as both sides get it) and --new-tokens
    positions = (max(int(c) for c in args.cache_lengths.split(",")) + 64 if args.decode_step else
                 1 + max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts) + args.new_tokens)
    rows = []
    steps = []
    for name in args.models.split(","):
        spec = tiny if name == "aquila2-tiny" else tiny.replace(**SIZES[name])
        if positions > spec.max_position_embeddings:
            spec = spec.replace(seq_length=positions, max_position_embeddings=positions)
        folder = tempfile.mkdtemp(prefix="generate-bench-")
        parity.save_random_hf_model(spec, folder)
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        generator = TextGenerator(GenerateOptions(load=folder, load_model_type="hf", tokenizer_name_or_path=tokenizer_dir,
                                                  model=None, device=args.device, params_dtype=args.dtype,
                                                  max_batch_size=max(batches), kernels=kernels))
        params = sum(p.numel() for p in hf.parameters()) / 1e6
        # what each side's attention runs: transformers picks SDPA by default; ours, the device's kernels
        attention = (f"transformers attention: {hf.config._attn_implementation}; ours: "
                     f"{', '.join(sorted(generator.world.kernels.fused)) or 'the reference'} kernels")
        if args.decode_step:
            steps += decode_step_table(args, generator, hf, tokenizer, family.tokenizer.bos_token_id, spec.name)
            del hf, generator
            continue
        for batch in batches:
            rates = median_rates({"ours": ours_runner(generator, texts[:batch], args.new_tokens),
                                  "hf": hf_runner(hf, tokenizer, texts[:batch], args.new_tokens,
                                                  family.tokenizer.bos_token_id, args.device)}, args.repeat)
            (ours, n_ours), (theirs, n_hf) = rates["ours"], rates["hf"]
            assert n_ours == n_hf == batch * args.new_tokens, (n_ours, n_hf)
            rows.append((spec.name, f"{params:.0f}M", batch, ours, theirs, ours / theirs))
            print(f"{spec.name} batch {batch}: ours {ours:.1f} tokens/s, transformers {theirs:.1f} tokens/s, "
                  f"ratio {ours / theirs:.2f}", flush=True)
        del hf, generator
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    if args.decode_step:
        print(f"\n{device}, {args.dtype}, batch 1, one decode step (median of a run), best of {args.repeat}\n")
        print("| model | KV cache | ours ms/step | transformers ms/step |")
        print("|---|---|---|---|")
        for name, length, ours, theirs in steps:
            print(f"| {name} | {length} | {1e3 * ours:.2f} | {1e3 * theirs:.2f} |")
        by_model: dict = {}
        for name, length, ours, theirs in steps:
            by_model.setdefault(name, []).append((ours, theirs))
        for name, ((ours_a, hf_a), *_, (ours_b, hf_b)) in by_model.items():
            # the slope (ms more per step) is how fast a step grows; the ratio also depends on the base step
            print(f"{name}: growth from the shortest to the longest cache: ours +{1e3 * (ours_b - ours_a):.2f} ms "
                  f"({ours_b / ours_a:.2f}x), transformers +{1e3 * (hf_b - hf_a):.2f} ms ({hf_b / hf_a:.2f}x)")
        return
    print(f"\n{device}, {args.dtype}, greedy, {args.new_tokens} new tokens per prompt, median of {args.repeat}; "
          f"{attention}\n")
    print("| model | params | batch | aquila_npu.generate tokens/s | transformers generate tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, params, batch, ours, theirs, ratio in rows:
        print(f"| {name} | {params} | {batch} | {ours:.1f} | {theirs:.1f} | **{ratio:.2f}** |")


if __name__ == "__main__":
    main()
