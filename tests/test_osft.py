"""osft.py: the decomposition, both forward paths, gradient and after-step projections, dense HF weights, the
edge ratios, and full runs (2 ranks, resume on another number of ranks) that keep every update orthogonal."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import osft
from conftest import ROOT, main_in_process, tokenized_conversations, torchrun
from test_train import CAP_SMALL
from utils import UserError

TARGET = "model.layers.0.self_attn.q_proj.weight"


def test_factors_rebuild_the_weight_and_both_forward_paths_agree():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=True)
    module = osft.OSFTLinear.from_linear(linear, k=12)
    assert module.u.shape == (16, 4) and module.v.shape == (24, 4) and module.u_frozen.shape == (16, 12)
    assert not module.u_frozen.requires_grad and module.u.requires_grad and module.bias is linear.bias
    for tokens in (1, 500):  # few tokens go through the factors, many through the rebuilt weight
        x = torch.randn(tokens, 24)
        torch.testing.assert_close(module(x), linear(x), atol=1e-5, rtol=1e-5)
    dense = osft.dense_state_dict(
        {f"q.{f}": getattr(module, f).detach() for f in osft.FACTORS} | {"q.bias": linear.bias}
    )
    assert set(dense) == {"q.weight", "q.bias"}
    torch.testing.assert_close(dense["q.weight"], linear.weight.detach(), atol=1e-5, rtol=1e-5)


def test_gradients_and_steps_stay_orthogonal_to_the_frozen_subspace():
    torch.manual_seed(1)
    module = osft.OSFTLinear.from_linear(nn.Linear(32, 32, bias=False), k=24)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    osft.keep_orthogonal(optimizer, module)
    w0 = osft.dense_state_dict({f"m.{f}": getattr(module, f).detach().clone() for f in osft.FACTORS})["m.weight"]
    for _ in range(5):
        module(torch.randn(7, 32)).pow(2).sum().backward()
        for grad, frozen in ((module.u.grad, module.u_frozen), (module.v.grad, module.v_frozen)):
            assert (frozen.T @ grad).norm() <= 1e-4 * grad.norm()
        optimizer.step()
        optimizer.zero_grad()
    w1 = osft.dense_state_dict({f"m.{f}": getattr(module, f).detach() for f in osft.FACTORS})["m.weight"]
    dw = w1 - w0
    assert dw.norm() > 0.1
    assert (module.u_frozen.T @ dw).norm() <= 1e-4 * dw.norm()
    assert (dw @ module.v_frozen).norm() <= 1e-4 * dw.norm()


def ranks_of(lm, ratio, patterns=None):
    return {name: math.floor((1 - ratio) * min(lm.get_submodule(name).weight.shape))
            for name in osft.find_targets(lm, patterns)}  # fmt: skip


def test_ratio_edges_and_target_patterns(qwen_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(qwen_dir)
    osft.apply_osft(lm, ranks_of(lm, 1.0))  # r = 1: plain Linears, nothing frozen
    assert not any(isinstance(m, osft.OSFTLinear) for m in lm.modules())
    assert all(p.requires_grad for p in lm.parameters())
    osft.apply_osft(lm, ranks_of(lm, 0.0, "*.q_proj,*.down_proj"))  # r = 0: the targets frozen as they are
    frozen = {n for n, p in lm.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in lm.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))}
    with pytest.raises(UserError, match="'\\*.nope' matches no Linear"):
        osft.find_targets(lm, "*.q_proj,*.nope")
    assert "lm_head" not in osft.find_targets(lm, None) and len(osft.find_targets(lm, None)) == 7 * 2


def test_allocated_ranks_follow_importance_and_keep_the_total():
    sizes = {"a": 64, "b": 64, "c": 32, "d": 16}
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        equal = osft.allocate_ranks(sizes, dict.fromkeys(sizes, 0.7), ratio)
        assert sum(sizes.values()) - sum(equal.values()) == round(ratio * sum(sizes.values()))
        assert all(abs(equal[n] / sizes[n] - (1 - ratio)) <= 1 / sizes[n] + 1e-9 for n in sizes), equal
        ranks = osft.allocate_ranks(sizes, {"a": 0.9, "b": 0.3, "c": 0.6, "d": -0.2}, ratio)
        assert sum(sizes.values()) - sum(ranks.values()) == round(ratio * sum(sizes.values()))
        assert all(0 <= ranks[n] <= sizes[n] for n in sizes)
        if 0 < ratio < 1:  # more important: a larger frozen fraction; below zero counts zero
            assert ranks["a"] / 64 >= ranks["c"] / 32 > ranks["b"] / 64 and ranks["d"] == 0, (ratio, ranks)
    # A fraction past 1 is capped, the rest goes to the others.
    capped = osft.allocate_ranks({"a": 10, "b": 10}, {"a": 1.0, "b": 0.1}, 0.2)
    assert capped == {"a": 10, "b": 6}


def osft_args(model, data, out, steps, *extra):
    return [
        "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", 8,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", steps, "--learning-rate", 3e-3, "--seed", 5,
        "--min-samples-per-checkpoint", 16, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("osft_data"), qwen_dir, 40, seed=9, max_tokens=CAP_SMALL)


def metrics(out):
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]


def run_main(*args):
    import train

    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in args])
    assert e.value.code in (0, None)


def test_two_ranks_update_orthogonally_and_resume_exactly_on_one(qwen_dir, data_path, tmp_path):
    out = tmp_path / "two"
    r = torchrun(
        ROOT / "train.py",
        *osft_args(qwen_dir, data_path, out, 4, "--osft", "--osft-unfreeze-rank-ratio", 0.25),
        nproc=2,
    )
    assert r.returncode == 0, r.stderr
    assert "osft: 14 target matrices" in r.stdout
    before, after = load_file(qwen_dir / "model.safetensors"), load_file(out / "hf_format/samples_32/model.safetensors")
    assert set(after) == set(before), "HF weights under the model's own names"
    for name, w0 in before.items():
        if not name.endswith(tuple(f"{t[2:]}.weight" for t in osft.DEFAULT_TARGETS)):
            continue
        u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
        k = math.floor(0.75 * len(s))
        dw = after[name].double() - w0.double()
        assert dw.norm() > 0, name
        assert (u[:, :k].T @ dw).norm() / dw.norm() < 1e-3, name
        assert (dw @ vh[:k].T).norm() / dw.norm() < 1e-3, name
        kept = u[:, :k].T @ after[name].double() @ vh[:k].T
        assert (kept - torch.diag(s[:k])).abs().max() <= 1e-4 * s[0], name

    # Resume the 2-rank state at step 2 on one rank: the same steps 3-4 and the same final weights.
    resumed = tmp_path / "one"
    run_main(*osft_args(qwen_dir, data_path, resumed, 4, "--osft", "--osft-unfreeze-rank-ratio", 0.25,
                        "--resume-from", out / "full_state/samples_16"))  # fmt: skip
    ref = metrics(out)
    for m in metrics(resumed):
        assert m["loss"] == pytest.approx(ref[m["step"] - 1]["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref[m["step"] - 1]["grad_norm"], rel=1e-4)
    final = load_file(resumed / "hf_format/samples_32/model.safetensors")
    for name, w in after.items():
        assert (final[name] - w).abs().max() <= 2e-4, name


def test_ratio_one_is_plain_fine_tuning_and_zero_freezes_the_targets(qwen_dir, data_path, tmp_path):
    run_main(*osft_args(qwen_dir, data_path, tmp_path / "plain", 2))
    run_main(*osft_args(qwen_dir, data_path, tmp_path / "r1", 2, "--osft", "--osft-unfreeze-rank-ratio", 1))
    for plain, r1 in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "r1")):
        assert r1["loss"] == pytest.approx(plain["loss"], rel=1e-4)
        assert r1["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    run_main(*osft_args(qwen_dir, data_path, tmp_path / "r0", 2, "--osft", "--osft-unfreeze-rank-ratio", 0))
    before, after = (
        load_file(qwen_dir / "model.safetensors"),
        load_file(tmp_path / "r0/hf_format/samples_16/model.safetensors"),
    )
    suffixes = tuple(f"{t[2:]}.weight" for t in osft.DEFAULT_TARGETS)
    for name, w in before.items():
        assert torch.equal(after[name], w) == name.endswith(suffixes), name
    shutil.rmtree(tmp_path / "plain")


@pytest.fixture(scope="module")
def uneven_dir(qwen_dir, tmp_path_factory):
    """The tiny Qwen2 with layer 0's outputs (o_proj, down_proj) shrunk 100x: that layer passes its input nearly
    unchanged (input/output similarity near 1, important by the paper's score), layer 1 does not."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("uneven")
    for f in qwen_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    lm = AutoModelForCausalLM.from_pretrained(qwen_dir)
    with torch.no_grad():
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            lm.model.layers[0].get_submodule(name).weight.mul_(0.01)
    lm.save_pretrained(out)
    return out


def test_importance_ranks_differ_by_layer_are_saved_and_reused_and_frozen_non_targets_stay(
    uneven_dir, data_path, tmp_path, capfd
):
    importance = ("--osft", "--osft-unfreeze-rank-ratio", 0.5, "--osft-rank-allocation", "importance")
    suffixes = tuple(f"{t[2:]}.weight" for t in osft.DEFAULT_TARGETS)
    out = tmp_path / "two"

    def resumed_from_step_2(folder, *flags):  # on one rank; the calibration file is gone: it is not read again
        gone = ("--osft-calibration-data-path", tmp_path / "gone.jsonl", "--resume-from", out / "full_state/samples_16")
        return main_in_process(capfd, *osft_args(uneven_dir, data_path, folder, 4, *importance, *flags, *gone))

    r = torchrun(
        ROOT / "train.py",
        *osft_args(uneven_dir, data_path, out, 4, *importance, "--osft-freeze-non-targets"),
        "--osft-calibration-data-path",
        data_path,
        nproc=2,
    )
    assert r.returncode == 0, r.stderr
    assert "osft: layer importance from" in r.stdout and "osft: frozen directions k per target:" in r.stdout
    ranks = json.loads((out / "full_state/samples_16/trainer_state.json").read_text())["osft_ranks"]
    before = load_file(uneven_dir / "model.safetensors")
    sizes = {name[: -len(".weight")]: min(w.shape) for name, w in before.items() if name.endswith(suffixes)}
    assert sizes.keys() == set(ranks) and len(ranks) == 14
    assert sum(sizes.values()) - sum(ranks.values()) == round(0.5 * sum(sizes.values()))
    for target in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # layer 0 keeps more of each target
        layer0, layer1 = (next(ranks[n] for n in ranks if n.startswith(f"model.layers.{i}.") and target in n)
                          for i in (0, 1))  # fmt: skip
        assert layer0 > layer1, (target, ranks)

    # Frozen non-targets: embeddings, norms, LM head and the targets' biases are as loaded; the targets moved.
    after = load_file(out / "hf_format/samples_32/model.safetensors")
    for name, w in before.items():
        assert torch.equal(after[name], w) != name.endswith(suffixes), name

    # 2 -> 1 ranks: the checkpoint's ranks are reused, and steps 3-4 are the 2-rank run's.
    resumed = tmp_path / "one"
    code, stdout, err = resumed_from_step_2(resumed, "--osft-freeze-non-targets")
    assert code == 0, err
    assert "osft: layer importance" not in stdout
    ref = metrics(out)
    assert [m["step"] for m in metrics(resumed)] == [3, 4]
    for m in metrics(resumed):
        assert m["loss"] == pytest.approx(ref[m["step"] - 1]["loss"], rel=1e-5)
    assert json.loads((resumed / "full_state/samples_32/trainer_state.json").read_text())["osft_ranks"] == ranks

    # The checkpoint trained with its non-targets frozen: a resume that would train them is refused.
    code, _, err = resumed_from_step_2(tmp_path / "three")
    assert code != 0 and "--osft-train-non-targets True (checkpoint: False)" in err, err
