"""sampler.py: loading, the global seeded sampler, LPT packing, padding-free collation, prefetching."""

import json
import re
import time

import numpy as np
import pytest
import torch

import packing
from conftest import dense_targets
from dataset import IGNORE, load_tokenized
from packing import collate, minibatch_lower_bound, pack_minibatches
from sampler import GlobalSampler
from utils import UserError


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_rows(n, seed=0, max_len=50):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(2, max_len))
        ids = rng.integers(0, 1000, length).tolist()
        labels = [i if rng.random() < 0.5 else IGNORE for i in ids[:-1]] + [ids[-1]]  # at least one target
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# --- loading -----------------------------------------------------------------------------------------------------


def test_load_is_compact_and_computes_optional_fields(tmp_path):
    rows = random_rows(30)
    rows[0]["len"] = len(rows[0]["input_ids"])
    rows[1]["num_loss_counted_tokens"] = 12345  # wrong on purpose: the loader recomputes it
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 1000)
    assert len(data) == 30 and data.input_ids.dtype == np.int32 and data.input_ids.ndim == 1
    for i, row in enumerate(rows):
        s, e = data.offsets[i], data.offsets[i + 1]
        assert data.input_ids[s:e].tolist() == row["input_ids"]
        assert data.labels[s:e].tolist() == row["labels"]
        assert data.position_ids[s:e].tolist() == list(range(e - s))
        assert data.num_loss_counted_tokens[i] == sum(lab != IGNORE for lab in row["labels"][1:])


def test_load_drops_samples_over_capacity(tmp_path, capsys):
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 50, 8, 51)]
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 10)
    assert data.lengths.tolist() == [5, 8] and data.source_lines.tolist() == [1, 3]
    assert "dropped 2 samples longer than --max-tokens-per-gpu 10" in capsys.readouterr().out
    with pytest.raises(UserError, match="none of its 4 samples fits --max-tokens-per-gpu 4"):
        load_tokenized(tmp_path / "d.jsonl", 4)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:2: not a tokenized sample.*process_data.py"),
        ('{"input_ids": [1, 2]}', "d.jsonl:2: not a tokenized sample"),
        ('{"input_ids": [1, 2], "labels": [1]}', "d.jsonl:2: 'input_ids' has 2 tokens but 'labels' has 1"),
        ('{"input_ids": [1, "a"], "labels": [1, 2]}', "d.jsonl:2: field 'input_ids' must be a list of integers"),
        ('{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0]}', "d.jsonl:2: 'position_ids' has 1"),
        ("{not json", "d.jsonl:2: invalid JSON"),
        ("5", "d.jsonl:2: not a tokenized sample"),
        ("null", "d.jsonl:2: not a tokenized sample"),
        ('"messages"', "d.jsonl:2: not a tokenized sample, needs fields 'input_ids' and 'labels'$"),
        ("[" * 100_000 + "]" * 100_000, "d.jsonl:2: invalid JSON \\(JSON nested too deeply\\)"),
        ('{"input_ids": [' + "9" * 5000 + '], "labels": [1]}', "d.jsonl:2: invalid JSON \\(Exceeds the limit"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input_ids": [1, 2], "labels": [1, 2]}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_tokenized(path, 100)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"input_ids": [1, 12.7], "labels": [1, 2]},
            "field 'input_ids' must be a list of integers, got 12.7 at index 1",
        ),
        (
            {"input_ids": [1, "12"], "labels": [1, 2]},
            "field 'input_ids' must be a list of integers, got '12' at index 1",
        ),
        (
            {"input_ids": [True, 2], "labels": [1, 2]},
            "field 'input_ids' must be a list of integers, got True at index 0",
        ),
        ({"input_ids": [1, -3], "labels": [1, 2]}, "field 'input_ids': -3 at index 1 is outside [0, 4000)"),
        ({"input_ids": [1, 2**32 + 7], "labels": [1, 2]}, f"field 'input_ids': {2**32 + 7} at index 1 is outside"),
        ({"input_ids": [1, 4000], "labels": [1, 2]}, "field 'input_ids': 4000 at index 1 is outside [0, 4000)"),
        ({"input_ids": [1, 2], "labels": [-5, 2]}, "field 'labels': -5 at index 0 is neither -100 nor in [0, 4000)"),
        ({"input_ids": [1, 2], "labels": [1, 99999]}, "field 'labels': 99999 at index 1 is neither -100 nor in"),
        ({"input_ids": [1, 2], "labels": [1, 2.0]}, "field 'labels' must be a list of integers, got 2.0 at index 1"),
        ({"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, -1]}, "field 'position_ids': -1 at index 1 is"),
    ],
)
def test_load_accepts_only_integers_the_model_can_take(tmp_path, row, message):
    """JSON integers only (no floats, strings or booleans); ids in [0, vocab), labels -100 or in [0, vocab),
    position_ids >= 0: one error naming the file, line and field, checked before any conversion can wrap."""
    path = write_rows(tmp_path / "d.jsonl", [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, row])
    with pytest.raises(UserError, match="^" + re.escape(f"{path}:2: {message}")):
        load_tokenized(path, 100, vocab_size=4000)


def test_load_accepts_a_utf8_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}\n')
    assert load_tokenized(path, 100, vocab_size=4000).input_ids.tolist() == [1, 2, 3]


def test_overlong_sequences_stop_or_are_dropped_and_documents_count_apart(tmp_path, capsys):
    """Max 8 positions: a 9-token sample is refused (or dropped with a count); a 12-token row of two 6-token
    documents (its own position_ids) is not overlong."""
    rows = [
        {"input_ids": [1] * 5, "labels": [1] * 5},
        {"input_ids": [1] * 9, "labels": [1] * 9},
        {"input_ids": [1] * 12, "labels": [1] * 12, "position_ids": [*range(6), *range(6)]},
    ]
    path = write_rows(tmp_path / "d.jsonl", rows)
    message = "1 sample with a sequence longer than the model's 8 positions (the first at line 2)"
    with pytest.raises(UserError, match=re.escape(f"--data-path {path}: {message}: drop them with --drop-overlong")):
        load_tokenized(path, 100, max_positions=8)
    data = load_tokenized(path, 100, max_positions=8, drop_overlong=True)
    assert data.source_lines.tolist() == [1, 3] and f"dropped {message}" in capsys.readouterr().out
    with pytest.raises(UserError, match="every sample has a sequence longer"):
        load_tokenized(path, 100, max_positions=4, drop_overlong=True)


def test_load_drops_samples_without_targets(tmp_path, capsys):
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]},
        {"input_ids": [4, 5, 6], "labels": [-100, 5, 6]},
        {"input_ids": [7, 8], "labels": [7, -100]},  # only the first token is labelled: nothing to predict
    ]
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 100)
    assert data.input_ids.tolist() == [4, 5, 6] and data.offsets.tolist() == [0, 3]
    assert data.source_lines.tolist() == [2] and data.num_loss_counted_tokens.tolist() == [2]
    assert "dropped 2 samples with no loss-counted token" in capsys.readouterr().out
    write_rows(tmp_path / "none.jsonl", [rows[0], rows[2]])
    with pytest.raises(UserError, match="no sample has a loss-counted token"):
        load_tokenized(tmp_path / "none.jsonl", 100)


def test_load_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty file"):
        load_tokenized(tmp_path / "e.jsonl", 100)
    with pytest.raises(UserError, match="no such file"):
        load_tokenized(tmp_path / "missing.jsonl", 100)


def test_load_is_fast_for_many_samples(tmp_path):
    """100k samples load into flat arrays (a smoke check of the approach, not a timing assertion)."""
    rows = "".join(json.dumps({"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}) + "\n" for _ in range(100_000))
    (tmp_path / "big.jsonl").write_text(rows)
    data = load_tokenized(tmp_path / "big.jsonl", 100)
    assert len(data) == 100_000 and data.num_loss_counted_tokens.sum() == 300_000


# --- sampling ----------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_covers_each_epoch_exactly_once():
    a, b = GlobalSampler(103, seed=7), GlobalSampler(103, seed=7)
    seq_a = np.concatenate([a.next_indices(10) for _ in range(31)])  # 310 = 3 epochs + 1, batches straddle epochs
    seq_b = np.concatenate([b.next_indices(10) for _ in range(31)])
    assert np.array_equal(seq_a, seq_b)
    for epoch in range(3):
        assert sorted(seq_a[epoch * 103 : (epoch + 1) * 103].tolist()) == list(range(103))
    assert not np.array_equal(seq_a[:103], seq_a[103:206]), "each epoch is a fresh permutation"
    assert not np.array_equal(seq_a[:103], GlobalSampler(103, seed=8).next_indices(103))
    assert (a.epoch, a.offset) == (3, 1)


def test_sampler_state_restores_mid_epoch():
    s = GlobalSampler(50, seed=1)
    s.next_indices(17)
    state = s.state_dict()
    expected = np.concatenate([s.next_indices(20) for _ in range(4)])
    restored = GlobalSampler(50, seed=1)
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert np.array_equal(np.concatenate([restored.next_indices(20) for _ in range(4)]), expected)
    with pytest.raises(ValueError):
        GlobalSampler(51, seed=1).load_state_dict(state)


# --- packing -----------------------------------------------------------------------------------------------------


def distributions(rng, n):
    return {
        "uniform": rng.integers(1, 4096, n),
        "lognormal": np.clip(rng.lognormal(6.0, 1.0, n).astype(int), 1, 8192),
        "bimodal": np.where(rng.random(n) < 0.97, rng.integers(50, 400, n), rng.integers(6000, 8192, n)),
    }


def check_plan(plan, lengths, capacity, ranks):
    assert len(plan) == ranks
    counts = {len(r) for r in plan}
    assert len(counts) == 1, "every rank has the same number of minibatches"
    flat = sorted(i for r in plan for mb in r for i in mb)
    assert flat == list(range(len(lengths))), "every sample exactly once"
    for r in plan:
        for mb in r:
            assert sum(lengths[i] for i in mb) <= capacity
    return counts.pop()


@pytest.mark.parametrize("ranks", [1, 2, 8, 64])
def test_pack_minibatches_properties(ranks):
    rng = np.random.default_rng(ranks)
    within_one = total = 0
    for batch in (32, 256, 2048):
        for name, lengths in distributions(rng, batch).items():
            plan = pack_minibatches(lengths, 8192, ranks)
            m = check_plan(plan, lengths, 8192, ranks)
            assert plan == pack_minibatches(lengths.tolist(), 8192, ranks), "deterministic, accepts lists"
            bound = minibatch_lower_bound(lengths, 8192, ranks)
            assert m >= bound, name
            within_one += m <= bound + 1
            total += 1
    assert within_one == total


def test_pack_balances_ranks_within_each_minibatch():
    lengths = np.random.default_rng(0).integers(100, 2000, 512)
    plan = pack_minibatches(lengths, 16384, 8)
    for k in range(len(plan[0])):
        loads = [sum(lengths[i] for i in plan[r][k]) for r in range(8)]
        assert max(loads) <= 1.1 * np.mean(loads)


def test_pack_edge_cases():
    assert pack_minibatches([5, 3], 10, 4) == [[[0]], [[1]], [[]], [[]]]  # fewer samples than ranks: empty ones
    assert pack_minibatches([], 10, 2) == [[], []]
    assert check_plan(pack_minibatches([10] * 7, 10, 2), [10] * 7, 10, 2) == 4
    with pytest.raises(ValueError):
        pack_minibatches([11], 10, 1)


def padded_size(lengths, mb) -> int:
    return len(mb) * max((lengths[i] for i in mb), default=0)


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_padded_packing_bounds_the_padded_size(ranks):
    """For models trained on padded batches: no minibatch pads past the capacity, and far less padding overall than
    a token-packed plan (which groups long and short samples: LPT) would cost as padded batches."""
    rng = np.random.default_rng(ranks)
    for batch in (32, 256):
        for name, lengths in distributions(rng, batch).items():
            plan = pack_minibatches(lengths, 8192, ranks, padded=True)
            m = check_plan(plan, lengths, 8192, ranks)
            assert all(padded_size(lengths, mb) <= 8192 for r in plan for mb in r), name
            assert m >= minibatch_lower_bound(lengths, 8192, ranks)
            assert plan == pack_minibatches(lengths.tolist(), 8192, ranks, padded=True), "deterministic"
            padded = sum(padded_size(lengths, mb) for r in plan for mb in r)
            packed = sum(padded_size(lengths, mb) for r in pack_minibatches(lengths, 8192, ranks) for mb in r)
            assert padded <= 1.4 * lengths.sum() and padded < packed, name
    assert pack_minibatches([3, 1, 3, 1], 8, 1) == [[[0, 2, 1, 3]]]  # 8 tokens, but 4 x 3 = 12 padded
    assert pack_minibatches([3, 1, 3, 1], 8, 1, padded=True) == [[[0, 2], [1, 3]]]


def test_samples_past_the_packings_switch_get_a_minibatch_to_themselves(tmp_path):
    """Packing(alone_from=N): a sample whose positions reach N (by its length, or by position_ids it carries)
    shares no minibatch; the rest pack as usual, and every sample is planned exactly once."""
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 30, 4, 12, 3, 6)]
    rows[3]["position_ids"] = list(range(6)) * 2  # 12 tokens, but positions only up to 5: not past the switch
    rows[5]["position_ids"] = [0, 1, 2, 3, 4, 40]
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 100)
    assert data.spans.tolist() == [5, 30, 4, 6, 3, 41]
    for ranks in (1, 2):
        plan = packing.Packing(alone_from=20).plan(data, np.arange(6), 64, ranks)
        cells = [mb for r in plan for mb in r]
        assert sorted(i for mb in cells for i in mb) == list(range(6))
        assert [1] in cells and [5] in cells
        assert len(plan[0]) == (3 if ranks == 1 else 2)
    assert packing.Packing().plan(data, np.arange(6), 64, 1) == [[[1, 3, 5, 0, 2, 4]]]
    assert pack_minibatches([5, 30, 4], 64, 1, alone=np.array([False, True, False])) == [[[1], [0, 2]]]


def test_best_fit_avoids_an_extra_minibatch():
    """LPT alone fails [9, 9, 6, 5, 4, 3, 2] in 4 bins of 10 (it spreads 6, 5, 4 over the emptiest bins and
    strands the 3); best fit finds 9 | 9 | 6+4 | 5+3+2, so one minibatch on 4 ranks suffices."""
    lengths = np.array([9, 9, 6, 5, 4, 3, 2])
    assert not packing._lpt(lengths, 4, 10)[2]
    plan = pack_minibatches(lengths, 10, 4)
    assert check_plan(plan, lengths, 10, 4) == 1


# --- collation ---------------------------------------------------------------------------------------------------


def test_collate_shifts_within_samples_only(tmp_path):
    rows = [
        {"input_ids": [10, 11, 12, 13], "labels": [-100, 11, 12, 13]},
        {"input_ids": [20, 21, 22], "labels": [20, 21, 22]},  # a first token labelled: never a target
        {"input_ids": [30, 31, 32], "labels": [-100, -100, 32]},
    ]
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 100)
    mb = collate(data, [1, 0, 2])
    assert mb.input_ids.tolist() == [[20, 21, 22, 10, 11, 12, 13, 30, 31, 32]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]
    assert dense_targets(mb).tolist() == [[21, 22, IGNORE, 11, 12, 13, IGNORE, IGNORE, 32, IGNORE]]
    assert mb.cu_seq_lens.tolist() == [0, 3, 7, 10] and mb.max_length == 4
    assert mb.num_tokens == 10 and mb.num_loss_tokens == 6
    assert mb.num_loss_tokens == int(data.num_loss_counted_tokens[[1, 0, 2]].sum())


def test_collate_respects_own_position_ids(tmp_path):
    """A document-block row carries position_ids restarting inside it: each block is its own sequence."""
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}]
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", rows), 100)
    assert data.num_loss_counted_tokens.tolist() == [3]
    mb = collate(data, [0, 0])
    assert mb.cu_seq_lens.tolist() == [0, 3, 5, 8, 10]
    assert dense_targets(mb).tolist() == [[2, 3, IGNORE, 5, IGNORE] * 2]


def test_collate_empty_minibatch_is_a_dummy_row():
    mb = collate(None, [], pad_token_id=7)
    assert mb.input_ids.tolist() == [[7]] and dense_targets(mb).tolist() == [[IGNORE]]
    assert mb.num_tokens == 0 and mb.num_loss_tokens == 0


def test_prefetcher_matches_direct_computation_and_surfaces_errors(tmp_path):
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", random_rows(40)), 100)
    direct_sampler, pre_sampler = GlobalSampler(len(data), 3), GlobalSampler(len(data), 3)
    sizes = [8, 8, 8, 5]
    direct = [packing.make_step_batch(data, direct_sampler, n, 120, 1, 2, 0) for n in sizes]
    fetched = list(packing.Prefetcher(data, pre_sampler, iter(sizes), 120, 1, 2, 0))
    assert len(fetched) == 4
    for a, b in zip(direct, fetched):
        assert a.sampler_state == b.sampler_state and a.num_loss_tokens == b.num_loss_tokens
        assert len(a.minibatches) == len(b.minibatches)
        for x, y in zip(a.minibatches, b.minibatches):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(dense_targets(x), dense_targets(y))

    def bad_sizes():
        yield 4
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(packing.Prefetcher(data, GlobalSampler(len(data), 3), bad_sizes(), 120, 0, 1))


def test_a_prefetcher_the_loop_stopped_reading_ends_at_once(tmp_path):
    """The loop leaves early (a preemption save, an error) with the queue full: the thread must not stay blocked on
    its last item, or close() waits its 5 s timeout and leaves the thread running into interpreter teardown."""
    data = load_tokenized(write_rows(tmp_path / "d.jsonl", random_rows(40)), 100)
    fetcher = packing.Prefetcher(data, GlobalSampler(len(data), 3), iter([4]), 120, 0, 1, depth=1)
    while not fetcher._queue.full():  # its one step is queued; the end of the stream waits behind it
        time.sleep(0.01)
    fetcher.close()
    assert not fetcher._thread.is_alive()
