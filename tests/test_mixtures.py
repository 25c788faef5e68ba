"""Data mixtures and several validation sets (issue 26): one grammar for --data-path and --validation-data-path
(its errors one line each); a single bare path is today's run (the code before the change, from git: same losses,
data order, fingerprint and sampler state, and its checkpoints resume); a mixture draws its sources by weight
(a 5-sigma test on the sampler), identically on 1 and 2 ranks and after SIGKILL + --resume; each source's training
loss and each set's val_loss equal a direct computation (1 and 2 ranks); the plot and the trackers get every key."""

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_checkpoint_trust import one_error_line, run  # noqa: F401  (run: train.py's main in this process)
from test_learning_samplers import kill_all, start
from transformers import AutoModelForCausalLM

import train
from batch_metrics import SourceMetrics, Trackers, plot
from conftest import ROOT, code_at, cpu_env, tokenized_conversations, torchrun
from dataset import Sources, load_tokenized, parse_sources
from packing import collate
from sampler import GlobalSampler, MixtureSampler, build_sampler, check_state, drawn_per_source
from test_train import CAP_SMALL
from utils import UserError

BATCH, SEED = 8, 5
BEFORE_MIXTURES = "d1fe13a"  # the last commit before this change: a single bare path must run as it did there
TIMING = ("tokens_per_second", "samples_per_second", "time_per_step", "peak_memory_gb", "timestamp", "val_time")


@pytest.fixture(scope="module")
def files(qwen_dir, tmp_path_factory):
    """Tokenized conversations split by line into two training sources (26 and 10 samples) and two validation sets
    (8 each): one process_data run."""
    folder = tmp_path_factory.mktemp("mixtures")
    lines = open(tokenized_conversations(folder, qwen_dir, 80, seed=21, max_tokens=CAP_SMALL)).readlines()
    assert len(lines) >= 52
    paths = {}
    for name, part in (
        ("chat", lines[:26]),
        ("code", lines[26:36]),
        ("heldout", lines[36:44]),
        ("other", lines[44:52]),
    ):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(part))
    return paths


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "training_metrics_0.jsonl")]


def without_timing(rows_):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows_]


def trainer_state(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def in_process(*args):
    """train.py's main in this process (no interpreter to start: the fastest run), which must succeed."""
    try:
        train.main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, f"train.py exited {e.code}"


def model_config():
    return SimpleNamespace(vocab_size=4000, get_text_config=lambda: None)


def config(data_path, **overrides):
    values = dict(
        model_name_or_path="-", data_path=data_path, output_dir="-", batch_size=BATCH, max_tokens_per_gpu=CAP_SMALL,
        seed=SEED,
    ) | overrides  # fmt: skip
    return train.TrainConfig(**values)


# --- the grammar --------------------------------------------------------------------------------------------------


def test_the_grammar_names_weights_and_defaults():
    assert parse_sources("data/train.jsonl", "--data-path") == [parse_sources("train=data/train.jsonl", "-")[0]]
    got = parse_sources("chat=a/c.jsonl:3,b/code.v2.jsonl,x=d.jsonl:0.25,e.jsonl:1e-1", "--data-path")
    assert [(s.name, s.path, s.weight) for s in got] == [
        ("chat", "a/c.jsonl", 3.0),
        ("code.v2", "b/code.v2.jsonl", None),
        ("x", "d.jsonl", 0.25),
        ("e", "e.jsonl", 0.1),
    ]
    assert parse_sources("runs:2024/v.jsonl", "--validation-data-path", weights=False)[0].path == "runs:2024/v.jsonl"


@pytest.mark.parametrize(
    "spec, flag, message",
    [
        ("a.jsonl,,b.jsonl", "--data-path", "an empty entry"),
        ("a.jsonl,", "--data-path", "an empty entry"),
        ("a.jsonl,x/a.jsonl", "--data-path", "two sources named 'a' (a.jsonl, x/a.jsonl): name them"),
        ("bad name=a.jsonl", "--data-path", "NAME 'bad name' is not a name"),
        ("x/y=a.jsonl", "--data-path", "NAME 'x/y' is not a name"),
        ("n=a=b.jsonl", "--data-path", "a path containing '=' cannot be given"),
        ("a.jsonl:0", "--data-path", "the weight must be a finite number > 0, got 0"),
        ("a.jsonl:-2", "--data-path", "the weight must be a finite number > 0, got -2"),
        ("a.jsonl:1e999", "--data-path", "the weight must be a finite number > 0"),
        ("n=:2", "--data-path", "no PATH"),
        ("v.jsonl:2", "--validation-data-path", "a weight (':2') is for --data-path only"),
    ],
)
def test_grammar_errors(spec, flag, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_sources(spec, flag, weights=flag == "--data-path")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, what", [("a,b.jsonl", "','"), ("a=b.jsonl", "'='"), ("a.jsonl:2", "':number'")])
def test_a_path_the_grammar_takes_apart_is_refused_naming_a_symlink(tmp_path, run, name, what):  # noqa: F811
    """An existing file whose path holds ',' or '=' or ends in ':number': one error line through train.py's CLI,
    naming the workaround, for either flag."""
    path = tmp_path / name
    path.write_text("{}\n")
    for flag in ("--data-path", "--validation-data-path"):
        data = path if flag == "--data-path" else tmp_path / "train.jsonl"
        argv = ["--model-name-or-path", tmp_path, "--data-path", data, "--output-dir", tmp_path / "out"]
        argv += ["--batch-size", 8, "--max-tokens-per-gpu", 64]
        if flag == "--validation-data-path":
            argv += [flag, path]
        code, out, err = run(*argv)
        line = one_error_line(err)
        assert code == 2 and what in line and "symlink" in line and "ln -s" in line, line
    assert not (tmp_path / "out").exists()


def test_flag_checks_of_sources_and_sets(files, tmp_path):
    data = f"{files['chat']},{files['code']}"
    with pytest.raises(UserError, match="--sampler loss-aware takes one --data-path source"):
        config(data, sampler="loss-aware").validate()
    with pytest.raises(UserError, match="--best-checkpoint-set needs --keep-best-checkpoint"):
        config(data, validation_split=0.2, best_checkpoint_set="chat").validate()
    with pytest.raises(UserError, match=r"--best-checkpoint-set x: no validation set of that name \(the sets: a, b\)"):
        config(data, validation_data_path="a=v.jsonl,b=w.jsonl", keep_best_checkpoint=True, best_checkpoint_set="x").validate()  # fmt: skip
    config(data, validation_split=0.2, keep_best_checkpoint=True, best_checkpoint_set="code").validate()


# --- the sampler alone --------------------------------------------------------------------------------------------


def test_the_mixture_draws_sources_by_weight():
    """Sources of 50, 7 and 20 samples, weights 3, 1, 0.5: over 4,000 steps of 8 (32,000 draws) each source's share
    is within 5 binomial standard deviations of weight / sum of weights (each step's split is one multinomial draw:
    a source's total is binomial); each source is walked a whole permutation per pass; the state resumes exactly
    through JSON, and a saved state that means nothing is refused."""
    counts, weights, steps = [50, 7, 20], [3.0, 1.0, 0.5], 4000
    sampler = MixtureSampler(counts, weights, seed=3)
    starts = np.array([0, 50, 57])
    draws = []
    for step in range(steps):
        if step == 1234:  # a resume mid-way: the same stream
            again = MixtureSampler(counts, weights, seed=3)
            again.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
            sampler = again
        draws.append(sampler.next_indices(BATCH))
    draws = np.concatenate(draws)
    source = np.searchsorted(starts, draws, side="right") - 1
    p = np.array(weights) / sum(weights)
    share = np.bincount(source, minlength=3) / len(draws)
    sigma = np.sqrt(p * (1 - p) / len(draws))
    assert np.all(np.abs(share - p) < 5 * sigma), (share, p)
    for k, n in enumerate(counts):  # every pass over a source is one permutation of it
        walked = draws[source == k] - starts[k]
        full = len(walked) // n * n
        assert (np.sort(walked[:full].reshape(-1, n), axis=1) == np.arange(n)).all()
    assert list(drawn_per_source(sampler.state_dict(), counts)) == list(np.bincount(source, minlength=3))
    assert sampler.epoch == len(draws) // sum(counts)
    with pytest.raises(ValueError, match="not this run's"):
        MixtureSampler(counts, [3.0, 1.0, 1.0], seed=3).load_state_dict(sampler.state_dict())
    state = sampler.state_dict()
    for forged in ({"offsets": [50, 0, 0]}, {"weights": [3.0, 0.0, 0.5]}, {"counts": [50, 7]}, {"steps": -1}, {"x": 1}):
        with pytest.raises(ValueError):
            check_state(state | forged)


def test_one_step_draws_the_same_whatever_the_batch_split():
    """A step's split among the sources depends on (seed, step) alone: the batch order is the same on every rank,
    and two samplers of one seed agree step by step; another seed differs."""
    a, b, c = (MixtureSampler([30, 10], [1.0, 1.0], seed=s) for s in (1, 1, 2))
    first = [a.next_indices(BATCH) for _ in range(20)]
    assert all(np.array_equal(x, b.next_indices(BATCH)) for x in first)
    assert not all(np.array_equal(x, c.next_indices(BATCH)) for x in first)


# --- loading: one source, several concatenated, a mixture, the split --------------------------------------------


def test_sources_concatenate_in_order_and_a_single_path_keeps_its_fingerprint(files):
    cfg = config(str(files["chat"]))
    data, val_sets, sources = train.load_data(cfg, model_config())
    chat = load_tokenized(files["chat"], CAP_SMALL)
    assert val_sets == [] and sources.fingerprint() == chat.fingerprint() == data.fingerprint()
    assert sources.settings() == {} and isinstance(build_sampler(cfg, len(data), sources), GlobalSampler)

    cfg = config(f"{files['chat']},c={files['code']}")  # no weights: one dataset, the sources in order
    data, _, sources = train.load_data(cfg, model_config())
    code = load_tokenized(files["code"], CAP_SMALL)
    assert (sources.names, sources.counts, sources.weights) == (["chat", "c"], [len(chat), len(code)], None)
    assert np.array_equal(data.input_ids, np.concatenate([chat.input_ids, code.input_ids]))
    assert np.array_equal(data.offsets[len(chat) :] - data.offsets[len(chat)], code.offsets)
    sampler = build_sampler(cfg, len(data), sources)
    assert isinstance(sampler, GlobalSampler) and sampler.num_samples == len(chat) + len(code)
    assert sources.settings() == {"data_weights": None} and sources.fingerprint() not in (
        chat.fingerprint(),
        train.load_data(config(f"{files['code']},{files['chat']}"), model_config())[2].fingerprint(),  # order counts
    )
    drawn = np.concatenate([sampler.next_indices(BATCH) for _ in range(7)])  # 56 draws: into a second epoch
    assert list(drawn_per_source(sampler.state_dict(), sources.counts)) == list(
        np.bincount(drawn >= len(chat), minlength=2)
    )

    _, _, mixture = train.load_data(config(f"{files['chat']}:3,{files['code']}"), model_config())
    assert mixture.weights == [3.0, 1.0] and mixture.settings() == {"data_weights": [3.0, 1.0]}
    assert mixture.fingerprint() == sources.fingerprint()  # the same data: the weights are checked apart


def test_the_split_holds_out_each_source_by_seed(files):
    cfg = config(f"{files['chat']},{files['code']}", validation_split=0.25)
    data, val_sets, sources = train.load_data(cfg, model_config())
    whole = [load_tokenized(files[n], CAP_SMALL) for n in ("chat", "code")]
    assert [name for name, _ in val_sets] == ["chat", "code"]
    for (_, val), part, kept in zip(val_sets, whole, sources.counts):
        assert len(val) == round(0.25 * len(part)) and kept + len(val) == len(part)
    one, one_val, _ = train.load_data(config(str(files["chat"]), validation_split=0.25), model_config())
    assert np.array_equal(one_val[0][1].input_ids, val_sets[0][1].input_ids)  # a source's split is its split alone
    assert np.array_equal(one.input_ids, data.input_ids[: len(one.input_ids)])


# --- metrics: per source, the plot, the trackers ------------------------------------------------------------------


def test_source_metrics_are_token_weighted_means_and_passes():
    sources = Sources(names=["a", "b"], counts=[3, 2], weights=None, fingerprints=["x", "y"])
    metrics = SourceMetrics(sources, {})
    lengths = np.array([5, 6, 7, 8, 9])
    row = metrics.row(
        np.array([4, 0, 1]), torch.tensor([8.0, 2.0, 4.0], dtype=torch.float64), np.array([4, 1, 2]), lengths
    )
    assert row == {
        "loss/a": 6.0 / 3, "num_samples/a": 2, "num_loss_counted_tokens/a": 3, "num_total_tokens/a": 11, "epoch/a": 2 / 3,
        "loss/b": 8.0 / 4, "num_samples/b": 1, "num_loss_counted_tokens/b": 4, "num_total_tokens/b": 9, "epoch/b": 0.5,
    }  # fmt: skip
    row = metrics.row(np.array([2]), np.array([3.0]), np.array([3]), lengths)
    assert row["loss/b"] is None and row["num_samples/b"] == 0 and row["epoch/a"] == 1.0 and row["epoch/b"] == 0.5


def test_the_plot_draws_a_curve_per_source_and_per_set(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    lines = []
    for step in range(1, 11):
        lines.append(
            {"step": step, "epoch": 0, "lr": 1e-3, "loss": 3.0 / step, "grad_norm": 1.0, "tokens_per_second": 9.0}
            | {"loss/chat": 3.1 / step, "loss/code": None if step == 4 else 2.9 / step}
        )
        if step % 5 == 0:
            lines.append({"step": step, "val_loss": 2.0, "val_loss/heldout": 2.0, "val_loss/other": 2.5})
    (tmp_path / "training_metrics_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.setdefault("fig", fig) and None)
    with pytest.raises(UserError):  # nothing written by the stub: the rename fails, after the drawing
        plot(tmp_path)
    loss_ax = drawn["fig"].axes[0]
    curves = {line.get_label(): line for line in loss_ax.get_lines()}
    assert {"loss", "loss/chat", "loss/code", "val_loss/heldout", "val_loss/other"} <= set(curves)
    assert "val_loss" not in curves  # the first set's curve once, by its name
    assert len(curves["loss/code"].get_xdata()) == 9  # the step that drew no code sample has no point


def test_trackers_get_every_key():
    logged = []
    trackers = Trackers.__new__(Trackers)
    trackers.wandb_run = SimpleNamespace(log=lambda scalars, step: logged.append(("wandb", step, scalars)))
    trackers.writer = SimpleNamespace(add_scalar=lambda key, value, step: logged.append(("tb", step, {key: value})))
    row = {"step": 3, "loss": 2.0, "loss/a": 1.5, "loss/b": None, "epoch/a": 0.5, "val_loss/x": 1.0, "timestamp": 1.0}
    trackers.log(row)
    wandb = logged[0][2]
    tensorboard = {k: v for kind, _, scalars in logged[1:] for k, v in scalars.items()}
    assert wandb == tensorboard == {"loss": 2.0, "loss/a": 1.5, "epoch/a": 0.5, "val_loss/x": 1.0}


# --- a single bare path is today's run ----------------------------------------------------------------------------


def test_a_single_bare_path_is_todays_run(files, qwen_dir, tmp_path):
    """The code before this change (git) and today's, on one bare --data-path with --validation-split: the same
    rows (losses, grad norms, the samples and tokens of every step: the data order), the same val_loss, the same
    saved settings (the data's fingerprint) and sampler state; today's code resumes the old run's checkpoint and
    goes on exactly as its own straight run."""
    old = code_at(BEFORE_MIXTURES, tmp_path / "old")

    def flags(out, steps, *extra):
        argv = ["--model-name-or-path", qwen_dir, "--data-path", files["chat"], "--output-dir", out]
        argv += ["--batch-size", BATCH, "--max-tokens-per-gpu", CAP_SMALL, "--seed", SEED, "--max-steps", steps]
        argv += ["--learning-rate", 1e-3, "--lr-scheduler", "constant", "--validation-split", 0.2]
        return argv + ["--validation-frequency", 2, "--min-samples-per-checkpoint", 2 * BATCH, *extra]

    argv = [sys.executable, old / "train.py", *flags(tmp_path / "run", 2)]
    r = subprocess.run(list(map(str, argv)), cwd=old, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    in_process(*flags(tmp_path / "today", 4))
    before, today = without_timing(rows(tmp_path / "run")), without_timing(rows(tmp_path / "today"))
    assert before == today[: len(before)] and [r["step"] for r in before] == [1, 2, 2]  # two steps, one val_loss
    checkpoint = "full_state/samples_16"
    old_state, new_state = trainer_state(tmp_path / "run" / checkpoint), trainer_state(tmp_path / "today" / checkpoint)
    assert old_state["settings"] == {k: v for k, v in new_state["settings"].items() if k in old_state["settings"]}
    assert old_state["settings"]["data"] == new_state["settings"]["data"]
    assert old_state["state"] == new_state["state"]  # counters and the sampler's position
    in_process(*flags(tmp_path / "run", 4, "--resume"))
    assert trainer_state(tmp_path / "run/full_state/samples_32")["num_steps"] == 4
    assert without_timing(rows(tmp_path / "run")) == today


# --- a mixture on 1 and 2 ranks, killed and resumed ---------------------------------------------------------------

MIX_STEPS = 6


def mix_flags(qwen_dir, files, out, *extra):
    return [
        "--model-name-or-path", qwen_dir, "--data-path", f"{files['chat']}:3,{files['code']}", "--output-dir", out,
        "--validation-data-path", f"{files['heldout']},o={files['other']}", "--validation-frequency", 3,
        "--keep-best-checkpoint", "--best-checkpoint-set", "o", "--batch-size", BATCH,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", MIX_STEPS, "--learning-rate", 1e-3, "--seed", SEED,
        "--min-samples-per-checkpoint", 2 * BATCH, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mixture_runs(qwen_dir, files, tmp_path_factory):
    """The mixture trained 6 steps on 1 rank and on 2 (torchrun), and on 1 rank SIGKILLed (torchrun and its worker)
    once its step-2 checkpoint is published, then resumed."""
    folder = tmp_path_factory.mktemp("mixture_runs")
    runs = {"one": folder / "one", "two": folder / "two", "killed": folder / "killed"}
    two = []  # the 2-rank run, side by side with the one to kill
    worker = threading.Thread(
        target=lambda: two.append(torchrun(ROOT / "train.py", *mix_flags(qwen_dir, files, runs["two"]), nproc=2))
    )
    worker.start()
    proc = start(mix_flags(qwen_dir, files, runs["killed"]), 1)
    deadline = time.time() + 300
    while time.time() < deadline and not (runs["killed"] / "full_state" / f"samples_{2 * BATCH}").exists():
        time.sleep(0.05)
    kill_all(proc)
    worker.join()
    assert two[0].returncode == 0, two[0].stderr[-3000:]
    assert (runs["killed"] / "full_state" / f"samples_{2 * BATCH}").exists()
    assert not (runs["killed"] / "full_state" / f"samples_{MIX_STEPS * BATCH}").exists()  # killed before its end
    in_process(*mix_flags(qwen_dir, files, runs["one"]))
    in_process(*mix_flags(qwen_dir, files, runs["killed"], "--resume"))
    return runs


def expected_draws(files, steps=MIX_STEPS):
    """The mixture's draws rebuilt from the sampler alone: [(source of each sample, its index in the source)]."""
    counts = [len(load_tokenized(files[n], CAP_SMALL)) for n in ("chat", "code")]
    sampler = MixtureSampler(counts, [3.0, 1.0], SEED)
    draws = []
    for _ in range(steps):
        indices = sampler.next_indices(BATCH)
        draws.append([(0, int(i)) if i < counts[0] else (1, int(i) - counts[0]) for i in indices])
    return counts, draws


def test_the_mixture_draws_identically_on_1_and_2_ranks_and_after_sigkill(mixture_runs, files):
    """Every step's samples per source are the sampler's (rebuilt alone), on 1 rank and on 2; the killed and resumed
    run's rows equal the straight run's bit for bit, and so does the saved sampler state; epoch/NAME counts the
    passes over each source."""
    counts, draws = expected_draws(files)
    one, two, killed = (rows(mixture_runs[k]) for k in ("one", "two", "killed"))
    for got in (one, two):
        steps = [r for r in got if "loss" in r]
        assert len(steps) == MIX_STEPS
        seen = np.zeros(2)
        for r, drawn in zip(steps, draws):
            per_source = np.bincount([s for s, _ in drawn], minlength=2)
            seen += per_source
            assert [r["num_samples/chat"], r["num_samples/code"]] == list(per_source)
            assert [r["epoch/chat"], r["epoch/code"]] == pytest.approx(list(seen / counts), rel=1e-12)
        keys = [k for k in steps[0] if "/" in k and not k.startswith("loss/")]
        assert [[r[k] for k in keys] for r in steps] == [[r[k] for k in keys] for r in one if "loss" in r]
    assert without_timing(killed) == without_timing(one)
    final = f"full_state/samples_{MIX_STEPS * BATCH}"
    states = [trainer_state(mixture_runs[k] / final)["state"]["sampler"] for k in ("one", "two", "killed")]
    assert states[0] == states[1] == states[2] and states[0]["kind"] == "mixture" and states[0]["steps"] == MIX_STEPS
    assert trainer_state(mixture_runs["one"] / final)["settings"]["data_weights"] == [3.0, 1.0]


def direct_losses(model_dir, paths_and_indices, dtype=torch.float64):
    """Each sample alone through plain transformers: (summed token loss, targets) per group of samples."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for data, indices in paths_and_indices:
            total, count = 0.0, 0
            for i in indices:
                mb = collate(data, [int(i)])
                logits = model(input_ids=mb.input_ids, use_cache=False).logits[0, mb.target_index]
                total += torch.nn.functional.cross_entropy(logits, mb.target_ids, reduction="sum").item()
                count += len(mb.target_ids)
            out.append(total / count if count else None)
    return out


@pytest.mark.parametrize("run_name", ["one", "two"])
def test_each_sources_loss_and_each_sets_val_loss_equal_a_direct_computation(mixture_runs, files, qwen_dir, run_name):
    """loss/NAME of step 1 (the model as loaded) and of step 3 (the model saved after step 2), from each source's
    samples of that step alone; val_loss/NAME of the last step from the final checkpoint, every sample alone; and
    val_loss is the first set's. --keep-best-checkpoint watched set o (--best-checkpoint-set)."""
    out = mixture_runs[run_name]
    data = [load_tokenized(files[n], CAP_SMALL) for n in ("chat", "code")]
    _, draws = expected_draws(files)
    steps = [r for r in rows(out) if "loss" in r]
    for step, model_dir in ((1, qwen_dir), (3, out / f"hf_format/samples_{2 * BATCH}")):
        groups = [(data[k], [i for s, i in draws[step - 1] if s == k]) for k in (0, 1)]
        expected = direct_losses(model_dir, groups)
        got = [steps[step - 1]["loss/chat"], steps[step - 1]["loss/code"]]
        assert got == pytest.approx(expected, rel=1e-5), step
    val = [r for r in rows(out) if "loss" not in r]
    assert [r["step"] for r in val] == [3, 6]
    sets = [load_tokenized(files[n], CAP_SMALL) for n in ("heldout", "other")]
    expected = direct_losses(out / f"hf_format/samples_{MIX_STEPS * BATCH}", [(d, range(len(d))) for d in sets])
    assert [val[-1]["val_loss/heldout"], val[-1]["val_loss/o"]] == pytest.approx(expected, rel=1e-5)
    assert val[-1]["val_loss"] == val[-1]["val_loss/heldout"]
    assert val[-1]["val_num_loss_counted_tokens/o"] == int(sets[1].num_loss_counted_tokens.sum())
    best = trainer_state(out / f"full_state/samples_{MIX_STEPS * BATCH}")["best"]
    assert best["set"] == "o" and best["val_loss"] == min(r["val_loss/o"] for r in val)


def test_a_mixture_resumes_by_the_rules_on_its_flags(mixture_runs, qwen_dir, files, tmp_path, run):  # noqa: F811
    """Other weights, or the sources in another order, are refused in one line naming what differs; other
    validation sets are accepted (the run goes on one step, measuring the new set)."""
    out = tmp_path / "run"
    shutil.copytree(mixture_runs["one"], out)

    def argv(data, *extra):
        flags = mix_flags(qwen_dir, files, out, "--resume", *extra)
        flags[flags.index("--data-path") + 1] = data
        return flags

    code, _, err = run(*argv(f"{files['chat']}:2,{files['code']}"))
    assert code == 2 and "--data-path weights [2.0, 1.0] (checkpoint: [3.0, 1.0]" in one_error_line(err)
    code, _, err = run(*argv(f"{files['chat']},{files['code']}"))
    assert code == 2 and "--data-path weights None (checkpoint: [3.0, 1.0]" in one_error_line(err)
    code, _, err = run(*argv(f"{files['code']}:1,{files['chat']}:3"))
    assert code == 2 and "--data-path holds other data" in one_error_line(err)
    flags = argv(f"{files['chat']}:3,{files['code']}", "--max-steps", MIX_STEPS + 1)
    flags[flags.index("--validation-data-path") + 1] = f"new={files['other']}"
    flags[flags.index("--best-checkpoint-set") + 1] = "new"
    code, out_text, err = run(*flags)
    assert code == 0, err
    last = rows(out)[-1]
    assert last["step"] == MIX_STEPS + 1 and "val_loss/new" not in last and math.isfinite(last["val_loss"])
    assert "starting over" in out_text  # the best was measured on o: --keep-best-checkpoint watches new now
