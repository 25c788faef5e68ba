"""Turn a messages JSONL into a tokenized JSONL with exact assistant-only labels; the CLI of document mode too.

    python process_data.py --input-file IN.jsonl --output-file OUT.jsonl --model-name-or-path TOKENIZER

The label rule, for any prefix-stable chat template (no `{% generation %}` tags needed): assistant turn i owns
the text from where `render(messages[:i], add_generation_prompt=True)` ends through the end of the first
`eos_token` after that point. Its tokens (every token overlapping that span, as transformers maps generation
spans) get `labels = input_ids`; every other token gets -100. A `pretrain` sample is `content + eos`, all
labelled. Labels stay aligned with `input_ids`; the trainer does the shifting.

Document mode (continual pretraining), `--pretrain-block-size N`, cuts documents into fully labelled blocks of N
tokens: see documents.py. What follows holds for both modes.

Bad input stops with `IN.jsonl:LINE: what is wrong` and exit code 2, unless --skip-invalid is given, in which
case the line is skipped and counted. The output is written to a temporary file and renamed at the end, so it is
either complete or absent. Lines are tokenized in chunks by worker processes and written in input order, with a
bounded number of chunks in flight: memory stays flat whatever the file's size, and the output is the same
whatever --num-proc. That machinery, which both modes share, is data_lines.py's.
"""

import functools
import json
import os
from pathlib import Path

import typer

import documents
from data_lines import (
    FatalLine,
    InvalidLine,
    Tally,
    check_paths,
    check_unicode,
    init_worker,
    model_positions,
    parse_object,
    read_chunks,
    remove_stale_temp_files,
    results_in_order,
)
from utils import UserError, exit_on_user_error, fail, first_line, make_folders, remove_empty_folders

ROLES = {"system", "user", "assistant", "tool", "pretrain"}
DOCUMENT_COLUMN = "document"  # document mode's default --document-column-name


def parse_messages(obj: dict) -> list[dict]:
    """Validate a chat line's object; return its messages or raise InvalidLine."""
    if "messages" not in obj:
        # --document-column-name needs --pretrain-block-size, so without it only the default column can be meant.
        hint = (
            f" (this line has a {DOCUMENT_COLUMN!r} field: for documents, pass --pretrain-block-size N)"
            if DOCUMENT_COLUMN in obj
            else ""
        )
        raise InvalidLine("missing_messages", f"missing field 'messages'{hint}")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise InvalidLine("bad_messages", f"field 'messages' must be a list, got {type(messages).__name__}")
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidLine("bad_messages", f"messages[{k}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidLine(
                "unknown_role",
                f"messages[{k}].role: unknown role {role!r} (expected one of {', '.join(sorted(ROLES))})",
            )
        for key in ("content", "reasoning_content"):
            if key == "reasoning_content" and key not in message:
                continue
            value = message.get(key)
            if not isinstance(value, str):
                got = type(value).__name__ if key in message else "nothing"
                raise InvalidLine("bad_content", f"messages[{k}].{key} must be a string, got {got}")
            check_unicode(value, f"messages[{k}].{key}")
    if any(m["role"] == "pretrain" for m in messages) and len(messages) != 1:
        raise InvalidLine("pretrain_mixed", "a 'pretrain' message must stand alone in its sample")
    return messages


def render(tokenizer, conversations: list[list[dict]], **kwargs) -> list:
    """The chat template's text of each conversation, or an InvalidLine where the template refuses it (e.g. roles
    that do not alternate): one raising conversation must not take the chunk's others with it."""
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)
    except Exception:  # find which: one at a time
        pass
    texts = []
    for conversation in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs))
        except Exception as e:
            texts.append(InvalidLine("template_error", f"the chat template refuses it ({first_line(e)})"))
    return texts


def assistant_spans(tokenizer, messages: list[dict], full_text: str, prefixes: list[str]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn in full_text (see the module docstring)."""
    eos = tokenizer.eos_token
    spans = []
    for turn, prefix in zip([i for i, m in enumerate(messages) if m["role"] == "assistant"], prefixes):
        if not full_text.startswith(prefix):
            raise InvalidLine(
                "not_prefix_stable",
                f"messages[{turn}]: the chat template is not prefix-stable here "
                "(rendering the earlier messages with a generation prompt is not a prefix of the "
                "whole conversation)",
            )
        end = full_text.find(eos, len(prefix))
        if end < 0:
            raise InvalidLine(
                "no_end_of_turn", f"messages[{turn}]: no end-of-turn marker {eos!r} after the assistant turn"
            )
        spans.append((len(prefix), end + len(eos)))
    return spans


def token_range(encoding, start: int, end: int) -> tuple[int, int]:
    """First and last token of the character span [start, end): the token holding its first character through
    the token holding its last (characters a normalizer dropped belong to no token: skip over them)."""
    first = last = None
    for char in range(start, end):
        if (first := encoding.char_to_token(char)) is not None:
            break
    for char in range(end - 1, start - 1, -1):
        if (last := encoding.char_to_token(char)) is not None:
            break
    return (first, last) if first is not None else (0, -1)


def process_chunk(tokenizer, chunk: list[tuple[int, bytes]], source: str, max_tokens: int | None) -> list[tuple]:
    """Tokenize one chunk of (line number, raw line). Returns per line one of:
    ("ok", output_json_line, length, num_loss_counted_tokens), ("drop", reason), ("invalid", lineno, reason, msg)."""
    import numpy as np

    results: list[tuple] = [()] * len(chunk)
    conversations, pretrains = [], []  # (position in chunk, messages)
    for pos, (lineno, raw) in enumerate(chunk):
        try:
            messages = parse_messages(parse_object(raw))
        except InvalidLine as e:
            results[pos] = ("invalid", lineno, e.reason, str(e))
            continue
        if not messages:
            results[pos] = ("drop", "no_loss_tokens")
        elif messages[0]["role"] == "pretrain":
            pretrains.append((pos, messages[0]["content"]))
        else:
            if tokenizer.chat_template is None:
                raise FatalLine(
                    f"{source}:{lineno}: the tokenizer has no chat template, so conversations cannot be "
                    "rendered (only 'pretrain' samples can)"
                )
            conversations.append((pos, messages))

    # Render whole conversations and, for each assistant turn, the prefix ending in a generation prompt.
    full_texts = render(tokenizer, [m for _, m in conversations])
    prefix_convs = [m[:i] for _, m in conversations for i, msg in enumerate(m) if msg["role"] == "assistant"]
    prefix_texts = iter(render(tokenizer, prefix_convs, add_generation_prompt=True))
    texts, spans_of, positions = [], [], []
    for (pos, messages), text in zip(conversations, full_texts):
        prefixes = [next(prefix_texts) for m in messages if m["role"] == "assistant"]
        try:
            if refused := next((t for t in [text, *prefixes] if isinstance(t, InvalidLine)), None):
                raise refused
            check_unicode(text, "the rendered conversation")  # any field the template renders ('name', ...)
            spans_of.append(assistant_spans(tokenizer, messages, text, prefixes))
        except InvalidLine as e:
            results[pos] = ("invalid", chunk[pos][0], e.reason, str(e))
            continue
        texts.append(text)
        positions.append(pos)

    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-token Python offsets are built
    samples = []  # (position, input_ids, labels)
    for pos, encoding, spans in zip(positions, backend.encode_batch(texts, add_special_tokens=False), spans_of):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        labels = np.full(len(ids), -100, dtype=np.int64)
        for first, last in (token_range(encoding, start, end) for start, end in spans):
            labels[first : last + 1] = ids[first : last + 1]
        samples.append((pos, ids, labels))

    if pretrains:
        eos_id = tokenizer.eos_token_id
        encoded = tokenizer.backend_tokenizer.encode_batch([c for _, c in pretrains], add_special_tokens=False)
        for (pos, _), encoding in zip(pretrains, encoded):
            ids = np.asarray(encoding.ids + [eos_id], dtype=np.int64)
            samples.append((pos, ids, ids))

    for pos, ids, labels in samples:
        num_loss = int((labels[1:] != -100).sum())  # targets under next-token shifting
        if max_tokens is not None and len(ids) > max_tokens:
            results[pos] = ("drop", "too_long")
        elif num_loss == 0:
            results[pos] = ("drop", "no_loss_tokens")
        else:
            line = json.dumps(
                {
                    "input_ids": ids.tolist(),
                    "labels": labels.tolist(),
                    "len": len(ids),
                    "num_loss_counted_tokens": num_loss,
                },
                separators=(",", ":"),
            )
            results[pos] = ("ok", line, len(ids), num_loss)
    return results


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...) for a bad path
        raise UserError(
            f"--model-name-or-path {model_name_or_path}: cannot load a tokenizer ({first_line(e)})"
        ) from None
    if tokenizer.eos_token is None:
        fail(f"--model-name-or-path {model_name_or_path}: the tokenizer has no eos_token")
    return tokenizer


def mark_masked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode a sample with each masked (label -100) run wrapped in «...», so the trained part stands out."""
    out, run, run_masked = [], [], None
    for tok, lab in zip(input_ids, labels):
        masked = lab == -100
        if run and masked != run_masked:
            text = tokenizer.decode(run)
            out.append(f"«{text}»" if run_masked else text)
            run = []
        run.append(tok)
        run_masked = masked
    if run:
        text = tokenizer.decode(run)
        out.append(f"«{text}»" if run_masked else text)
    return "".join(out)


def print_summary(source, output, tally, lengths, loss_tokens, example, tokenizer, positions):
    import numpy as np

    print(f"read {tally.read} samples from {source}, wrote {tally.written} to {output}")
    overlong = sum(1 for n in lengths if positions and n > positions)
    if overlong:
        print(
            f"  warning: {overlong} samples are longer than the model's {positions} positions: train.py stops on them"
            f" unless --drop-overlong-samples (or drop them here with --max-sample-num-tokens {positions})"
        )
    tally.print_skipped()
    lengths = np.asarray(lengths)
    print(f"tokens: {int(lengths.sum())} total, {loss_tokens} loss-counted ({loss_tokens / max(1, lengths.sum()):.1%})")
    p = np.percentile(lengths, [50, 90, 99]).astype(int)
    print(f"length: min {lengths.min()}, p50 {p[0]}, p90 {p[1]}, p99 {p[2]}, max {lengths.max()}")
    print("example (masked tokens in «», the rest is trained on):")
    print(mark_masked(tokenizer, *example))


def write_samples(results, out, tally: Tally, source: str, skip_invalid: bool):
    """Write the chat (and pretrain-message) samples; returns their lengths, loss-counted tokens and the first one."""
    lengths, loss_tokens, example = [], 0, None
    for chunk_results in results:
        for result in chunk_results:
            tally.read += 1
            if result[0] != "ok":
                tally.skip(result, source, skip_invalid)
                continue
            _, line, length, num_loss = result
            out.write(line + "\n")
            tally.written += 1
            lengths.append(length)
            loss_tokens += num_loss
            if example is None:
                row = json.loads(line)
                example = (row["input_ids"], row["labels"])
    return lengths, loss_tokens, example


@exit_on_user_error
def main(
    input_file: Path = typer.Option(
        ...,
        help="Messages JSONL: one {'messages': [{'role', 'content'}, ...]} per line; with --pretrain-block-size, "
        "one {'document': text} per line.",
    ),
    output_file: Path = typer.Option(
        ...,
        help="Tokenized JSONL to write (input_ids, labels, len, num_loss_counted_tokens), in input order, atomically.",
    ),
    model_name_or_path: str = typer.Option(
        ..., help="Model or tokenizer folder (or hub id) whose tokenizer and chat template to use."
    ),
    max_sample_num_tokens: int | None = typer.Option(
        None, help="Drop (and count) samples longer than this many tokens. Default: no limit."
    ),
    num_proc: int | None = typer.Option(None, help="Worker processes. Default: the number of CPUs available."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip bad lines (counted per reason) instead of stopping at the first one."
    ),
    pretrain_block_size: int | None = typer.Option(
        None,
        help="Document mode: tokenize each line's document, follow it with EOS, and cut the stream into blocks of "
        "this many tokens, every token trained on.",
    ),
    document_column_name: str | None = typer.Option(
        None, help="Document mode: the field holding each line's text. Default: document."
    ),
    isolate_documents: bool = typer.Option(
        False,
        "--isolate-documents",
        help="Document mode: write position_ids restarting at each document start, so attention stays within "
        "documents and no document's first token is predicted from the one before.",
    ),
    drop_last_block: bool = typer.Option(
        False, "--drop-last-block", help="Document mode: drop the final partial block (kept at its true length)."
    ),
):
    """Tokenize chat data with exact assistant-only labels (or pretrain data with every token labelled)."""
    import multiprocessing as mp

    source = str(input_file)
    check_paths(input_file, output_file)
    if max_sample_num_tokens is not None and max_sample_num_tokens < 1:
        fail(f"--max-sample-num-tokens must be >= 1, got {max_sample_num_tokens}")
    documents.check_document_flags(
        pretrain_block_size,
        document_column_name,
        isolate_documents,
        drop_last_block,
        max_sample_num_tokens,
        model_name_or_path,
    )
    num_proc = num_proc or len(os.sched_getaffinity(0))
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes, not from rayon
    tokenizer = load_tokenizer(model_name_or_path)
    if pretrain_block_size is None:
        work = functools.partial(process_chunk, tokenizer, source=source, max_tokens=max_sample_num_tokens)
    else:
        work = functools.partial(documents.process_documents, tokenizer, column=document_column_name or DOCUMENT_COLUMN)

    created = make_folders(output_file.parent)  # removed again if this run fails
    remove_stale_temp_files(output_file)
    tmp = output_file.with_name(f".{output_file.name}.tmp-{os.getpid()}")
    tally = Tally()
    pool = None
    try:
        if num_proc > 1:
            pool = mp.get_context("fork").Pool(num_proc, init_worker, (work,))
        # Two chunks per process in flight: each has the next one queued while the writer takes a result.
        results = results_in_order(work, read_chunks(input_file), pool, 2 * num_proc)
        with open(tmp, "w") as out:
            if pretrain_block_size is None:
                samples = write_samples(results, out, tally, source, skip_invalid)
                tally.check_written(source, "samples", "sample")
            else:
                blocks = documents.write_blocks(
                    results, out, tally, source, skip_invalid, pretrain_block_size, isolate_documents, drop_last_block
                )
                tally.check_written(source, "documents", "block")
        os.replace(tmp, output_file)
    except FatalLine as e:  # raised in this process or, through the pool, in a worker
        raise UserError(str(e)) from None
    except OSError as e:  # disk full, permissions changed under us...
        raise UserError(f"{e.filename or output_file}: cannot write ({e.strerror or first_line(e)})") from None
    finally:
        if pool is not None:
            pool.terminate()
        tmp.unlink(missing_ok=True)
        if not output_file.exists():
            remove_empty_folders(created)
    if pretrain_block_size is None:
        print_summary(source, output_file, tally, *samples, tokenizer, model_positions(model_name_or_path))
    else:
        documents.print_block_summary(source, output_file, tally, blocks, tokenizer, isolate_documents, drop_last_block)


if __name__ == "__main__":
    typer.run(main)
