"""process_data.py: the exact label rule on several template styles, drops, bad input, parallel == serial."""

import json
import os
import random

import numpy as np
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

import process_data
import tiny_model
from conftest import ROOT, run_script, tokenize
from dataset import load_tokenized
from documents import EXAMPLE_CHARS

SYS = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "hello there, how are you?"}
A1 = {"role": "assistant", "content": "fine thanks"}
U2 = {"role": "user", "content": "and now?"}
A2 = {"role": "assistant", "content": "  still fine  ", "reasoning_content": "think about it\nstep by step"}
TOOL = {"role": "tool", "content": '{"temp": 21}'}

ROLE_COMBOS = {
    "user_assistant": [U1, A1],
    "system_user_assistant": [SYS, U1, A1],
    "multi_turn": [SYS, U1, A1, U2, A2],
    "reasoning": [U1, A2],
    "tool": [U1, A1, TOOL, A2],
    "assistant_first": [A1, U1, A1],
    "consecutive_assistants": [U1, A1, A2],
}

# The same templates with `{% generation %}` tags: transformers' own assistant mask is the oracle for our rule.
LLAMA3_TAGGED = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}"
    "{%- if message.get('reasoning_content') %}"
    "{{- '<think>' + message['reasoning_content'] + '</think>' }}"
    "{%- endif %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral style: the span starts right after "[/INST]" with a space, so the first span token (" fine") straddles
# nothing but starts with a character outside any role header; end-of-turn is the eos token.
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- endfor %}"
)
MISTRAL_TAGGED = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- ' ' + message['content'] + eos_token }}"
    "{% endgeneration %}{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- endfor %}"
)


def invoke(src, out, tokenizer_dir, *flags):
    """The process_data CLI, in-process."""
    import typer

    app = typer.Typer()
    app.command()(process_data.main)
    args = ["--input-file", src, "--output-file", out, "--model-name-or-path", tokenizer_dir, *flags]
    return CliRunner().invoke(app, [str(a) for a in args])


def run(tmp_path, rows, tokenizer_dir, *flags, raw_lines=None):
    """Write rows (or raw lines) to a JSONL, run the CLI in-process; return (result, output rows or None)."""
    src = tmp_path / "in.jsonl"
    if raw_lines is not None:
        src.write_bytes(b"".join(raw_lines))
    else:
        tiny_model.write_jsonl(src, rows)
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    result = invoke(src, out, tokenizer_dir, "--num-proc", "1", *flags)
    rows_out = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None
    return result, rows_out


def oracle_labels(tokenizer, tagged_template, messages):
    """Labels from transformers' `{% generation %}` assistant mask on an otherwise identical template."""
    enc = tokenizer.apply_chat_template(
        messages, chat_template=tagged_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    return ids, [i if m else -100 for i, m in zip(ids, mask)]


def make_tokenizer_dir(tmp_path, template_name, chat_template=None):
    d = tmp_path / f"tok_{template_name}"
    tok = tiny_model.build_tokenizer(d, "llama3" if template_name == "llama3" else "chatml")
    if chat_template is not None:
        tok.chat_template = chat_template
        tok.eos_token = "<|endoftext|>"
        tok.bos_token = "<|begin_of_text|>"
        tok.save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "style,tagged",
    [("chatml", tiny_model.CHATML_GENERATION_TEMPLATE), ("llama3", LLAMA3_TAGGED), ("mistral", MISTRAL_TAGGED)],
)
def test_labels_match_transformers_generation_mask(tmp_path, style, tagged):
    tok_dir = make_tokenizer_dir(tmp_path, style, MISTRAL if style == "mistral" else None)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # Mistral-style templates render no system, tool or reasoning: only user/assistant alternation applies.
    combos = ROLE_COMBOS if style != "mistral" else {"two_turns": [U1, A1, U2, {"role": "assistant", "content": "ok"}]}
    names = list(combos)
    result, rows = run(tmp_path, [{"messages": combos[n]} for n in names], tok_dir)
    assert result.exit_code == 0, result.output
    assert len(rows) == len(names)
    for name, row in zip(names, rows):
        ids, labels = oracle_labels(tokenizer, tagged, combos[name])
        assert row["input_ids"] == ids, name
        assert row["labels"] == labels, name
        assert row["len"] == len(ids)
        assert row["num_loss_counted_tokens"] == sum(lab != -100 for lab in labels[1:])


def test_chatml_labels_decode_to_exactly_the_assistant_text(tmp_path, qwen_dir):
    """An oracle-free check: the labelled tokens decode to reasoning-with-tags + content + <|im_end|>, nothing else."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    result, rows = run(tmp_path, [{"messages": ROLE_COMBOS["multi_turn"]}], qwen_dir)
    assert result.exit_code == 0, result.output
    ids, labels = np.array(rows[0]["input_ids"]), np.array(rows[0]["labels"])
    kept = labels != -100
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(kept.astype(int))) + 1)
    trained = [tokenizer.decode(ids[r]) for r in runs if kept[r[0]]]
    assert trained == [
        "fine thanks<|im_end|>",
        "<think>\nthink about it\nstep by step\n</think>\n\n  still fine  <|im_end|>",
    ]
    assert not kept[-1], "the newline after the last <|im_end|> is not trained on"


def test_llama3_reasoning_and_multi_turn(tmp_path, llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    result, rows = run(tmp_path, [{"messages": ROLE_COMBOS["multi_turn"]}], llama_dir)
    assert result.exit_code == 0, result.output
    ids, labels = np.array(rows[0]["input_ids"]), np.array(rows[0]["labels"])
    assert (
        tokenizer.decode(ids[labels != -100])
        == "fine thanks<|eot_id|><think>think about it\nstep by step</think>still fine<|eot_id|>"
    )
    assert ids[0] == tokenizer.bos_token_id and labels[0] == -100


def test_pretrain_sample(tmp_path, qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    text = "plain text for pretraining, with no template at all."
    result, rows = run(tmp_path, [{"messages": [{"role": "pretrain", "content": text}]}], qwen_dir)
    assert result.exit_code == 0, result.output
    expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows[0]["input_ids"] == expected
    assert rows[0]["labels"] == expected
    assert rows[0]["num_loss_counted_tokens"] == len(expected) - 1  # the first token is never a target


def test_drops_are_counted_and_reported(tmp_path, qwen_dir):
    long_reply = {"role": "assistant", "content": " ".join(["word"] * 300)}
    rows = [
        {"messages": [U1, A1]},
        {"messages": [U1, long_reply]},  # over the limit
        {"messages": [SYS, U1]},  # no assistant turn: no loss token
        {"messages": []},  # empty sample
        {"messages": [{"role": "pretrain", "content": ""}]},  # eos only: nothing to predict
        {"messages": [U2, A1]},
    ]
    result, out = run(tmp_path, rows, qwen_dir, "--max-sample-num-tokens", "100")
    assert result.exit_code == 0, result.output
    assert len(out) == 2 and all(r["len"] <= 100 for r in out)
    assert "read 6 samples" in result.output and "wrote 2" in result.output
    assert "dropped 1 (too_long)" in result.output
    assert "dropped 3 (no_loss_tokens)" in result.output
    assert "p50" in result.output and "«" in result.output


BAD_LINES = {
    "invalid_json": b'{"messages": [}\n',
    "not_an_object": b"[1, 2]\n",
    "missing_messages": b'{"conversation": []}\n',
    "ill_typed_messages": b'{"messages": "hi"}\n',
    "message_not_object": b'{"messages": ["hi"]}\n',
    "unknown_role": b'{"messages": [{"role": "robot", "content": "x"}]}\n',
    "missing_role": b'{"messages": [{"content": "x"}]}\n',
    "non_string_content": b'{"messages": [{"role": "user", "content": 5}]}\n',
    "missing_content": b'{"messages": [{"role": "user"}]}\n',
    "non_string_reasoning": b'{"messages": [{"role": "assistant", "content": "a", "reasoning_content": ["x"]}]}\n',
    "pretrain_mixed": b'{"messages": [{"role": "pretrain", "content": "x"}, {"role": "user", "content": "y"}]}\n',
    "invalid_utf8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
    "nested_too_deeply": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "integer_too_long": b'{"messages": [], "n": 1' + b"0" * 5000 + b"}\n",
    "list_role": b'{"messages": [{"role": ["user"], "content": "x"}]}\n',
    "lone_surrogate": b'{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "a"}]}\n',
}
GOOD = json.dumps({"messages": [U1, A1]}).encode() + b"\n"


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_is_one_line_error_with_line_number(tmp_path, qwen_dir, case):
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[GOOD, b"\n", BAD_LINES[case], GOOD])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'in.jsonl'}:3: "), result.stderr
    assert out is None, "no output file on error"
    assert not list(tmp_path.glob(".out.jsonl.tmp*")), "no temporary file left behind"


def test_a_utf8_bom_is_accepted(tmp_path, qwen_dir):
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[b"\xef\xbb\xbf" + GOOD, GOOD])
    assert result.exit_code == 0, result.output
    assert len(out) == 2


@pytest.mark.parametrize("case", ["output_is_input", "output_is_folder", "parent_is_file", "input_is_folder"])
def test_bad_paths_fail_before_any_work_and_leave_nothing(tmp_path, qwen_dir, case):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD)
    output, expected = {
        "output_is_input": (src, "is the input file"),
        "output_is_folder": (tmp_path, "is a folder"),
        "parent_is_file": (src / "sub" / "out.jsonl", "is a file, not a folder"),
        "input_is_folder": (tmp_path / "new" / "out.jsonl", "is a folder, not a file"),
    }[case]
    if case == "input_is_folder":
        src = tmp_path
    before = sorted(tmp_path.rglob("*"))
    result = invoke(src, output, qwen_dir)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before, "nothing created"
    assert (tmp_path / "in.jsonl").read_bytes() == GOOD, "input untouched"


def test_a_failed_run_removes_the_folders_it_created(tmp_path, qwen_dir):
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[GOOD, BAD_LINES["unknown_role"]])
    assert result.exit_code == 2
    deep = tmp_path / "a" / "b" / "out.jsonl"
    src = tmp_path / "in.jsonl"
    result = invoke(src, deep, qwen_dir, "--num-proc", "1")
    assert result.exit_code == 2 and not (tmp_path / "a").exists()


def test_stale_temp_files_go_live_ones_stay(tmp_path, qwen_dir):
    dead, alive = tmp_path / ".out.jsonl.tmp-999999999", tmp_path / f".out.jsonl.tmp-{os.getppid()}"
    for f in (dead, alive):
        f.write_text("partial")
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[GOOD])
    assert result.exit_code == 0 and len(out) == 1
    assert not dead.exists() and alive.exists()


def test_samples_longer_than_the_models_positions_are_counted(tmp_path, qwen_dir):
    """The tiny model has 4,096 positions; a conversation of ~5,000 tokens is kept, with a warning and a count."""
    long = {"messages": [U1, {"role": "assistant", "content": " ".join(["suneelxi"] * 5000)}]}
    result, out = run(tmp_path, [long, {"messages": [U1, A1]}], qwen_dir)
    assert result.exit_code == 0 and len(out) == 2 and out[0]["len"] > 4096
    assert "warning: 1 samples are longer than the model's 4096 positions" in result.output


def test_a_conversation_the_chat_template_refuses_is_one_invalid_line(tmp_path, qwen_dir):
    """A template that raises (here: roles must alternate, starting with the user) refuses that line only, in one
    line naming it, or skipped and counted with --skip-invalid; the chunk's other conversations are kept."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model)
    template = model / "chat_template.jinja"
    check = "{%- if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}"
    template.write_text(check + "{%- endif %}" + template.read_text())
    first = json.dumps({"messages": [A1, U1]}).encode() + b"\n"
    result, out = run(tmp_path, None, model, raw_lines=[GOOD, first, GOOD])
    assert result.exit_code == 2 and out is None
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'in.jsonl'}:2: the chat template refuses it (Conversation must start with user)"
    )
    result, out = run(tmp_path, None, model, "--skip-invalid", raw_lines=[GOOD, first, GOOD])
    assert result.exit_code == 0 and len(out) == 2 and "skipped 1 invalid (template_error)" in result.output


def test_a_lone_surrogate_in_any_rendered_field_is_one_invalid_line(tmp_path, qwen_dir):
    """A template that renders a field leantrain does not check ('name'): the rendered text is checked too."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model)
    template = model / "chat_template.jinja"
    template.write_text("{%- for m in messages %}{{ m.get('name', '') }}{%- endfor %}" + template.read_text())
    named = (
        b'{"messages": [{"role": "user", "name": "\\ud800", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    result, out = run(tmp_path, None, model, raw_lines=[GOOD, named])
    assert result.exit_code == 2 and out is None
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'in.jsonl'}:2: the rendered conversation: lone surrogate '\\ud800' at character 0"
    )
    result, out = run(tmp_path, None, model, "--skip-invalid", "--num-proc", "2", raw_lines=[GOOD, named, GOOD])
    assert result.exit_code == 0 and len(out) == 2 and "skipped 1 invalid (bad_unicode)" in result.output


def test_skip_invalid_counts_per_reason(tmp_path, qwen_dir):
    lines = [GOOD, BAD_LINES["invalid_json"], BAD_LINES["unknown_role"], BAD_LINES["invalid_json"], GOOD]
    result, out = run(tmp_path, None, qwen_dir, "--skip-invalid", raw_lines=lines)
    assert result.exit_code == 0, result.output
    assert len(out) == 2
    assert "skipped 2 invalid (invalid_json)" in result.output
    assert "skipped 1 invalid (unknown_role)" in result.output


def test_empty_file_and_missing_template_and_bad_tokenizer(tmp_path, qwen_dir):
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[b"\n"])
    assert result.exit_code == 2 and "empty file" in result.stderr and out is None

    no_template = tmp_path / "no_template"
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    tok.chat_template = None
    tok.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    result, out = run(tmp_path, [{"messages": [U1, A1]}], no_template)
    assert result.exit_code == 2 and "no chat template" in result.stderr and out is None
    # pretrain data needs no template
    result, out = run(tmp_path, [{"messages": [{"role": "pretrain", "content": "abc"}]}], no_template)
    assert result.exit_code == 0 and len(out) == 1

    result, out = run(tmp_path, [{"messages": [U1, A1]}], tmp_path / "does_not_exist")
    assert result.exit_code == 2 and "--model-name-or-path" in result.stderr


def test_parallel_output_equals_serial_and_cli_has_no_traceback(tmp_path, qwen_dir):
    src = tiny_model.write_jsonl(tmp_path / "big.jsonl", tiny_model.make_conversations(700, seed=5))
    outs = []
    for n in (1, 2):
        out = tokenize(src, qwen_dir, tmp_path / f"out{n}.jsonl", "--num-proc", n)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0].count(b"\n") == 700

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(src.read_bytes() + BAD_LINES["unknown_role"])
    r = run_script(
        ROOT / "process_data.py",
        "--input-file",
        bad,
        "--output-file",
        tmp_path / "x.jsonl",
        "--model-name-or-path",
        qwen_dir,
        "--num-proc",
        2,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip() == f"error: {bad}:701: messages[0].role: unknown role 'robot' (expected one of "
        "assistant, pretrain, system, tool, user)"
    )
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# Document mode: --pretrain-block-size

BLOCK = 64


def documents(n: int, seed: int) -> list[str]:
    """n generated documents of 1-150 words, one of them long enough to span several blocks, one empty."""
    rng = random.Random(seed)
    docs = [tiny_model.make_text(rng, rng.randint(1, 150)) for _ in range(n)]
    docs[n // 3] = tiny_model.make_text(rng, 400)
    docs[n // 2] = ""
    return docs


def document_stream(tokenizer, docs: list[str]) -> tuple[list[int], set[int]]:
    """The documents' tokens, each followed by EOS (empty documents left out), and where each one starts."""
    stream, starts = [], set()
    for doc in docs:
        if doc:
            starts.add(len(stream))
            stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream, starts


def run_documents(tmp_path, docs, tokenizer_dir, *flags):
    return run(tmp_path, [{"document": d} for d in docs], tokenizer_dir, "--pretrain-block-size", BLOCK, *flags)


def test_script_loads_each_module_once(tmp_path, qwen_dir):
    """Run as `python process_data.py`, the script is `__main__`: no module it imports may import process_data by
    name, which would load a second copy (a second FatalLine class, which main() would not catch). The import log
    of a document-mode run through worker processes names each module imported, and process_data not among them."""
    src = tiny_model.write_jsonl(tmp_path / "docs.jsonl", [{"document": d} for d in documents(40, seed=8)])
    out = tmp_path / "out.jsonl"
    r = run_script(
        "-X",
        "importtime",
        ROOT / "process_data.py",
        "--input-file",
        src,
        "--output-file",
        out,
        "--model-name-or-path",
        qwen_dir,
        "--pretrain-block-size",
        BLOCK,
        "--num-proc",
        2,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_text().count("\n") > 1
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert {"documents", "utils"} <= imported  # the log is read right
    assert "process_data" not in imported


@pytest.mark.parametrize("isolate", [False, True])
def test_blocks_are_the_documents_with_eos_separators(tmp_path, qwen_dir, isolate):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    docs = documents(80, seed=3)
    result, rows = run_documents(tmp_path, docs, qwen_dir, *(["--isolate-documents"] if isolate else []))
    assert result.exit_code == 0, result.output
    stream, starts = document_stream(tokenizer, docs)
    assert sum((r["input_ids"] for r in rows), []) == stream
    assert 0 < len(stream) % BLOCK == rows[-1]["len"], "the partial last block is kept at its true length"
    assert all(r["len"] == BLOCK for r in rows[:-1])
    offset = 0
    for row in rows:
        assert row["labels"] == row["input_ids"] and row["len"] == len(row["input_ids"])
        if isolate:  # 0 at each document start and at the block start (a fresh context), else counting on
            expected, p = [], 0
            for t in range(row["len"]):
                p = 0 if t == 0 or offset + t in starts else p + 1
                expected.append(p)
            assert row["position_ids"] == expected
            assert row["num_loss_counted_tokens"] == sum(p != 0 for p in expected[1:])
        else:
            assert "position_ids" not in row and row["num_loss_counted_tokens"] == row["len"] - 1
        offset += row["len"]
    # The trainer counts the same targets (its own rule, from the rows' position_ids).
    data = load_tokenized(tmp_path / "out.jsonl", BLOCK)
    assert data.num_loss_counted_tokens.tolist() == [r["num_loss_counted_tokens"] for r in rows]

    assert (
        f"read {len(docs)} documents" in result.output
        and f"wrote {len(rows)} blocks of {BLOCK} tokens" in result.output
    )
    assert "dropped 1 (empty_document)" in result.output
    assert f"last block: {rows[-1]['len']} tokens, kept at its true length" in result.output
    assert tokenizer.decode(rows[0]["input_ids"])[:EXAMPLE_CHARS] in result.output


@pytest.mark.parametrize("isolate", [False, True])
def test_the_example_states_its_targets_as_written(tmp_path, qwen_dir, isolate):
    """Short documents: with --isolate-documents the first block has a target fewer per document start after its
    first token, and the summary says so."""
    docs = ["one short document", "and another", "and a third one"]
    result, rows = run_documents(tmp_path, docs, qwen_dir, *(["--isolate-documents"] if isolate else []))
    assert result.exit_code == 0, result.output
    targets, length = rows[0]["num_loss_counted_tokens"], rows[0]["len"]
    assert targets == length - (3 if isolate else 1)
    assert (
        f"example (block 1, tokenized as line 1 of {tmp_path / 'out.jsonl'}; {targets} of its {length} tokens are "
        "targets), decoded:\n" in result.output
    )


def test_the_summary_shows_the_first_block_cut_short(tmp_path, qwen_dir):
    """A whole block is thousands of characters: the summary shows its start and says what is left out; a short
    one is shown whole."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    result, rows = run(
        tmp_path, [{"document": d} for d in documents(20, seed=7)], qwen_dir, "--pretrain-block-size", 1024
    )
    assert result.exit_code == 0, result.output
    text = tokenizer.decode(rows[0]["input_ids"])
    shown, left = text[:EXAMPLE_CHARS], len(text) - EXAMPLE_CHARS
    assert left > 3000
    assert result.output.endswith(f"decoded:\n{shown}… [{left} more characters]\n"), result.output[-500:]

    result, rows = run_documents(tmp_path, ["a short document"], qwen_dir)
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"decoded:\n{tokenizer.decode(rows[0]['input_ids'])}\n")


def test_a_document_line_in_chat_mode_suggests_document_mode(tmp_path, qwen_dir):
    """A documents file given without --pretrain-block-size: the error says how to read it (only where the line has
    the document column), and --skip-invalid still counts it as missing_messages."""
    document = b'{"document": "some text to pretrain on"}\n'
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[GOOD, document])
    assert result.exit_code == 2 and out is None
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'in.jsonl'}:2: missing field 'messages' (this line has a 'document' field: for "
        "documents, pass --pretrain-block-size N)"
    )
    result, out = run(tmp_path, None, qwen_dir, raw_lines=[GOOD, BAD_LINES["missing_messages"]])
    assert result.stderr.strip() == f"error: {tmp_path / 'in.jsonl'}:2: missing field 'messages'"
    result, out = run(tmp_path, None, qwen_dir, "--skip-invalid", raw_lines=[GOOD, document, GOOD])
    assert result.exit_code == 0 and len(out) == 2 and "skipped 1 invalid (missing_messages)" in result.output


def test_drop_last_block(tmp_path, qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    docs = documents(30, seed=4)
    result, rows = run_documents(tmp_path, docs, qwen_dir, "--drop-last-block")
    assert result.exit_code == 0, result.output
    stream, _ = document_stream(tokenizer, docs)
    assert len(stream) % BLOCK and all(r["len"] == BLOCK for r in rows)
    assert sum((r["input_ids"] for r in rows), []) == stream[: len(stream) // BLOCK * BLOCK]
    assert f"last block: {len(stream) % BLOCK} tokens, dropped (--drop-last-block)" in result.output

    result, rows = run_documents(tmp_path, ["too short for one block"], qwen_dir, "--drop-last-block")
    assert result.exit_code == 2 and rows is None
    assert result.stderr.strip().endswith("no block left to write (1 partial_last_block)"), result.stderr


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--pretrain-block-size", 4097], "--pretrain-block-size 4097: more than the model's 4096 positions"),
        (["--pretrain-block-size", 1], "--pretrain-block-size must be >= 2"),
        (["--pretrain-block-size", 64, "--max-sample-num-tokens", 10], "--max-sample-num-tokens does not apply"),
        (["--isolate-documents"], "--isolate-documents needs --pretrain-block-size"),
        (["--drop-last-block"], "--drop-last-block needs --pretrain-block-size"),
        (["--document-column-name", "text"], "--document-column-name needs --pretrain-block-size"),
        (["--pretrain-block-size", "8", "--document-column-name", ""], "--document-column-name must not be empty"),
    ],
)
def test_document_flag_errors(tmp_path, qwen_dir, flags, expected):
    result, rows = run(tmp_path, [{"document": "some text"}], qwen_dir, *flags)
    assert result.exit_code == 2 and rows is None
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


DOC_GOOD = b'{"text": "a good document with a few words"}\n'
DOC_BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated}\n', "invalid JSON"),
    "not_an_object": (b'["text"]\n', "expected a JSON object, got list"),
    "missing_column": (b'{"document": "the default column, not the one named"}\n', "missing field 'text'"),
    "number": (b'{"text": 5}\n', "field 'text' must be a string, got int"),
    "null": (b'{"text": null}\n', "field 'text' must be a string, got NoneType"),
    "list": (b'{"text": ["a", "b"]}\n', "field 'text' must be a string, got list"),
    "invalid_utf8": (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    "lone_surrogate": (b'{"text": "caf\\udc80"}\n', "field 'text': lone surrogate '\\udc80' at character 3"),
}


@pytest.mark.parametrize("case", sorted(DOC_BAD_LINES))
def test_bad_document_lines_are_one_line_errors(tmp_path, qwen_dir, case):
    bad, expected = DOC_BAD_LINES[case]
    flags = ["--pretrain-block-size", BLOCK, "--document-column-name", "text"]
    result, out = run(tmp_path, None, qwen_dir, *flags, raw_lines=[DOC_GOOD, b"\n", bad, DOC_GOOD])
    assert result.exit_code == 2 and out is None
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'in.jsonl'}:3: "), result.stderr
    assert expected in lines[0]
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))


def test_bad_document_lines_skipped_and_counted(tmp_path, qwen_dir):
    lines = [DOC_GOOD, DOC_BAD_LINES["number"][0], DOC_BAD_LINES["invalid_json"][0], DOC_BAD_LINES["null"][0]]
    flags = ["--pretrain-block-size", BLOCK, "--document-column-name", "text", "--skip-invalid"]
    result, out = run(tmp_path, None, qwen_dir, *flags, raw_lines=[*lines, DOC_GOOD])
    assert result.exit_code == 0, result.output
    assert "read 5 documents" in result.output
    assert "skipped 2 invalid (bad_document)" in result.output and "skipped 1 invalid (invalid_json)" in result.output
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    good = json.loads(DOC_GOOD)["text"]
    assert sum((r["input_ids"] for r in out), []) == document_stream(tokenizer, [good, good])[0]


def test_document_blocks_parallel_equal_serial(tmp_path, qwen_dir):
    """Enough documents for more chunks than are in flight at once, blocks carried across chunk boundaries."""
    flags = ["--pretrain-block-size", 100, "--isolate-documents"]
    result, _ = run(tmp_path, [{"document": d} for d in documents(1400, seed=5)], qwen_dir, *flags)
    assert result.exit_code == 0, result.output
    serial = (tmp_path / "out.jsonl").read_bytes()
    parallel = tokenize(tmp_path / "in.jsonl", qwen_dir, tmp_path / "out2.jsonl", *flags, "--num-proc", 2)
    assert parallel.read_bytes() == serial
    assert serial.count(b"\n") > 1000


def single_token_words(tokenizer) -> list[str]:
    """Words, leading space included, that are one token each: documents of an exact token length."""
    words = [" " + t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    encoded = tokenizer.backend_tokenizer.encode_batch(words, add_special_tokens=False)
    return sorted(w for w, e in zip(words, encoded) if len(e.ids) == 1)


def one_step(model_dir, data, out_dir) -> dict:
    """train.py's own main, in-process: one step on every sample of `data` at once. Returns the step's metrics."""
    import train

    argv = ["--model-name-or-path", model_dir, "--data-path", data, "--output-dir", out_dir]
    argv += ["--batch-size", data.read_text().count("\n"), "--max-tokens-per-gpu", 4096, "--max-steps", 1]
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in [*argv, "--no-save-final-checkpoint"]])
    assert exit_info.value.code == 0
    (metrics,) = [json.loads(line) for line in open(out_dir / "training_metrics_0.jsonl")]
    return metrics


def test_isolated_blocks_train_like_separate_documents(tmp_path, qwen_dir):
    """Documents laid out to fill whole blocks: one step on all --isolate-documents blocks equals one step on the
    same documents as separate samples, alone and mixed with chat samples in one file. Without
    --isolate-documents it does not: attention crosses documents, and each document's first token is a target."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    words = single_token_words(tokenizer)
    rng = random.Random(6)
    lengths = []  # tokens per document, EOS included
    for _ in range(5):  # full blocks of three documents each
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        lengths += [a, b, BLOCK - a - b]
    lengths += [20, 15]  # and a partial last block
    docs = ["".join(rng.choices(words, k=n - 1)) for n in lengths]
    assert [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs] == lengths

    def tokenized(name, rows, *flags) -> str:
        src = tiny_model.write_jsonl(tmp_path / f"{name}_in.jsonl", rows)
        result = invoke(src, tmp_path / f"{name}.jsonl", qwen_dir, "--num-proc", 1, *flags)
        assert result.exit_code == 0, result.output
        return (tmp_path / f"{name}.jsonl").read_text()

    doc_rows = [{"document": d} for d in docs]
    blocks = tokenized("blocks", doc_rows, "--pretrain-block-size", BLOCK, "--isolate-documents")
    plain = tokenized("plain", doc_rows, "--pretrain-block-size", BLOCK)
    separate = tokenized("separate", [{"messages": [{"role": "pretrain", "content": d}]} for d in docs])
    chat = tokenized("chat", tiny_model.make_conversations(6, seed=2, max_words=30))
    assert blocks.count("\n") == 6 and separate.count("\n") == len(docs)

    runs = {"blocks": blocks, "plain": plain, "separate": separate}
    runs |= {"chat_blocks": chat + blocks, "chat_separate": chat + separate}
    metrics = {}
    for name, text in runs.items():
        (tmp_path / f"{name}_train.jsonl").write_text(text)
        metrics[name] = one_step(qwen_dir, tmp_path / f"{name}_train.jsonl", tmp_path / f"run_{name}")
    for a, b in [("blocks", "separate"), ("chat_blocks", "chat_separate")]:
        assert metrics[a]["num_total_tokens"] == metrics[b]["num_total_tokens"]
        assert metrics[a]["num_loss_counted_tokens"] == metrics[b]["num_loss_counted_tokens"]
        assert metrics[a]["loss"] == pytest.approx(metrics[b]["loss"], rel=1e-4)
        assert metrics[a]["grad_norm"] == pytest.approx(metrics[b]["grad_norm"], rel=1e-4)
    # Every document start but the 6 at a block start becomes a target.
    assert metrics["plain"]["num_loss_counted_tokens"] == metrics["separate"]["num_loss_counted_tokens"] + 17 - 6
    # and fails the very checks the isolated blocks pass (a random model's loss moves little; its gradient, ~1%).
    assert metrics["plain"]["loss"] != pytest.approx(metrics["separate"]["loss"], rel=1e-4)
    assert metrics["plain"]["grad_norm"] != pytest.approx(metrics["separate"]["grad_norm"], rel=1e-3)
