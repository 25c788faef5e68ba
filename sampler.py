"""Samplers: which samples each optimizer step trains on.

The interface (a sampler is any object with these; `build_sampler` at the bottom is the one place that names them):

    observes: bool                 False: drawn ahead by the prefetch thread. True: step t+1 is drawn only after
                                   observe() has seen step t (the loop waits for it), so the draw is exact.
    epoch: int                     passes over the data so far (the metrics' `epoch`), at the next draw
    next_indices(count)            the next step's sample indices (a global batch, the same on every rank)
    observe(indices, losses, counts)   only if observes: the step's samples in batch order, each one's summed loss
                                   and target count (float64 / int64 arrays, equal on every rank)
    state_dict() -> dict           JSON; the state saved with step t is the state after step t (drawn, observed)
    load_state_dict(state)         restores it; ValueError (one line) if it is not this run's
    check_state(state)             static: ValueError if a saved state means nothing (checked before a checkpoint
                                   is used: such a checkpoint is damaged)

Every rank sees the whole global batch and takes its own share (packing.py), so the data order does not depend on
the world size. Loading is dataset.py; packing, collating and the prefetch thread are packing.py.
"""

import base64

import numpy as np

from packing import pack_minibatches  # noqa: F401  (sampler.pack_minibatches: other tools import it here)


class GlobalSampler:
    """Infinite seeded sampler over n samples: epoch e is a fresh permutation drawn from (seed, e). Identical on
    every rank; its position is (epoch, offset)."""

    observes = False

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, count: int) -> np.ndarray:
        """The next `count` sample indices; a batch may run on into the next epoch's permutation."""
        out = []
        while count > 0:
            take = min(count, self.num_samples - self.offset)
            out.append(self.permutation(self.epoch)[self.offset : self.offset + take])
            self.offset += take
            count -= take
            if self.offset == self.num_samples:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples}

    @staticmethod
    def check_state(state: dict):
        """A saved state's meaning (ValueError says what is wrong): its fields, counts, an offset inside its
        samples. Checked before a checkpoint is used: a state that fails is damaged."""
        fields = ("epoch", "offset", "seed", "num_samples")
        if sorted(state) != sorted(fields):
            raise ValueError(f"sampler state fields {sorted(state)}, expected {list(fields)}")
        for name in fields:
            if type(state[name]) is not int or state[name] < 0:
                raise ValueError(f"sampler {name} {state[name]!r} is not a count")
        if not state["offset"] < max(state["num_samples"], 1):
            raise ValueError(f"sampler offset {state['offset']} is outside its {state['num_samples']} samples")

    def load_state_dict(self, state: dict):
        self.check_state(state)
        if (state["seed"], state["num_samples"]) != (self.seed, self.num_samples):
            raise ValueError(
                f"sampler state is for seed {state['seed']} over {state['num_samples']} samples, "
                f"not seed {self.seed} over {self.num_samples}"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]


class LossAwareSampler:
    """Online data selection: sample i is drawn with probability (1 - uniform) x l_i^power / sum_j l_j^power +
    uniform / n, where l_i is its last seen per-token loss (a sample not seen yet counts as the highest loss seen,
    1.0 before any). Each step draws its global batch from a seeded stream of its own (seed, step): without
    replacement while the batch fits the samples of nonzero probability. Exact on resume: the state is the losses
    (float32, base64 in trainer_state.json: ~5.3 MB for a million samples) and the step and draw counts."""

    observes = True

    def __init__(self, num_samples: int, seed: int, power: float, uniform: float):
        self.num_samples, self.seed, self.power, self.uniform = num_samples, seed, power, uniform
        self.losses = np.full(num_samples, np.nan, dtype=np.float32)  # NaN: not seen yet
        self.steps, self.drawn = 0, 0

    @property
    def epoch(self) -> int:
        return self.drawn // max(self.num_samples, 1)

    def probabilities(self) -> np.ndarray:
        seen = ~np.isnan(self.losses)
        highest = float(self.losses[seen].max()) if seen.any() else 1.0
        weights = np.where(seen, self.losses, highest).astype(np.float64) ** self.power
        total = weights.sum()
        uniform = self.uniform if total > 0 else 1.0  # every loss 0: nothing to prefer
        return (1 - uniform) * weights / (total if total > 0 else 1.0) + uniform / self.num_samples

    def next_indices(self, count: int) -> np.ndarray:
        p = self.probabilities()
        rng = np.random.default_rng([self.seed, self.steps])
        indices = rng.choice(self.num_samples, size=count, replace=count > np.count_nonzero(p), p=p)
        self.steps, self.drawn = self.steps + 1, self.drawn + count
        return indices

    def observe(self, indices: np.ndarray, losses: np.ndarray, counts: np.ndarray):
        seen = counts > 0
        self.losses[indices[seen]] = losses[seen] / counts[seen]

    def state_dict(self) -> dict:
        return {
            "kind": "loss-aware",
            "seed": self.seed,
            "num_samples": self.num_samples,
            "power": self.power,
            "uniform": self.uniform,
            "steps": self.steps,
            "drawn": self.drawn,
            "losses": base64.b64encode(self.losses.tobytes()).decode(),
        }

    @staticmethod
    def check_state(state: dict):
        fields = ("kind", "seed", "num_samples", "power", "uniform", "steps", "drawn", "losses")
        if sorted(state) != sorted(fields) or state["kind"] != "loss-aware":
            raise ValueError(f"loss-aware sampler state fields {sorted(state)}, expected {list(fields)}")
        for name in ("seed", "num_samples", "steps", "drawn"):
            if type(state[name]) is not int or state[name] < 0:
                raise ValueError(f"sampler {name} {state[name]!r} is not a count")
        if not isinstance(state["losses"], str) or len(state["losses"]) != 4 * -(-4 * state["num_samples"] // 3):
            raise ValueError(f"sampler losses are not {state['num_samples']} float32 values in base64")

    def load_state_dict(self, state: dict):
        self.check_state(state)
        saved = (state["seed"], state["num_samples"], state["power"], state["uniform"])
        if saved != (self.seed, self.num_samples, self.power, self.uniform):
            raise ValueError(f"sampler state is for (seed, samples, power, uniform) {saved}, not this run's")
        losses = np.frombuffer(base64.b64decode(state["losses"], validate=True), dtype=np.float32)
        self.losses, self.steps, self.drawn = losses.copy(), state["steps"], state["drawn"]


# --sampler's choices: the one place a sampler is named. A saved state says which wrote it by its "kind" (none:
# uniform, as every checkpoint saved before samplers had kinds).
SAMPLERS = {"uniform": GlobalSampler, "loss-aware": LossAwareSampler}


def build_sampler(cfg, num_samples: int):
    """--sampler's sampler over the run's samples."""
    if cfg.sampler == "loss-aware":
        return LossAwareSampler(num_samples, cfg.seed, cfg.loss_aware_power, cfg.loss_aware_uniform)
    return GlobalSampler(num_samples, cfg.seed)


def check_state(state: dict):
    """A saved sampler state's meaning, checked by the sampler that wrote it (ValueError says what is wrong)."""
    kind = state.get("kind", "uniform")
    if kind not in SAMPLERS:
        raise ValueError(f"sampler kind {kind!r} is none of {', '.join(SAMPLERS)}")
    SAMPLERS[kind].check_state(state)
