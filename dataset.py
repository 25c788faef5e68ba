"""Tokenized data: read process_data.py's JSONL once into flat int32 arrays (no Python list per sample), every
field checked (one-line errors naming file, line and field), samples that can never fit a minibatch dropped and
counted. The grammar of --data-path and --validation-data-path (named sources, weights) and several sources
concatenated into one run's data."""

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import counted, fail, first_line, log, numbered_lines, parse_json

IGNORE = -100


@dataclass
class TokenizedData:
    """All samples, flat. Sample i spans offsets[i]:offsets[i+1] of input_ids, labels and position_ids."""

    input_ids: np.ndarray  # int32 [total tokens]
    labels: np.ndarray  # int32, aligned with input_ids (unshifted), IGNORE where not trained on
    position_ids: np.ndarray  # int32, restarting at 0 per sample unless the sample carries its own
    offsets: np.ndarray  # int64 [n + 1]
    num_loss_counted_tokens: np.ndarray  # int64 [n]: targets the sample contributes under shifting
    source_lines: np.ndarray  # int64 [n]: 1-based line of each kept sample in the file

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def spans(self) -> np.ndarray:
        """Per sample: its largest position id + 1 (its length, unless it carries its own position_ids)."""
        if len(self) == 0:
            return np.zeros(0, np.int64)
        return np.maximum.reduceat(self.position_ids, self.offsets[:-1]).astype(np.int64) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def fingerprint(self) -> str:
        """Identifies the data a run trained on, every id, label and position (resume refuses other data)."""
        h = hashlib.sha256()
        for a in (self.offsets, self.input_ids, self.labels, self.position_ids):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def sequence_starts(position_ids: np.ndarray, sample_starts: np.ndarray) -> np.ndarray:
    """True where a new sequence begins: at each sample start, and where position_ids do not continue by +1
    (document blocks inside one sample carry their own restarting position_ids)."""
    starts = np.ones(len(position_ids), dtype=bool)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    starts[sample_starts] = True
    return starts


def count_targets(labels: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per sample: tokens that are predicted (labelled, and not the first token of a sequence)."""
    is_target = (labels != IGNORE) & ~starts
    return np.add.reduceat(is_target, offsets[:-1]).astype(np.int64) if len(labels) else np.zeros(0, np.int64)


INT32_LIMIT = 2**31 - 1  # ids and positions are stored as int32


def _int_array(value, field: str, where: str, raw: bytes, high: int, allow_ignore: bool = False) -> np.ndarray:
    """A JSON list of integers in [0, high) (or IGNORE, for labels) as int64. Anything else is a one-line error:
    floats, strings and booleans are not silently converted, and nothing wraps in the int32 arrays."""
    if not isinstance(value, list):
        fail(f"{where}: field '{field}' must be a list of integers, got {type(value).__name__}")
    if not value:
        return np.zeros(0, np.int64)
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.ndim != 1:
        fail(f"{where}: field '{field}' must be a flat list of integers")
    # numpy turns [1, True] into integers: where the line could hold a boolean, check element by element.
    if arr.dtype.kind != "i" or b"true" in raw or b"false" in raw:
        for i, x in enumerate(value):
            if type(x) is not int:
                fail(f"{where}: field '{field}' must be a list of integers, got {x!r} at index {i}")
    if arr.dtype.kind == "i":
        bad = (arr < 0) | (arr >= high)
        if allow_ignore:
            bad &= arr != IGNORE
        first = int(np.argmax(bad)) if bad.any() else None
    else:  # Python integers beyond int64
        first = next(i for i, x in enumerate(value) if not (0 <= x < high or (allow_ignore and x == IGNORE)))
    if first is not None:
        allowed = f"neither {IGNORE} nor in [0, {high})" if allow_ignore else f"outside [0, {high})"
        hint = "" if high == INT32_LIMIT else " (the model's vocabulary: was the data tokenized for another model?)"
        fail(f"{where}: field '{field}': {value[first]} at index {first} is {allowed}{hint}")
    return arr.astype(np.int64)


def load_tokenized(
    path: str | Path,
    max_tokens_per_sample: int,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    drop_overlong: bool = False,
    flag: str = "--data-path",
) -> TokenizedData:
    """Read a tokenized JSONL (`input_ids`, `labels`, optional `position_ids`, `len`, `num_loss_counted_tokens`).
    Ids and labels must fit the model's vocabulary (`vocab_size`, when given); a UTF-8 BOM is accepted. A sample
    whose positions reach `max_positions` (a sequence longer than the model has positions for) is an error, or
    dropped and counted with `drop_overlong`.

    Samples longer than max_tokens_per_sample (the per-rank minibatch capacity) can never be packed: they are
    dropped here with a logged count. Optional fields are recomputed (`num_loss_counted_tokens` always, with the
    trainer's own boundary rule, so the loss normalisation can never disagree with the targets actually built).
    `flag`: the flag that named the file, in error messages."""
    path = Path(path)
    if not path.is_file():
        fail(f"{flag} {path}: no such file")
    ids_parts, label_parts, pos_parts, lines = [], [], [], []
    too_long = 0
    vocab = vocab_size or INT32_LIMIT
    with open(path, "rb") as f:
        for lineno, raw in numbered_lines(f):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = parse_json(raw)
            except ValueError as e:  # UnicodeDecodeError included
                fail(f"{where}: invalid JSON ({first_line(e)})")
            if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
                messages = isinstance(row, dict) and "messages" in row
                hint = " (this looks like a messages file: run process_data.py first)" if messages else ""
                fail(f"{where}: not a tokenized sample, needs fields 'input_ids' and 'labels'{hint}")
            ids = _int_array(row["input_ids"], "input_ids", where, raw, vocab)
            labels = _int_array(row["labels"], "labels", where, raw, vocab, allow_ignore=True)
            if len(ids) != len(labels):
                fail(f"{where}: 'input_ids' has {len(ids)} tokens but 'labels' has {len(labels)}")
            if len(ids) == 0:
                fail(f"{where}: empty 'input_ids'")
            if "len" in row and row["len"] != len(ids):
                fail(f"{where}: field 'len' is {row['len']} but 'input_ids' has {len(ids)} tokens")
            if "position_ids" in row:
                pos = _int_array(row["position_ids"], "position_ids", where, raw, INT32_LIMIT)
                if len(pos) != len(ids):
                    fail(f"{where}: 'position_ids' has {len(pos)} entries but 'input_ids' has {len(ids)}")
            else:
                pos = np.arange(len(ids))
            if len(ids) > max_tokens_per_sample:
                too_long += 1
                continue
            ids_parts.append(ids)
            label_parts.append(labels)
            pos_parts.append(pos)
            lines.append(lineno)
    if not lines and not too_long:
        fail(f"{flag} {path}: empty file (no samples)")
    if too_long:
        log(f"dropped {too_long} samples longer than --max-tokens-per-gpu {max_tokens_per_sample}")
    if not lines:
        fail(f"{flag} {path}: none of its {too_long} samples fits --max-tokens-per-gpu {max_tokens_per_sample}")

    offsets = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in ids_parts], out=offsets[1:])
    labels = np.concatenate(label_parts).astype(np.int32)
    position_ids = np.concatenate(pos_parts).astype(np.int32)
    data = TokenizedData(
        input_ids=np.concatenate(ids_parts).astype(np.int32),
        labels=labels,
        position_ids=position_ids,
        offsets=offsets,
        num_loss_counted_tokens=count_targets(labels, sequence_starts(position_ids, offsets[:-1]), offsets),
        source_lines=np.asarray(lines, dtype=np.int64),
    )
    if max_positions is not None:
        data = drop_overlong_samples(data, path, max_positions, drop_overlong, flag)
    return drop_samples_without_targets(data, path, flag)


def drop_overlong_samples(
    data: TokenizedData, path: Path, max_positions: int, drop: bool, flag: str = "--data-path"
) -> TokenizedData:
    """Positions restart at each sequence, so a sample reaching position max_positions holds a sequence longer
    than the model's positions: the model would train on positions it has never been given."""
    overlong = data.spans > max_positions
    if not overlong.any():
        return data
    count, line = int(overlong.sum()), int(data.source_lines[np.argmax(overlong)])
    what = f"{counted(count, 'sample')} with a sequence longer than the model's {max_positions} positions"
    what += f" (the first at line {line})"
    if not drop:
        fail(
            f"{flag} {path}: {what}: drop them with --drop-overlong-samples (or --max-sample-num-tokens in process_data.py)"
        )
    if overlong.all():
        fail(f"{flag} {path}: every sample has a sequence longer than the model's {max_positions} positions")
    log(f"dropped {what}")
    return select_samples(data, ~overlong)


def drop_samples_without_targets(data: TokenizedData, path: Path, flag: str = "--data-path") -> TokenizedData:
    """A sample with no target adds nothing to the loss (and a batch of only such samples has none to divide
    by): drop it, logged."""
    keep = data.num_loss_counted_tokens > 0
    if keep.all():
        return data
    log(f"dropped {int((~keep).sum())} samples with no loss-counted token")
    if not keep.any():
        fail(f"{flag} {path}: no sample has a loss-counted token (every label is -100 or a sequence's first token)")
    return select_samples(data, keep)


def select_samples(data: TokenizedData, keep: np.ndarray) -> TokenizedData:
    """The samples where `keep` is true, flat arrays rebuilt."""
    token_keep = np.repeat(keep, data.lengths)
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(data.lengths[keep], out=offsets[1:])
    return TokenizedData(
        input_ids=data.input_ids[token_keep],
        labels=data.labels[token_keep],
        position_ids=data.position_ids[token_keep],
        offsets=offsets,
        num_loss_counted_tokens=data.num_loss_counted_tokens[keep],
        source_lines=data.source_lines[keep],
    )


def concat_samples(parts: list[TokenizedData]) -> TokenizedData:
    """Several datasets as one, in the order given (sample i of part k is sample starts[k] + i); one part as it is."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedData(
        input_ids=np.concatenate([p.input_ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        position_ids=np.concatenate([p.position_ids for p in parts]),
        offsets=offsets,
        num_loss_counted_tokens=np.concatenate([p.num_loss_counted_tokens for p in parts]),
        source_lines=np.concatenate([p.source_lines for p in parts]),
    )


# ---------------------------------------------------------------------------------------------------------------
# Named sources: the grammar of --data-path and --validation-data-path

SOURCE_NAME = re.compile(r"[\w.+-]+")  # a NAME given with NAME=PATH (a file's stem is taken as it is)
WEIGHT_END = re.compile(r":([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)$")  # ":number" at the end
GRAMMAR = "[NAME=]PATH[:WEIGHT], comma-separated"


@dataclass(frozen=True)
class Source:
    """One entry of --data-path or --validation-data-path."""

    name: str  # NAME, or the file's stem
    path: str
    weight: float | None = None  # WEIGHT as given (only --data-path takes one); None: not given


def parse_sources(spec: str, flag: str, weights: bool = True) -> list[Source]:
    """The one grammar of --data-path and --validation-data-path: `[NAME=]PATH[:WEIGHT]`, comma-separated. NAME
    defaults to the file's stem (two sources of one name: an error), WEIGHT (a number > 0) is taken only where
    `weights`. ',' and '=' and a ':number' ending are the grammar's: a path holding them cannot be named here
    (a symlink can). Every error is one line."""

    def refuse_path(path: str, what: str):
        fail(
            f"{flag} {path!r}: a path {what} cannot be given ({flag} takes {GRAMMAR}): give a symlink to it "
            f"whose path has no ',' or '=' and no ':number' ending (ln -s {path!r} data.jsonl)"
        )

    def special(path: str) -> str | None:
        for char in (",", "="):
            if char in path:
                return f"containing {char!r}"
        return "ending in ':number'" if WEIGHT_END.search(path) else None

    # An existing file whose path the grammar would take apart: said so, not read as something else.
    if (what := special(spec)) and Path(spec).exists():
        refuse_path(spec, what)
    sources: list[Source] = []
    for entry in spec.split(","):
        if not entry:
            fail(f"{flag} {spec!r}: an empty entry ({flag} takes {GRAMMAR})")
        if (what := special(entry)) and Path(entry).exists():
            refuse_path(entry, what)
        name, path = "", entry
        if "=" in entry:
            name, _, path = entry.partition("=")
            if "=" in path:
                refuse_path(entry, "containing '='")
            if not SOURCE_NAME.fullmatch(name):
                fail(
                    f"{flag} entry {entry!r}: NAME {name!r} is not a name (letters, digits, '_', '.', '+', '-'); "
                    "a path containing '=' cannot be given: give a symlink to it"
                )
        weight = None
        if match := WEIGHT_END.search(path):
            if not weights:
                fail(
                    f"{flag} entry {entry!r}: a weight (':{match[1]}') is for --data-path only; a path ending in "
                    "':number' cannot be given: give a symlink to it"
                )
            weight, path = float(match[1]), path[: match.start()]
            if not (math.isfinite(weight) and weight > 0):
                fail(f"{flag} entry {entry!r}: the weight must be a finite number > 0, got {match[1]}")
        if not path:
            fail(f"{flag} entry {entry!r}: no PATH ({flag} takes {GRAMMAR})")
        name = name or Path(path).stem
        if same := next((s for s in sources if s.name == name), None):
            fail(
                f"{flag}: two sources named {name!r} ({same.path}, {path}): name them, e.g. "
                f"{name}_1={same.path},{name}_2={path}"
            )
        sources.append(Source(name, path, weight))
    return sources


@dataclass
class Sources:
    """The run's training sources, concatenated in the order given: sample i of source k is the run's sample
    starts[k] + i. Several with a weight given: a mixture, drawn by weight (sampler.MixtureSampler); several without:
    one dataset, drawn as one (today's behaviour for one file)."""

    names: list[str]
    counts: list[int]  # samples kept of each source (after any --validation-split)
    weights: list[float] | None  # a mixture's, an unweighted source counting 1; None: not a mixture
    fingerprints: list[str]  # each source's TokenizedData.fingerprint()

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def fingerprint(self) -> str:
        """One source: its data's own fingerprint (a run of one file is today's run, whose checkpoints resume).
        Several: every source's, in order (another source, or another order, is other data)."""
        if len(self.fingerprints) == 1:
            return self.fingerprints[0]
        return hashlib.sha256(json.dumps(self.fingerprints).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """name samples[:weight], ..., for the console."""
        weights = self.weights or [None] * len(self.names)
        return ", ".join(
            f"{n} {c}" + (f":{w:g}" if w is not None else "") for n, c, w in zip(self.names, self.counts, weights)
        ) + ("" if self.weights else "; concatenated")

    def settings(self) -> dict:
        """What a resume must repeat beyond the fingerprint: several sources' weights (None: concatenated)."""
        return {"data_weights": self.weights} if len(self.names) > 1 else {}

    @staticmethod
    def of(sources: list[Source], parts: list[TokenizedData]) -> "Sources":
        weighted = len(sources) > 1 and any(s.weight is not None for s in sources)
        return Sources(
            names=[s.name for s in sources],
            counts=[len(p) for p in parts],
            weights=[s.weight or 1.0 for s in sources] if weighted else None,
            fingerprints=[p.fingerprint() for p in parts],
        )
