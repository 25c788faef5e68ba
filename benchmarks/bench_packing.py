"""Packing quality and speed: leantrain's pack_minibatches vs a greedy baseline vs mini_trainer's LPT packer.

    pip install --no-deps --target .bench-env rhai-innovation-mini-trainer==0.9.0   # benchmark-only, no deps
    PYTHONPATH=.bench-env python benchmarks/bench_packing.py

For each length distribution, global batch size and world size: minibatches per step against the lower bound
(ceil(tokens / (capacity x ranks)), and what the samples over half the capacity force), the max/mean token load
across ranks within a minibatch (1.0 = perfectly balanced), and the time to plan one step. mini_trainer's
`batch_lengths_to_minibatches_lpt` is called once per rank, as each rank does in its trainer. Plan times: ours is
one call that yields the whole plan (every rank runs it); for mini_trainer both one call (one rank's share, the
wall time when ranks run in parallel) and all calls (the whole plan) are shown.

Then the packing for models trained on padded batches (`padded=True`): padded tokens (samples x longest, summed
over minibatches) per real token, and the largest minibatch's padded size per capacity, when rows packed by tokens
are run as padded batches (what the padded path did before) against packing by padded size; minibatches per step.
`chat`: the issue-9 GPU benchmark's lengths (log-normal, mean ~944, 64 samples per step, capacity 32768).
"""

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from packing import minibatch_lower_bound
from sampler import pack_minibatches  # noqa: E402

CAPACITY = 16384
BATCH_SIZES = [32, 128, 512, 2048, 4096]
RANKS = [1, 2, 8, 64]
BATCHES_PER_CELL = 5


def load_mini_trainer_packer():
    """mini_trainer's batch_packer.py loaded on its own (its package __init__ imports the whole trainer)."""
    spec = importlib.util.find_spec("mini_trainer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "batch_packer.py"
    module_spec = importlib.util.spec_from_file_location("mini_trainer_batch_packer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.batch_lengths_to_minibatches_lpt


def sample_lengths(rng, name, n):
    if name == "uniform":
        return rng.integers(16, 4096, n)
    if name == "lognormal":
        return np.clip(rng.lognormal(6.3, 1.0, n).astype(np.int64), 16, CAPACITY)
    # bimodal: mostly short chats, 2% near-capacity outliers
    return np.where(rng.random(n) < 0.98, rng.integers(64, 1024, n), rng.integers(CAPACITY // 2, CAPACITY, n))


def greedy(lengths, capacity, ranks):
    """Baseline: fill minibatches in arrival order, rank after rank (what a naive packer does)."""
    bins, load = [[]], 0
    for i, n in enumerate(lengths.tolist()):
        if load + n > capacity:
            bins.append([])
            load = 0
        bins[-1].append(i)
        load += n
    m = -(-len(bins) // ranks)
    bins += [[]] * (m * ranks - len(bins))
    return [[bins[k * ranks + r] for k in range(m)] for r in range(ranks)]


def imbalance(plan, lengths):
    """Mean over minibatches of max/mean rank load (empty minibatch slots count as zero load)."""
    ratios = []
    for k in range(len(plan[0])):
        loads = np.array([lengths[mb].sum() if mb else 0 for mb in (rank[k] for rank in plan)])
        if loads.sum():
            ratios.append(loads.max() / loads.mean())
    return float(np.mean(ratios)) if ratios else 1.0


def timed(fn, *args, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    mt_pack = load_mini_trainer_packer()
    if mt_pack is None:
        print("mini_trainer not found: install it as shown in this file's docstring to compare with its LPT packer")
    pack_minibatches(np.array([1, 2, 3]), 4, 2)  # compile (numba caches it on disk afterwards)
    if mt_pack:
        mt_pack([1, 2, 3], 4, 2, 0)
    rng = np.random.default_rng(0)
    rows, within_one, cells, more_than_mt, slower_than_mt, slower_than_mt_all = [], 0, 0, 0, 0, 0
    print(f"capacity {CAPACITY} tokens per rank per minibatch; {BATCHES_PER_CELL} batches per cell")
    print(
        f"{'dist':9} {'batch':>5} {'ranks':>5} {'bound':>6} | {'leantrain':>9} {'greedy':>7} {'mini_tr':>7} | "
        f"{'imbal lt':>8} {'greedy':>7} {'mini_tr':>7} | {'ms lt':>7} {'mt 1':>7} {'mt all':>7}"
    )
    for dist in ("uniform", "lognormal", "bimodal"):
        for batch in BATCH_SIZES:
            for ranks in RANKS:
                agg = {k: [] for k in ("bound", "lt", "gr", "mt", "ilt", "igr", "imt", "tlt", "tmt", "tmt_all")}
                for _ in range(BATCHES_PER_CELL):
                    lengths = sample_lengths(rng, dist, batch)
                    bound = minibatch_lower_bound(lengths, CAPACITY, ranks)
                    plan, t = timed(pack_minibatches, lengths, CAPACITY, ranks)
                    gplan = greedy(lengths, CAPACITY, ranks)
                    agg["bound"].append(bound)
                    agg["lt"].append(len(plan[0]))
                    agg["gr"].append(len(gplan[0]))
                    agg["ilt"].append(imbalance(plan, lengths))
                    agg["igr"].append(imbalance(gplan, lengths))
                    agg["tlt"].append(t)
                    within_one += len(plan[0]) <= bound + 1
                    cells += 1
                    if mt_pack:
                        per_rank, times = [], []
                        for r in range(ranks):
                            out, t = timed(mt_pack, lengths.tolist(), CAPACITY, ranks, r)
                            per_rank.append([[i for i in mb if i >= 0] for mb in out])
                            times.append(t)
                        agg["mt"].append(len(per_rank[0]))
                        agg["imt"].append(imbalance(per_rank, lengths))
                        agg["tmt"].append(float(np.mean(times)))
                        agg["tmt_all"].append(float(np.sum(times)))
                        more_than_mt += len(plan[0]) > len(per_rank[0])
                        slower_than_mt += agg["tlt"][-1] > agg["tmt"][-1]
                        slower_than_mt_all += agg["tlt"][-1] > agg["tmt_all"][-1]
                mean = {k: (float(np.mean(v)) if v else float("nan")) for k, v in agg.items()}
                print(
                    f"{dist:9} {batch:5d} {ranks:5d} {mean['bound']:6.1f} | {mean['lt']:9.1f} {mean['gr']:7.1f} "
                    f"{mean['mt']:7.1f} | {mean['ilt']:8.3f} {mean['igr']:7.3f} {mean['imt']:7.3f} | "
                    f"{mean['tlt'] * 1e3:7.3f} {mean['tmt'] * 1e3:7.3f} {mean['tmt_all'] * 1e3:7.2f}"
                )
                rows.append(mean)
    print(f"\nbatches within one minibatch of the lower bound: {within_one}/{cells} ({within_one / cells:.1%})")
    if mt_pack:
        print(f"batches where leantrain used more minibatches than mini_trainer: {more_than_mt}/{cells}")
        print(
            f"batches where leantrain's whole plan took longer than mini_trainer's whole plan: "
            f"{slower_than_mt_all}/{cells}; than one mini_trainer call (one rank's share): {slower_than_mt}/{cells}"
        )
        print(
            f"plan time, means per cell summed: leantrain {sum(r['tlt'] for r in rows) * 1e3:.1f} ms, mini_trainer "
            f"one call {sum(r['tmt'] for r in rows) * 1e3:.1f} ms, all calls {sum(r['tmt_all'] for r in rows) * 1e3:.1f} ms"
        )
    padded_report(rng)


def padded_report(rng):
    def padded_sizes(plan, lengths):
        return [len(mb) * int(lengths[mb].max()) for r in plan for mb in r if mb]

    print("\npadded batches: padded tokens / real tokens, largest minibatch / capacity, minibatches per step")
    print(f"{'dist':9} {'batch':>5} {'ranks':>5} {'cap':>6} | {'by tokens':>17} {'by padded size':>17}")
    for dist, batch, capacity in [(d, b, CAPACITY) for d in ("uniform", "lognormal", "bimodal") for b in (64, 512)] + [
        ("chat", 64, 32768)
    ]:
        for ranks in (1, 8):
            cols = []
            for padded in (False, True):
                real = pad = worst = mbs = 0
                for _ in range(BATCHES_PER_CELL):
                    if dist == "chat":
                        lengths = np.clip(rng.lognormal(np.log(944) - 0.18, 0.6, batch).astype(int), 32, 4096)
                    else:
                        lengths = sample_lengths(rng, dist, batch)
                    plan = pack_minibatches(lengths, capacity, ranks, padded)
                    sizes = padded_sizes(plan, lengths)
                    real, pad, worst = real + lengths.sum(), pad + sum(sizes), max(worst, max(sizes) / capacity)
                    mbs += len(plan[0]) / BATCHES_PER_CELL
                cols.append(f"{pad / real:5.2f} {worst:5.2f} {mbs:5.1f}")
            print(f"{dist:9} {batch:5d} {ranks:5d} {capacity:6d} | {cols[0]:>17} {cols[1]:>17}")


if __name__ == "__main__":
    main()
