"""Generation samples (--generation-prompts-path): what the model answers to a handful of prompts as it trains.

At each validation (validation.py's schedule: every --validation-frequency steps and at the end, also in a run
without a validation set), every rank joins one batched greedy `generate` of all the prompts with the current
weights, and rank 0 appends one line per prompt to output_dir/generations.jsonl and sends them to the trackers:

    {"step": S, "prompt": "<the chat template's text, generation prompt included>", "completion": "<new text>"}

The prompt is the rendered text, exactly what the model continued (the messages are the prompts file's, in its
order); the completion is the new tokens decoded without special tokens. Greedy decoding draws no random number,
and every state the call touches is put back, so training goes on bit for bit as without it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import Timer, counted, fail, log, numbered_lines

GENERATIONS_FILE = "generations.jsonl"


@dataclass
class Prompts:
    texts: list[str]  # each prompt rendered by the chat template, generation prompt included
    tokenizer: Any  # the model's, padding on the left: every row of the batch continues from its own last token
    max_new_tokens: int


def load_prompts(cfg) -> Prompts | None:
    """--generation-prompts-path's prompts, rendered (None without the flag). Bad input stops the run before any
    work, in one line naming the file, the line and the field."""
    from data_lines import InvalidLine, parse_object
    from process_data import load_tokenizer, parse_messages, render

    if cfg.generation_prompts_path is None:
        return None
    path = Path(cfg.generation_prompts_path)
    if not path.is_file():
        fail(f"--generation-prompts-path {path}: no such file")
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    if tokenizer.chat_template is None:
        fail(f"--generation-prompts-path {path}: the tokenizer of {cfg.model_name_or_path} has no chat template")
    conversations, line_numbers = [], []
    try:
        with open(path, "rb") as f:
            for lineno, raw in numbered_lines(f):
                if not raw.strip():
                    continue
                try:
                    messages = parse_messages(parse_object(raw))
                    if not messages or messages[0]["role"] == "pretrain":
                        raise InvalidLine("no_prompt", "field 'messages' holds no conversation to continue")
                except InvalidLine as e:
                    fail(f"{path}:{lineno}: {e}")
                conversations.append(messages)
                line_numbers.append(lineno)
    except OSError as e:
        fail(f"--generation-prompts-path {path}: cannot read it ({e.strerror or e})")
    if not conversations:
        fail(f"--generation-prompts-path {path}: no prompts in it")
    texts = render(tokenizer, conversations, add_generation_prompt=True)
    for lineno, text in zip(line_numbers, texts):
        if isinstance(text, InvalidLine):
            fail(f"{path}:{lineno}: {text}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding needs a token; the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    return Prompts(texts, tokenizer, cfg.generation_max_new_tokens)


def generate(model, prompts: Prompts, dist) -> list[str]:
    """Collective: every prompt's greedy completion with the model's current weights (every rank gets them).

    generate runs the causal LM inside the LossModel, the root FSDP unit, so the root's hooks never fire: its own
    parameters (embeddings, final norm, LM head) are gathered by hand, and every unit is resharded after, as after
    validation's no-grad forwards (else the optimizer stops updating them). Each decoder layer gathers its own in its
    hooks, on every rank: synced_gpus keeps the ranks in the same number of forwards. The training attention needs
    packed-row boundaries: the model's own sdpa/eager honours the padding mask, and the training one comes back
    after. Compiled layers run eagerly (new shapes, a KV cache: graphs training would not use)."""
    import torch

    import setup_model
    from attention import mask_attention

    tokenizer = prompts.tokenizer
    # The template wrote its own special tokens: the tokenizer must not add more.
    batch = tokenizer(prompts.texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dist.device)
    model.eval()
    model.unshard()
    with mask_attention(model.lm), torch.compiler.set_stance("force_eager"):
        # use_cache here, not in the config: training keeps the config's False (a KV cache leaks across a packed row).
        out = model.lm.generate(
            **batch,
            do_sample=False,
            use_cache=True,
            max_new_tokens=prompts.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=dist.world_size > 1,
        )
    setup_model.reshard(model)
    model.train()
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_samples(model, prompts: Prompts, dist, step: int, output_dir: Path, trackers) -> float:
    """Collective: generate, then (rank 0) append the step's lines to generations.jsonl and send them to the
    trackers. Returns the time it took (the validation row's `generation_time`)."""
    from run_folder import trim_rows

    timer = Timer()
    completions = generate(model, prompts, dist)
    seconds = timer.elapsed()
    if dist.is_main:
        rows = [{"step": step, "prompt": p, "completion": c} for p, c in zip(prompts.texts, completions)]
        path = Path(output_dir) / GENERATIONS_FILE
        try:
            # A launch killed between these lines and their validation row measures the step again on resume: the
            # new lines replace the old.
            trim_rows(path, step - 1, why=f"of step {step}, written before a launch stopped (generated again)")
            with open(path, "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        except OSError as e:  # a full disk or a vanished folder: the user's to fix, so one line
            fail(f"cannot write {path}: {e.strerror or e}")
        if trackers is not None:
            trackers.log_generations(step, rows)
        log(f"step {step} | {counted(len(rows), 'generation')} in {seconds:.1f} s | {path}")
    return seconds
