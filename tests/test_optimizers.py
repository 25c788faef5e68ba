"""--optimizer (issue 25): AdamW by default, exactly as before; Muon for the decoder layers' matrices with AdamW for
the rest, as one optimizer that the schedule, OSFT's after-step projection and DCP see as one. Muon trains, resumes
bit for bit after SIGKILL, gives on 2 ranks what it gives on 1 (with and without OSFT, whose invariants hold), and
the choice is a setting a resume must repeat; a checkpoint from before the flag resumes as AdamW."""

import inspect
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint_trust import forge_manifest, one_error_line
from torch import nn

import config
import optimizers
from conftest import ROOT, cpu_env, main_in_process, run_script, setup, tokenized_conversations, torchrun
from test_train import CAP_SMALL
from utils import UserError

BATCH, LR = 8, 1e-3
OSFT = ("--osft", "--osft-unfreeze-rank-ratio", 0.25, "--osft-target-patterns", "*.q_proj,*.down_proj")


def args(model, data, out, steps, *extra):
    return [
        "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", BATCH,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", steps, "--learning-rate", LR, "--seed", 5, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("optim_data"), qwen_dir, 60, seed=9, max_tokens=CAP_SMALL)


def metrics(out):
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]


def final_weights(out):
    (folder,) = sorted((out / "hf_format").iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1:]
    return load_file(folder / "model.safetensors")


def train(*argv, nproc=None):
    """train.py in a fresh process (under torchrun with nproc), asserting success."""
    r = torchrun(ROOT / "train.py", *argv, nproc=nproc) if nproc else run_script(ROOT / "train.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_run(got, ref):
    a, b = metrics(got), metrics(ref)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), x["step"]


# --- the optimizer object, in this process ---------------------------------------------------------------------


def test_whole_matrix_muon_is_torch_muon_on_plain_tensors():
    """The DTensor-safe Muon takes torch's steps bit for bit where nothing is sharded (both Nesterov settings)."""
    for nesterov in (True, False):
        torch.manual_seed(0)
        shapes = [(48, 16), (16, 48), (32, 32)]
        ours = [nn.Parameter(torch.randn(s)) for s in shapes]
        theirs = [nn.Parameter(p.detach().clone()) for p in ours]
        kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
        a, b = optimizers.WholeMatrixMuon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
        for _ in range(3):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            a.step()
            b.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q)
            assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


def test_groups_learning_rates_and_the_default(qwen_dir, dist):
    """adamw: torch's fused AdamW over every trainable parameter in one group, as before the flag. muon: the decoder
    layers' 2-D weights in a Muon group, everything else (embeddings, head, norms, biases, OSFT's factors) in an
    AdamW group listed first; one schedule multiplies both groups' own peak rates."""
    model, cfg = setup(qwen_dir, dist, learning_rate=1e-3, beta1=0.8, weight_decay=0.01)
    opt = optimizers.build_optimizer(cfg, model, dist.device)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["params"] == [p for p in model.parameters() if p.requires_grad]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["fused"]) == (
        1e-3, (0.8, 0.95), 1e-8, 0.01, True
    )  # fmt: skip

    model, cfg = setup(
        qwen_dir, dist, optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02, lr_scheduler="linear",
        num_warmup_steps=2, muon_momentum=0.9, weight_decay=0.01,
    )  # fmt: skip
    opt = optimizers.build_optimizer(cfg, model, dist.device)
    assert isinstance(opt, torch.optim.Optimizer) and [g["optimizer"] for g in opt.param_groups] == ["adamw", "muon"]
    adamw, muon = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2}
    assert len(muon_names) == 2 * 7
    adamw_names = {names[id(p)] for p in adamw["params"]}
    assert {"lm.model.embed_tokens.weight", "lm.lm_head.weight", "lm.model.norm.weight"} <= adamw_names
    assert "lm.model.layers.0.self_attn.q_proj.bias" in adamw_names
    assert (muon["lr"], muon["momentum"], muon["weight_decay"], muon["adjust_lr_fn"]) == (
        0.02,
        0.9,
        0.01,
        "match_rms_adamw",
    )
    assert (adamw["lr"], adamw["betas"], adamw["fused"]) == (1e-3, (0.9, 0.95), True)
    scheduler = optimizers.build_scheduler(cfg, opt, 10)
    optimizers.move_scheduler_to(scheduler, 1)  # warmup: half way
    assert scheduler.get_last_lr() == pytest.approx([0.5e-3, 0.01])
    optimizers.move_scheduler_to(scheduler, 6)  # linear decay: 4 of 8 steps left
    assert scheduler.get_last_lr() == pytest.approx([0.5e-3, 0.01])


def test_osft_factors_train_with_adamw(qwen_dir, dist):
    import osft

    model, cfg = setup(qwen_dir, dist, optimizer="muon", osft=True, osft_unfreeze_rank_ratio=0.25,
                       osft_target_patterns="*.q_proj,*.down_proj")  # fmt: skip
    opt = optimizers.build_optimizer(cfg, model, dist.device)
    factors = {id(p) for m in model.modules() if isinstance(m, osft.OSFTLinear) for p in (m.u, m.s, m.v)}
    assert len(factors) == 4 * 3
    assert factors <= {id(p) for p in opt.param_groups[0]["params"]}
    assert len(opt.param_groups[1]["params"]) == 2 * 5  # k, v, o, gate, up in each layer
    assert opt._optimizer_step_post_hooks, "OSFT's projection hangs on the one optimizer"

    model, cfg = setup(qwen_dir, dist, optimizer="muon", osft=True, osft_unfreeze_rank_ratio=0.25)
    with pytest.raises(UserError, match="no trainable 2-D weight in the decoder layers for Muon"):
        optimizers.build_optimizer(cfg, model, dist.device)


def flags_error(**flags):
    required = dict(model_name_or_path="m", data_path="d", output_dir="o", batch_size=1, max_tokens_per_gpu=64)
    with pytest.raises(UserError) as e:
        config.TrainConfig(**required, **flags).validate()
    return str(e.value)


def test_flag_checks(tmp_path):
    assert flags_error(optimizer="sgd") == "--optimizer must be one of adamw, muon, got sgd"
    assert flags_error(muon_momentum=0.9, muon_learning_rate=0.02) == (
        "--muon-learning-rate, --muon-momentum need --optimizer muon"
    )
    assert "--muon-momentum must be in [0, 1)" in flags_error(optimizer="muon", muon_momentum=1.0)
    assert "--muon-adjust-lr must be one of" in flags_error(optimizer="muon", muon_adjust_lr="none")
    # A torch without Muon (as before 2.9), from a fresh interpreter: train.py and its modules import, and the
    # flag is refused in one line before any model is loaded.
    code = (
        "import sys, torch; del torch.optim.Muon; sys.argv[0] = 'train.py'; import train; "
        "train.main(['--model-name-or-path', 'm', '--data-path', 'd', '--output-dir', sys.argv[1], '--batch-size', '1', "
        "'--max-tokens-per-gpu', '64', '--optimizer', 'muon'])"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, env=cpu_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr).startswith("error: --optimizer muon needs torch >= 2.9 (torch.optim.Muon)")


# --- whole runs ----------------------------------------------------------------------------------------------


def train_in_process(*argv):
    """train.py's main in this process (no interpreter start: seconds faster), asserting success."""
    import train as train_py

    with pytest.raises(SystemExit) as e:
        train_py.main([str(a) for a in argv])
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def muon_run(qwen_dir, data_path, tmp_path_factory):
    """5 Muon steps on one rank, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("muon") / "ref"
    train_in_process(*args(qwen_dir, data_path, out, 5, "--optimizer", "muon", "--min-samples-per-checkpoint", 16))
    return out


def test_muon_trains_and_resumes_exactly_after_sigkill(qwen_dir, data_path, muon_run, tmp_path):
    losses = [m["loss"] for m in metrics(muon_run)]
    assert losses[-1] < losses[0] - 0.5, losses

    out = tmp_path / "killed"
    argv = args(qwen_dir, data_path, out, 5, "--optimizer", "muon", "--min-samples-per-checkpoint", 16)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, argv)],
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "full_state/samples_16").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "hf_format/samples_40").exists(), "killed mid-run"

    train_in_process(*argv, "--resume")
    got, ref = metrics(out), metrics(muon_run)
    assert [m["step"] for m in got] == list(range(1, 6))
    for a, b in zip(got, ref):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]  # bit for bit
    final, expected = final_weights(out), final_weights(muon_run)
    assert all(torch.equal(final[name], w) for name, w in expected.items())


def test_sharded_muon_steps_are_the_unsharded_steps(tmp_path):
    """On 2 ranks, parameters sharded by rows as FSDP2 shards them (uneven too), the same gradients give torch's
    own Muon steps bit for bit: each rank orthogonalises the whole matrix and applies its rows."""
    script = tmp_path / "sharded_muon.py"  # the check alone: no test module imported (2 ranks start faster)
    script.write_text(inspect.getsource(sharded_muon_check) + "\n\nsharded_muon_check()\n")
    r = torchrun(script, nproc=2, extra_env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "sharded muon: equal" in r.stdout, r.stderr[-3000:]


def sharded_muon_check():
    """Run by test_sharded_muon_steps_are_the_unsharded_steps under torchrun (2 gloo ranks), from its source."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import optimizers

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (33, 20)]
    whole = [nn.Parameter(torch.randn(s)) for s in shapes]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in whole]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="original")
    ours, theirs = optimizers.WholeMatrixMuon(sharded, **kwargs), torch.optim.Muon(whole, **kwargs)
    for _ in range(3):
        for p, q in zip(sharded, whole):
            q.grad = torch.randn_like(q)
            p.grad = distribute_tensor(q.grad, mesh, [Shard(0)])
        ours.step()
        theirs.step()
    for p, q in zip(sharded, whole):
        assert torch.equal(p.full_tensor(), q), p.shape
    dist.destroy_process_group()
    print("sharded muon: equal")


def assert_close_runs(got, ref, base):
    """Losses to rel 1e-5 and gradient norms to 1e-4. Weights: each tensor's difference is a small part of what
    training moved it by. Muon's Newton-Schulz runs in bf16 and normalises by a bf16 norm: a gradient differing in
    its last bits (another summation order) can round that norm or its inputs differently and move a whole update
    by up to ~1% (measured: a 1e-7 relative perturbation of one gradient moved its update by 1e-2), so weights
    agree to a fraction of their change, not to float precision."""
    assert_same_run(got, ref)
    start, a, b = load_file(base / "model.safetensors"), final_weights(got), final_weights(ref)
    for name, w in b.items():
        assert (a[name] - w).norm() <= 0.2 * (w - start[name]).norm(), name  # seen: up to 4%


def test_two_ranks_equal_one(qwen_dir, data_path, muon_run, tmp_path):
    out = tmp_path / "two"
    train(*args(qwen_dir, data_path, out, 5, "--optimizer", "muon"), nproc=2)
    assert_close_runs(out, muon_run, qwen_dir)


def test_two_ranks_equal_one_with_osft_and_its_invariants_hold(qwen_dir, data_path, tmp_path):
    train_in_process(*args(qwen_dir, data_path, tmp_path / "r1", 3, "--optimizer", "muon", *OSFT))
    train(*args(qwen_dir, data_path, tmp_path / "r2", 3, "--optimizer", "muon", *OSFT), nproc=2)
    assert_close_runs(tmp_path / "r2", tmp_path / "r1", qwen_dir)
    before, after = load_file(qwen_dir / "model.safetensors"), final_weights(tmp_path / "r2")
    for name, w0 in before.items():
        dw = after[name].double() - w0.double()
        assert dw.norm() > 0, name  # trained: by Muon (the other matrices) or AdamW (the rest, the factors)
        if not name.endswith(("q_proj.weight", "down_proj.weight")):
            continue
        u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
        k = math.floor(0.75 * len(s))
        assert (u[:, :k].T @ dw).norm() / dw.norm() < 1e-3, name
        assert (dw @ vh[:k].T).norm() / dw.norm() < 1e-3, name
        kept = u[:, :k].T @ after[name].double() @ vh[:k].T
        assert (kept - torch.diag(s[:k])).abs().max() <= 1e-4 * s[0], name


# --- the choice is a setting a resume must repeat ---------------------------------------------------------------


def test_another_optimizer_on_resume_is_refused(qwen_dir, data_path, muon_run, tmp_path, capfd):
    checkpoint = muon_run / "full_state/samples_16"
    code, _, err = main_in_process(capfd, *args(qwen_dir, data_path, tmp_path / "a", 8, "--resume-from", checkpoint))
    assert code == 2 and "--optimizer adamw (checkpoint: muon)" in one_error_line(err)
    code, _, err = main_in_process(
        capfd,
        *args(
            qwen_dir,
            data_path,
            tmp_path / "b",
            8,
            "--optimizer",
            "muon",
            "--muon-momentum",
            0.9,
            "--resume-from",
            checkpoint,
        ),  # fmt: skip
    )
    assert code == 2 and "--muon-momentum 0.9 (checkpoint: 0.95)" in one_error_line(err)


def test_a_checkpoint_from_before_the_flag_resumes_as_adamw(qwen_dir, data_path, tmp_path, capfd):
    straight = tmp_path / "straight"
    code, _, err = main_in_process(capfd, *args(qwen_dir, data_path, straight, 2, "--min-samples-per-checkpoint", 8))
    assert code == 0, err
    old = straight / "full_state/samples_8"
    path = old / "trainer_state.json"
    meta = json.loads(path.read_text())
    new_flags = [name for name in meta["settings"] if name == "optimizer" or name.startswith("muon_")]
    assert new_flags == ["optimizer", "muon_learning_rate", "muon_momentum", "muon_adjust_lr"]
    for name in new_flags:
        del meta["settings"][name]
    path.write_text(json.dumps(meta))
    forge_manifest(old)  # intact by its manifest: as the code before the flag wrote it

    code, _, err = main_in_process(
        capfd, *args(qwen_dir, data_path, tmp_path / "muon", 2, "--optimizer", "muon", "--resume-from", old)
    )
    assert code == 2 and "--optimizer muon (checkpoint: adamw)" in one_error_line(err)
    resumed = tmp_path / "resumed"
    code, out, err = main_in_process(capfd, *args(qwen_dir, data_path, resumed, 2, "--resume-from", old))
    assert code == 0 and f"resumed from {old} at step 1" in out, err
    assert [(m["loss"], m["grad_norm"]) for m in metrics(resumed)] == [
        (m["loss"], m["grad_norm"]) for m in metrics(straight)[1:]
    ]
