"""The CPU quickstart: the seed workflow end to end on the model family's tiny model, stage by stage.

Stages so far: a random Hugging Face checkpoint of the family's tiny model, its tokenizer, the megatron-core model
from our spec (one process, then two tensor-parallel processes) against ``transformers``, weight conversion
HF -> Megatron TP=2 -> HF (bit-exact) with megatron-core loading the converted checkpoint, and data preprocessing
(Alpaca -> pretraining and instruction datasets, read back with megatron-core's IndexedDataset), pretraining and
instruction fine-tuning with the megatron-core driver, and the fine-tuned checkpoint converted back to Hugging Face
(--verify), then generation on megatron-core's inference engine (greedy completions of the converted checkpoint
against ``transformers``' ``generate``, and a chat turn of the fine-tuned model), and BoolQ evaluation of the
converted checkpoint against ``transformers`` scored lm-evaluation-harness's way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aquila_npu.errors import AquilaNpuError

# sample data: the repository's examples/data (source checkout or current folder), then the shared data set
DATA_ROOTS = (Path(__file__).resolve().parent.parent / "examples" / "data", Path("examples") / "data",
              Path("..") / "shared" / "data")
PARITY_TOLERANCE_HF = 1e-4  # megatron-core vs transformers, fp32
PARITY_TOLERANCE_TP = 1e-5  # TP=2 vs TP=1, fp32


@dataclass
class QuickstartOptions:
    workdir: str = "quickstart-out"
    tokenizer: str | None = None
    device: str | None = None
    skip_tp2: bool = False
    model: str | None = None  # default: the smoke-test model of the installed model family
    alpaca: str | None = None  # Alpaca parquet; default: the shared 5,000 records, else the bundled 300


def _alpaca_parquet(option: str | None) -> str:
    candidates = [option] if option else [str(root / "alpaca" / name) for name in ("alpaca_5000.parquet",
                                                                                   "alpaca_300.parquet")
                                          for root in reversed(DATA_ROOTS)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise AquilaNpuError(f"no Alpaca parquet at {' or '.join(candidates)}; pass --alpaca FILE")


def _python(processes: int = 1) -> list[str]:
    """This interpreter, under torchrun (standalone, one node) when the step runs ``processes`` > 1 processes."""
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [sys.executable]


def _run_step(command: list[str], what: str, threads: int) -> str:
    """A stage's subprocess; its output, or an error with the last lines of it."""
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    output = result.stdout + result.stderr
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise AquilaNpuError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return output


TRAIN_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-decay-style", "cosine",
               "--lr-warmup-fraction", "0.1", "--split", "100,0,0", "--log-interval", "1", "--eval-iters", "0"]


def _train(model: str, tokenizer_dir: str, flags: list[str], device: str | None) -> list[float]:
    """The megatron-core driver in a process of its own; its losses by iteration."""
    import re

    command = [sys.executable, "-m", "aquila_npu.pretrain", "--model", model, "--tokenizer-name-or-path",
               tokenizer_dir, *TRAIN_FLAGS, *flags] + (["--device", device] if device else [])
    output = _run_step(command, "training", threads=2)
    return [float(m.group(1)) for m in re.finditer(r"\| lm loss: ([0-9.E+-]+) \|", output)]


def _falls(losses: list[float]) -> tuple[bool, str]:
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return tail < head, f"loss {head:.2f} -> {tail:.2f} (first / last 3 iterations)"


def _preprocess_stage(work: Path, tokenizer_dir: str, alpaca: str) -> tuple[bool, str]:
    """Both datasets of the seed's data step, read back with megatron-core and checked against the tokenizer."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from aquila_npu.preprocess import PreprocessOptions, preprocess
    from aquila_npu.preprocess.handlers import IGNORE_INDEX, render_alpaca
    from aquila_npu.preprocess.writer import indexed_dataset_module

    prefix = str(work / "data" / "alpaca")
    common = dict(input=alpaca, tokenizer=tokenizer_dir, output_prefix=prefix, workers=2, progress=False)
    pretrain = preprocess(PreprocessOptions(**common))
    instruction = preprocess(PreprocessOptions(**common, handler="GeneralInstructionHandler", append_eod=True))
    IndexedDataset = indexed_dataset_module().IndexedDataset
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = pq.read_table(alpaca, columns=["instruction", "input", "output", "text"]).to_pylist()
    texts = IndexedDataset(pretrain.outputs["text"])
    labels = IndexedDataset(instruction.outputs["labels"])
    expected_texts = tokenizer([r["text"] for r in records])["input_ids"]
    prompts = tokenizer([render_alpaca(r["instruction"], r["input"]) for r in records])["input_ids"]
    ok = len(texts) == len(labels) == len(records) and all(
        texts[i].tolist() == expected_texts[i] and int(np.sum(labels[i] == IGNORE_INDEX)) == len(prompts[i])
        and labels[i][len(prompts[i])] != IGNORE_INDEX for i in range(len(records)))
    return ok, (f"{len(records)} Alpaca records -> {os.path.basename(pretrain.outputs['text'])} "
                f"({pretrain.tokens['text']:,} tokens) and the 3 instruction datasets (labels -100 over the "
                f"prompt); {'equal to the tokenizer' if ok else 'DIFFERENT from the tokenizer'}")


GENERATE_PROMPTS = ("Aquila2 is a family of bilingual language models", "北京的十大景点是什么？",
                    "Write a tongue twister that's extremely difficult to pronounce.")


def _generate_stage(work: Path, mg_dir: str, hf_dir: str, tokenizer_dir: str, tp: int, family,
                    device: str | None) -> tuple[bool, str]:
    """``python -m aquila_npu.generate`` on the converted checkpoint vs ``transformers``' greedy generate."""
    from aquila_npu.inference import InferenceTokenizer
    from aquila_npu.parity import hf_greedy

    prompts, out, new_tokens = work / "prompts.txt", work / "generated.jsonl", 16
    prompts.write_text("\n".join(GENERATE_PROMPTS) + "\n", encoding="utf-8")
    command = ["-m", "aquila_npu.generate", "--load", mg_dir, "--tokenizer-name-or-path", tokenizer_dir,
               "--tensor-model-parallel-size", str(tp), "--prompt-file", str(prompts), "--greedy",
               "--max-new-tokens", str(new_tokens), "--output", str(out)] + (["--device", device] if device else [])
    output = _run_step(_python(tp) + command, "generate", threads=1)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    tokenizer = InferenceTokenizer(tokenizer_dir, family.tokenizer)
    ids = [[tokenizer.bos] * tokenizer.add_bos + tokenizer.tokenize(p) for p in GENERATE_PROMPTS]
    expected = hf_greedy(hf_dir, ids, new_tokens, tokenizer.eod)
    same = sum(r["tokens"] == e for r, e in zip(records, expected))
    rate = next((line.strip("[]") for line in output.splitlines() if "tokens/s" in line), "")
    return same == len(expected), (f"greedy, TP={tp}, {len(expected)} prompts of different lengths in one batch: "
                                   f"{same}/{len(expected)} token for token equal to transformers' generate; {rate}")


def _chat_stage(work: Path, checkpoint: str, tokenizer_dir: str, family, spec, device: str | None) -> tuple[bool, str]:
    conversation = work / "chat.jsonl"
    messages = [{"role": "user", "content": "Give three tips for staying healthy."}]
    conversation.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = work / "chat-replies.jsonl"
    command = [sys.executable, "-m", "aquila_npu.generate", "--load", checkpoint, "--tokenizer-name-or-path",
               tokenizer_dir, "--chat", "--prompt-file", str(conversation), "--max-new-tokens", "24", "--output",
               str(out)] + (["--device", device] if device else [])
    _run_step(command, "chat", threads=2)
    record = json.loads(out.read_text(encoding="utf-8"))
    template = family.chat_template(spec.name)
    ok = record["prompt"] == template.render(messages) and bool(record["tokens"])
    return ok, (f"the fine-tuned checkpoint answers through the {template.name} template "
                f"({len(record['tokens'])} tokens sampled; a tiny random model's words, not sense)")


BOOLQ_EXAMPLES = 50


def _boolq_file() -> str:
    candidates = [root / "boolq" / name for root in reversed(DATA_ROOTS) for name in ("dev.jsonl", "dev_300.jsonl")]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise AquilaNpuError(f"no BoolQ dev file at {' or '.join(map(str, candidates))}")


def _boolq_stage(work: Path, mg_dir: str, hf_dir: str, tokenizer_dir: str, tp: int, spec,
                 device: str | None) -> tuple[bool, str]:
    """``python -m aquila_npu.evaluate boolq`` on the converted checkpoint vs ``transformers``, lm-eval's way."""
    from aquila_npu.parity import hf_loglikelihoods

    data, out = _boolq_file(), work / "boolq.json"
    command = ["-m", "aquila_npu.evaluate", "boolq", "--load", mg_dir, "--tokenizer-name-or-path", tokenizer_dir,
               "--tensor-model-parallel-size", str(tp), "--task-data-path", data, "--limit", str(BOOLQ_EXAMPLES),
               "--output", str(out), "--no-progress"] + (["--device", device] if device else [])
    _run_step(_python(tp) + command, "evaluate", threads=1)
    result = json.loads(out.read_text(encoding="utf-8"))
    with open(data, encoding="utf-8") as f:
        docs = [json.loads(line) for line, _ in zip(f, range(BOOLQ_EXAMPLES))]
    contexts = [f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:" for d in docs]
    expected = hf_loglikelihoods(hf_dir, tokenizer_dir, contexts, (" no", " yes"), spec.max_position_embeddings)
    diff = max(abs(e["scores"][c] - v) for e, row in zip(result["examples"], expected) for c, v in zip(("no", "yes"), row))
    same = all(e["prediction"] == int(row[1] > row[0]) for e, row in zip(result["examples"], expected))
    ok = same and diff <= PARITY_TOLERANCE_HF
    return ok, (f"TP={tp}, {result['n']} BoolQ dev questions: accuracy {result['accuracy']:.3f} (a random model); "
                f"max |log-likelihood diff| vs transformers {diff:.1e}, predictions "
                f"{'identical' if same else 'DIFFERENT'}; {result['examples_per_second']:.1f} examples/s")


def _tokenizer_dir(option: str | None, family) -> str:
    sample = family.tokenizer.sample_dir
    candidates = [option] if option else [str(root / sample) for root in DATA_ROOTS if sample]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            return candidate
    raise AquilaNpuError(f"no tokenizer.json in {' or '.join(candidates) or 'the sample data'}; pass --tokenizer DIR")


def _same_tensors(a: str, b: str) -> bool:
    from aquila_npu.convert.hf_format import load_state

    x, y = load_state(a), load_state(b)
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def _megatron_logits(model_dir: str, tokens_file: str, out: str, tp: int, device: str | None,
                     source: str = "--hf-dir", flags: tuple[str, ...] = ()):
    from safetensors.torch import load_file

    command = ["-m", "aquila_npu.parity", source, model_dir, "--tokens", tokens_file, "--out", out, *flags]
    if device:
        command += ["--device", device]
    _run_step(_python(tp) + command, f"megatron-core at TP={tp}", threads=1)
    return load_file(out)["logits"]


def _default_model(plugins) -> str:
    models = [f.smoke_test_model for f in plugins.families().values() if f.smoke_test_model]
    if len(models) != 1:
        raise AquilaNpuError(f"choose the quickstart model with --model (candidates: {', '.join(models) or 'none'})")
    return models[0]


def run(options: QuickstartOptions) -> int:
    from aquila_npu import kernels, parity, plugin_manager

    plugins = plugin_manager.get()
    device = plugins.select_device(options.device)
    family, spec = plugins.find_model(options.model or _default_model(plugins))
    work = Path(options.workdir)
    work.mkdir(parents=True, exist_ok=True)
    stages: list[dict] = []
    failed = False

    def stage(name: str, detail: str, started: float, ok: bool = True) -> None:
        nonlocal failed
        failed |= not ok
        stages.append({"stage": name, "result": "ok" if ok else "FAIL", "seconds": f"{time.perf_counter() - started:.1f}",
                       "detail": detail})
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    print(f"aquila-npu quickstart: {spec.name} on {device} ({plugins.backend(device)}), work folder {work}", flush=True)

    t = time.perf_counter()
    hf_dir = str(work / "hf-random")
    parity.save_random_hf_model(spec, hf_dir)
    stage("model", f"random {spec.name} in Hugging Face layout at {hf_dir}", t)

    t = time.perf_counter()
    tokenizer_dir = _tokenizer_dir(options.tokenizer, family)
    tokens = parity.encode(tokenizer_dir)
    tokens_file = str(work / "tokens.json")
    with open(tokens_file, "w", encoding="utf-8") as f:
        json.dump(tokens.tolist(), f)
    stage("tokenize", f"{tokens.shape[0]} texts x {tokens.shape[1]} tokens with the {family.name} tokenizer", t)

    t = time.perf_counter()
    reference = parity.hf_logits(hf_dir, tokens)
    stage("transformers", "reference logits from LlamaForCausalLM", t)

    t = time.perf_counter()
    tp1 = _megatron_logits(hf_dir, tokens_file, str(work / "logits-tp1.safetensors"), 1, options.device)
    diff = (tp1 - reference).abs().max().item()
    ok = diff <= PARITY_TOLERANCE_HF
    stage("megatron-core TP=1", f"max |logit diff| vs transformers {diff:.2e} (tolerance {PARITY_TOLERANCE_HF:g})",
          t, ok)

    t = time.perf_counter()
    offered = [op for op in kernels.OPS if op in plugins.fused_kernels(device)]
    fused = _megatron_logits(hf_dir, tokens_file, str(work / "logits-fused.safetensors"), 1, options.device,
                             flags=tuple(kernels.FLAGS[op] for op in offered))
    diff = (fused - reference).abs().max().item()
    ok = diff <= PARITY_TOLERANCE_HF
    stage("fused kernels", f"every fused kernel the {device} device has ({', '.join(offered) or 'none'}): max |logit "
                           f"diff| vs transformers {diff:.2e}", t, ok)

    if not options.skip_tp2:
        t = time.perf_counter()
        tp2 = _megatron_logits(hf_dir, tokens_file, str(work / "logits-tp2.safetensors"), 2, options.device)
        diff = (tp2 - tp1).abs().max().item()
        ok = diff <= PARITY_TOLERANCE_TP
        stage("megatron-core TP=2", f"2 processes; max |logit diff| vs TP=1 {diff:.2e} "
                                    f"(tolerance {PARITY_TOLERANCE_TP:g})", t, ok)

    t = time.perf_counter()
    from aquila_npu.convert import ConvertOptions, convert

    mg_dir, back_dir = str(work / "megatron-tp2"), str(work / "hf-from-megatron")
    convert(ConvertOptions(load_dir=hf_dir, save_dir=mg_dir, target_tensor_parallel_size=2, overwrite=True,
                           progress=False))
    result = convert(ConvertOptions(load_dir=mg_dir, save_dir=back_dir, load_model_type="mg", save_model_type="hf",
                                    overwrite=True, progress=False, verify=True))
    ok = _same_tensors(hf_dir, back_dir)
    stage("convert", f"HF -> Megatron TP=2 ({mg_dir}) -> HF: {'bit-exact' if ok else 'DIFFERENT'}; --verify "
                     f"max |logit diff| {result.max_logit_diff:.2e}", t, ok)

    if not options.skip_tp2:
        t = time.perf_counter()
        loaded = _megatron_logits(mg_dir, tokens_file, str(work / "logits-loaded-tp2.safetensors"), 2,
                                  options.device, source="--megatron-dir")
        diff = (loaded - reference).abs().max().item()
        ok = diff <= PARITY_TOLERANCE_HF
        stage("load converted TP=2", f"megatron-core loads the converted checkpoint; max |logit diff| vs "
                                     f"transformers {diff:.2e}", t, ok)

    t = time.perf_counter()
    ok, detail = _preprocess_stage(work, tokenizer_dir, _alpaca_parquet(options.alpaca))
    stage("preprocess", detail, t, ok)

    t = time.perf_counter()
    pretrained = str(work / "checkpoints" / "pretrain")
    losses = _train(spec.name, tokenizer_dir, ["--data-path", str(work / "data" / "alpaca_text_document"),
                                                  "--seq-length", "64", "--train-iters", "20", "--save", pretrained,
                                                  "--save-interval", "20"],
                       options.device)
    ok, detail = _falls(losses)
    stage("pretrain", f"megatron-core driver, 20 iterations on the Alpaca text: {detail}; torch_dist checkpoint at "
                      f"{pretrained}", t, ok)

    t = time.perf_counter()
    finetuned = str(work / "checkpoints" / "finetune")
    losses = _train(spec.name, tokenizer_dir, ["--data-path", str(work / "data" / "alpaca"),
                                                  "--is-instruction-dataset", "--seq-length", "128",
                                                  "--train-iters", "20", "--load", pretrained, "--finetune",
                                                  "--save", finetuned], options.device)
    ok, detail = _falls(losses)
    stage("finetune", f"--finetune --is-instruction-dataset, 20 iterations, loss on response tokens only: {detail}",
          t, ok)

    t = time.perf_counter()
    trained_hf = str(work / "hf-finetuned")
    result = convert(ConvertOptions(load_dir=finetuned, save_dir=trained_hf, load_model_type="mg",
                                    save_model_type="hf", overwrite=True, progress=False, verify=True))
    stage("convert trained", f"the fine-tuned checkpoint -> Hugging Face at {trained_hf}; --verify max |logit "
                             f"diff| {result.max_logit_diff:.2e}", t)

    t = time.perf_counter()
    ok, detail = _generate_stage(work, mg_dir, hf_dir, tokenizer_dir, 1 if options.skip_tp2 else 2, family,
                                 options.device)
    stage("generate", detail, t, ok)

    t = time.perf_counter()
    ok, detail = _chat_stage(work, finetuned, tokenizer_dir, family, spec, options.device)
    stage("chat", detail, t, ok)

    t = time.perf_counter()
    ok, detail = _boolq_stage(work, mg_dir, hf_dir, tokenizer_dir, 1 if options.skip_tp2 else 2, spec,
                              options.device)
    stage("evaluate", detail, t, ok)

    from aquila_npu.__main__ import _table

    print("\n" + _table(stages, ["stage", "result", "seconds", "detail"]))
    print("\nquickstart " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0
