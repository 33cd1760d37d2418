"""The CPU quickstart: the seed workflow end to end on the model family's tiny model, stage by stage (``STAGES``).

A random Hugging Face checkpoint of the family's tiny model, its tokenizer, the megatron-core model from our spec
(one process, then two tensor-parallel processes) against ``transformers``, weight conversion HF -> Megatron TP=2 ->
HF (bit-exact) with megatron-core loading the converted checkpoint, data preprocessing (Alpaca -> pretraining and
instruction datasets, read back with megatron-core's IndexedDataset), pretraining and instruction fine-tuning with
the megatron-core driver, the fine-tuned checkpoint converted back to Hugging Face (--verify), generation on
megatron-core's inference engine (greedy completions of the converted checkpoint against ``transformers``'
``generate``, and a chat turn of the fine-tuned model), and BoolQ evaluation of the converted checkpoint against
``transformers`` scored lm-evaluation-harness's way. The data comes from the installed sample data
(``aquila_npu.sample_data``), so it runs in any folder. Each stage announces itself when it starts; the long ones
show a progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aquila_npu.errors import AquilaNpuError

PARITY_TOLERANCE_HF = 1e-4  # megatron-core vs transformers, fp32
PARITY_TOLERANCE_TP = 1e-5  # TP=2 vs TP=1, fp32


@dataclass
class QuickstartOptions:
    workdir: str = "quickstart-out"
    tokenizer: str | None = None
    device: str | None = None
    skip_tp2: bool = False
    model: str | None = None  # default: the smoke-test model of the installed model family
    alpaca: str | None = None  # Alpaca parquet; default: the 300 records of the sample data
    stop_after: str | None = None  # a stage key (STAGE_KEYS): the stages up to it only


def _sample(*parts: str) -> str:
    """A file or folder of the installed sample data (``aquila_npu.sample_data``)."""
    from aquila_npu import sample_data

    path = str(sample_data.path(*parts))
    if not os.path.exists(path):
        raise AquilaNpuError(f"the sample data lacks {path} (a damaged install?); reinstall aquila-npu")
    return path


def _python(processes: int = 1) -> list[str]:
    """This interpreter, under torchrun (standalone, one node) when the step runs ``processes`` > 1 processes."""
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [sys.executable]


def _run_step(command: list[str], what: str, threads: int, progress: str | None = None,
              env: dict | None = None) -> str:
    """A stage's subprocess; its output, or an error with the last lines of it. ``progress``: a regular expression
    whose groups (done, total) the step prints as it goes; each match moves a progress bar (with its rate)."""
    import codecs
    import re

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})})
    pattern, bar = (re.compile(progress) if progress else None), None
    decoder, pending, output = codecs.getincrementaldecoder("utf-8")("replace"), "", []
    try:
        for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
            text = decoder.decode(chunk)
            output.append(text)
            if pattern is None:
                continue
            *lines, pending = re.split(r"[\r\n]", pending + text)  # tqdm redraws with \r
            for line in lines:
                match = pattern.search(line)
                if match:
                    bar = bar or _bar(what, int(match.group(2)))
                    bar.update(int(match.group(1)) - bar.n)
    finally:
        process.stdout.close()
        process.wait()
        if bar is not None:
            bar.close()
    output = "".join(output)
    if process.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise AquilaNpuError(f"{what} failed (exit {process.returncode}):\n{tail}")
    return output


def _bar(what: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"     {what}", leave=False, dynamic_ncols=True, mininterval=0.5)


TRAIN_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-decay-style", "cosine",
               "--lr-warmup-fraction", "0.1", "--split", "100,0,0", "--log-interval", "1", "--eval-iters", "0"]


def _train(model: str, tokenizer_dir: str, flags: list[str], device: str | None, what: str,
           output: list | None = None) -> list[float]:
    """The megatron-core driver in a process of its own; its losses by iteration (its output appended to
    ``output`` when given)."""
    import re

    command = [sys.executable, "-m", "aquila_npu.pretrain", "--model", model, "--tokenizer-name-or-path",
               tokenizer_dir, *TRAIN_FLAGS, *flags] + (["--device", device] if device else [])
    printed = _run_step(command, what, threads=2, progress=r"iteration\s+(\d+)/\s*(\d+)")
    if output is not None:
        output.append(printed)
    return [float(m.group(1)) for m in re.finditer(r"\| lm loss: ([0-9.E+-]+) \|", printed)]


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


def _boolq_stage(work: Path, mg_dir: str, hf_dir: str, tokenizer_dir: str, tp: int, spec,
                 device: str | None) -> tuple[bool, str]:
    """``python -m aquila_npu.evaluate boolq`` on the converted checkpoint vs ``transformers``, lm-eval's way."""
    from aquila_npu.parity import hf_loglikelihoods

    data, out = _sample("boolq", "dev_300.jsonl"), work / "boolq.json"
    command = ["-m", "aquila_npu.evaluate", "boolq", "--load", mg_dir, "--tokenizer-name-or-path", tokenizer_dir,
               "--tensor-model-parallel-size", str(tp), "--task-data-path", data, "--limit", str(BOOLQ_EXAMPLES),
               "--output", str(out)] + (["--device", device] if device else [])
    _run_step(_python(tp) + command, "evaluate", threads=1, progress=r"evaluating:.*?(\d+)/(\d+)")
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
    if option:
        folder = option
    elif family.tokenizer.sample_dir:
        folder = _sample(family.tokenizer.sample_dir)
    else:
        raise AquilaNpuError(f"the {family.name} model family bundles no sample tokenizer; pass --tokenizer DIR")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise AquilaNpuError(f"no tokenizer.json in {folder}; pass --tokenizer DIR")
    return folder


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


@dataclass
class _Run:
    """What the stages share: the choices, and what earlier stages made."""

    options: QuickstartOptions
    plugins: object
    device: str
    family: object
    spec: object
    work: Path
    tp: int  # the tensor-parallel size of the multi-process stages (1 with --skip-tp2)
    hf_dir: str = ""
    tokenizer_dir: str = ""
    tokens_file: str = ""
    tokens: object = None  # the sample texts' token ids
    reference: object = None  # transformers' logits
    tp1: object = None  # megatron-core's at TP=1
    mg_dir: str = ""  # the converted TP=2 checkpoint
    pretrained: str = ""
    finetuned: str = ""


def _model(run: _Run) -> tuple[bool, str]:
    from aquila_npu import parity

    run.hf_dir = str(run.work / "hf-random")
    parity.save_random_hf_model(run.spec, run.hf_dir)
    return True, f"random {run.spec.name} in Hugging Face layout at {run.hf_dir}"


def _tokenize(run: _Run) -> tuple[bool, str]:
    from aquila_npu import parity

    run.tokenizer_dir = _tokenizer_dir(run.options.tokenizer, run.family)
    tokens = parity.encode(run.tokenizer_dir)
    run.tokens_file = str(run.work / "tokens.json")
    with open(run.tokens_file, "w", encoding="utf-8") as f:
        json.dump(tokens.tolist(), f)
    run.tokens = tokens
    return True, f"{tokens.shape[0]} texts x {tokens.shape[1]} tokens with the {run.family.name} tokenizer"


def _transformers(run: _Run) -> tuple[bool, str]:
    from aquila_npu import parity

    run.reference = parity.hf_logits(run.hf_dir, run.tokens)
    return True, "reference logits from LlamaForCausalLM"


def _tp1(run: _Run) -> tuple[bool, str]:
    run.tp1 = _megatron_logits(run.hf_dir, run.tokens_file, str(run.work / "logits-tp1.safetensors"), 1,
                               run.options.device)
    diff = (run.tp1 - run.reference).abs().max().item()
    return diff <= PARITY_TOLERANCE_HF, (f"max |logit diff| vs transformers {diff:.2e} "
                                         f"(tolerance {PARITY_TOLERANCE_HF:g})")


def _fused(run: _Run) -> tuple[bool, str]:
    from aquila_npu.kernels import seams as kernels

    offered = [op for op in kernels.OPS if op in run.plugins.fused_kernels(run.device)]
    fused = _megatron_logits(run.hf_dir, run.tokens_file, str(run.work / "logits-fused.safetensors"), 1,
                             run.options.device, flags=tuple(kernels.FLAGS[op] for op in offered))
    diff = (fused - run.reference).abs().max().item()
    return diff <= PARITY_TOLERANCE_HF, (f"every fused kernel the {run.device} device has "
                                         f"({', '.join(offered) or 'none'}): max |logit diff| vs transformers "
                                         f"{diff:.2e}")


def _tp2(run: _Run) -> tuple[bool, str]:
    tp2 = _megatron_logits(run.hf_dir, run.tokens_file, str(run.work / "logits-tp2.safetensors"), 2,
                           run.options.device)
    diff = (tp2 - run.tp1).abs().max().item()
    return diff <= PARITY_TOLERANCE_TP, (f"2 processes; max |logit diff| vs TP=1 {diff:.2e} "
                                         f"(tolerance {PARITY_TOLERANCE_TP:g})")


def _convert(run: _Run) -> tuple[bool, str]:
    from aquila_npu.convert import ConvertOptions, convert

    run.mg_dir, back_dir = str(run.work / "megatron-tp2"), str(run.work / "hf-from-megatron")
    convert(ConvertOptions(load_dir=run.hf_dir, save_dir=run.mg_dir, target_tensor_parallel_size=2, overwrite=True,
                           progress=False))
    result = convert(ConvertOptions(load_dir=run.mg_dir, save_dir=back_dir, load_model_type="mg", save_model_type="hf",
                                    overwrite=True, progress=False, verify=True))
    ok = _same_tensors(run.hf_dir, back_dir)
    return ok, (f"HF -> Megatron TP=2 ({run.mg_dir}) -> HF: {'bit-exact' if ok else 'DIFFERENT'}; --verify max |logit "
                f"diff| {result.max_logit_diff:.2e}")


def _load_tp2(run: _Run) -> tuple[bool, str]:
    loaded = _megatron_logits(run.mg_dir, run.tokens_file, str(run.work / "logits-loaded-tp2.safetensors"), 2,
                              run.options.device, source="--megatron-dir")
    diff = (loaded - run.reference).abs().max().item()
    return diff <= PARITY_TOLERANCE_HF, (f"megatron-core loads the converted checkpoint; max |logit diff| vs "
                                         f"transformers {diff:.2e}")


def _preprocess(run: _Run) -> tuple[bool, str]:
    alpaca = run.options.alpaca or _sample("alpaca", "alpaca_300.parquet")  # preprocess checks a given one
    return _preprocess_stage(run.work, run.tokenizer_dir, alpaca)


def _pretrain(run: _Run) -> tuple[bool, str]:
    run.pretrained = str(run.work / "checkpoints" / "pretrain")
    losses = _train(run.spec.name, run.tokenizer_dir, ["--data-path", str(run.work / "data" / "alpaca_text_document"),
                                                       "--seq-length", "64", "--train-iters", "20", "--save",
                                                       run.pretrained, "--save-interval", "20"],
                    run.options.device, "pretrain")
    ok, detail = _falls(losses)
    return ok, (f"megatron-core driver, 20 iterations on the Alpaca text: {detail}; torch_dist checkpoint at "
                f"{run.pretrained}")


def _finetune(run: _Run) -> tuple[bool, str]:
    run.finetuned = str(run.work / "checkpoints" / "finetune")
    losses = _train(run.spec.name, run.tokenizer_dir, ["--data-path", str(run.work / "data" / "alpaca"),
                                                       "--is-instruction-dataset", "--seq-length", "128",
                                                       "--train-iters", "20", "--load", run.pretrained, "--finetune",
                                                       "--save", run.finetuned], run.options.device, "finetune")
    ok, detail = _falls(losses)
    return ok, f"--finetune --is-instruction-dataset, 20 iterations, loss on response tokens only: {detail}"


def _chat_finetune(run: _Run) -> tuple[bool, str]:
    """Multi-turn conversations in the model's chat template -> packed instruction datasets (labels on the replies
    only, checked against the tokenizer), then fine-tuning on them from the pretrained checkpoint, one packed
    sequence a micro-batch, positions and attention reset at each conversation."""
    from transformers import AutoTokenizer

    from aquila_npu.preprocess import PreprocessOptions, preprocess
    from aquila_npu.preprocess.handlers import IGNORE_INDEX
    from aquila_npu.preprocess.writer import indexed_dataset_module

    template = run.family.chat_template(run.spec.name)
    prefix = str(run.work / "data" / "chat")
    data = preprocess(PreprocessOptions(input=str(_sample("conversations", "alpaca_chat_200.jsonl")),
                                        tokenizer=run.tokenizer_dir, output_prefix=prefix,
                                        handler="SharegptStyleInstructionHandler", prompt_type=template.name,
                                        seq_length=run.spec.seq_length, pack=True, progress=False))
    labels = indexed_dataset_module().IndexedDataset(data.outputs["labels"])
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    trained = tokenizer.decode([int(t) for t in labels[0] if t != IGNORE_INDEX])
    ok = trained.endswith(template.sep2) and template.user_role not in trained
    losses = _train(run.spec.name, run.tokenizer_dir, ["--data-path", prefix, "--is-instruction-dataset",
                                                       "--seq-length", str(run.spec.seq_length), "--train-iters",
                                                       "10", "--load", run.pretrained, "--finetune",
                                                       "--micro-batch-size", "1", "--reset-position-ids",
                                                       "--reset-attention-mask"],
                    run.options.device, "chat fine-tune")
    falls, detail = _falls(losses)
    return ok and falls, (f"{data.packed} conversations ({data.too_long} longer than {run.spec.seq_length} tokens "
                          f"dropped) in the {template.name} template, packed into {data.samples} sequences, loss on "
                          f"the replies only{'' if ok else ' (labels WRONG)'}; 10 iterations: {detail}")


def _lora_finetune(run: _Run) -> tuple[bool, str]:
    """LoRA adapters (r=8, all four targets) fine-tuned from the pretrained checkpoint, its weights frozen, on the
    same four Alpaca records every step (a tiny random model's adapters move its loss too little to see over
    changing batches); the adapter-only save exported merged into a Hugging Face model and, with peft installed, as
    a PEFT adapter folder that peft applies to the base: the same logits."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from aquila_npu.convert import ConvertOptions, convert

    printed: list[str] = []
    adapters = run.work / "lora"
    losses = _train(run.spec.name, run.tokenizer_dir, ["--data-path", str(run.work / "data" / "alpaca"),
                                                       "--is-instruction-dataset", "--seq-length", "128",
                                                       "--train-iters", "10", "--load", run.pretrained,
                                                       "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2",
                                                       "--split", "4,296,0", "--save", str(adapters)],
                    run.options.device, "LoRA fine-tune", printed)
    counts = re.search(r"LoRA r=8 .*?: ([0-9,]+) trainable parameters, ([0-9,]+) frozen", printed[0])
    falls, detail = _falls(losses)
    trainable = f"{counts.group(1)} trainable parameters, {counts.group(2)} frozen" if counts else "no LoRA line"
    size = sum(f.stat().st_size for f in adapters.rglob("*") if f.is_file())
    exports = {}
    for kind, base in (("hf", run.pretrained), ("base", run.pretrained), ("peft", None)):
        if kind == "peft":
            try:
                import peft
            except ImportError:
                break
            base = exports["base"]
        exports[kind] = str(run.work / f"lora-{kind}")
        convert(ConvertOptions(load_dir=base, save_dir=exports[kind], load_model_type="hf" if kind == "peft" else "mg",
                               save_model_type="hf" if kind == "base" else kind, overwrite=True, progress=False,
                               lora_load=None if kind == "base" else str(adapters)))
    tokens = torch.arange(3, 35)[None]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(exports["hf"], dtype=torch.float32)(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(exports["base"], dtype=torch.float32)
        moved = (merged - base(tokens).logits).abs().max().item()
        agree = True
        export = f"merged HF export moves the base's logits by {moved:.2e}"
        if "peft" in exports:
            difference = (peft.PeftModel.from_pretrained(base, exports["peft"])(tokens).logits - merged).abs().max()
            agree = difference.item() <= 1e-4
            export += f"; PEFT export on the base = merged (max |diff| {difference.item():.1e})"
    return falls and counts is not None and agree and moved > 0, (
        f"r=8 on linear_qkv/proj/fc1/fc2 ({trainable}), 10 iterations on the same 4 records: {detail}; adapter "
        f"checkpoint {size / 2**20:.1f} MiB; {export}")


def _convert_trained(run: _Run) -> tuple[bool, str]:
    from aquila_npu.convert import ConvertOptions, convert

    trained_hf = str(run.work / "hf-finetuned")
    result = convert(ConvertOptions(load_dir=run.finetuned, save_dir=trained_hf, load_model_type="mg",
                                    save_model_type="hf", overwrite=True, progress=False, verify=True))
    return True, (f"the fine-tuned checkpoint -> Hugging Face at {trained_hf}; --verify max |logit diff| "
                  f"{result.max_logit_diff:.2e}")


def _generate(run: _Run) -> tuple[bool, str]:
    return _generate_stage(run.work, run.mg_dir, run.hf_dir, run.tokenizer_dir, run.tp, run.family,
                           run.options.device)


def _chat(run: _Run) -> tuple[bool, str]:
    return _chat_stage(run.work, run.finetuned, run.tokenizer_dir, run.family, run.spec, run.options.device)


def _evaluate(run: _Run) -> tuple[bool, str]:
    return _boolq_stage(run.work, run.mg_dir, run.hf_dir, run.tokenizer_dir, run.tp, run.spec, run.options.device)


LM_EVAL_EXAMPLES = 20


def _lm_eval(run: _Run) -> tuple[bool, str]:
    """lm-evaluation-harness (its CLI, a local task YAML, offline) with the ``aquila-npu`` model on the converted
    checkpoint at the run's TP: the same log-likelihoods as the evaluate stage's, which were checked against
    transformers."""
    import glob
    import importlib.util

    from aquila_npu.lm_eval.local_tasks import write_boolq_task

    if importlib.util.find_spec("lm_eval") is None:
        return True, "skipped: lm-evaluation-harness is not installed (pip install 'aquila-npu[lm-eval]')"
    folder = run.work / "lm_eval_tasks"
    folder.mkdir(exist_ok=True)
    with open(_sample("boolq", "dev_300.jsonl"), encoding="utf-8") as f:
        lines = [line for line, _ in zip(f, range(LM_EVAL_EXAMPLES))]
    (folder / "boolq.jsonl").write_text("".join(lines), encoding="utf-8")
    write_boolq_task(folder, folder / "boolq.jsonl")
    out = run.work / "lm_eval_out"
    model_args = f"load={run.mg_dir},tokenizer={run.tokenizer_dir},tensor_model_parallel_size={run.tp}"
    if run.options.device:
        model_args += f",device={run.options.device}"
    _run_step(_python(run.tp) + ["-m", "aquila_npu.lm_eval", "--model", "aquila-npu", "--model_args", model_args,
                                 "--tasks", "boolq_local", "--include_path", str(folder), "--output_path", str(out),
                                 "--log_samples"], "lm-eval", threads=1,
              env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    [samples] = glob.glob(str(out / "**" / "samples_boolq_local_*.jsonl"), recursive=True)
    with open(samples, encoding="utf-8") as f:
        theirs = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    ours = json.loads((run.work / "boolq.json").read_text(encoding="utf-8"))["examples"][:LM_EVAL_EXAMPLES]
    diff = max(abs(float(s["resps"][c][0][0]) - e["scores"][name]) for s, e in zip(theirs, ours)
               for c, name in enumerate(("no", "yes")))
    ok = len(theirs) == LM_EVAL_EXAMPLES and diff <= 1e-5
    return ok, (f"lm_eval's CLI, model aquila-npu at TP={run.tp}, a local BoolQ task YAML, offline: {len(theirs)} "
                f"questions, max |log-likelihood diff| vs the evaluate stage {diff:.1e}")


# (key for --stop-after, the name the report shows, what it does, the stage; "tp2" stages: not with --skip-tp2)
STAGES = (
    ("model", "model", "a random checkpoint of the tiny model, Hugging Face layout", _model),
    ("tokenize", "tokenize", "sample texts through the model family's tokenizer", _tokenize),
    ("transformers", "transformers", "reference logits from Hugging Face", _transformers),
    ("tp1", "megatron-core TP=1", "the model built from our spec by megatron-core, one process", _tp1),
    ("fused", "fused kernels", "the same with the device's fused kernels", _fused),
    ("tp2", "megatron-core TP=2", "split over two processes", _tp2),
    ("convert", "convert", "HF -> Megatron TP=2 -> HF", _convert),
    ("load-tp2", "load converted TP=2", "megatron-core loads the converted checkpoint in two processes", _load_tp2),
    ("preprocess", "preprocess", "Alpaca records -> pretraining and instruction datasets", _preprocess),
    ("pretrain", "pretrain", "20 iterations of the megatron-core driver", _pretrain),
    ("finetune", "finetune", "20 iterations of instruction fine-tuning from the pretrained checkpoint", _finetune),
    ("chat-finetune", "chat fine-tune", ("multi-turn conversations in the chat template, packed, fine-tuned on "
                                         "the replies"),
     _chat_finetune),
    ("lora-finetune", "LoRA fine-tune", "low-rank adapters trained on the instruction data, the base frozen",
     _lora_finetune),
    ("convert-trained", "convert trained", "the fine-tuned checkpoint -> Hugging Face", _convert_trained),
    ("generate", "generate", "greedy generation on the converted checkpoint vs transformers", _generate),
    ("chat", "chat", "a conversation turn of the fine-tuned model", _chat),
    ("evaluate", "evaluate", "BoolQ on the converted checkpoint vs transformers", _evaluate),
    ("lm-eval", "lm-eval", "lm-evaluation-harness with the aquila-npu model on the same checkpoint", _lm_eval),
)
TWO_PROCESS_STAGES = ("tp2", "load-tp2")
STAGE_KEYS = tuple(key for key, *_ in STAGES)


def run(options: QuickstartOptions) -> int:
    from aquila_npu import known_warnings, plugin_manager

    if options.stop_after and options.stop_after not in STAGE_KEYS:
        raise AquilaNpuError(f"--stop-after {options.stop_after}: choose one of {', '.join(STAGE_KEYS)}")
    known_warnings.silence()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a tiny model's loading and saving bars, in between our lines
    plugins = plugin_manager.get()
    device = plugins.select_device(options.device)
    family, spec = plugins.find_model(options.model or _default_model(plugins))
    work = Path(options.workdir)
    work.mkdir(parents=True, exist_ok=True)
    state = _Run(options, plugins, device, family, spec, work, tp=1 if options.skip_tp2 else 2)
    rows: list[dict] = []
    print(f"aquila-npu quickstart: {spec.name} on {device} ({plugins.backend(device)}), work folder {work}", flush=True)
    for key, name, what, body in STAGES:
        if options.skip_tp2 and key in TWO_PROCESS_STAGES:
            continue
        print(f"[..] {name}: {what}", flush=True)
        started = time.perf_counter()
        ok, detail = body(state)
        rows.append({"stage": name, "result": "ok" if ok else "FAIL",
                     "seconds": f"{time.perf_counter() - started:.1f}", "detail": detail})
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        if key == options.stop_after:
            break
    from aquila_npu.__main__ import _table

    failed = any(row["result"] != "ok" for row in rows)
    print("\n" + _table(rows, ["stage", "result", "seconds", "detail"]))
    print("\nquickstart " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0
