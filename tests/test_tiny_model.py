import json
import re
import time
from dataclasses import fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import tiny_model
from conftest import ROOT, run_script


def test_tokenizer_routes_agree(qwen_dir, llama_dir, tmp_path):
    """AutoTokenizer on the model folder, on a tokenizer-only folder, and PreTrainedTokenizerFast give the same ids."""
    texts = [json.dumps(c) for c in tiny_model.make_conversations(200, seed=3)] + [
        "Café  naïve\u0301 ünï\tcode\r\n\n  spaces   end ",
        "don't I'LL we've 1234567 ?!... \u00e9\u0065\u0301",
    ]
    for model_dir, template in [(qwen_dir, "chatml"), (llama_dir, "llama3")]:
        tok_dir = tmp_path / template
        tiny_model.build_tokenizer(tok_dir, template)
        routes = [
            AutoTokenizer.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(tok_dir),
            PreTrainedTokenizerFast.from_pretrained(model_dir),
        ]
        ids = [[r(t, add_special_tokens=False)["input_ids"] for t in texts] for r in routes]
        assert ids[0] == ids[1] == ids[2]
        assert len(routes[0]) == tiny_model.VOCAB_SIZE
        assert routes[0].eos_token == tiny_model.TEMPLATES[template]["eos_token"]
        assert routes[0].pad_token == "<|endoftext|>"


def test_models_round_trip(qwen_dir, llama_dir, tmp_path):
    for model_dir, cls in [(qwen_dir, "Qwen2ForCausalLM"), (llama_dir, "LlamaForCausalLM")]:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        assert type(model).__name__ == cls
        assert 1.2e6 < sum(p.numel() for p in model.parameters()) < 2e6
        model.save_pretrained(tmp_path / cls)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / cls)
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
        ids = torch.tensor([[5, 17, 99, 300]])
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_build_is_deterministic(tmp_path):
    a = tiny_model.build_model(tmp_path / "a", seed=7)
    b = tiny_model.build_model(tmp_path / "b", seed=7)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))


PROCESS_DATA_FLAGS = [
    "--input-file",
    "--output-file",
    "--model-name-or-path",
    "--max-sample-num-tokens",
    "--num-proc",
    "--skip-invalid",
]


def train_flags():
    from train import TrainConfig

    return [f"--{f.name.replace('_', '-')}" for f in fields(TrainConfig)]


def test_cli_help_is_fast_and_complete():
    """Every flag whole in --help on an 80-column terminal (rich's tables cut long names: `--model-name-or-p…`)."""
    for script, flags in [("process_data.py", PROCESS_DATA_FLAGS), ("train.py", train_flags())]:
        start = time.perf_counter()
        result = run_script(ROOT / script, "--help", env={"COLUMNS": "80"})
        assert time.perf_counter() - start < 2.0, f"{script} --help is slow (heavy import at module level?)"
        assert result.returncode == 0
        assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80, script
        for flag in flags:
            assert re.search(rf"(^|\s){flag}(\s|$)", result.stdout, re.M), (script, flag)


def test_reference_documents_every_flag():
    """docs/REFERENCE.md documents, in each script's own section, every flag its --help lists (and every command of
    batch_metrics.py), written as code: `--flag` or the `--flag/--no-flag` pair."""
    import re

    reference = (ROOT / "docs" / "REFERENCE.md").read_text()
    sections = {s.split("\n", 1)[0].strip(): s for s in reference.split("\n## ")[1:]}

    def options(*args):
        result = run_script(*args, "--help", env={"COLUMNS": "200"})
        assert result.returncode == 0, (args, result.stderr)
        lines = result.stdout.splitlines()
        row = r"^\W?\s+(?:\*\s+)?(--[a-z][\w-]*)(?:\s+(--[a-z][\w-]*))?"  # an option row: `--x` or `--x  --no-x`
        found = {flag for line in lines for pair in re.findall(row, line) for flag in pair}
        return found - {"", "--help"}, lines

    checked = 0
    for script in ("process_data.py", "train.py", "batch_metrics.py", "tiny_model.py", "demo.py"):
        section = sections[script]
        flags, lines = options(ROOT / script)
        if script == "batch_metrics.py":  # commands: the rows of the Commands panel
            start = next(i for i, line in enumerate(lines) if "Commands" in line)
            commands = [m.group(1) for line in lines[start + 1 :] if (m := re.match(r"^\W\s(\w[\w-]*)\s", line))]
            assert commands, lines
            for command in commands:
                assert f"batch_metrics.py {command}" in section, command
                flags |= options(ROOT / script, command)[0]
        for flag in flags:
            assert re.search(rf"[`/]{re.escape(flag)}(?![\w-])", section), (script, flag)
        checked += len(flags)
    assert checked >= len(PROCESS_DATA_FLAGS) + len(train_flags())  # the parsing found the flags at all


def markdown_targets(text: str):
    """(link target, heading anchors) of a markdown text, fenced code blocks left out; anchors as GitHub makes them
    (lower case, punctuation dropped, spaces as dashes, -1, -2... for repeats)."""
    import re

    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return links, anchors


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md points at a file that exists (and at a heading of it, for
    links into a markdown file with #anchor)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 2
    checked = 0
    for page in pages:
        links, _ = markdown_targets(page.read_text())
        for link in links:
            if ":" in link.split("/")[0]:  # https:, mailto:: not a file here
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            assert target.exists(), f"{page.relative_to(ROOT)}: {link} -> {target} does not exist"
            if anchor and target.suffix == ".md":
                assert anchor in markdown_targets(target.read_text())[1], f"{page.relative_to(ROOT)}: {link}"
            checked += 1
    assert checked > 10
