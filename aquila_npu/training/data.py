"""Training data: megatron-core's GPTDataset for pretraining, the packed instruction datasets for fine-tuning, and
the micro-batch stream of one data-parallel rank.

Every rank reads its own samples (tensor- and pipeline-parallel peers read the same ones) instead of receiving them
by broadcast: the datasets are memory-mapped, so this costs little and needs no data-parallel plumbing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from aquila_npu.errors import AquilaNpuError, first_line
from aquila_npu.preprocess.handlers import IGNORE_INDEX


class DatasetTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer: end-of-document and pad ids, vocabulary size, and
    identifiers for its index cache."""

    def __init__(self, path: str | None, vocab_size: int) -> None:
        if path is None:  # --mock-data without a tokenizer
            self.eod, self.pad, self.vocab_size = vocab_size - 1, 0, vocab_size
        else:
            from aquila_npu.preprocess import load_tokenizer

            hf = load_tokenizer(path)
            if hf.eos_token_id is None:
                raise AquilaNpuError(f"--tokenizer-name-or-path {path}: the tokenizer has no eos (end-of-document) "
                                     f"token")
            self.eod, self.vocab_size = hf.eos_token_id, len(hf)
            self.pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        self.unique_identifiers = {"class": type(self).__name__, "path": path, "vocab_size": self.vocab_size}


def sample_counts(args) -> list[int]:
    """Train / validation / test samples the run will draw (Megatron-LM's arithmetic)."""
    gbs = args.global_batch_size
    evals = args.train_iters // args.eval_interval + 1 if args.eval_iters else 0
    return [args.train_iters * gbs, evals * args.eval_iters * gbs, args.eval_iters * gbs]


def build_datasets(args, tokenizer: DatasetTokenizer, packed: bool = False):
    """(train, valid, test) datasets; None where the split is empty. ``packed``: the instruction data was written
    with ``--pack`` (``check_packed_training``)."""
    if args.is_instruction_dataset:
        return instruction_datasets(args.data_path[0], args.split, sample_counts(args), args.seq_length, args.seed,
                                    tokenizer.pad, packed=packed)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    if not args.mock_data:
        for prefix in get_blend_from_list(args.data_path)[0]:
            check_indexed_dataset(prefix)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length,
        blend=None if args.mock_data else get_blend_from_list(args.data_path), split=args.split,
        # without shared storage every rank keeps its indices in memory: no two nodes race on one cache file
        path_to_cache=None if args.no_shared_storage else args.data_cache_path,
        tokenizer=tokenizer, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sample_counts(args), lambda: True, config).build()


class InstructionDataset(torch.utils.data.Dataset):
    """Samples of a GeneralInstructionHandler output: one record a sample, shuffled anew each epoch, inputs
    ``input_ids[:-1]`` and labels ``labels[1:]`` padded to the sequence length; the loss mask is where the label is
    not IGNORE_INDEX (prompt and padding carry no loss).

    A packed record (``--pack``: several documents, numbered in ``attention_mask``) also gives ``cu_seqlens``, the
    int32 boundaries of its documents and then of the padding (megatron-core's THD layout, ``PackedSeqParams``, and
    Megatron-LM's packed-batch key), position ids that restart at each document, and no loss on a document's last
    token (its next token belongs to the next document), so each document trains exactly as it would alone."""

    def __init__(self, prefix: str, records: np.ndarray, num_samples: int, seq_length: int, seed: int,
                 pad: int, create_attention_mask: bool = False, packed: bool = False) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.input_ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
        self.labels = IndexedDataset(f"{prefix}_packed_labels_document")
        self.documents = IndexedDataset(f"{prefix}_packed_attention_mask_document") if packed else None
        self.seq_length, self.pad = seq_length, pad
        self.create_attention_mask = create_attention_mask
        # Megatron-LM's data loader may ask for GPTDataset's causal mask (True = masked out); a packed sample's is
        # its own (block-diagonal)
        self.attention_mask = (torch.tril(torch.ones(1, seq_length, seq_length)) < 0.5) \
            if create_attention_mask and not packed else None
        epochs = max(1, math.ceil(num_samples / max(len(records), 1)))
        self.order = np.concatenate([np.random.RandomState(seed + epoch).permutation(records)
                                     for epoch in range(epochs)])[:num_samples]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = int(self.order[index])
        ids = np.asarray(self.input_ids[record][:self.seq_length + 1], dtype=np.int64)
        labels = np.asarray(self.labels[record][:self.seq_length + 1], dtype=np.int64)
        tokens = np.full(self.seq_length, self.pad, dtype=np.int64)
        targets = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        tokens[:len(ids) - 1] = ids[:-1]
        targets[:len(labels) - 1] = labels[1:]
        position_ids = np.arange(self.seq_length)
        cu_seqlens = None
        if self.documents is not None:
            documents = np.asarray(self.documents[record][:self.seq_length + 1], dtype=np.int64)
            inputs = len(ids) - 1
            targets[:inputs][documents[:-1] != documents[1:]] = IGNORE_INDEX
            starts = np.flatnonzero(np.diff(documents[:-1])) + 1
            ends = [inputs, self.seq_length] if inputs < self.seq_length else [inputs]  # the documents, the padding
            cu_seqlens = np.concatenate([[0], starts, ends]).astype(np.int64)
            position_ids -= np.repeat(cu_seqlens[:-1], np.diff(cu_seqlens))
        loss_mask = (targets != IGNORE_INDEX).astype(np.float32)
        targets[targets == IGNORE_INDEX] = self.pad  # a valid id; the loss mask removes it
        sample = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(targets),
                  "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids)}
        if cu_seqlens is not None:
            sample["cu_seqlens"] = torch.from_numpy(cu_seqlens.astype(np.int32))
            if self.create_attention_mask:  # the dense equivalent: block-diagonal causal (True = masked out)
                from aquila_npu.kernels.reference import document_mask

                boundaries = sample["cu_seqlens"]
                sample["attention_mask"] = document_mask(boundaries, boundaries)[None]
        elif self.attention_mask is not None:
            sample["attention_mask"] = self.attention_mask
        return sample


def is_packed(prefix: str) -> bool:
    """Whether ``prefix``'s instruction datasets were written with ``--pack`` (a document number above 1 in
    ``attention_mask``; unpacked samples hold 1 everywhere)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

    mask = f"{prefix}_packed_attention_mask_document"
    if not IndexedDataset.exists(mask):
        return False
    dtype = check_indexed_dataset(mask).index.dtype
    values = np.memmap(get_bin_path(mask), dtype=dtype, mode="r")
    chunk = 1 << 24
    return any(values[start:start + chunk].max(initial=0) > 1 for start in range(0, len(values), chunk))


def check_packed_training(prefix: str, args, *, per_token_loss_flag: bool = False) -> bool:
    """Whether ``prefix`` is packed; if so, that ``args`` train it as packed data must be trained. One line naming
    what to add otherwise. ``per_token_loss_flag``: the route has Megatron-LM's ``--calculate-per-token-loss`` and
    it must be given (our driver turns it on itself)."""
    if not is_packed(prefix):
        return False
    needed = [("--reset-position-ids", args.reset_position_ids, "positions restart at each document"),
              ("--reset-attention-mask", args.reset_attention_mask, "no token attends to another document")]
    if per_token_loss_flag:
        needed.append(("--calculate-per-token-loss", getattr(args, "calculate_per_token_loss", False),
                       "the loss is the mean over all response tokens, as unpacked"))
    missing = [(flag, why) for flag, given, why in needed if not given]
    if missing:
        raise AquilaNpuError(f"--data-path {prefix}: packed samples (preprocessed with --pack); add "
                             f"{' '.join(flag for flag, _ in missing)} ({'; '.join(why for _, why in missing)})")
    if args.micro_batch_size != 1:
        raise AquilaNpuError(f"--micro-batch-size {args.micro_batch_size}: packed sequences train one a micro-batch "
                             f"(megatron-core's THD layout); use --micro-batch-size 1 and set --global-batch-size")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    inputs = IndexedDataset(f"{prefix}_packed_input_ids_document")  # held: its lengths are a view of its mmap
    longest = int(inputs.sequence_lengths.max())
    if longest > args.seq_length + 1:
        raise AquilaNpuError(f"--seq-length {args.seq_length}: {prefix} was packed into sequences of up to "
                             f"{longest - 1} tokens; train at that --seq-length or preprocess again with --pack "
                             f"--seq-length {args.seq_length}")
    return True


def packed_seq_params(cu_seqlens: torch.Tensor):
    """megatron-core's ``PackedSeqParams`` (layout thd) for one packed sequence's boundaries."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.reshape(-1).to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _split_bounds(split: str, total: int) -> list[tuple[int, int]]:
    from megatron.core.datasets.utils import normalize

    weights = normalize([float(x) for x in split.replace("/", ",").split(",")])
    weights += [0.0] * (3 - len(weights))
    cuts = [0] + [round(sum(weights[:i + 1]) * total) for i in range(3)]
    return [(cuts[i], cuts[i + 1]) for i in range(3)]


def instruction_datasets(prefix: str, split: str, counts: list[int], seq_length: int, seed: int, pad: int,
                         create_attention_mask: bool = False, packed: bool = False):
    """(train, valid, test) InstructionDatasets over the records of ``prefix``, divided by ``split``; ``packed``:
    written with ``--pack`` (``check_packed_training``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    opened = {}
    for key in ("input_ids", "labels"):
        if not IndexedDataset.exists(f"{prefix}_packed_{key}_document"):
            raise AquilaNpuError(f"--data-path {prefix}: no {prefix}_packed_{key}_document.bin/.idx; give the "
                                 f"--output-prefix of a GeneralInstructionHandler preprocessing run")
        opened[key] = check_indexed_dataset(f"{prefix}_packed_{key}_document")
    if not np.array_equal(opened["input_ids"].sequence_lengths, opened["labels"].sequence_lengths):
        raise AquilaNpuError(f"--data-path {prefix}: its input_ids and labels datasets do not describe the same "
                             f"samples (files of two preprocessing runs?); run the preprocessing step again")
    total = len(opened["input_ids"])
    datasets = []
    for (start, end), samples, offset in zip(_split_bounds(split, total), counts, (0, 1, 2)):
        if end > start and samples:
            datasets.append(InstructionDataset(prefix, np.arange(start, end), samples, seq_length,
                                               seed + 1000 * offset, pad, create_attention_mask, packed))
        else:
            datasets.append(None)
    return tuple(datasets)


@dataclass
class RankBatches:
    """Megatron's pretraining sampler: global batches in order from ``consumed`` on; this data-parallel rank takes
    its micro-batch slice of each group of ``micro * dp`` samples."""

    total: int
    consumed: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __iter__(self):
        step = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed, self.total - step + 1, step):
            yield list(range(first + start, first + start + self.micro_batch_size))

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro_batch_size * self.dp_size))


def micro_batch_iterator(dataset, consumed: int, micro_batch_size: int, num_workers: int):
    """An iterator of this rank's micro-batches (dicts of tensors), starting after ``consumed`` samples."""
    from megatron.core import parallel_state

    if dataset is None:
        return None
    sampler = RankBatches(len(dataset), consumed, micro_batch_size, parallel_state.get_data_parallel_rank(),
                          parallel_state.get_data_parallel_world_size())
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                            persistent_workers=num_workers > 0))


def check_indexed_dataset(prefix: str, flag: str = "--data-path"):
    """Open ``prefix``'s ``.bin``/``.idx`` and check that the one holds what the other describes; a truncated
    ``.bin``, an unreadable ``.idx`` or one from another dataset is one line now, not a ValueError from megatron-core
    mid-training. Returns the opened ``IndexedDataset``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

    if not IndexedDataset.exists(prefix):
        raise AquilaNpuError(f"{flag} {prefix}: no {prefix}.bin/.idx; give the prefix the preprocessing step wrote "
                             f"(e.g. dataset/alpaca_text_document)")
    # a reader whose set-up fails must still be deletable: IndexedDataset.__del__ deletes these two attributes
    dataset = IndexedDataset.__new__(IndexedDataset)
    dataset.bin_reader = dataset.index = None
    try:
        dataset.__init__(prefix, mmap=True)
    except Exception as exc:  # noqa: BLE001 - megatron-core's reader asserts and numpy raises on a damaged index
        raise AquilaNpuError(f"{flag} {prefix}: {get_idx_path(prefix)} is not a readable Megatron index "
                             f"({type(exc).__name__}: {first_line(exc)}); run the preprocessing step again") from None
    index = dataset.index
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size \
        if len(index) else 0
    actual = os.path.getsize(get_bin_path(prefix))
    if actual != expected:
        raise AquilaNpuError(f"{flag} {prefix}: {get_bin_path(prefix)} holds {actual:,} bytes where its .idx "
                             f"describes {expected:,} (a truncated copy, or the .idx of another dataset); copy both "
                             f"files again or run the preprocessing step again")
    return dataset
