"""``--pack``: whole instruction samples packed into sequences of at most ``--seq-length`` training tokens.

A packed sequence is one sample of the instruction datasets (``input_ids``, ``labels``, ``attention_mask``) holding
several documents back to back; its ``attention_mask`` values are each token's 1-based document number within the
sequence (LLaMA-Factory's "neat packing" convention; unpacked samples hold 1 everywhere), which is how training finds
the boundaries (``aquila_npu.training.data``: positions restart and attention stays inside a document there).

Samples are packed best-fit-decreasing within each ``--batch-size`` group of records (the longest first, each into
the fullest sequence it still fits), so the output does not depend on ``--workers`` and memory stays bounded; a group
of about 1,000 Alpaca records fills 2,048-token sequences to about 99%. Within a sequence the documents keep their
input order. ``--seq-length`` drops the same samples as without ``--pack``; a sequence holds up to ``seq_length + 1``
tokens, as training reads ``seq_length + 1`` to predict ``seq_length`` next tokens.
"""

from __future__ import annotations

import bisect

import numpy as np

from aquila_npu.preprocess.handlers import Encoded, EncodedBatch


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most ``capacity``: the longest sample first, each into the bin
    with the least room that still holds it (a new bin when none does). Bins come in the order of their first
    sample; each bin's samples in index order."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[index])
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            left, chosen = room.pop(at)
        else:
            left, chosen = capacity, len(bins)
            bins.append([])
        bins[chosen].append(index)
        bisect.insort(room, (left - length, chosen))
    for members in bins:
        members.sort()
    return sorted(bins, key=lambda members: members[0])


def pack_batch(encoded: EncodedBatch, seq_length: int) -> EncodedBatch:
    """The batch's samples packed into sequences of at most ``seq_length + 1`` tokens."""
    outputs = encoded.outputs
    lengths = outputs["input_ids"].lengths
    if len(lengths) == 0:
        return encoded
    bins = best_fit_decreasing(lengths, seq_length + 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for members in bins for i in members])
    packed_lengths = np.array([int(lengths[members].sum()) for members in bins], dtype=np.int64)
    # 1-based document number within its sequence, repeated over the document's tokens
    numbers = np.concatenate([np.arange(1, len(members) + 1) for members in bins])
    documents = np.repeat(numbers, np.concatenate([lengths[members] for members in bins]))
    result = {key: Encoded(outputs[key].tokens[order], packed_lengths) for key in ("input_ids", "labels")}
    result["attention_mask"] = Encoded(documents.astype(outputs["attention_mask"].tokens.dtype), packed_lengths)
    return EncodedBatch(result, empty=encoded.empty, too_long=encoded.too_long)
