"""Generation samples (--generation-prompts-path, generation.py): at each validation, every rank joins one batched
greedy generate; the samples equal a plain transformers generate of the HF checkpoint saved at that step (1 and 2
ranks); training after a generation is bit-identical to training without one; a bad prompts file is one line before
any work; generations.jsonl lives like the metrics file (trimmed on resume, deleted by --overwrite, restored when a
launch fails before its first step); the trackers get a table and a text per prompt."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint_trust import one_error_line
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from batch_metrics import read_metrics
from conftest import ROOT, main_in_process, setup, tokenized_conversations, torchrun
from test_train import CAP_SMALL

BATCH, STEPS, NEW_TOKENS = 4, 4, 16
LR = 1e-4  # the completions still depend on the prompt and change from step to step (3e-3: one word repeated)
PROMPTS = [  # different lengths: the batch is left-padded
    [{"role": "user", "content": "reverse 4821"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France, and why does it matter so much to everyone?"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "tell me a story"},
    ],
]


@pytest.fixture(scope="module")
def files(qwen_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in PROMPTS))
    return tokenized_conversations(folder, qwen_dir, 24, seed=7, max_tokens=CAP_SMALL), prompts


def flags(model, data, out, *extra) -> list:
    """4 steps of 4 samples, a checkpoint every 2 steps (samples_8 and samples_16)."""
    return [
        "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", BATCH,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", STEPS, "--learning-rate", LR, "--seed", 5,
        "--min-samples-per-checkpoint", 2 * BATCH, *extra,
    ]  # fmt: skip


def generating(prompts) -> list:
    """Samples of NEW_TOKENS tokens every 2 steps (and at the end)."""
    return ["--generation-prompts-path", prompts, "--validation-frequency", 2, "--generation-max-new-tokens", NEW_TOKENS]  # fmt: skip


def run_main(*argv):
    """train.py's main in this process, asserting success."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def runs(qwen_dir, files, tmp_path_factory):
    """The same 4 steps with samples at steps 2 and 4 on 1 rank and on 2 (torchrun, meanwhile), and without
    samples."""
    data, prompts = files
    folder = tmp_path_factory.mktemp("generation_runs")
    two = []
    args = flags(qwen_dir, data, folder / "two", *generating(prompts))
    worker = threading.Thread(target=lambda: two.append(torchrun(ROOT / "train.py", *args, nproc=2)))
    worker.start()
    run_main(*flags(qwen_dir, data, folder / "one", *generating(prompts)))
    run_main(*flags(qwen_dir, data, folder / "plain"))
    worker.join()
    assert two[0].returncode == 0, two[0].stderr
    return {name: folder / name for name in ("one", "two", "plain")}


def plain_generate(model_dir: Path, conversations: list) -> tuple[list[str], list[str]]:
    """A user's own batched greedy generate of a saved model: rendered prompts and completions."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = lm.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    return texts, tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generations(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "generations.jsonl")]


@pytest.mark.parametrize("name", ["one", "two"])
def test_samples_equal_a_plain_generate_of_the_checkpoint_saved_at_that_step(runs, name):
    out = runs[name]
    rows = generations(out)
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]  # every 2 steps; the end (step 4) is not done twice
    for step in (2, 4):
        texts, completions = plain_generate(out / "hf_format" / f"samples_{step * BATCH}", PROMPTS)
        assert [(r["prompt"], r["completion"]) for r in rows if r["step"] == step] == list(zip(texts, completions))
    # Samples that tell prompts (padding) and steps (weights) apart: a collapsed model would pass anything.
    by_step = [[r["completion"] for r in rows if r["step"] == step] for step in (2, 4)]
    assert all(len(set(completions)) == len(PROMPTS) for completions in by_step) and by_step[0] != by_step[1]
    # Without a validation set the validation rows hold the generation's time alone; readers take them.
    _, val = read_metrics(out)
    assert [(r["step"], set(r)) for r in val] == [(s, {"step", "generation_time", "timestamp"}) for s in (2, 4)]


def test_training_after_generation_is_bit_identical(runs):
    """Losses, gradient norms, the final weights and the saved RNG states: equal to the bit with and without."""
    train_rows = {}
    for name in ("one", "plain"):
        rows, _ = read_metrics(runs[name])
        train_rows[name] = [(r["step"], r["loss"], r["grad_norm"]) for r in rows]
    assert train_rows["one"] == train_rows["plain"] and len(train_rows["one"]) == STEPS
    final = f"samples_{STEPS * BATCH}"
    with_samples, without = (load_file(runs[n] / "hf_format" / final / "model.safetensors") for n in ("one", "plain"))
    assert with_samples.keys() == without.keys()
    assert all(torch.equal(with_samples[k], without[k]) for k in without)
    for saved in ("samples_8", final):  # the step-2 save comes right after that step's generation
        rng = [(runs[n] / "full_state" / saved / "rng_0.safetensors").read_bytes() for n in ("one", "plain")]
        assert rng[0] == rng[1]


def test_generation_puts_back_every_state_it_touches(qwen_dir, files, dist):
    """The sharded model as training holds it: train mode, the packed-row attention, no KV cache in the config,
    every parameter sharded (the optimizer's), the RNG untouched."""
    from torch.distributed.tensor import DTensor

    import generation

    model, cfg = setup(qwen_dir, dist, generation_prompts_path=str(files[1]), generation_max_new_tokens=NEW_TOKENS)
    config = model.lm.config
    before = (config._attn_implementation, config.use_cache, torch.get_rng_state())
    assert before[:2] == ("leantrain_per_sequence", False)
    generation.generate(model, generation.load_prompts(cfg), dist)
    assert model.training and all(m.training for m in model.modules())
    assert (config._attn_implementation, config.use_cache) == before[:2]
    assert torch.equal(torch.get_rng_state(), before[2])
    assert all(isinstance(p, DTensor) for p in model.parameters())


def without_template(qwen_dir: Path, folder: Path) -> Path:
    """The tiny model with a tokenizer that has no chat template."""
    shutil.copytree(qwen_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "content, extra, expected",
    [
        (None, [], "--generation-prompts-path {path}: no such file"),
        ('{"messages": []}\n', [], "{path}:1: field 'messages' holds no conversation to continue"),
        ('\n{"messages": [{"role": "user", "content": "x"}]}\n{"messages": [\n', [], "{path}:3: invalid JSON"),
        ('{"prompt": "x"}\n', [], "{path}:1: missing field 'messages'"),
        ('{"messages": "x"}\n', [], "{path}:1: field 'messages' must be a list, got str"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', [], "{path}:1: messages[0].role: unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', [], "{path}:1: messages[0].content must be a string"),
        ("\n", [], "--generation-prompts-path {path}: no prompts in it"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', ["template"], "has no chat template"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', ["--generation-max-new-tokens", 0], "must be >= 1"),
    ],
)
def test_a_bad_prompts_file_is_one_line_before_any_work(qwen_dir, files, tmp_path, capfd, content, extra, expected):
    path, model = tmp_path / "prompts.jsonl", qwen_dir
    if content is not None:
        path.write_text(content)
    if extra == ["template"]:
        extra, model = [], without_template(qwen_dir, tmp_path / "model")
    argv = flags(model, files[0], tmp_path / "out", "--generation-prompts-path", path, *extra)
    code, _, err = main_in_process(capfd, *argv)
    assert code == 2 and expected.format(path=path) in one_error_line(err), err
    assert not (tmp_path / "out").exists(), "refused before the output folder is made"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--validation-frequency", 2], "--validation-frequency needs --validation-data-path, --validation-split or "),
        (["--generation-max-new-tokens", 8], "--generation-max-new-tokens need --generation-prompts-path"),
    ],
)
def test_the_schedule_and_the_length_need_something_to_do(qwen_dir, files, tmp_path, capfd, extra, expected):
    code, _, err = main_in_process(capfd, *flags(qwen_dir, files[0], tmp_path / "out", *extra))
    assert code == 2 and expected in one_error_line(err)


def test_resume_trims_overwrite_deletes_a_failed_launch_restores(runs, qwen_dir, files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(runs["one"], out)
    for kind in ("full_state", "hf_format"):  # as if killed before the step-4 save: a resume starts at step 2
        shutil.rmtree(out / kind / f"samples_{STEPS * BATCH}")
    argv = flags(qwen_dir, files[0], out, *generating(files[1]), "--resume")
    whole = (out / "generations.jsonl").read_bytes()

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as patch:  # the launch trims step 4's samples, then fails in its first step
        patch.setattr(train, "train_minibatch", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            train.main([str(a) for a in argv])
    assert (out / "generations.jsonl").read_bytes() == whole, "a launch that finished no step replaced nothing"

    run_main(*argv)  # step 4's samples again, once: the same as before (the resume is exact)
    assert generations(out) == generations(runs["one"])

    run_main(*flags(qwen_dir, files[0], out, "--overwrite", "--max-steps", 1, "--no-save-final-checkpoint"))
    assert not (out / "generations.jsonl").exists()


def test_samples_killed_before_their_validation_row_are_written_once(runs, qwen_dir, files, tmp_path):
    """Killed at the end after the last step's samples and before its validation row (its checkpoint saved): the
    resume at the end measures that step again, and its samples replace the first ones instead of adding a copy."""
    out = tmp_path / "run"
    shutil.copytree(runs["one"], out)
    metrics = out / "training_metrics_0.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1]).keys() >= {"step", "generation_time"} and json.loads(lines[-1])["step"] == STEPS
    metrics.write_text("".join(lines[:-1]))
    run_main(*flags(qwen_dir, files[0], out, *generating(files[1]), "--resume"))
    assert generations(out) == generations(runs["one"])
    assert json.loads(metrics.read_text().splitlines()[-1]).keys() >= {"step", "generation_time"}  # measured again


def test_trackers_get_a_table_and_a_text_per_prompt(tmp_path):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from batch_metrics import Trackers

    logged = []
    trackers = Trackers.__new__(Trackers)
    trackers.wandb_run = type("Run", (), {"log": lambda self, data, step: logged.append((data, step))})()
    trackers.writer = SummaryWriter(tmp_path)
    rows = [{"step": 3, "prompt": f"<|im_start|>user\nq{k}<|im_end|>\n", "completion": f"a{k}\nb"} for k in range(2)]
    trackers.log_generations(3, rows)
    trackers.writer.close()
    [(data, step)] = logged
    table = data["generations"]
    assert step == 3 and isinstance(table, wandb.Table)
    assert table.columns == ["step", "prompt", "completion"]
    assert table.data == [[3, row["prompt"], row["completion"]] for row in rows]
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    for k in range(len(rows)):  # code blocks: the template's tokens shown as they are
        [event] = events.Tensors(f"generations/{k}/text_summary")
        text = event.tensor_proto.string_val[0].decode()
        assert event.step == 3 and f"    <|im_start|>user\n    q{k}<|im_end|>" in text and f"    a{k}\n    b" in text
