"""The line machinery both modes of process_data.py share: bad lines, JSON objects, chunks through workers, counts.

Chat mode (process_data.py) and document mode (documents.py) both read the input in chunks of raw lines, which
worker processes turn into results that come back in input order; both parse each line into a JSON object and
report a bad one as InvalidLine (skipped and counted per reason with --skip-invalid) or FatalLine (no flag works
around it); both count lines in a Tally and write the output to a temporary file beside it. This module imports
neither mode: they import it, and process_data.py imports both.
"""

import json
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from utils import check_can_create, fail, first_line, numbered_lines

# A work unit ends at CHUNK_LINES lines or CHUNK_BYTES bytes: big enough to batch tokenization, small enough to
# balance processes and to keep the chunks in flight small whatever the lines' size.
CHUNK_LINES = 256
CHUNK_BYTES = 1 << 20


class InvalidLine(Exception):
    """A bad input line: `reason` is the counter key, the message the one-line explanation."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class FatalLine(Exception):
    """A problem no --skip-invalid can work around (e.g. the tokenizer has no chat template)."""


def parse_object(raw: bytes) -> dict:
    """Decode one input line into a JSON object or raise InvalidLine."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidLine("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidLine("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InvalidLine("invalid_json", "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise InvalidLine("invalid_json", f"invalid JSON: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise InvalidLine("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def check_unicode(text: str, where: str):
    """JSON's \\ud800 escapes decode to lone surrogates, which are no text a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidLine("bad_unicode", f"{where}: lone surrogate {text[e.start]!r} at character {e.start}") from None


# Worker processes are forked: they inherit the parent's loaded tokenizer inside the work function.
_worker = {}


def init_worker(work):
    _worker["work"] = work


def _run_chunk(chunk):
    return _worker["work"](chunk)


def results_in_order(work, chunks, pool, in_flight: int):
    """work(chunk) for every chunk, in input order, in the pool's processes (or here, without a pool), with at most
    `in_flight` chunks submitted ahead of the one being written: reading stays a bounded distance ahead of
    writing. (Pool.imap keeps every result that arrives before the writer takes it: memory would grow with the
    file whenever writing is the slower side.) A FatalLine raised in a worker is raised here."""
    if pool is None:
        yield from map(work, chunks)
        return
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_run_chunk, (chunk,)))
        if len(pending) == in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def read_chunks(path: Path):
    """Yield lists of (1-based line number, raw bytes) for non-blank lines."""
    chunk, size = [], 0
    with open(path, "rb") as f:
        for lineno, raw in numbered_lines(f):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            chunk.append((lineno, raw))
            size += len(raw)
            if len(chunk) == CHUNK_LINES or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def model_positions(model_name_or_path: str) -> int | None:
    """The model's `max_position_embeddings`, where the folder has a config.json that says it."""
    config = Path(model_name_or_path) / "config.json"
    try:
        return int(json.loads(config.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_stale_temp_files(output_file: Path):
    """Temp files of earlier runs killed before their rename (`.NAME.tmp-PID`): removed once their owner is
    gone; a live one may be another run writing the same output right now."""
    for tmp in output_file.parent.glob(f".{output_file.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_paths(input_file: Path, output_file: Path):
    """What can be known before any work: the input is a file, the output is not the input, not a folder, and its
    folder can be made and written to."""
    if input_file.is_dir():
        fail(f"{input_file}: is a folder, not a file")
    if not input_file.is_file():
        fail(f"{input_file}: no such file")
    if output_file.exists() and output_file.resolve() == input_file.resolve():
        fail(f"--output-file {output_file}: is the input file (it would be overwritten)")
    if output_file.is_dir():
        fail(f"--output-file {output_file}: is a folder")
    check_can_create(output_file.parent, f"--output-file {output_file}")


@dataclass
class Tally:
    """Lines read, rows written, and the lines that gave no row, per reason."""

    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)

    def skip(self, outcome: tuple, source: str, skip_invalid: bool):
        """A line that gives no row: ("invalid", lineno, reason, message) stops the run unless --skip-invalid;
        ("drop", reason) is counted."""
        if outcome[0] == "invalid":
            _, lineno, reason, message = outcome
            if not skip_invalid:
                fail(f"{source}:{lineno}: {message}")
            self.invalid[reason] += 1
        else:
            self.dropped[outcome[1]] += 1

    def check_written(self, source: str, lines: str, rows: str):
        if self.read == 0:
            fail(f"{source}:1: empty file (no {lines})")
        if self.written == 0:
            reasons = ", ".join(f"{n} {r}" for r, n in (self.dropped + self.invalid).items())
            fail(f"{source}: no {rows} left to write ({reasons})")

    def print_skipped(self):
        for reason, n in sorted(self.dropped.items()):
            print(f"  dropped {n} ({reason})")
        for reason, n in sorted(self.invalid.items()):
            print(f"  skipped {n} invalid ({reason})")
