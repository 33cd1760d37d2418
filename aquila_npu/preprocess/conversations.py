"""Multi-turn conversation data (``--handler-name SharegptStyleInstructionHandler`` / ``ConversationHandler``):
records in the two common shapes, rendered with a model family's chat template, labels on the assistant turns.

* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."}``;
* OpenAI messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}``;
* anything else through ``--map-keys`` (MindSpeed-LLM's flag), a JSON object such as
  ``{"messages": "dialog", "system": "sys", "tags": {"role_tag": "speaker", "content_tag": "text",
  "user_tag": "q", "assistant_tag": "a", "system_tag": "s"}}``.

A conversation is written as the template writes it (``ChatTemplate.conversation_segments``: FastChat's
``get_prompt`` of the whole conversation, replies included) and each segment is tokenised on its own, so a label
boundary is where the text says, whatever BPE would merge across it. Labels are IGNORE_INDEX except over each
assistant reply and the end token that closes it. The outputs are the instruction handler's three datasets, so
fine-tuning reads them as it reads Alpaca data (``--is-instruction-dataset``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from aquila_npu.errors import AquilaNpuError
from aquila_npu.preprocess.handlers import IGNORE_INDEX, Encoded, EncodedBatch, _flat, _ids

SHAREGPT = {"messages": "conversations", "system": "system",
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                     "system_tag": "system"}}
OPENAI = {"messages": "messages", "system": "system",
          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                   "system_tag": "system"}}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


def parse_map_keys(text: str | None) -> dict | None:
    """``--map-keys``: a JSON object naming the messages field, the system field and the role/content tags."""
    if not text:
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AquilaNpuError(f"--map-keys: not valid JSON ({exc.msg}); give an object such as "
                             f"'{json.dumps(SHAREGPT)}'") from None
    if not isinstance(mapping, dict) or not isinstance(mapping.get("messages", ""), str) \
            or not isinstance(mapping.get("tags", {}), dict):
        raise AquilaNpuError('--map-keys: expected {"messages": FIELD, "system": FIELD, "tags": {...}}')
    unknown = set(mapping) - {"messages", "system", "tags"} | set(mapping.get("tags", {})) - set(TAGS)
    if unknown:
        raise AquilaNpuError(f"--map-keys: unknown key(s) {', '.join(sorted(unknown))}; known: messages, system, "
                             f"tags ({', '.join(TAGS)})")
    base = OPENAI if mapping.get("tags", {}).get("role_tag") == "role" else SHAREGPT
    return {"messages": mapping.get("messages", base["messages"]), "system": mapping.get("system", base["system"]),
            "tags": {**base["tags"], **mapping.get("tags", {})}}


@dataclass(frozen=True)
class ConversationHandler:
    """Multi-turn conversations in a chat template (see the module doc)."""

    dtype: str
    template: Any  # aquila_npu.chat.ChatTemplate
    bos: int | None = None
    seq_length: int | None = None
    mapping: dict | None = None  # --map-keys; None: ShareGPT or OpenAI, whichever field a record has
    append_eod: bool = False     # accepted: the template's end token already closes every reply
    eod: int | None = None

    name: ClassVar[str] = "SharegptStyleInstructionHandler"
    layouts: tuple = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "layouts", (self.mapping,) if self.mapping else (SHAREGPT, OPENAI))

    @property
    def fields(self) -> tuple[str, ...]:
        return ()

    @property
    def optional(self) -> tuple[str, ...]:
        names = []
        for layout in self.layouts:
            names += [layout["messages"], layout["system"]]
        return tuple(dict.fromkeys(names))

    def outputs(self, prefix: str) -> dict[str, str]:
        return {key: f"{prefix}_packed_{key}_document" for key in ("input_ids", "attention_mask", "labels")}

    def output_dtype(self, key: str) -> str:
        return "int32" if key == "labels" else self.dtype

    # ------------------------------------------------------------------------------------------ checking a record
    def check(self, values: dict[str, Any]) -> tuple[list[dict] | None, str | None]:
        """(messages as {role, content}, None) for a usable record, else (None, why not)."""
        from aquila_npu.preprocess.sources import MISSING

        for layout in self.layouts:
            turns = values.get(layout["messages"], MISSING)
            if turns is MISSING or turns is None:
                continue
            return self._messages(layout, turns, values.get(layout["system"], MISSING))
        names = " or ".join(repr(layout["messages"]) for layout in self.layouts)
        return None, f"no conversation: the record has no {names} field (another name: --map-keys)"

    def _messages(self, layout, turns, system) -> tuple[list[dict] | None, str | None]:
        from aquila_npu.preprocess.sources import MISSING, as_text

        tags, field_name = layout["tags"], layout["messages"]
        if not isinstance(turns, (list, tuple)):
            return None, f"field {field_name!r} is {type(turns).__name__}, not a list of turns"
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        messages = []
        if system is not MISSING and system is not None:
            text, problem = as_text(layout["system"], system, required=True)
            if problem:
                return None, problem
            if text:
                messages.append({"role": "system", "content": text})
        for number, turn in enumerate(turns, 1):
            if not isinstance(turn, dict):
                return None, f"turn {number} of {field_name!r} is {type(turn).__name__}, not an object"
            tag = turn.get(tags["role_tag"])
            if tag not in roles:
                return None, (f"turn {number}: unknown role {tag!r} (known: {', '.join(map(repr, roles))}; "
                              f"other names: --map-keys)")
            text, problem = as_text(f"{field_name}[{number}].{tags['content_tag']}",
                                    turn.get(tags["content_tag"], MISSING), required=True)
            if problem:
                return None, problem
            role = roles[tag]
            if role == "system":
                if number != 1 or messages:
                    return None, f"turn {number}: a system turn comes only first"
            elif messages and messages[-1]["role"] == role:
                return None, f"turns {number - 1} and {number}: two {role} turns in a row"
            elif role == "assistant" and (not messages or messages[-1]["role"] == "system"):
                return None, f"turn {number}: the conversation starts with the assistant (it must start with a user)"
            messages.append({"role": role, "content": text})
        spoken = [m for m in messages if m["role"] != "system"]
        if not spoken:
            return None, f"empty conversation ({field_name!r} has no user or assistant turn)"
        if not any(m["role"] == "assistant" for m in spoken):
            return None, "no assistant turn: nothing to train on"
        if spoken[-1]["role"] == "user":
            return None, "the conversation ends with a user turn that has no reply"
        return messages, None

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, tokenizer, columns: dict[str, list]) -> EncodedBatch:
        conversations = [self.template.conversation_segments(messages) for messages in columns["conversation"]]
        texts = [text for segments in conversations for text, _ in segments]
        ids = iter(_ids(tokenizer, texts, add_special_tokens=False))
        samples, labels = [], []
        result = EncodedBatch({})
        for segments in conversations:
            sample, label = ([self.bos], [IGNORE_INDEX]) if self.template.add_bos and self.bos is not None else ([], [])
            for _, trained in segments:
                piece = next(ids)
                sample += piece
                label += piece if trained else [IGNORE_INDEX] * len(piece)
            if self.seq_length is not None and len(sample) >= self.seq_length:
                result.too_long += 1
                continue
            samples.append(sample)
            labels.append(label)
        lengths = np.fromiter(map(len, samples), dtype=np.int64, count=len(samples))
        input_ids = _flat(samples, self.dtype)
        result.outputs = {"input_ids": Encoded(input_ids, lengths),
                          "attention_mask": Encoded(np.ones(len(input_ids), dtype=self.dtype), lengths),
                          "labels": Encoded(_flat(labels, np.int32), lengths)}
        return result
