"""Document mode of process_data.py (`--pretrain-block-size N`, continual pretraining): documents into token blocks.

Each line's document (`--document-column-name`, default `document`) is tokenized and followed by EOS, and that
stream is cut into blocks of N tokens, every token labelled; the last block keeps its true length (or is dropped
with --drop-last-block). With --isolate-documents each block also carries `position_ids` restarting at 0 at each
document start, so the trainer keeps documents apart. Rows have the fields of chat rows: the trainer needs no mode,
and both kinds can share one file.

The CLI and the atomic write are process_data.py's; the line checks both modes share, the reading in chunks by
worker processes and the counts are data_lines.py's. This module imports data_lines, never process_data: run as a
script, process_data is `__main__`, and importing it by name would load a second copy of it.
"""

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from data_lines import InvalidLine, Tally, check_unicode, model_positions, parse_object
from utils import counted, fail

# The summary shows this many characters of the first block: a whole one is ~10,000 at a block size of 2048.
EXAMPLE_CHARS = 300


def check_document_flags(block_size, column, isolate, drop_last, max_tokens, model_name_or_path):
    """Document mode's flags make sense together, and a block fits the model's positions."""
    if block_size is None:
        for flag, given in [("--document-column-name", column is not None), ("--isolate-documents", isolate)]:
            if given:
                fail(f"{flag} needs --pretrain-block-size")
        if drop_last:
            fail("--drop-last-block needs --pretrain-block-size")
        return
    if column is not None and not column:
        fail("--document-column-name must not be empty")
    if block_size < 2:
        fail(f"--pretrain-block-size must be >= 2 (a block's first token is never a target), got {block_size}")
    if max_tokens is not None:
        fail("--max-sample-num-tokens does not apply to blocks: they have at most --pretrain-block-size tokens")
    positions = model_positions(model_name_or_path)
    if positions is not None and block_size > positions:
        fail(
            f"--pretrain-block-size {block_size}: more than the model's {positions} positions "
            f"(max_position_embeddings in {Path(model_name_or_path) / 'config.json'})"
        )


def parse_document(obj: dict, column: str) -> str:
    """A document line's text (its `column` field) or raise InvalidLine."""
    if column not in obj:
        raise InvalidLine("missing_document", f"missing field {column!r}")
    if not isinstance(obj[column], str):
        raise InvalidLine("bad_document", f"field {column!r} must be a string, got {type(obj[column]).__name__}")
    check_unicode(obj[column], f"field {column!r}")
    return obj[column]


def process_documents(tokenizer, chunk: list[tuple[int, bytes]], column: str) -> tuple[list[tuple], object, object]:
    """Tokenize one chunk of document lines. Returns the lines that give no document, in order (("invalid",
    lineno, reason, message) or ("drop", reason)); the kept documents' tokens, each document followed by EOS,
    concatenated (int32); and the length of each, EOS included."""
    import numpy as np

    skipped, texts = [], []
    for lineno, raw in chunk:
        try:
            texts.append(parse_document(parse_object(raw), column))
        except InvalidLine as e:
            skipped.append(("invalid", lineno, e.reason, str(e)))
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    # An empty document would only put a second EOS after the previous one: nothing to learn from.
    documents = [ids for ids in encoded if ids]
    skipped += [("drop", "empty_document")] * (len(encoded) - len(documents))
    eos = [tokenizer.eos_token_id]
    lengths = np.fromiter((len(ids) + 1 for ids in documents), np.int64, len(documents))
    tokens = np.fromiter(chain.from_iterable(ids + eos for ids in documents), np.int32, int(lengths.sum()))
    return skipped, tokens, lengths


@dataclass
class Blocks:
    """What document mode wrote, for the summary."""

    size: int
    documents: int = 0
    document_tokens: int = 0  # EOS included
    tokens: int = 0  # in the written blocks
    loss_tokens: int = 0
    last: int = 0  # tokens left for a final partial block (0: the documents filled whole blocks)
    last_written: bool = False
    example: list[int] | None = None  # the first block written
    example_targets: int = 0  # its loss-counted tokens


def positions_in_documents(lengths):
    """Each token's position within its document, for documents of these lengths laid end to end."""
    import numpy as np

    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def block_line(ids, doc_positions, isolate: bool) -> tuple[str, int]:
    """One block as a tokenized row, and its loss-counted tokens (every token is labelled; each sequence's first
    token is no target)."""
    import numpy as np

    text = json.dumps(ids.tolist(), separators=(",", ":"))
    fields = [f'"input_ids":{text}', f'"labels":{text}']  # labels are the ids: serialized once
    num_loss = len(ids) - 1
    if isolate:
        # A document continued from the previous block counts from 0 again: the block is a fresh context (the
        # model sees nothing before it), as in the plain concatenated stream, and no position passes the block size
        # (a long document's continued count would pass the model's positions, which train.py refuses).
        positions = np.minimum(doc_positions, np.arange(len(ids)))
        num_loss = int(np.count_nonzero(positions[1:]))
        fields.append(f'"position_ids":{json.dumps(positions.tolist(), separators=(",", ":"))}')
    fields += [f'"len":{len(ids)}', f'"num_loss_counted_tokens":{num_loss}']
    return "{" + ",".join(fields) + "}", num_loss


def write_blocks(results, out, tally: Tally, source: str, skip_invalid: bool, size: int, isolate: bool, drop_last):
    """Cut the stream of documents (each followed by EOS) into blocks of `size` tokens, in input order. Only the
    tokens of one partial block are carried from chunk to chunk."""
    import numpy as np

    blocks = Blocks(size)
    carry, carry_positions = np.zeros(0, np.int32), np.zeros(0, np.int64)

    def write(ids, doc_positions) -> bool:
        line, num_loss = block_line(ids, doc_positions, isolate)
        if num_loss == 0:  # e.g. a last block of one token: nothing to predict (the trainer would drop it)
            tally.dropped["no_loss_tokens"] += 1
            return False
        out.write(line + "\n")
        tally.written += 1
        blocks.tokens += len(ids)
        blocks.loss_tokens += num_loss
        if blocks.example is None:
            blocks.example, blocks.example_targets = ids.tolist(), num_loss
        return True

    for skipped, tokens, lengths in results:
        tally.read += len(skipped) + len(lengths)
        for outcome in skipped:
            tally.skip(outcome, source, skip_invalid)
        blocks.documents += len(lengths)
        blocks.document_tokens += len(tokens)
        stream = np.concatenate([carry, tokens])
        doc_positions = np.concatenate([carry_positions, positions_in_documents(lengths)])
        full = len(stream) - len(stream) % size
        for start in range(0, full, size):
            write(stream[start : start + size], doc_positions[start : start + size])
        carry, carry_positions = stream[full:], doc_positions[full:]
    blocks.last = len(carry)
    if blocks.last and drop_last:
        tally.dropped["partial_last_block"] += 1
    elif blocks.last:
        blocks.last_written = write(carry, carry_positions)
    return blocks


def print_block_summary(source, output, tally, blocks, tokenizer, isolate: bool, drop_last: bool):
    print(
        f"read {counted(tally.read, 'document')} from {source}, wrote {counted(tally.written, 'block')} of "
        f"{blocks.size} tokens to {output}"
    )
    tally.print_skipped()
    print(
        f"tokens: {blocks.document_tokens} in {blocks.documents} documents (each followed by EOS), {blocks.tokens} "
        f"written, {blocks.loss_tokens} loss-counted ({blocks.loss_tokens / max(1, blocks.tokens):.1%})"
    )
    if blocks.last == 0:
        print("last block: full (the documents filled whole blocks)")
    elif drop_last:
        print(f"last block: {blocks.last} tokens, dropped (--drop-last-block)")
    elif not blocks.last_written:
        print(f"last block: {blocks.last} tokens, dropped (no token to predict)")
    else:
        print(f"last block: {blocks.last} tokens, kept at its true length (--drop-last-block drops it)")
    if isolate:
        print("documents: kept apart (position_ids restart at each document start)")
    else:
        print("documents: one stream, attention crosses document boundaries inside a block (--isolate-documents)")
    text = tokenizer.decode(blocks.example)
    print(
        f"example (block 1, tokenized as line 1 of {output}; {blocks.example_targets} of its {len(blocks.example)} "
        "tokens are targets), decoded:"
    )
    if len(text) > EXAMPLE_CHARS:
        text = f"{text[:EXAMPLE_CHARS]}… [{len(text) - EXAMPLE_CHARS} more characters]"
    print(text)
