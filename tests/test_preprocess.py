"""Preprocessing: records -> Megatron indexed datasets, checked against the tokenizer itself and megatron-core's
own readers (IndexedDataset, GPTDataset) and builder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BUNDLED_DATA, run_python

from aquila_npu.preprocess import PreprocessOptions, preprocess
from aquila_npu.preprocess.__main__ import main as preprocess_main
from aquila_npu.preprocess.handlers import IGNORE_INDEX, render_alpaca
from aquila_npu.preprocess.sources import _json_list_records

EOD = 100007  # Aquila2's </s>


@pytest.fixture(scope="module")
def alpaca() -> dict[str, Path]:
    """The bundled 300-record Alpaca sample, as parquet and as a JSON list."""
    folder = BUNDLED_DATA / "alpaca"
    return {"parquet": folder / "alpaca_300.parquet", "json": folder / "alpaca_300.json"}


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def records(alpaca) -> list[dict]:
    return pq.read_table(alpaca["parquet"]).to_pylist()


def _read(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    # copies: the arrays are views of a memory map that closes with the dataset
    return [np.array(dataset[i]) for i in range(len(dataset))]


def _run(tokenizer_dir, input_path, prefix, **kwargs):
    return preprocess(PreprocessOptions(input=str(input_path), tokenizer=str(tokenizer_dir), output_prefix=str(prefix),
                                        progress=False, **kwargs))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- acceptance: exact against the tokenizer -----------------------------------------------------------------------

def test_pretraining_output_equals_tokenizer_plus_eod(tmp_path, tokenizer_dir, hf_tokenizer, alpaca, records):
    result = _run(tokenizer_dir, alpaca["parquet"], tmp_path / "alpaca", append_eod=True)
    assert result.outputs == {"text": str(tmp_path / "alpaca_text_document")}
    documents = _read(tmp_path / "alpaca_text_document")
    expected = hf_tokenizer([r["text"] for r in records])["input_ids"]
    assert len(documents) == len(records) == result.samples == result.documents
    for document, ids in zip(documents, expected):
        assert document.dtype == np.int32  # 100,008 ids do not fit uint16
        assert document.tolist() == ids + [EOD]
    assert result.tokens["text"] == sum(len(ids) + 1 for ids in expected)


def test_instruction_labels_are_ignored_exactly_over_the_prompt(tmp_path, tokenizer_dir, hf_tokenizer, alpaca,
                                                               records):
    result = _run(tokenizer_dir, alpaca["parquet"], tmp_path / "alpaca", handler="GeneralInstructionHandler",
                  append_eod=True)
    assert sorted(result.outputs) == ["attention_mask", "input_ids", "labels"]
    inputs, masks, labels = (_read(tmp_path / f"alpaca_packed_{key}_document")
                             for key in ("input_ids", "attention_mask", "labels"))
    assert len(inputs) == len(masks) == len(labels) == len(records)
    for record, ids, mask, label in zip(records, inputs, masks, labels):
        prompt = render_alpaca(record["instruction"], record["input"])
        assert prompt + record["output"] == record["text"]  # the template is Alpaca's own
        prompt_ids = hf_tokenizer(prompt)["input_ids"]
        response_ids = hf_tokenizer(record["output"])["input_ids"] + [EOD]
        assert ids.tolist() == prompt_ids + response_ids
        assert label.dtype == np.int32
        assert label.tolist() == [IGNORE_INDEX] * len(prompt_ids) + response_ids
        assert mask.tolist() == [1] * len(ids)


def test_prompt_boundary_is_exact_where_retokenising_the_prefix_is_not(tmp_path, tokenizer_dir, hf_tokenizer):
    # an indented code answer: BPE merges its leading spaces with the prompt's closing newline, so the prefix's
    # token count (ModelLink's method) no longer marks where the response starts in the full text's tokens
    record = {"instruction": "Indent this line of Python.", "input": "", "output": "    print('hi')"}
    prompt = render_alpaca(record["instruction"], record["input"])
    full = hf_tokenizer(prompt + record["output"])["input_ids"]
    prefix = hf_tokenizer(prompt)["input_ids"]
    assert full[:len(prefix)] != prefix, "the tokenizer no longer merges across this boundary; pick another case"
    (tmp_path / "one.jsonl").write_text(json.dumps(record) + "\n")
    _run(tokenizer_dir, tmp_path / "one.jsonl", tmp_path / "one", handler="AlpacaStyleInstructionHandler")
    labels = _read(tmp_path / "one_packed_labels_document")[0].tolist()
    response = [t for t in labels if t != IGNORE_INDEX]
    assert labels[:len(prefix)] == [IGNORE_INDEX] * len(prefix) and len(response) == len(labels) - len(prefix)
    assert hf_tokenizer.decode(response) == record["output"]


# --- acceptance: the same bytes whatever the workers and the input format --------------------------------------

def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx")}


@pytest.mark.slow
@pytest.mark.parametrize("handler", ["GeneralPretrainHandler", "GeneralInstructionHandler"])
def test_same_bytes_for_one_and_two_workers(tmp_path, tokenizer_dir, alpaca, handler):
    outputs = {}
    for workers in (1, 2):
        folder = tmp_path / f"workers{workers}"
        _run(tokenizer_dir, alpaca["parquet"], folder / "alpaca", handler=handler, append_eod=True, workers=workers,
             batch_size=700)
        outputs[workers] = _bytes(folder)
    assert outputs[1] == outputs[2] and len(outputs[1]) in (2, 6)


def test_same_result_from_parquet_json_list_and_json_lines(tmp_path, tokenizer_dir, alpaca):
    lines = tmp_path / "alpaca.jsonl"
    with open(alpaca["json"], encoding="utf-8") as f:
        lines.write_text("".join(json.dumps(r) + "\n" for r in json.load(f)))
    outputs = []
    for name, source in (("parquet", alpaca["parquet"]), ("list", alpaca["json"]), ("lines", lines)):
        _run(tokenizer_dir, source, tmp_path / name / "alpaca", handler="GeneralInstructionHandler", append_eod=True)
        outputs.append(_bytes(tmp_path / name))
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 6


def test_folder_and_glob_inputs_read_every_part_in_order(tmp_path, tokenizer_dir, alpaca):
    table = pq.read_table(alpaca["parquet"])
    parts = tmp_path / "parts"
    parts.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), parts / "part-0.parquet")
    pq.write_table(table.slice(half), parts / "part-1.parquet")
    _run(tokenizer_dir, alpaca["parquet"], tmp_path / "whole" / "a")
    _run(tokenizer_dir, parts, tmp_path / "folder" / "a")
    _run(tokenizer_dir, parts / "part-*.parquet", tmp_path / "glob" / "a")
    assert _bytes(tmp_path / "whole") == _bytes(tmp_path / "folder") == _bytes(tmp_path / "glob")


# --- megatron-core reads it --------------------------------------------------------------------------------------

def test_bytes_equal_megatron_core_builder_one_document_at_a_time(tmp_path, tokenizer_dir, alpaca):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _run(tokenizer_dir, alpaca["parquet"], tmp_path / "ours" / "a", handler="GeneralInstructionHandler")
    for key in ("input_ids", "labels"):
        prefix = tmp_path / "ours" / f"a_packed_{key}_document"
        documents = _read(prefix)
        reference = tmp_path / f"reference_{key}"
        builder = IndexedDatasetBuilder(f"{reference}.bin", dtype=documents[0].dtype.type)
        for document in documents:
            builder.add_document(document.astype(np.int64), [len(document)])
        builder.finalize(f"{reference}.idx")
        for suffix in (".bin", ".idx"):
            assert Path(f"{prefix}{suffix}").read_bytes() == Path(f"{reference}{suffix}").read_bytes()


def test_gpt_dataset_samples_are_windows_of_the_documents(tmp_path, tokenizer_dir, alpaca):
    from types import SimpleNamespace

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    _run(tokenizer_dir, alpaca["parquet"], tmp_path / "alpaca", append_eod=True)
    prefix = str(tmp_path / "alpaca_text_document")
    indexed = IndexedDataset(prefix)
    seq = 64
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, split="100,0,0", path_to_cache=str(tmp_path),
                              tokenizer=SimpleNamespace(eod=EOD, pad=0, vocab_size=100008,
                                                        unique_identifiers={"name": "aquila2"}), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    dataset = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), None, Split.train, config)
    documents = _read(prefix)
    stream = np.concatenate([documents[d] for d in dataset.document_index])
    starts = np.concatenate([[0], np.cumsum([len(documents[d]) for d in dataset.document_index])])
    assert len(dataset) == (len(stream) - 1) // seq
    for i in range(0, len(dataset), max(1, len(dataset) // 50)):
        doc_at, offset = dataset.sample_index[dataset.shuffle_index[i]]
        start = starts[doc_at] + offset
        sample = dataset[i]
        assert sample["tokens"].tolist() == stream[start:start + seq].tolist()
        assert sample["labels"].tolist() == stream[start + 1:start + seq + 1].tolist()


# --- filters, dtypes, empty documents ----------------------------------------------------------------------------

def test_seq_length_drops_and_counts_long_samples(tmp_path, tokenizer_dir, hf_tokenizer, records, alpaca):
    lengths = [len(ids) + 1 for ids in hf_tokenizer([r["text"] for r in records])["input_ids"]]
    limit = int(np.median(lengths))
    result = _run(tokenizer_dir, alpaca["parquet"], tmp_path / "a", append_eod=True, seq_length=limit)
    kept = [n for n in lengths if n < limit]
    assert result.too_long == len(lengths) - len(kept) > 0
    assert [len(d) for d in _read(tmp_path / "a_text_document")] == kept


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["hello", "", "world", ""]) + "\n")
    result = _run(tokenizer_dir, path, tmp_path / "d", append_eod=True)
    assert (result.documents, result.samples, result.empty) == (4, 2, 2)
    assert [d[-1] for d in _read(tmp_path / "d_text_document")] == [EOD, EOD]


def test_small_vocabulary_gets_uint16_tokens_and_int32_labels(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "below", "is", "an", "instruction", "hello", "world"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "</s>"}))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "hello", "output": "world"}) + "\n")
    _run(folder, data, tmp_path / "s", handler="GeneralInstructionHandler", append_eod=True)
    ids, labels = _read(tmp_path / "s_packed_input_ids_document")[0], _read(tmp_path / "s_packed_labels_document")[0]
    assert ids.dtype == np.uint16 and labels.dtype == np.int32
    assert ids[-2:].tolist() == [6, 0] and labels[-2:].tolist() == [6, 0] and (labels[:-2] == IGNORE_INDEX).all()


def test_tokenizer_from_an_aquila_model_folder_without_remote_code(tmp_path, tokenizer_dir):
    folder = tmp_path / "Aquila2-7B"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["AquilaForCausalLM"], "model_type": "aquila",
        "auto_map": {"AutoConfig": "configuration_aquila.AquilaConfig",
                     "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"}}))
    (folder / "modeling_aquila.py").write_text("raise SystemExit('remote code ran')\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    result = _run(folder, data, tmp_path / "d")
    assert result.tokens["text"] == 2


def test_json_list_reader_streams_objects_across_chunk_boundaries(tmp_path):
    items = [{"text": "x" * n, "i": n} for n in range(0, 300, 7)] + [{"text": "é\u4e2d", "nested": {"a": [1, 2]}}]
    path = tmp_path / "list.json"
    path.write_text(" \n[" + ",\n ".join(json.dumps(x, ensure_ascii=False) for x in items) + "]\n", encoding="utf-8")
    read = [record for _, record, _ in _json_list_records(str(path), chunk_chars=16)]
    assert read == items


# --- bad input: one line, exit 2, nothing left -------------------------------------------------------------------

def _fail(capsys, *argv) -> str:
    code = preprocess_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("aquila-npu preprocess: error: "), err
    return err


def _write_parquet(path: Path, columns: dict, schema=None):
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


BAD_CASES = {
    "missing field": ("bad.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n'),
                      "bad.jsonl line 3: field 'text' is missing"),
    "null": ("bad.parquet", lambda p: _write_parquet(p, {"text": ["a", "b", None]}),
             "bad.parquet row 2: field 'text' is null"),
    "not text": ("bad.json", lambda p: p.write_text('[{"text": "a"}, {"text": 5}]'),
                 "bad.json row 1: field 'text' is int, not text"),
    "undecodable bytes": ("bad.jsonl", lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
                          "bad.jsonl line 2: field 'text' holds bytes that are not valid UTF-8"),
    "undecodable parquet bytes": ("bad.parquet", lambda p: _write_parquet(
        p, {"text": [b"ok", b"\xff\xfe"]}, pa.schema([("text", pa.binary())])),
        "bad.parquet row 1: field 'text' holds bytes that are not valid UTF-8"),
    "not JSON": ("bad.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": "b",\n'),
                 "bad.jsonl line 2: is not valid JSON"),
    "not an object": ("bad.jsonl", lambda p: p.write_text('{"text": "a"}\n["text"]\n'),
                      "bad.jsonl line 2: is a JSON list, not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_record_names_file_and_row_and_leaves_nothing(tmp_path, capsys, tokenizer_dir, case):
    name, make, message = BAD_CASES[case]
    data = tmp_path / "in"
    data.mkdir()
    make(data / name)
    out = tmp_path / "out"
    # batch size 1: the good records before the bad one are already written when it is found
    err = _fail(capsys, "--input", str(data / name), "--tokenizer-name-or-path", str(tokenizer_dir),
                "--output-prefix", str(out / "d"), "--batch-size", "1", "--append-eod")
    assert message in err and "--skip-bad-records" in err
    assert not out.exists() or _files(out) == []


def test_skip_bad_records_skips_and_counts(tmp_path, tokenizer_dir, hf_tokenizer, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"txt": "x"}\n{"text": null}\n{"text": 3}\n{"text": "caf\xe9"}\nnope\n'
                     b'{"text": "two"}\n')
    code = preprocess_main(["--input", str(path), "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix",
                            str(tmp_path / "m"), "--skip-bad-records"])
    assert code == 0
    assert "skipped 5 bad" in capsys.readouterr().out
    assert [d.tolist() for d in _read(tmp_path / "m_text_document")] == hf_tokenizer(["one", "two"])["input_ids"]


@pytest.mark.parametrize("case", ["missing column", "instruction without output", "unsupported format", "no input",
                                  "no tokenizer", "nothing to write", "damaged parquet", "cut-short JSON list"])
def test_bad_input_one_line_error(tmp_path, capsys, tokenizer_dir, case):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    args = {"--input": str(data), "--tokenizer-name-or-path": str(tokenizer_dir),
            "--output-prefix": str(tmp_path / "out" / "d")}
    extra, message = [], ""
    if case == "missing column":
        args["--input"] = str(_write_parquet(tmp_path / "x.parquet", {"body": ["a"]}))
        message = "x.parquet: no column 'text' (columns: body)"
    elif case == "instruction without output":
        data.write_text(json.dumps({"instruction": "do it"}) + "\n")
        extra, message = ["--handler-name", "GeneralInstructionHandler"], "line 1: field 'output' is missing"
    elif case == "unsupported format":
        (tmp_path / "x.csv").write_text("text\nhello\n")
        args["--input"], message = str(tmp_path / "x.csv"), "unsupported format"
    elif case == "no input":
        args["--input"], message = str(tmp_path / "nothing.parquet"), "no such file or folder"
    elif case == "no tokenizer":
        args["--tokenizer-name-or-path"], message = str(tmp_path), "no tokenizer.json there"
    elif case == "damaged parquet":
        whole = _write_parquet(tmp_path / "x.parquet", {"text": ["hello"] * 100}).read_bytes()
        (tmp_path / "x.parquet").write_bytes(whole[:len(whole) // 2])
        args["--input"], message = str(tmp_path / "x.parquet"), "x.parquet: not a readable parquet file"
    elif case == "cut-short JSON list":
        (tmp_path / "x.json").write_text('[{"text": "a"}, {"text": "b"')
        args["--input"], message = str(tmp_path / "x.json"), "x.json row 1: not valid JSON"
    elif case == "nothing to write":
        data.write_text(json.dumps({"text": ""}) + "\n")
        message = "no sample to write (1 records: 0 bad, 1 empty, 0 too long)"
    err = _fail(capsys, *sum(args.items(), ()), *extra)
    assert message in err
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []


def test_unknown_handler_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        preprocess_main(["--input", "x", "--tokenizer-name-or-path", "t", "--output-prefix", str(tmp_path / "d"),
                         "--handler-name", "AlpacaHandler"])
    assert exit_info.value.code == 2 and "invalid choice: 'AlpacaHandler'" in capsys.readouterr().err


def test_a_failed_run_keeps_the_previous_dataset(tmp_path, tokenizer_dir, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    assert preprocess_main(["--input", str(good), "--tokenizer-name-or-path", str(tokenizer_dir),
                            "--output-prefix", str(tmp_path / "out" / "d")]) == 0
    before = _bytes(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": None}) + "\n")
    _fail(capsys, "--input", str(bad), "--tokenizer-name-or-path", str(tokenizer_dir),
          "--output-prefix", str(tmp_path / "out" / "d"), "--batch-size", "1")
    assert _bytes(tmp_path / "out") == before and _files(tmp_path / "out") == sorted(before)


def test_a_killed_run_leaves_no_dataset_that_looks_complete(tmp_path, tokenizer_dir, alpaca):
    # the process dies the moment its outputs are complete but not yet renamed
    script = (
        "import os, signal, sys\n"
        "from aquila_npu.preprocess import writer\n"
        "writer.DatasetWriter.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from aquila_npu.preprocess.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    result = run_python("-c", script, "--input", str(alpaca["parquet"]), "--tokenizer-name-or-path",
                        str(tokenizer_dir), "--output-prefix", str(tmp_path / "d"), "--no-progress")
    assert result.returncode == -9
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(str(tmp_path / "d_text_document"))
    assert all(name.endswith(".partial") for name in _files(tmp_path))


def test_interrupted_run_removes_its_partial_files(tmp_path, tokenizer_dir, alpaca, monkeypatch, capsys):
    from aquila_npu.preprocess import handlers

    calls = []

    def interrupted(self, tokenizer, columns):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, tokenizer, columns)

    original = handlers.PretrainHandler.encode
    monkeypatch.setattr(handlers.PretrainHandler, "encode", interrupted)
    code = preprocess_main(["--input", str(alpaca["parquet"]), "--tokenizer-name-or-path", str(tokenizer_dir),
                            "--output-prefix", str(tmp_path / "out" / "d"), "--batch-size", "10"])
    assert code == 130 and "no dataset was written" in capsys.readouterr().err
    assert _files(tmp_path / "out") == []


# --- command line ----------------------------------------------------------------------------------------------

def test_seed_command_line_unchanged_through_the_aquila_npu_verb(tmp_path, tokenizer_dir, alpaca):
    from aquila_npu.__main__ import main

    code = main(["preprocess", "--input", str(alpaca["parquet"]), "--tokenizer-name-or-path", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "alpaca"), "--workers", "1", "--log-interval", "1000",
                 "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralInstructionHandler",
                 "--append-eod", "--tokenizer-not-use-fast"])
    assert code == 0
    assert {os.path.basename(p) for p in tmp_path.iterdir()} == {
        f"alpaca_packed_{k}_document.{s}" for k in ("input_ids", "attention_mask", "labels") for s in ("bin", "idx")}
