"""demo.py: the task, the scorer, and a very short run through every command the demo calls (so that a renamed
flag or output of process_data.py, train.py or batch_metrics.py breaks a test, not the README's first command)."""

import json
import subprocess

import pytest

import demo
from conftest import ROOT, run_script


def test_task_answers_are_the_reversed_digits_and_heldout_prompts_are_unseen():
    train, heldout = demo.make_task(2000, 200)
    assert (len(train), len(heldout)) == (2000, 200)
    prompts = []
    for row in train + heldout:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        digits = user["content"].removeprefix("reverse ")
        assert digits.isdigit() and 3 <= len(digits) <= 8
        assert assistant["content"] == digits[::-1]
        prompts.append(user["content"])
    assert len(set(prompts)) == len(prompts)
    assert demo.make_task(2000, 200) == (train, heldout)  # the same task every run


def test_exact_match():
    assert demo.exact_match(["123", "45", " 6"], ["123", "54", "6"]) == 1 / 3
    with pytest.raises(ValueError):
        demo.exact_match(["1"], ["1", "2"])


@pytest.mark.slow
def test_short_demo_run_writes_everything_it_lists(tmp_path):
    out = tmp_path / "demo"
    r = run_script(ROOT / "demo.py", "--out-dir", out, "--num-train", 64, "--num-heldout", 8, "--epochs", 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["answers"]) == 8 and 0 <= results["exact_match_after"] <= 1
    assert (out / "train" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(out / "train" / "training_metrics_0.jsonl")]
    assert [row["step"] for row in rows if "val_loss" in row] == [1]  # the held-out split is the validation set
    assert (out / "train" / "hf_format" / "samples_64" / "config.json").exists()
    assert f"written to {out}/" in r.stdout
    # A second run into the same folder is refused before touching it.
    again = run_script(ROOT / "demo.py", "--out-dir", out)
    assert again.returncode == 1 and "exists" in again.stderr


def test_dev_script_without_a_verb_prints_its_usage():
    r = subprocess.run(["bash", ROOT / "dev.sh"], capture_output=True, text=True)
    assert r.returncode == 2 and "./dev.sh demo" in r.stderr and "./dev.sh test" in r.stderr
