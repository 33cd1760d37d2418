"""What a record becomes: the pretraining and the instruction (Alpaca) handlers (conversations:
``aquila_npu.preprocess.conversations``).

A handler is a small picklable object: the fields it reads, the datasets it writes, and ``encode`` that turns a
batch of validated texts into flat token arrays plus per-sample lengths. ``encode`` runs on the worker threads; the
tokenizer arrives as a ``tokenizers.Tokenizer`` (the backend of the ``transformers`` tokenizer, so the ids are
``tokenizer(text)``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from itertools import chain

import numpy as np

IGNORE_INDEX = -100  # label of a prompt token: no loss (megatron / ModelLink / transformers convention)

# The Stanford Alpaca prompt, as in tatsu-lab/stanford_alpaca and the `text` column of its parquet release
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Encoded:
    """One output dataset's share of a batch: the samples' tokens back to back, and each sample's length."""

    tokens: np.ndarray
    lengths: np.ndarray


@dataclass
class EncodedBatch:
    outputs: dict[str, Encoded]
    empty: int = 0       # samples with no tokens (not written)
    too_long: int = 0    # samples dropped by --seq-length


@dataclass(frozen=True)
class Output:
    name: str        # the dataset's suffix: ``{prefix}_{name}_document.bin/.idx`` or ``{prefix}_packed_...``
    label_values: bool = False  # holds IGNORE_INDEX, so it needs a signed dtype


def render_alpaca(instruction: str, context: str) -> str:
    if context:
        return ALPACA_PROMPT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    # encode_batch_fast skips the character offsets we never read (about 10% faster); older tokenizers lack it
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


def _flat(ids: list[list[int]], dtype) -> np.ndarray:
    total = sum(map(len, ids))
    return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=total)


def _lengths(ids: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


@dataclass(frozen=True)
class PretrainHandler:
    """Megatron's / ModelLink's ``GeneralPretrainHandler``: each ``--json-keys`` field becomes a document of
    ``tokenizer(text)`` ids (special tokens as the tokenizer adds them), plus the end-of-document id with
    ``--append-eod``. Empty documents are not written (as Megatron-LM's tool)."""

    keys: tuple[str, ...]
    dtype: str
    append_eod: bool = False
    eod: int | None = None
    seq_length: int | None = None

    name: ClassVar[str] = "GeneralPretrainHandler"
    optional: ClassVar[tuple[str, ...]] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return self.keys

    def outputs(self, prefix: str) -> dict[str, str]:
        return {key: f"{prefix}_{key}_document" for key in self.keys}

    def output_dtype(self, key: str) -> str:
        return self.dtype

    def encode(self, tokenizer, columns: dict[str, list[str]]) -> EncodedBatch:
        result = EncodedBatch({})
        for key in self.keys:
            ids = _ids(tokenizer, columns[key], add_special_tokens=True)
            if self.append_eod:
                for sample in ids:
                    if sample:
                        sample.append(self.eod)
            lengths = _lengths(ids)
            keep = lengths > 0
            result.empty += int((~keep).sum())
            if self.seq_length is not None:
                too_long = lengths >= self.seq_length
                result.too_long += int((too_long & keep).sum())
                keep &= ~too_long
            if not keep.all():
                ids = [sample for sample, k in zip(ids, keep) if k]
            result.outputs[key] = Encoded(_flat(ids, self.dtype), lengths[keep])
        return result


@dataclass(frozen=True)
class InstructionHandler:
    """ModelLink's ``GeneralInstructionHandler`` (also accepted as ``AlpacaStyleInstructionHandler``): Alpaca
    records (``instruction``, optional ``input``, ``output``) rendered with the Alpaca prompt. Writes
    ``{prefix}_packed_{input_ids,attention_mask,labels}_document``; labels are IGNORE_INDEX over the prompt.

    The prompt and the response are tokenised separately and their ids concatenated, so the label mask starts at
    the first response token by construction (ModelLink instead re-tokenises the prefix and counts, which is wrong
    whenever a BPE merge crosses the boundary). With ``--append-eod`` the end-of-document id ends both input ids and
    labels."""

    dtype: str
    append_eod: bool = False
    eod: int | None = None
    seq_length: int | None = None

    name: ClassVar[str] = "GeneralInstructionHandler"
    fields: ClassVar[tuple[str, ...]] = ("instruction", "output")
    optional: ClassVar[tuple[str, ...]] = ("input",)

    def outputs(self, prefix: str) -> dict[str, str]:
        return {key: f"{prefix}_packed_{key}_document" for key in ("input_ids", "attention_mask", "labels")}

    def output_dtype(self, key: str) -> str:
        return "int32" if key == "labels" else self.dtype

    def encode(self, tokenizer, columns: dict[str, list[str]]) -> EncodedBatch:
        prompts = [render_alpaca(i, c) for i, c in zip(columns["instruction"], columns["input"])]
        prompt_ids = _ids(tokenizer, prompts, add_special_tokens=False)
        response_ids = _ids(tokenizer, columns["output"], add_special_tokens=False)
        if self.append_eod:
            for sample in response_ids:
                sample.append(self.eod)
        prompt_lengths, response_lengths = _lengths(prompt_ids), _lengths(response_ids)
        lengths = prompt_lengths + response_lengths
        result = EncodedBatch({})
        keep = np.ones(len(lengths), dtype=bool)
        if self.seq_length is not None:
            keep = lengths < self.seq_length
            result.too_long = int((~keep).sum())
        pieces = [part for p, r, k in zip(prompt_ids, response_ids, keep) if k for part in (p, r)]
        input_ids = _flat(pieces, self.dtype)
        # per sample: prompt then response segments; the prompt segments are masked out of the labels
        segment_lengths = np.stack([prompt_lengths[keep], response_lengths[keep]], axis=1).reshape(-1)
        in_prompt = np.repeat(np.tile(np.array([True, False]), int(keep.sum())), segment_lengths)
        labels = input_ids.astype(np.int32)
        labels[in_prompt] = IGNORE_INDEX
        result.outputs = {"input_ids": Encoded(input_ids, lengths[keep]),
                          "attention_mask": Encoded(np.ones(len(input_ids), dtype=self.dtype), lengths[keep]),
                          "labels": Encoded(labels, lengths[keep])}
        return result


HANDLERS = {"GeneralPretrainHandler": PretrainHandler, "GeneralInstructionHandler": InstructionHandler,
            "AlpacaStyleInstructionHandler": InstructionHandler,
            # MindSpeed-LLM's name, and ours (aquila_npu.preprocess.conversations, imported when chosen)
            "SharegptStyleInstructionHandler": "conversations", "ConversationHandler": "conversations"}
