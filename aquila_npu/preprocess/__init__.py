"""Data preprocessing: parquet / JSON records -> Megatron indexed datasets, for pretraining and instruction tuning.

``preprocess(PreprocessOptions(...))`` is the whole pipeline; ``python -m aquila_npu.preprocess`` is its command
line with the seed guide's flags. The main thread reads records in batches and checks them, ``--workers`` threads
tokenise the batches with the fast (Rust) tokenizer, and the main thread writes the results in input order, so the
output is the same bytes whatever the number of workers.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from aquila_npu.errors import AquilaNpuError, first_line, reported_os_errors
from aquila_npu.preprocess.handlers import HANDLERS, EncodedBatch, InstructionHandler, PretrainHandler
from aquila_npu.preprocess.sources import as_text, input_files, read_batches

TOKENIZER_TYPES = ("PretrainedFromHF", "HuggingFaceTokenizer")


@dataclass
class PreprocessOptions:
    input: str
    tokenizer: str
    output_prefix: str
    handler: str = "GeneralPretrainHandler"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    seq_length: int | None = None
    workers: int = 1
    batch_size: int = 1000
    skip_bad_records: bool = False
    tokenizer_type: str = "PretrainedFromHF"
    log_interval: int = 1000
    progress: bool = True
    prompt_type: str | None = None  # conversations: the chat template's name (--prompt-type)
    map_keys: str | None = None     # conversations: --map-keys (JSON)
    pack: bool = False              # instruction data: --pack (aquila_npu.preprocess.packing)


@dataclass
class PreprocessResult:
    outputs: dict[str, str]                               # dataset key -> path prefix of its .bin/.idx
    dtypes: dict[str, str]
    tokens: dict[str, int] = field(default_factory=dict)  # per dataset
    documents: int = 0                                    # records read
    samples: int = 0                                      # samples written (per dataset): sequences with --pack
    packed: int = 0                                       # --pack: the samples packed into them
    bad: int = 0
    empty: int = 0
    too_long: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        main = next(iter(self.tokens))
        names = ", ".join(os.path.basename(p) for p in self.outputs.values())
        rate = self.documents / max(self.seconds, 1e-9)
        samples = f"{self.samples:,} samples"
        if self.packed:
            samples = f"{self.packed:,} samples packed into {self.samples:,} sequences"
        return (f"{self.documents:,} documents -> {samples}, {self.tokens[main]:,} tokens ({names}; "
                f"{'/'.join(sorted(set(self.dtypes.values())))}); skipped {self.bad} bad, {self.empty} empty, "
                f"{self.too_long} too long; {self.seconds:.1f} s ({rate:,.0f} docs/s, "
                f"{self.tokens[main] / max(self.seconds, 1e-9):,.0f} tokens/s)")


def load_tokenizer(path: str, tokenizer_type: str = "PretrainedFromHF"):
    """A fast Hugging Face tokenizer from a folder (or its tokenizer.json), never with remote code."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise AquilaNpuError(f"--tokenizer-type {tokenizer_type}: not supported; use {' or '.join(TOKENIZER_TYPES)}")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise AquilaNpuError(f"--tokenizer-name-or-path {path}: no tokenizer.json there; give the folder of the "
                             f"model's tokenizer files")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable tokenizer files
        if "trust_remote_code" in str(exc):
            raise AquilaNpuError(f"--tokenizer-name-or-path {path}: its tokenizer_config.json asks for custom code "
                                 f"(auto_map / tokenizer_class), which is never run; point it at a standard "
                                 f"tokenizer class (Aquila2's is GPT2Tokenizer over tokenizer.json)") from None
        raise AquilaNpuError(f"--tokenizer-name-or-path {path}: cannot load the tokenizer "
                             f"({type(exc).__name__}: {first_line(exc)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise AquilaNpuError(f"--tokenizer-name-or-path {path}: needs a fast (tokenizer.json) tokenizer")
    return tokenizer


def chat_template(name: str | None):
    """The chat template ``name`` of an installed model family (``--prompt-type``)."""
    from aquila_npu import plugin_manager

    templates = {t.name: t for family in plugin_manager.get().families().values() for t in family.chat_templates}
    if not name:
        raise AquilaNpuError(f"--prompt-type: name the chat template the conversations are written in "
                             f"({', '.join(templates)})")
    if name not in templates:
        raise AquilaNpuError(f"--prompt-type {name}: no such chat template; known: {', '.join(templates)}")
    return templates[name]


def make_handler(options: PreprocessOptions, vocab_size: int, eod: int | None, bos: int | None = None):
    from aquila_npu.preprocess.writer import indexed_dataset_module

    if options.handler not in HANDLERS:
        raise AquilaNpuError(f"--handler-name {options.handler}: unknown; use one of {', '.join(HANDLERS)}")
    if options.append_eod and eod is None:
        raise AquilaNpuError("--append-eod: the tokenizer has no eos token to end documents with; add eos_token to "
                             "its tokenizer_config.json")
    if options.seq_length is not None and options.seq_length < 1:
        raise AquilaNpuError(f"--seq-length {options.seq_length}: must be positive")
    if options.pack:
        if HANDLERS[options.handler] is PretrainHandler:
            raise AquilaNpuError(f"--pack: packs instruction and conversation samples, not {options.handler} "
                                 f"documents (pretraining already fills every sequence)")
        if options.seq_length is None:
            raise AquilaNpuError("--pack: give --seq-length, the training sequence length to pack samples into")
    dtype = indexed_dataset_module().DType.optimal_dtype(vocab_size).__name__  # megatron-core's rule: uint16 below 65,500 ids, else int32
    common = dict(dtype=dtype, append_eod=options.append_eod, eod=eod, seq_length=options.seq_length)
    if HANDLERS[options.handler] == "conversations":
        from aquila_npu.preprocess.conversations import ConversationHandler, parse_map_keys

        return ConversationHandler(template=chat_template(options.prompt_type), bos=bos,
                                   mapping=parse_map_keys(options.map_keys), **common)
    if options.prompt_type or options.map_keys:
        raise AquilaNpuError(f"--prompt-type / --map-keys are for conversation data (--handler-name "
                             f"SharegptStyleInstructionHandler), not {options.handler}")
    if HANDLERS[options.handler] is PretrainHandler:
        if not options.json_keys:
            raise AquilaNpuError("--json-keys: name at least one field")
        return PretrainHandler(keys=tuple(options.json_keys), **common)
    return InstructionHandler(**common)


def _checked(batch, handler, skip_bad: bool) -> tuple[dict[str, list[str]], int]:
    """The batch's usable records as text columns, and how many were bad. Without --skip-bad-records the first
    bad record is an error naming its file and row."""
    if hasattr(handler, "check"):  # records with structure (conversations): the handler checks them whole
        return _checked_by_handler(batch, handler, skip_bad)
    fields = [(name, True) for name in handler.fields] + [(name, False) for name in handler.optional]
    columns: dict[str, list[str]] = {name: [] for name, _ in fields}
    bad = 0
    for i in range(len(batch)):
        problem, texts = batch.bad.get(i), []
        for name, required in fields:
            if problem is not None:
                break
            text, problem = as_text(name, batch.columns[name][i], required)
            texts.append(text)
        if problem is not None:
            if not skip_bad:
                raise AquilaNpuError(f"{batch.where(i)}: {problem}; fix the record or pass --skip-bad-records")
            bad += 1
            continue
        for (name, _), text in zip(fields, texts):
            columns[name].append(text)
    return columns, bad


def _checked_by_handler(batch, handler, skip_bad: bool) -> tuple[dict[str, list], int]:
    records, bad = [], 0
    for i in range(len(batch)):
        problem = batch.bad.get(i)
        if problem is None:
            value, problem = handler.check({name: batch.columns[name][i] for name in handler.optional})
        if problem is not None:
            if not skip_bad:
                raise AquilaNpuError(f"{batch.where(i)}: {problem}; fix the record or pass --skip-bad-records")
            bad += 1
            continue
        records.append(value)
    return {"conversation": records}, bad


# --- workers ---------------------------------------------------------------------------------------------------
class _Encoder:
    """Encodes batches in input order on ``workers`` threads sharing one tokenizer.

    Threads, not processes: the Rust tokenizer releases the GIL while it encodes, so N threads keep N cores busy;
    they share one BPE cache, and nothing is pickled between processes. Measured on 2 cores
    (benchmarks/preprocess.py), two threads beat two spawned processes by about a third and the tokenizer's own
    multi-threaded ``encode_batch`` of the whole input too. Each thread encodes single-threaded
    (TOKENIZERS_PARALLELISM=false while we run), so ``--workers`` is the number of cores used. At most
    ``2 * workers`` batches are in flight, so memory stays flat."""

    def __init__(self, handler, tokenizer, workers: int) -> None:
        self.handler, self.tokenizer, self.pool = handler, tokenizer, None
        self.pending: deque = deque()
        self.limit = 2 * workers
        self.saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="aquila-npu-tokenize")

    def submit(self, columns):
        if self.pool is None:
            yield self.handler.encode(self.tokenizer, columns)
            return
        self.pending.append(self.pool.submit(self.handler.encode, self.tokenizer, columns))
        while len(self.pending) >= self.limit:
            yield self.pending.popleft().result()

    def drain(self):
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.saved_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.saved_parallelism


class _Progress:
    """A tqdm bar (documents/s, tokens/s) on a terminal; otherwise a log line every --log-interval documents."""

    def __init__(self, enabled: bool, log_interval: int, total: int | None) -> None:
        self.start, self.documents, self.tokens, self.logged = time.perf_counter(), 0, 0, 0
        self.log_interval = log_interval if enabled else 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", desc="preprocess", dynamic_ncols=True)

    def add(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(documents)
            self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        elif self.log_interval and self.documents - self.logged >= self.log_interval:
            self.logged = self.documents
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"processed {self.documents:,} documents ({self.documents / elapsed:,.0f} docs/s, "
                  f"{rate:,.0f} tokens/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parquet_rows(files: list[str]) -> int | None:
    if not all(f.endswith(".parquet") for f in files):
        return None
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception:  # a damaged file is reported by the reader, with its name
        return None


def preprocess(options: PreprocessOptions) -> PreprocessResult:
    from aquila_npu.preprocess.packing import pack_batch
    from aquila_npu.preprocess.writer import DatasetWriter

    if options.workers < 1:
        raise AquilaNpuError(f"--workers {options.workers}: must be at least 1")
    if options.batch_size < 1:
        raise AquilaNpuError(f"--batch-size {options.batch_size}: must be at least 1")
    files = input_files(options.input)
    tokenizer = load_tokenizer(options.tokenizer, options.tokenizer_type)
    handler = make_handler(options, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    outputs = handler.outputs(options.output_prefix)
    result = PreprocessResult(outputs=outputs, dtypes={k: handler.output_dtype(k) for k in outputs},
                              tokens={k: 0 for k in outputs})
    # the outputs' file-system failures (a full disk, a read-only folder) name the flag; the input's name its file
    writing = f"--output-prefix {options.output_prefix}"
    started = time.perf_counter()
    writers = {}
    encoder = None
    progress = _Progress(options.progress, options.log_interval, _parquet_rows(files))
    try:
        with reported_os_errors(writing):
            os.makedirs(os.path.dirname(os.path.abspath(options.output_prefix)), exist_ok=True)
            writers = {key: DatasetWriter(prefix, handler.output_dtype(key)) for key, prefix in outputs.items()}
        encoder = _Encoder(handler, tokenizer.backend_tokenizer, options.workers)
        first = next(iter(outputs))

        def write(encoded: EncodedBatch, documents: int) -> None:
            if options.pack:
                result.packed += len(encoded.outputs["input_ids"].lengths)
                encoded = pack_batch(encoded, options.seq_length)
            with reported_os_errors(writing):
                for key, part in encoded.outputs.items():
                    writers[key].add(part.tokens, part.lengths)
            result.empty += encoded.empty
            result.too_long += encoded.too_long
            progress.add(documents, int(encoded.outputs[first].tokens.size))

        sizes: deque = deque()  # documents per batch in flight, for the progress count
        for path in files:
            for batch in read_batches(path, list(handler.fields), list(handler.optional), options.batch_size):
                columns, bad = _checked(batch, handler, options.skip_bad_records)
                result.documents += len(batch)
                result.bad += bad
                sizes.append(len(batch))
                for encoded in encoder.submit(columns):
                    write(encoded, sizes.popleft())
        for encoded in encoder.drain():
            write(encoded, sizes.popleft())
        encoder.close()
        result.samples = writers[first].sequences
        if result.samples == 0:
            raise AquilaNpuError(f"--input {options.input}: no sample to write ({result.documents} records: "
                                 f"{result.bad} bad, {result.empty} empty, {result.too_long} too long)")
        with reported_os_errors(writing):
            for writer in writers.values():
                writer.finalize()
            for writer in writers.values():
                writer.commit()
    except BaseException:
        if encoder is not None:
            encoder.close()
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    result.tokens = {key: writer.tokens for key, writer in writers.items()}
    result.seconds = time.perf_counter() - started
    return result
