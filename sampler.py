"""Samplers: which samples each optimizer step trains on.

`GlobalSampler` is infinite and seeded: epoch e is a fresh permutation drawn from (seed, e), the same on every rank.
Every rank sees the whole global batch and takes its own share (packing.py), so the data order does not depend on
the world size, and the sampler's whole state is (epoch, offset). Loading is dataset.py; packing, collating and the
prefetch thread are packing.py.
"""

import numpy as np

from packing import pack_minibatches  # noqa: F401  (sampler.pack_minibatches: other tools import it here)


class GlobalSampler:
    """Infinite seeded sampler over n samples. Identical on every rank; its position is (epoch, offset)."""

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
