"""Packing a global batch into minibatches and rows: numba LPT splits each step's samples into as few minibatches
per rank as the token capacity allows, every rank with the same count, tokens balanced across ranks within each
minibatch (for models trained on padded batches, by padded size instead); `collate` builds one padding-free row per
minibatch (position_ids restart per sequence, labels shifted within each sequence, so no sequence's first token is
predicted from the previous one's last); `Prefetcher` prepares the next step in a background thread."""

import queue
import threading
from dataclasses import dataclass

import numba
import numpy as np

from dataset import IGNORE, TokenizedData, sequence_starts


@numba.njit(cache=True)
def _lpt(sorted_lengths, num_bins, capacity):
    """Longest processing time first: each item (longest first) to the least loaded bin. Fails if it overflows."""
    loads = np.zeros(num_bins, np.int64)
    assign = np.empty(len(sorted_lengths), np.int64)
    for i in range(len(sorted_lengths)):
        b = np.argmin(loads)
        if loads[b] + sorted_lengths[i] > capacity:
            return assign, loads, False
        loads[b] += sorted_lengths[i]
        assign[i] = b
    return assign, loads, True


@numba.njit(cache=True)
def _best_fit(sorted_lengths, num_bins, capacity, padded):
    """Best fit decreasing: each item to the fullest bin it still fits. Packs tighter than LPT, balances worse.
    `padded`: a bin's load is its padded size, items x its first (longest) item, so consecutive (similar) lengths
    share a bin."""
    loads = np.zeros(num_bins, np.int64)
    longest = np.zeros(num_bins, np.int64)
    assign = np.empty(len(sorted_lengths), np.int64)
    for i in range(len(sorted_lengths)):
        best = -1
        for b in range(num_bins):
            cost = longest[b] if padded and longest[b] > 0 else sorted_lengths[i]
            if loads[b] + cost <= capacity and (best < 0 or loads[b] > loads[best]):
                best = b
        if best < 0:
            return assign, loads, False
        loads[best] += longest[best] if padded and longest[best] > 0 else sorted_lengths[i]
        longest[best] = max(longest[best], sorted_lengths[i])
        assign[i] = best
    return assign, loads, True


@numba.njit(cache=True)
def _lower_bound(lengths, capacity, num_ranks):
    if len(lengths) == 0:
        return 0
    by_tokens = -(-lengths.sum() // (capacity * num_ranks))
    by_big_items = -(-(lengths > capacity // 2).sum() // num_ranks)
    return max(1, by_tokens, by_big_items)


def minibatch_lower_bound(lengths, capacity: int, num_ranks: int) -> int:
    """No plan can use fewer minibatches: total tokens over total capacity, and one bin per item over half
    the capacity (no two of them share a bin)."""
    return int(_lower_bound(np.asarray(lengths, dtype=np.int64), capacity, num_ranks))


@numba.njit(cache=True)
def _plan(lengths, capacity, num_ranks, padded):
    """Returns (number of minibatches, items longest first, and the minibatch and rank of each of them)."""
    order = np.argsort(-lengths, kind="mergesort")
    sorted_lengths = lengths[order]
    num_minibatches = _lower_bound(lengths, capacity, num_ranks)
    assign = np.zeros(len(lengths), np.int64)
    loads = np.zeros(1, np.int64)
    while num_minibatches > 0:
        num_bins = num_minibatches * num_ranks
        ok = False
        if not padded:  # LPT spreads the long items over the bins: padded, short ones would pad to them
            assign, loads, ok = _lpt(sorted_lengths, num_bins, capacity)
        if not ok:
            assign, loads, ok = _best_fit(sorted_lengths, num_bins, capacity, padded)
        if ok:
            break
        num_minibatches += 1
    # Deal the bins out heaviest first, num_ranks at a time: the ranks of one minibatch carry similar loads.
    slot = np.empty(len(loads), np.int64)
    slot[np.argsort(-loads, kind="mergesort")] = np.arange(len(loads))
    item_slot = slot[assign]
    return num_minibatches, order, item_slot // num_ranks, item_slot % num_ranks


def pack_minibatches(
    lengths, max_tokens_per_rank: int, num_ranks: int, padded=False, alone=None
) -> list[list[list[int]]]:
    """Split one global batch into minibatches: plan[rank][k] is the list of sample indices (into `lengths`) of
    minibatch k on that rank. Deterministic; every rank gets the same number of minibatches (some may be empty);
    no minibatch holds more than max_tokens_per_rank tokens.

    The fewest minibatches first: starting at the lower bound, try M minibatches (M x ranks bins) with LPT, which
    also balances, then with best-fit decreasing, which packs tighter; else M + 1. Then the bins, sorted by load,
    are dealt out in groups of `num_ranks`, so the ranks of one minibatch carry similar loads.

    `padded`, for models trained on padded batches (setup_model's packing check): a minibatch holds at most
    max_tokens_per_rank tokens padding included (its samples x its longest), by best-fit decreasing alone, which
    keeps similar lengths together (on chat data ~1.1-1.8x the real tokens, where a token-packed row would pad
    to 2-3x and to several times the capacity).

    `alone` (one bool per sample): samples that must have a minibatch to themselves (planned as a full one)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if num_ranks < 1 or max_tokens_per_rank < 1:
        raise ValueError("need num_ranks >= 1 and max_tokens_per_rank >= 1")
    if len(lengths) and lengths.max() > max_tokens_per_rank:
        raise ValueError(f"a sample of {lengths.max()} tokens exceeds the capacity of {max_tokens_per_rank}")
    if alone is not None:
        lengths = np.where(alone, max_tokens_per_rank, lengths)
    m, order, minibatch, rank = _plan(lengths, max_tokens_per_rank, num_ranks, padded)
    cells = [[] for _ in range(num_ranks * m)]  # one flat comprehension: nested ones cost ~0.5 us per rank
    for item, cell in zip(order.tolist(), (rank * m + minibatch).tolist()):
        cells[cell].append(item)
    return [cells[r * m : (r + 1) * m] for r in range(num_ranks)]


# ---------------------------------------------------------------------------------------------------------------
# Collation


@dataclass
class Minibatch:
    """One padding-free row (batch dimension 1) and what the loss needs to know about it. The targets come as an
    index built here, on the CPU: the model's forward never has to find them with a mask (a device sync)."""

    input_ids: "object"  # torch.LongTensor [1, T]
    position_ids: "object"  # torch.LongTensor [1, T]
    target_index: "object"  # torch.LongTensor [K]: positions whose next token (same sequence) is a target
    target_ids: "object"  # torch.LongTensor [K]: those targets
    cu_seq_lens: "object"  # torch.IntTensor [num_sequences + 1]: sequence boundaries, for varlen attention
    max_length: int  # longest sequence in the row
    num_tokens: int  # real tokens (0 for an empty minibatch, whose row is one dummy token)
    target_sample: "object"  # torch.LongTensor [K]: each target's sample, as its position in the step's batch

    @property
    def num_loss_tokens(self) -> int:
        return len(self.target_ids)

    def inputs(self, device) -> dict:
        """LossModel's keyword arguments, tensors moved to the device."""
        to = dict(device=device, non_blocking=True)
        return dict(
            input_ids=self.input_ids.to(**to),
            position_ids=self.position_ids.to(**to),
            cu_seq_lens=self.cu_seq_lens.to(**to),
            cu_seq_lens_host=self.cu_seq_lens,  # per-sequence attention splits by it without a device sync
            max_length=self.max_length,
            target_index=self.target_index.to(**to),
            target_ids=self.target_ids.to(**to),
        )


def collate(data: TokenizedData, indices: list[int], pad_token_id: int = 0, positions=None) -> Minibatch:
    """The row of samples `indices`; `positions`: where each stands in the step's global batch (default 0, 1, ...),
    which each target's `target_sample` names (the loop sums per-sample losses by it)."""
    import torch

    if not indices:  # an empty minibatch still runs forward/backward so FSDP's collectives line up
        one = torch.tensor([[pad_token_id]])
        none = torch.zeros(0, dtype=torch.long)
        return Minibatch(one, torch.zeros_like(one), none, none, torch.tensor([0, 1], dtype=torch.int32), 1, 0, none)
    idx = np.asarray(indices, dtype=np.int64)
    starts, ends = data.offsets[idx], data.offsets[idx + 1]
    lengths = ends - starts
    token_idx = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    input_ids = data.input_ids[token_idx]
    labels = data.labels[token_idx]
    position_ids = data.position_ids[token_idx]
    row_offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq_start = sequence_starts(position_ids, row_offsets[:-1])
    # Position t predicts t + 1 only inside one sequence, and only where t + 1 is labelled.
    target_index = np.flatnonzero(~seq_start[1:] & (labels[1:] != IGNORE))
    cu = np.concatenate([np.flatnonzero(seq_start), [len(input_ids)]]).astype(np.int32)
    positions = np.arange(len(idx)) if positions is None else np.asarray(positions, dtype=np.int64)
    sample_of_token = np.repeat(positions, lengths)  # a target's sample is its predicting token's
    return Minibatch(
        input_ids=torch.from_numpy(input_ids.astype(np.int64)).unsqueeze(0),
        position_ids=torch.from_numpy(position_ids.astype(np.int64)).unsqueeze(0),
        target_index=torch.from_numpy(target_index.astype(np.int64)),
        target_ids=torch.from_numpy(labels[target_index + 1].astype(np.int64)),
        cu_seq_lens=torch.from_numpy(cu),
        max_length=int(np.diff(cu).max()),
        num_tokens=len(input_ids),
        target_sample=torch.from_numpy(sample_of_token[target_index].astype(np.int64)),
    )


# ---------------------------------------------------------------------------------------------------------------
# The stream of steps, prepared one step ahead


@dataclass
class StepBatch:
    """Everything one optimizer step consumes: this rank's minibatches plus global counts (known on every rank,
    since every rank sees the whole global batch)."""

    minibatches: list[Minibatch]
    num_samples: int
    num_loss_tokens: int  # over the whole global batch: the loss denominator
    num_tokens: int  # real tokens over the whole global batch
    epoch: int  # epoch in which the batch starts
    sampler_state: dict  # the sampler's state after drawing this batch (a sampler that observes: after observing)
    indices: np.ndarray  # the global batch's samples, in batch order (per-sample losses follow it)


@dataclass(frozen=True)
class Packing:
    """What a model asks of its minibatches (setup_model's checks find out):
    - padded: it trains on padded batches, so a minibatch's size is its samples x its longest;
    - alone_from: a sample whose positions reach this many gets a minibatch to itself. For RoPE whose frequencies
      follow the longest sequence of a forward (Phi-3's longrope switches beyond original_max_position_embeddings):
      a short sample packed with a long one would be computed with the long one's frequencies."""

    padded: bool = False
    alone_from: int | None = None

    def plan(self, data: TokenizedData, indices: np.ndarray, capacity: int, num_ranks: int) -> list:
        alone = data.spans[indices] >= self.alone_from if self.alone_from else None
        return pack_minibatches(data.lengths[indices], capacity, num_ranks, self.padded, alone)


def make_step_batch(data, sampler, count, capacity, rank, world_size, pad_token_id, packing=Packing()) -> StepBatch:
    epoch = sampler.epoch
    indices = sampler.next_indices(count)
    plan = packing.plan(data, indices, capacity, world_size)
    return StepBatch(
        minibatches=[collate(data, indices[mb].tolist(), pad_token_id, positions=mb) for mb in plan[rank]],
        num_samples=len(indices),
        num_loss_tokens=int(data.num_loss_counted_tokens[indices].sum()),
        num_tokens=int(data.lengths[indices].sum()),
        epoch=epoch,
        sampler_state=sampler.state_dict(),
        indices=indices,
    )


class Prefetcher:
    """Prepares step n+1 in a background thread while step n computes. `batch_sizes` yields the number of
    samples of each step (a shorter last one ends an exact number of epochs); the stream ends with it.

    A sampler that observes (sampler.py) draws step n+1 from what step n showed it: its step n+1 is prepared only
    once the loop calls `observed()` after step n (so the draw never depends on thread timing); packing and
    collating still overlap nothing then, but the draw is exact."""

    def __init__(
        self, data, sampler, batch_sizes, capacity, rank, world_size, pad_token_id=0, packing=Packing(), depth=2
    ):
        self._queue = queue.Queue(maxsize=depth)
        args = (capacity, rank, world_size, pad_token_id, packing)
        self._thread = threading.Thread(target=self._produce, args=(data, sampler, batch_sizes, args), daemon=True)
        self._stop = False
        self._observed = threading.Semaphore(0) if getattr(sampler, "observes", False) else None
        self._thread.start()

    def _produce(self, data, sampler, batch_sizes, args):
        try:
            for i, count in enumerate(batch_sizes):
                if i and self._observed is not None and not self._wait_observed():
                    return
                if not self._put(make_step_batch(data, sampler, count, *args)):
                    return
            self._put(None)
        except BaseException as e:  # surfaced in the training thread
            self._put(e)

    def _wait_observed(self) -> bool:
        """Wait until the loop has shown the sampler the last step, unless it stopped taking steps: False then."""
        while not self._stop:
            if self._observed.acquire(timeout=0.1):
                return True
        return False

    def observed(self):
        """The loop has passed the last step's losses to the sampler: the next step may be drawn."""
        if self._observed is not None:
            self._observed.release()

    def _put(self, item) -> bool:
        """Queue `item` unless the loop stopped taking them (a preemption, an error): False then."""
        while not self._stop:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop = True
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
