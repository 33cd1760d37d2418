"""Scoring choices with the model: lm-evaluation-harness's log-likelihood, and ModelLink's first-token probability.

Log-likelihood (lm-evaluation-harness, ``HFLM.loglikelihood``): the context's trailing whitespace moves to the
continuation; the continuation's ids are those of ``tokenize(context + continuation)`` after the first
``len(tokenize(context))`` (no special tokens); the model reads ``(context + continuation)[-(max_len + 1):][:-1]``
and the score is the sum of the log-probabilities of the continuation's ids. When every choice of a question is one
token after the same context (BoolQ's " no"/" yes", MMLU's " A".." D"), one forward pass of the context scores them
all, as lm-evaluation-harness's one-token cache does.

First token (ModelLink's BoolQ): the probabilities, after the prompt, of the first token of each choice's word.

Rows are sorted longest first and batched with little padding (right-padded: a causal model's earlier positions do
not see the padding); the model's output layer is applied only at the positions read (a pre-hook selects them), so
a batch never holds logits for every position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def encode_pair(tokenize, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair`` for causal models."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenize(context + continuation)
    context_ids = tokenize(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class Row:
    """One model input and what is read from it: for choice ``choices[i]``, the log-probabilities of
    ``targets[i]`` at ``positions[i]`` (the positions whose next token is the target)."""

    example: int
    tokens: list[int]
    choices: list[int]
    positions: list[list[int]]
    targets: list[list[int]]


def loglikelihood_rows(example_index: int, context: str, continuations, tokenize, max_length: int) -> list[Row]:
    pairs = [encode_pair(tokenize, context, c) for c in continuations]
    contexts = {tuple(ctx) for ctx, _ in pairs}
    if len(contexts) == 1 and all(len(cont) == 1 for _, cont in pairs):
        return [one_pass_row(example_index, pairs[0][0], list(range(len(pairs))), [cont for _, cont in pairs],
                             max_length)]
    return [continuation_row(example_index, choice, ctx, cont, max_length)
            for choice, (ctx, cont) in enumerate(pairs)]


def one_pass_row(example_index: int, context_ids: list[int], choices: list[int], targets: list[list[int]],
                 max_length: int) -> Row:
    """One-token continuations of the same context: one pass of the context scores them all."""
    tokens = context_ids[-max_length:]
    last = len(tokens) - 1
    return Row(example_index, tokens, choices, [[last]] * len(choices), targets)


def continuation_row(example_index: int, choice: int, context_ids: list[int], continuation_ids: list[int],
                     max_length: int) -> Row:
    """The model reads ``(context + continuation)[-(max_length + 1):][:-1]``, as lm-evaluation-harness's."""
    whole = (context_ids + continuation_ids)[-(max_length + 1):]
    tokens = whole[:-1]
    first = len(tokens) - len(continuation_ids)
    return Row(example_index, tokens, [choice], [list(range(first, len(tokens)))], [continuation_ids])


def token_pair_rows(pairs, max_length: int) -> list[Row]:
    """Rows for lm-evaluation-harness's ``(context ids, continuation ids)`` requests, request ``i`` read as
    ``(0, i)``: requests whose continuation is one token after the same context share one row."""
    rows, one_token = [], {}
    for index, (context_ids, continuation_ids) in enumerate(pairs):
        if len(continuation_ids) == 1 and context_ids:
            one_token.setdefault(tuple(context_ids), []).append(index)
        else:
            rows.append(continuation_row(0, index, list(context_ids), list(continuation_ids), max_length))
    for context_ids, indices in one_token.items():
        rows.append(one_pass_row(0, list(context_ids), indices, [list(pairs[i][1]) for i in indices], max_length))
    return rows


def first_token_row(example_index: int, context: str, words, tokenize, max_length: int) -> Row:
    tokens = tokenize(context)[-max_length:]
    targets = [[tokenize(word)[0]] for word in words]
    return Row(example_index, tokens, list(range(len(words))), [[len(tokens) - 1]] * len(words), targets)


@contextlib.contextmanager
def _only_positions(model, positions: torch.Tensor):
    """While active, the model's output layer sees only ``positions`` ([batch, k]) of each row."""

    def select(module, args, kwargs):
        hidden = args[0]  # [sequence, batch, hidden]
        rows = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        return (hidden[positions.t().to(hidden.device), rows],) + tuple(args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def log_probs_at(model, tokens: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 log-probabilities ``[batch, k, vocab_size]`` of the next token at ``positions`` ([batch, k]) of
    ``tokens`` ([batch, sequence]); a ``GPTModel`` built with ``parallel_output=False``."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device)[None, :].expand_as(tokens)
    with torch.inference_mode(), _only_positions(model, positions.to(device)):
        logits = model(tokens, position_ids, None)
    return logits[..., :vocab_size].float().log_softmax(dim=-1)


MAX_PADDING = 0.1  # padded positions a batch may compute, as a share of its real tokens


def length_batches(lengths: list[int], micro_batch_size: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of rows of these ``lengths`` in batches, longest first: at most ``micro_batch_size`` rows, and a
    batch closes before its padding would exceed ``max_padding`` of its real tokens.

    A padded position costs as much as a real one, and with rows of mixed lengths a fixed row count puts one long
    outlier's width on seven short rows (BoolQ's first 60 questions: one of 753 tokens among rows of 300 or less
    made the first batch of 8 three-fifths padding); batching buys little beside that on a CPU, where a product of
    a few hundred rows already runs at full speed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        batch = batches[-1] if batches else None
        if batch and len(batch) < micro_batch_size:
            width, real = lengths[batch[0]], sum(lengths[i] for i in batch) + lengths[index]
            if width * (len(batch) + 1) <= (1 + max_padding) * real:
                batch.append(index)
                continue
        batches.append([index])
    return batches


def score_rows(model, rows: list[Row], vocab_size: int, pad_id: int, micro_batch_size: int, on_batch=None,
               greedy: dict | None = None):
    """``{(example, choice): [log-probability of each target token]}`` for every row, in batches of rows of
    similar length (``length_batches``); ``on_batch(rows)`` after each batch. ``greedy``, when given, is filled
    with ``{(example, choice): whether every target token is the most likely one}``."""
    results: dict[tuple[int, int], list[float]] = {}
    for indices in length_batches([len(row.tokens) for row in rows], micro_batch_size):
        batch = [rows[i] for i in indices]
        width = max(len(row.tokens) for row in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for b, row in enumerate(batch):
            tokens[b, :len(row.tokens)] = torch.tensor(row.tokens)
        reads = [(b, choice, positions, targets) for b, row in enumerate(batch)
                 for choice, positions, targets in zip(row.choices, row.positions, row.targets)]
        read_at = [sorted({p for ps in row.positions for p in ps}) for row in batch]
        positions = torch.zeros(len(batch), max(len(flat) for flat in read_at), dtype=torch.long)
        for b, flat in enumerate(read_at):
            positions[b, :len(flat)] = torch.tensor(flat)
            positions[b, len(flat):] = flat[-1]
        log_probs = log_probs_at(model, tokens, positions, vocab_size).cpu()
        best = log_probs.argmax(dim=-1) if greedy is not None else None
        for b, choice, wanted, targets in reads:
            slots = positions[b].tolist()
            at = [slots.index(p) for p in wanted]
            results[(batch[b].example, choice)] = [log_probs[b, a, t].item() for a, t in zip(at, targets)]
            if best is not None:
                greedy[(batch[b].example, choice)] = all(best[b, a].item() == t for a, t in zip(at, targets))
        if on_batch is not None:
            on_batch(batch)
    return results
