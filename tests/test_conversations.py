"""Conversation fine-tuning data (``--handler-name SharegptStyleInstructionHandler`` / ``ConversationHandler``):
read back through megatron-core's ``IndexedDataset`` and held to an independent rendering of each chat template
(written here from FastChat's ``get_prompt``, not from aquila-npu's code) tokenised by ``transformers``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aquila_npu.errors import AquilaNpuError
from aquila_npu.plugins.aquila2 import FAMILY
from aquila_npu.preprocess import PreprocessOptions, preprocess
from aquila_npu.preprocess.__main__ import main as preprocess_main

SYSTEM = "You are a careful assistant."
RECORDS = [
    {"conversations": [{"from": "human", "value": "北京是哪个国家的首都？"}, {"from": "gpt", "value": "中国。"},
                       {"from": "human", "value": "And Paris?"}, {"from": "gpt", "value": "France, of course."}]},
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"system": SYSTEM, "conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}]},
]


def fastchat_pieces(name: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """FastChat's ``Conversation.get_prompt`` for AquilaChat2's templates, with the replies (and their end token)
    marked as the text to train on."""
    system = {"aquila-v1": "", "aquila-legacy": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n\n"), "aquila": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.")}[name]
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if name == "aquila-v1":     # no_colon_two, roles <|startofpiece|> / <|endofpiece|>, sep "", sep2 "</s>"
        head, user, bot, sep, sep2 = system, "<|startofpiece|>", "<|endofpiece|>", "", "</s>"
    elif name == "aquila-legacy":  # no_colon_two, "### Human: " / "### Assistant: ", sep "\n", sep2 "</s>"
        head, user, bot, sep, sep2 = system, "### Human: ", "### Assistant: ", "\n", "</s>"
    else:                       # add_colon_two, Human / Assistant, sep "###", sep2 "</s>"
        head, user, bot, sep, sep2 = system + "###", "Human: ", "Assistant: ", "###", "</s>"
    pieces, context = [], head
    for i in range(0, len(messages), 2):
        context += user + messages[i]["content"] + sep + bot
        pieces += [(context, False), (messages[i + 1]["content"] + sep2, True)]
        context = ""
    return pieces


def as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out = [{"role": "system", "content": record["system"]}] if "system" in record else []
    return out + [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def _read(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("template", ["aquila-v1", "aquila-legacy", "aquila"])
def test_samples_read_back_as_the_template_renders_them(tmp_path, tokenizer_dir, hf_tokenizer, template):
    data = _write(tmp_path / "chat.jsonl", RECORDS)
    result = preprocess(PreprocessOptions(input=data, tokenizer=str(tokenizer_dir), output_prefix=str(tmp_path / "c"),
                                          handler="SharegptStyleInstructionHandler", prompt_type=template,
                                          progress=False))
    assert result.samples == len(RECORDS)
    input_ids = _read(tmp_path / "c_packed_input_ids_document")
    labels = _read(tmp_path / "c_packed_labels_document")
    masks = _read(tmp_path / "c_packed_attention_mask_document")
    for record, ids, label, mask in zip(RECORDS, input_ids, labels, masks):
        pieces = fastchat_pieces(template, as_messages(record))
        expected_ids, expected_labels = [], []
        for text, trained in pieces:
            piece = hf_tokenizer(text, add_special_tokens=False).input_ids
            expected_ids += piece
            expected_labels += piece if trained else [-100] * len(piece)
        assert ids.tolist() == expected_ids
        assert label.tolist() == expected_labels
        assert mask.tolist() == [1] * len(ids)
        # the text the ids spell is the whole rendered conversation, and the labels spell exactly the replies
        assert hf_tokenizer.decode(ids.tolist()) == "".join(text for text, _ in pieces)
        replies = [m["content"] + "</s>" for m in as_messages(record) if m["role"] == "assistant"]
        assert hf_tokenizer.decode([t for t in label.tolist() if t != -100]) == "".join(replies)


def test_the_label_boundary_is_exact_where_whole_text_tokenisation_would_move_it(tmp_path, tokenizer_dir,
                                                                                hf_tokenizer):
    """'### Assistant: ' + 'Hello': tokenised whole, BPE merges the template's space into ' Hello', so searching
    the whole text's ids for the reply's ids finds nothing, and a prefix count would start the labels one
    character late. Segments tokenised apart put the boundary where the text has it."""
    record = {"messages": [{"role": "user", "content": "Greet me"}, {"role": "assistant", "content": "Hello"}]}
    data = _write(tmp_path / "one.jsonl", [record])
    preprocess(PreprocessOptions(input=data, tokenizer=str(tokenizer_dir), output_prefix=str(tmp_path / "c"),
                                 handler="ConversationHandler", prompt_type="aquila-legacy", progress=False))
    ids, labels = _read(tmp_path / "c_packed_input_ids_document")[0], _read(tmp_path / "c_packed_labels_document")[0]
    pieces = fastchat_pieces("aquila-legacy", record["messages"])
    whole = hf_tokenizer("".join(text for text, _ in pieces), add_special_tokens=False).input_ids
    reply = hf_tokenizer("Hello</s>", add_special_tokens=False).input_ids
    assert whole != ids.tolist()
    assert not any(whole[i:i + len(reply)] == reply for i in range(len(whole)))
    assert [t for t in labels.tolist() if t != -100] == reply


def test_other_field_names_through_map_keys(tmp_path, tokenizer_dir, hf_tokenizer):
    record = {"dialog": [{"speaker": "q", "text": "Hi"}, {"speaker": "a", "text": "Hello there"}], "sys": SYSTEM}
    map_keys = json.dumps({"messages": "dialog", "system": "sys",
                           "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "q",
                                    "assistant_tag": "a"}})
    code = preprocess_main(["--input", _write(tmp_path / "d.jsonl", [record]), "--tokenizer-name-or-path",
                            str(tokenizer_dir), "--output-prefix", str(tmp_path / "c"), "--handler-name",
                            "SharegptStyleInstructionHandler", "--prompt-type", "aquila", "--map-keys", map_keys,
                            "--no-progress"])
    assert code == 0
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}]
    expected = [t for text, _ in fastchat_pieces("aquila", messages)
                for t in hf_tokenizer(text, add_special_tokens=False).input_ids]
    assert _read(tmp_path / "c_packed_input_ids_document")[0].tolist() == expected


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
     "turn 2: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turns 1 and 2: two user turns in a row"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"text": "not a conversation"}, "no conversation: the record has no 'conversations' or 'messages' field"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}]}, "not text"),
])
def test_bad_records_are_one_line_with_file_and_row(tmp_path, tokenizer_dir, capsys, record, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data = _write(tmp_path / "bad.jsonl", [good, record])
    code = preprocess_main(["--input", data, "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix",
                            str(tmp_path / "out" / "c"), "--handler-name", "ConversationHandler", "--prompt-type",
                            "aquila-v1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{data} line 2: " in err[0] and message in err[0], err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_a_template_must_be_named(tmp_path, tokenizer_dir):
    with pytest.raises(AquilaNpuError, match="--prompt-type: name the chat template.*aquila-v1, aquila-legacy, aquila"):
        preprocess(PreprocessOptions(input=_write(tmp_path / "c.jsonl", RECORDS), tokenizer=str(tokenizer_dir),
                                     output_prefix=str(tmp_path / "c"), handler="ConversationHandler",
                                     progress=False))
    with pytest.raises(AquilaNpuError, match="--prompt-type alpaca: no such chat template"):
        preprocess(PreprocessOptions(input=_write(tmp_path / "c.jsonl", RECORDS), tokenizer=str(tokenizer_dir),
                                     output_prefix=str(tmp_path / "c"), handler="ConversationHandler",
                                     prompt_type="alpaca", progress=False))
    assert {t.name for t in FAMILY.chat_templates} == {"aquila-v1", "aquila-legacy", "aquila"}
