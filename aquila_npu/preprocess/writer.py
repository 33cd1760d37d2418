"""Megatron indexed datasets (``.bin`` + ``.idx``) written through megatron-core's own ``IndexedDatasetBuilder``.

Batches go to the builder's data file in one write each (its ``add_document`` takes one document per call, too slow
at millions of documents); the sequence and document tables are the builder's, and its ``finalize`` writes the
index, so the files are megatron-core's format by construction. Every sample is one sequence and one document, as
Megatron-LM's ``tools/preprocess_data.py`` writes them without ``--split-sentences``.

Both files are written under ``.partial`` names and renamed only when every output of the run is complete; an
interrupted run leaves nothing that ``IndexedDataset.exists`` would accept.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

PARTIAL = ".partial"


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, without megatron-core's notices about Transformer Engine and Apex
    (which preprocessing never uses)."""
    from aquila_npu import known_warnings

    with warnings.catch_warnings():
        known_warnings.silence()
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class DatasetWriter:
    def __init__(self, prefix: str, dtype: str) -> None:
        indexed = indexed_dataset_module()
        self.prefix = prefix
        self.bin_path, self.idx_path = indexed.get_bin_path(prefix), indexed.get_idx_path(prefix)
        self.dtype = np.dtype(dtype)
        self.builder = indexed.IndexedDatasetBuilder(self.bin_path + PARTIAL, dtype=self.dtype.type)
        self.tokens = 0

    @property
    def sequences(self) -> int:
        return len(self.builder.sequence_lengths)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        builder = self.builder
        builder.data_file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        start = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths.tolist())
        builder.document_indices.extend(range(start + 1, start + 1 + len(lengths)))
        self.tokens += int(tokens.size)

    def finalize(self) -> None:
        self.builder.finalize(self.idx_path + PARTIAL)

    def commit(self) -> None:
        # drop an older index first: never an old .idx beside a new .bin, even for a moment
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self.bin_path + PARTIAL, self.bin_path)
        os.replace(self.idx_path + PARTIAL, self.idx_path)

    def abort(self) -> None:
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self.bin_path + PARTIAL, self.idx_path + PARTIAL):
            if os.path.exists(path):
                os.remove(path)
