"""The training core: exact loss whatever the packing or world size, packed == separate forwards, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import setup_model
import tiny_model
from conftest import ROOT, cpu_env, dense_targets, free_port, run_script, tokenized_conversations, torchrun
from dataset import load_tokenized
from packing import collate
from sampler import GlobalSampler
from utils import UserError

CAP_SMALL = 256  # tokens per minibatch: forces several minibatches per step
STEPS, BATCH, LR = 3, 8, 1e-3


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    """At least 64 tokenized conversations of at most CAP_SMALL tokens, through the real process_data CLI."""
    out = tokenized_conversations(tmp_path_factory.mktemp("data"), qwen_dir, 120, seed=11, max_tokens=CAP_SMALL)
    assert sum(1 for _ in open(out)) >= 64
    return out


def train_args(model_dir, data_path, out_dir, cap, *extra):
    return [
        "--model-name-or-path",
        model_dir,
        "--data-path",
        data_path,
        "--output-dir",
        out_dir,
        "--batch-size",
        BATCH,
        "--max-tokens-per-gpu",
        cap,
        "--max-steps",
        STEPS,
        "--learning-rate",
        LR,
        "--seed",
        3,
        *extra,
    ]


def read_run(out_dir):
    metrics = [json.loads(line) for line in open(out_dir / "training_metrics_0.jsonl")]
    (hf,) = (out_dir / "hf_format").glob("samples_*")
    return metrics, load_file(hf / "model.safetensors")


def reference_run(model_dir, data_path, cap):
    """Unpacked, per-sample, plain HF forward with HF's own shifted loss; the same global batches and AdamW."""
    data = load_tokenized(data_path, cap)
    order = GlobalSampler(len(data), seed=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for _ in range(STEPS):
        samples = []
        for i in order.next_indices(BATCH).tolist():
            s, e = data.offsets[i], data.offsets[i + 1]
            samples.append(
                (
                    torch.tensor(data.input_ids[s:e], dtype=torch.long)[None],
                    torch.tensor(data.labels[s:e], dtype=torch.long)[None],
                )
            )
        counts = [int((labels[0, 1:] != -100).sum()) for _, labels in samples]
        total, loss_sum = sum(counts), 0.0
        for (ids, labels), n in zip(samples, counts):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss  # mean over this sample's targets
            (loss * n / total).backward()
            loss_sum += loss.item() * n
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
        losses.append(loss_sum / total)
    return losses, norms, {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_run(metrics, weights, ref_losses, ref_norms, ref_weights):
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m, loss, norm in zip(metrics, ref_losses, ref_norms):
        assert m["loss"] == pytest.approx(loss, rel=1e-4)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-4)
    for name, ref in ref_weights.items():
        assert torch.allclose(weights[name], ref, atol=2e-5, rtol=0), name


@pytest.mark.floor
def test_packed_forward_equals_separate_forwards(qwen_dir, data_path):
    """The packed row's summed loss and gradients, through every CPU attention and loss path, equal those of
    separate per-sample forwards."""
    setup_model.register_attention()
    data = load_tokenized(data_path, 10_000)
    idx = list(range(6))
    paths = [(setup_model.PER_SEQUENCE, "chunked"), (setup_model.PER_SEQUENCE, "model"), ("sdpa", "chunked")]
    results = {}
    for attn, loss_name in [("eager", "separate"), *paths]:
        lm = AutoModelForCausalLM.from_pretrained(qwen_dir, attn_implementation=attn)
        lm.train()
        if loss_name == "separate":
            loss = 0
            for i in idx:
                mb = collate(data, [i])
                logits = lm(input_ids=mb.input_ids, use_cache=False).logits[0]
                loss = loss + torch.nn.functional.cross_entropy(logits, dense_targets(mb)[0], reduction="sum")
        else:
            model = setup_model.LossModel(lm, loss_name, setup_model.LogitTransform.of(lm.config))
            loss = model(**collate(data, idx).inputs("cpu")).total
        loss.backward()
        results[attn, loss_name] = (loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()})
    ref_loss, ref_grads = results["eager", "separate"]
    for path in paths:
        loss, grads = results[path]
        assert loss == pytest.approx(ref_loss, rel=1e-5), path
        for n, g in ref_grads.items():
            assert torch.allclose(grads[n], g, atol=1e-5, rtol=1e-4), (path, n)


def test_one_rank_many_minibatches_two_ranks_two_nodes_equal_reference(qwen_dir, data_path, tmp_path):
    ref = reference_run(qwen_dir, data_path, CAP_SMALL)

    r = run_script(ROOT / "train.py", *train_args(qwen_dir, data_path, tmp_path / "one", 4096))
    assert r.returncode == 0, r.stderr
    metrics, weights = read_run(tmp_path / "one")
    assert all(m["num_minibatches"] == 1 for m in metrics)
    assert_same_run(metrics, weights, *ref)

    r = run_script(ROOT / "train.py", *train_args(qwen_dir, data_path, tmp_path / "many", CAP_SMALL))
    assert r.returncode == 0, r.stderr
    metrics, weights = read_run(tmp_path / "many")
    assert all(m["num_minibatches"] >= 3 for m in metrics)
    assert_same_run(metrics, weights, *ref)

    r = torchrun(ROOT / "train.py", *train_args(qwen_dir, data_path, tmp_path / "two", CAP_SMALL), nproc=2)
    assert r.returncode == 0, r.stderr
    metrics, weights = read_run(tmp_path / "two")
    assert_same_run(metrics, weights, *ref)
    params = json.loads((tmp_path / "two" / "training_params.json").read_text())
    assert params["world_size"] == 2 and params["batch_size"] == BATCH and "torch" in params["versions"]

    # Two nodes of one process each, rendezvous on localhost.
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(ROOT / "train.py"),
                *map(str, train_args(qwen_dir, data_path, tmp_path / "nodes", CAP_SMALL)),
            ],
            cwd=ROOT,
            env=cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    metrics, weights = read_run(tmp_path / "nodes")
    assert_same_run(metrics, weights, *ref)


@pytest.mark.floor
def test_metrics_fields_and_loss_decreases(qwen_dir, data_path, tmp_path):
    out = tmp_path / "run"
    r = run_script(
        ROOT / "train.py",
        "--model-name-or-path",
        qwen_dir,
        "--data-path",
        data_path,
        "--output-dir",
        out,
        "--batch-size",
        16,
        "--max-tokens-per-gpu",
        2048,
        "--max-epochs",
        2,
        "--learning-rate",
        3e-3,
        "--lr-scheduler",
        "cosine",
        "--num-warmup-steps",
        2,
        "--no-save-final-checkpoint",
    )
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
    num_samples = len(load_tokenized(data_path, 2048))
    assert len(metrics) == -(-2 * num_samples // 16)
    assert sum(m["num_samples"] for m in metrics) == 2 * num_samples, "exactly two epochs"
    assert metrics[-1]["samples_seen"] == 2 * num_samples
    required = [
        "step",
        "epoch",
        "lr",
        "loss",
        "grad_norm",
        "num_samples",
        "num_loss_counted_tokens",
        "num_total_tokens",
        "num_minibatches",
        "tokens_per_second",
        "samples_per_second",
        "samples_seen",
        "tokens_seen",
        "time_per_step",
        "peak_memory_gb",
        "timestamp",
    ]
    for m in metrics:
        assert set(required) <= set(m)
        assert m["tokens_per_second"] == pytest.approx(m["num_total_tokens"] / m["time_per_step"])
    assert [m["epoch"] for m in metrics][0] == 0 and metrics[-1]["epoch"] == 1
    assert metrics[0]["lr"] == 0 and metrics[2]["lr"] == pytest.approx(3e-3, rel=0.05)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert "step 1/" in r.stdout and "ETA" in r.stdout
    assert not (out / "hf_format").exists()


def test_non_finite_loss_stops_before_the_step(qwen_dir, data_path, tmp_path):
    r = run_script(
        ROOT / "train.py",
        *train_args(qwen_dir, data_path, tmp_path / "nan", 4096, "--learning-rate", "1e30", "--max-grad-norm", 0),
    )
    assert r.returncode == 2
    assert "non-finite loss" in r.stderr and "step 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(learning_rate=float("nan")), "--learning-rate must be a finite number >= 0, got nan"),
        (dict(learning_rate=float("inf")), "--learning-rate must be a finite number >= 0, got inf"),
        (dict(max_grad_norm=float("nan")), "--max-grad-norm must be a finite number >= 0, got nan"),
        (dict(weight_decay=-0.1), "--weight-decay must be a finite number >= 0, got -0.1"),
        (dict(eps=float("nan")), "--eps must be a finite number >= 0, got nan"),
        (dict(beta1=1.0), r"--beta1 must be in \[0, 1\), got 1.0"),
        (dict(beta2=-0.5), "--beta2 must be a finite number >= 0, got -0.5"),
        (dict(seed=-1), r"--seed must be in \[0, 2\*\*63\), got -1"),
        (dict(seed=2**64), r"--seed must be in \[0, 2\*\*63\)"),
        (dict(batch_size=10**12), "--batch-size must be <= 16777216, got 1000000000000"),
        (dict(num_warmup_steps=-1), "--num-warmup-steps must be >= 0, got -1"),
        (dict(max_tokens_per_gpu=2**64), r"--max-tokens-per-gpu must be in \[1, 2\*\*31\), got 18446744073709551616"),
    ],
)
def test_flag_values_are_checked_before_any_work(flags, message):
    import train

    cfg = train.TrainConfig(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=8)
    cfg.validate()
    for name, value in flags.items():
        setattr(cfg, name, value)
    with pytest.raises(UserError, match="^" + message):
        cfg.validate()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("batch_size_0", "--batch-size must be >= 1"),
        ("conflicting_lengths", "--max-steps and --max-epochs conflict"),
        ("missing_model", "--model-name-or-path"),
        ("misspelt_local_model", "runs/nope: no such folder"),
        ("output_dir_is_a_file", "is a file, not a folder"),
        ("unusable_scheduler", "--lr-scheduler reduce_lr_on_plateau: steps only with a metric"),
        ("not_a_model", "not a loadable model"),
        ("not_tokenized", "not a tokenized sample"),
        ("nothing_fits", "fits --max-tokens-per-gpu"),
        ("id_outside_vocabulary", ":2: field 'input_ids': 99999 at index 1 is outside [0, 4000)"),
        ("float_label", ":1: field 'labels' must be a list of integers, got 2.5 at index 1"),
    ],
)
def test_clear_one_line_errors(qwen_dir, data_path, tmp_path, case, expected, monkeypatch, capfd):
    """Each through train.py's own main, in-process: exit code 2, exactly one stderr line `error: ...`, no
    traceback, no output folder left behind, the data file untouched."""
    import train

    args = dict(model=qwen_dir, data=data_path, bs=4, cap=4096, extra=[])
    if case == "batch_size_0":
        args["bs"] = 0
    elif case == "conflicting_lengths":
        args["extra"] = ["--max-epochs", 1]
    elif case == "missing_model":
        args["model"] = tmp_path / "nope"
    elif case == "misspelt_local_model":  # runs/ exists here: a local folder meant, not a hub id to try
        (tmp_path / "runs").mkdir()
        args["model"] = "runs/nope"
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        args["model"] = tmp_path / "empty"
    elif case == "output_dir_is_a_file":
        (tmp_path / "o").write_text("not a folder")
    elif case == "unusable_scheduler":
        args["extra"] = ["--lr-scheduler", "reduce_lr_on_plateau"]
    elif case == "not_tokenized":
        args["data"] = tiny_model.write_jsonl(tmp_path / "m.jsonl", tiny_model.make_conversations(3))
    elif case == "nothing_fits":
        args["cap"] = 3
    elif case == "id_outside_vocabulary":
        rows = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 99999], "labels": [1, 2]}]
        args["data"] = tiny_model.write_jsonl(tmp_path / "d.jsonl", rows)
    elif case == "float_label":
        args["data"] = tiny_model.write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1, 2], "labels": [1, 2.5]}])
    data_before = open(args["data"], "rb").read()
    monkeypatch.chdir(tmp_path)
    argv = ["--model-name-or-path", args["model"], "--data-path", args["data"], "--output-dir", tmp_path / "o"]
    argv += ["--batch-size", args["bs"], "--max-tokens-per-gpu", args["cap"], "--max-steps", 1, *args["extra"]]
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in argv])
    stderr = capfd.readouterr().err
    assert exit_info.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert open(args["data"], "rb").read() == data_before
    if case != "output_dir_is_a_file":
        assert not (tmp_path / "o").exists(), "a failed run leaves no output folder"


@pytest.mark.parametrize("num_samples, batch", [(10, 8), (10, 3), (7, 7), (100, 16), (5, 12)])
def test_run_length_counts_the_steps_that_run_when_a_run_grows(num_samples, batch):
    """A launch's length in steps, from the position it resumes at, is what batch_sizes() then yields: a finished
    run grown by --max-epochs may have ended on a short step (10 samples, batch 8: 8 + 2), which a count from 0
    misses (2 epochs: 3 steps fresh, 4 after a resume); unchanged, there is nothing left."""
    from dataclasses import replace

    from train import TrainConfig, batch_sizes, total_steps

    base = TrainConfig(model_name_or_path="m", data_path="d", output_dir="o", batch_size=batch, max_tokens_per_gpu=8)
    for flag, first, then in [("max_epochs", 1, 2), ("max_epochs", 2, 5), ("max_epochs", 3, 3), ("max_steps", 3, 3)]:
        cfg = replace(base, **{flag: first})
        sizes = list(batch_sizes(cfg, num_samples, 0, 0))
        assert total_steps(cfg, num_samples) == len(sizes)
        step, seen = len(sizes), sum(sizes)
        for more in (then, then + 4):  # unchanged (or grown), then grown further
            grown = replace(cfg, **{flag: more})
            rest = list(batch_sizes(grown, num_samples, step, seen))
            assert total_steps(grown, num_samples, step, seen) == step + len(rest), (flag, first, more)
            if flag == "max_epochs":
                assert seen + sum(rest) == more * num_samples
            assert (len(rest) == 0) == (more == first)
