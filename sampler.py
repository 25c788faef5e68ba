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
import math

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


class MixtureSampler:
    """A data mixture: each step's global batch drawn from several sources by weight. Step t splits its count among
    the sources by one multinomial draw from a seeded stream of its own, (seed, 0, t), with probabilities weight /
    sum of weights; each source is walked like GlobalSampler, a fresh permutation per pass over it from
    (seed, 1 + source, pass). Sources are contiguous in the run's data (dataset.concat_samples): source k's sample
    i is starts[k] + i. Identical on every rank; exact on resume: the state is the step count and each source's
    position (its pass and offset)."""

    observes = False

    def __init__(self, counts: list[int], weights: list[float], seed: int):
        self.counts, self.weights, self.seed = [int(c) for c in counts], [float(w) for w in weights], seed
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.probabilities = np.asarray(self.weights) / sum(self.weights)
        self.steps = 0
        self.passes, self.offsets = [0] * len(counts), [0] * len(counts)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (pass, its permutation)

    @property
    def drawn(self) -> list[int]:
        """Samples drawn from each source so far."""
        return [p * n + o for p, n, o in zip(self.passes, self.counts, self.offsets)]

    @property
    def epoch(self) -> int:
        """Passes over the whole data (every source's samples once): what --max-epochs counts."""
        return sum(self.drawn) // sum(self.counts)

    def split(self, count: int) -> np.ndarray:
        """How many of the next step's `count` samples each source gives."""
        return np.random.default_rng([self.seed, 0, self.steps]).multinomial(count, self.probabilities)

    def walk(self, source: int, count: int) -> np.ndarray:
        """The source's next `count` samples (indices within it), running on into its next pass."""
        out, n = [], self.counts[source]
        while count > 0:
            this_pass = self.passes[source]
            if self._perms.get(source, (-1,))[0] != this_pass:
                perm = np.random.default_rng([self.seed, 1 + source, this_pass]).permutation(n)
                self._perms[source] = (this_pass, perm)
            take = min(count, n - self.offsets[source])
            out.append(self._perms[source][1][self.offsets[source] : self.offsets[source] + take])
            self.offsets[source] += take
            count -= take
            if self.offsets[source] == n:
                self.passes[source], self.offsets[source] = this_pass + 1, 0
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def next_indices(self, count: int) -> np.ndarray:
        """The next step's samples: each source's share, in source order."""
        parts = [self.walk(k, int(c)) + self.starts[k] for k, c in enumerate(self.split(count))]
        self.steps += 1
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {
            "kind": "mixture",
            "seed": self.seed,
            "counts": list(self.counts),
            "weights": list(self.weights),
            "steps": self.steps,
            "passes": list(self.passes),
            "offsets": list(self.offsets),
        }

    @staticmethod
    def check_state(state: dict):
        fields = ("kind", "seed", "counts", "weights", "steps", "passes", "offsets")
        if sorted(state) != sorted(fields) or state["kind"] != "mixture":
            raise ValueError(f"mixture sampler state fields {sorted(state)}, expected {list(fields)}")
        for name in ("seed", "steps"):
            if type(state[name]) is not int or state[name] < 0:
                raise ValueError(f"sampler {name} {state[name]!r} is not a count")
        lists = [state[name] for name in ("counts", "weights", "passes", "offsets")]
        if not all(isinstance(x, list) for x in lists) or len({len(x) for x in lists}) != 1 or not state["counts"]:
            raise ValueError("mixture sampler counts, weights, passes and offsets are not lists of one length")
        for name in ("counts", "passes", "offsets"):
            if not all(type(x) is int and x >= 0 for x in state[name]):
                raise ValueError(f"mixture sampler {name} {state[name]!r} are not counts")
        if not all(type(w) is float and math.isfinite(w) and w > 0 for w in state["weights"]):
            raise ValueError(f"mixture sampler weights {state['weights']!r} are not numbers > 0")
        if not all(0 <= o < n for o, n in zip(state["offsets"], state["counts"])):
            raise ValueError(f"mixture sampler offsets {state['offsets']} are outside their sources {state['counts']}")

    def load_state_dict(self, state: dict):
        self.check_state(state)
        saved = (state["seed"], state["counts"], state["weights"])
        if saved != (self.seed, self.counts, self.weights):
            raise ValueError(f"sampler state is for (seed, source counts, weights) {saved}, not this run's")
        self.steps, self.passes, self.offsets = state["steps"], list(state["passes"]), list(state["offsets"])


# Every sampler by the "kind" its saved state names (none: uniform, as every checkpoint saved before samplers had
# kinds): the one place a sampler is named. --sampler chooses among CHOICES; a mixture is chosen by weights in
# --data-path.
SAMPLERS = {"uniform": GlobalSampler, "loss-aware": LossAwareSampler, "mixture": MixtureSampler}
CHOICES = ("uniform", "loss-aware")


def build_sampler(cfg, num_samples: int, sources=None):
    """The run's sampler over its samples: a mixture where `sources` (dataset.Sources) has weights, else
    --sampler's."""
    if sources is not None and sources.weights is not None:
        return MixtureSampler(sources.counts, sources.weights, cfg.seed)
    if cfg.sampler == "loss-aware":
        return LossAwareSampler(num_samples, cfg.seed, cfg.loss_aware_power, cfg.loss_aware_uniform)
    return GlobalSampler(num_samples, cfg.seed)


def check_state(state: dict):
    """A saved sampler state's meaning, checked by the sampler that wrote it (ValueError says what is wrong)."""
    kind = state.get("kind", "uniform")
    if kind not in SAMPLERS:
        raise ValueError(f"sampler kind {kind!r} is none of {', '.join(SAMPLERS)}")
    SAMPLERS[kind].check_state(state)


def drawn_per_source(state: dict, counts: list[int]) -> np.ndarray:
    """Samples drawn from each source (counts: each one's samples, contiguous in the run's data) by a saved sampler
    state: the state after the last finished step, {} before the first. A mixture's from its walks; the uniform
    sampler's over the sources concatenated from its position in its permutation."""
    counts = np.asarray(counts, dtype=np.int64)
    if not state:
        return np.zeros(len(counts), np.int64)
    if state.get("kind") == "mixture":
        return np.asarray(state["passes"]) * counts + np.asarray(state["offsets"])
    if "kind" in state:
        raise ValueError(f"the {state['kind']} sampler does not tell samples drawn per source")
    done = GlobalSampler(state["num_samples"], state["seed"]).permutation(state["epoch"])[: state["offset"]]
    source_of = np.repeat(np.arange(len(counts)), counts)
    return state["epoch"] * counts + np.bincount(source_of[done], minlength=len(counts))
