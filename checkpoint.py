"""Checkpoints and the output folder: HF-format models anyone can load, full training state for exact,
reshardable resume, and one run per folder.

Layout, N = samples seen when saved:

    output_dir/full_state/samples_N/   dcp/ (model weights and optimizer tensors, torch.distributed.checkpoint,
                                       sharded, reshardable on load), trainer_state.json (counters, sampler
                                       position, run length, the settings a resume must match),
                                       rng_RANK.safetensors, manifest.json
    output_dir/hf_format/samples_N/    safetensors (sharded when large), config.json (dtype = saved dtype),
                                       generation_config.json, tokenizer files, manifest.json
    output_dir/leantrain.lock          the running run's host, pid and SLURM job (held with flock)

Trust. Nothing read from a checkpoint can run code: state is JSON and safetensors, DCP's pickled `.metadata` goes
through an unpickler that knows only DCP's own index classes, and no non-tensor entry is stored in DCP (the
optimizer's hyperparameters come from the flags, which a resume must repeat). Integrity: `manifest.json`
(size and sha256 of every file, written last) is checked before a checkpoint is used; `--resume` skips damaged
checkpoints, newest first, saying which and why.

Atomicity. Every folder is written under a temporary name (`.tmp-samples_N`) and renamed when complete: the
state first, then the HF folder. A crash between the two leaves state N without its HF folder; `--resume`
rebuilds it from the state, so the final model is never lost. Leftover temporary folders are removed at start.
"""

import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from batch_metrics import METRICS_FILE
from utils import (
    Timer,
    UserError,
    counted,
    fail,
    first_line,
    gather_objects,
    log,
    make_folders,
    parse_json,
    remove_empty_folders,
    stop_if_any,
    write_atomically,
)

STATE_DIR, HF_DIR = "full_state", "hf_format"
NAME = re.compile(r"^samples_(\d+)$")
MANIFEST, TRAINER_STATE, OPTIMIZER_NUMBERS, PARAMS_FILE, LOCK_FILE = (
    "manifest.json",
    "trainer_state.json",
    "optimizer_numbers.json",
    "training_params.json",
    "leantrain.lock",
)
FORMAT = 2  # trainer_state.json's format: checkpoints of another format are not resumed
# A folder holding any of these holds a run. --overwrite deletes exactly these (trackers' folders included).
RUN_OUTPUTS = (PARAMS_FILE, METRICS_FILE, STATE_DIR, HF_DIR)
TRACKER_DIRS = ("wandb", "tensorboard")


class Damaged(Exception):
    """A checkpoint file is missing, truncated, altered or not what leantrain writes."""


class Unsupported(Exception):
    """A checkpoint intact by its manifest that holds a DCP storage kind leantrain does not read."""


@dataclass
class TrainState:
    """The loop's counters and the sampler's position after the last finished step."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    sampler: dict = field(default_factory=dict)

    @classmethod
    def checked(cls, state: dict, check_sampler) -> "TrainState":
        """The state as saved, its meaning checked (ValueError says what is wrong): these counters here, the
        sampler's position by the sampler (`check_sampler`), which alone knows its fields."""
        names = [f.name for f in fields(cls)]
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            raise ValueError(f"state fields {sorted(state) if isinstance(state, dict) else state!r}, expected {names}")
        for name in ("step", "samples_seen", "tokens_seen"):
            if not _is_count(state[name]):
                raise ValueError(f"{name} {state[name]!r} is not a count")
        if not isinstance(state["sampler"], dict):
            raise ValueError("the sampler's state is not a JSON object")
        check_sampler(state["sampler"])
        return cls(**state)

    def advance(self, batch):
        self.step += 1
        self.samples_seen += batch.num_samples
        self.tokens_seen += batch.num_tokens
        self.sampler = batch.sampler_state


def loaded_dtype(model_config) -> str:
    import torch

    dtype = getattr(model_config, "dtype", None) or torch.float32
    return str(dtype).removeprefix("torch.")


def run_identity(model_config, data) -> dict:
    """What a resumed run must share with the saved one: the model architecture and the data."""
    arch = {
        k: v
        for k, v in model_config.to_dict().items()
        if k not in ("dtype", "use_cache", "transformers_version", "_name_or_path", "architectures")
    }
    model_hash = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model": model_hash, "data": data.fingerprint(), "num_samples": len(data)}


# ---------------------------------------------------------------------------------------------------------------
# Integrity: manifest.json


def sha256_of(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def hash_files(folder: Path, relpaths) -> dict:
    return {rel: sha256_of(folder / rel) for rel in relpaths}


def write_manifest(folder: Path, hashes: dict):
    """Hash what no rank claimed (rank 0 is the fallback), then write manifest.json: the folder's last file."""
    every = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    hashes = hashes | hash_files(folder, [rel for rel in every if rel not in hashes])
    (folder / MANIFEST).write_text(json.dumps({"files": dict(sorted(hashes.items()))}, indent=1) + "\n")


def read_manifest(folder: Path) -> dict:
    """manifest.json's {relpath: {size, sha256}}, shape-checked: any path inside the folder, nothing else."""
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_bytes())["files"]
    except FileNotFoundError:
        raise Damaged(f"{path}: missing (not a complete leantrain checkpoint)") from None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise Damaged(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(files, dict):
        raise Damaged(f"{path}: 'files' is not an object")
    for rel, entry in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts or rel == MANIFEST:
            raise Damaged(f"{path}: file name {rel!r} points outside the checkpoint")
        if not (
            isinstance(entry, dict)
            and type(entry.get("size")) is int
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise Damaged(f"{path}: bad entry for {rel!r}")
    return files


def check_files(folder: Path, files: dict, dist):
    """Every rank hashes its share of the manifest's files; any mismatch on any rank marks the folder damaged."""
    problem = None
    for rel in sorted(files)[dist.rank :: dist.world_size]:
        try:
            got = sha256_of(folder / rel)
        except OSError as e:
            problem = f"{folder / rel}: {e.strerror or first_line(e)}"
            break
        if got != files[rel]:
            what = "size" if got["size"] != files[rel]["size"] else "content"
            problem = f"{folder / rel}: {what} differs from the manifest (truncated or altered)"
            break
    problem = next((p for p in gather_objects(problem) if p is not None), None)
    if problem is not None:
        raise Damaged(problem)


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint without running anything it contains

_DCP_META = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_DCP_META, "Metadata"),
    (_DCP_META, "MetadataIndex"),
    (_DCP_META, "StorageMeta"),
    (_DCP_META, "TensorProperties"),
    (_DCP_META, "TensorStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"),
    (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` knowing only DCP's index dataclasses, torch.Size, dtypes and paths: a forged
    file cannot name os.system or any other callable."""

    def find_class(self, module, name):
        import torch

        if (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        if module == _DCP_META and name.endswith("StorageMetadata"):  # another kind of entry, not a callable
            raise Unsupported(name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_dcp_index(folder: Path, files: dict):
    """DCP's index of the tensors in folder/dcp, checked: tensors only, stored in files the manifest lists."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    path = folder / "dcp" / ".metadata"
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except Unsupported as e:
        fail(
            f"{path}: holds entries of DCP storage kind {e}, which leantrain does not read (it saves tensors, and an "
            "optimizer's plain numbers as JSON): unsupported, not resumed"
        )
    except Exception as e:  # any failure to unpickle means damaged or forged, whatever exception it raises
        raise Damaged(f"{path}: not a checkpoint index ({first_line(e)})") from None
    if not isinstance(index, Metadata) or not isinstance(index.storage_data, dict):
        raise Damaged(f"{path}: not a checkpoint index")
    for key, entry in index.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise Damaged(f"{path}: entry {key!r} is not a tensor (leantrain stores tensors only)")
    for info in index.storage_data.values():
        if not (
            isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            and f"dcp/{info.relative_path}" in files
            and not info.transform_descriptors
        ):
            raise Damaged(f"{path}: refers to a file outside the manifest")
    if getattr(index, "storage_meta", None) is None:
        index.storage_meta = StorageMeta()
    return index


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader with the restricted index unpickler (tensors themselves load with weights_only)."""

        def __init__(self, path, files):
            super().__init__(path)
            self.files = files

        def read_metadata(self, *args, **kwargs):
            index = read_dcp_index(Path(self.path).parent, self.files)
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def read_trainer_state(folder: Path, check_sampler) -> dict:
    """trainer_state.json, checked: its format and the checkpoint's own fields here, the loop's state by TrainState
    and the sampler's by the sampler (`check_sampler`). Anything wrong is Damaged."""
    path = folder / TRAINER_STATE
    try:
        meta = json.loads(path.read_bytes())
        if meta["format"] != FORMAT:
            raise Damaged(f"{path}: format {meta['format']!r}, expected {FORMAT} (saved by another leantrain version)")
        valid = (
            (
                meta.get("best") is None
                or (type(meta["best"]["val_loss"]) is float and _is_count(meta["best"]["samples"]))
            )
            and (meta["num_steps"] is None or _is_count(meta["num_steps"]))
            and _is_count(meta["world_size"])
            and isinstance(meta["settings"], dict)
        )
    except (OSError, ValueError, RecursionError) as e:
        raise Damaged(f"{path}: unreadable ({first_line(e)})") from None
    except (KeyError, TypeError) as e:
        raise Damaged(f"{path}: missing or malformed field ({first_line(e)})") from None
    if not valid:
        raise Damaged(f"{path}: a counter or setting is missing, unknown or out of range")
    try:
        TrainState.checked(meta["state"], check_sampler)
    except (KeyError, TypeError, ValueError) as e:
        raise Damaged(f"{path}: {first_line(e)}") from None
    return meta


def verify(folder: Path, kind: str, dist, check_sampler=None) -> dict | None:
    """Check a checkpoint folder before use; returns its trainer state (STATE_DIR, whose sampler state
    `check_sampler` checks) or raises Damaged."""
    if not folder.is_dir():
        raise Damaged(f"{folder}: missing")
    files = read_manifest(folder)
    required = [TRAINER_STATE, "dcp/.metadata"] if kind == STATE_DIR else ["config.json"]
    for rel in required:
        if rel not in files:
            raise Damaged(f"{folder / rel}: not in the manifest")
    check_files(folder, files, dist)
    if kind == HF_DIR:
        return None
    meta = read_trainer_state(folder, check_sampler)
    read_dcp_index(folder, files)
    meta["files"], meta["optimizer_numbers"] = files, read_optimizer_numbers(folder, files)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Finding and loading checkpoints


def checkpoints(output_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """Published checkpoints of one kind (STATE_DIR or HF_DIR), oldest first."""
    root = Path(output_dir) / kind
    found = [(int(m.group(1)), p) for p in root.glob("samples_*") if (m := NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_partial_saves(output_dir: Path):
    """Delete temporary folders of interrupted saves; put back a checkpoint whose replacement was interrupted."""
    for kind in (STATE_DIR, HF_DIR):
        root = Path(output_dir) / kind
        for old in root.glob(".old-samples_*"):
            target = root / old.name.removeprefix(".old-")
            if target.exists():
                shutil.rmtree(old)
            else:
                old.rename(target)
        for tmp in root.glob(".tmp-samples_*"):
            shutil.rmtree(tmp)


def find_resume_state(cfg, output_dir: Path, dist, check_sampler) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state: --resume-from as given (refused if damaged), or with
    --resume the newest intact one in output_dir (damaged ones are reported and skipped, never all of them)."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if path.is_file():
            fail(f"--resume-from {path}: a file; give a checkpoint folder ({STATE_DIR}/samples_N)")
        try:
            return path, verify(path, STATE_DIR, dist, check_sampler)
        except Damaged as e:
            fail(f"--resume-from {path}: damaged or not a complete training state: {e}")
    if not cfg.resume:
        return None
    found = checkpoints(output_dir, STATE_DIR)
    if not found:
        log(f"--resume: no checkpoint in {output_dir / STATE_DIR}, starting from scratch")
        return None
    for _, path in reversed(found):
        try:
            return path, verify(path, STATE_DIR, dist, check_sampler)
        except Damaged as e:
            log(f"warning: skipping damaged checkpoint {path}: {e}")
    fail(
        f"--resume: every checkpoint in {output_dir / STATE_DIR} is damaged (see above); not starting from scratch "
        "over them: use --overwrite to start over, or --resume-from an intact copy"
    )


def resume_state(cfg, output_dir: Path, dist, check_sampler, settings: dict, before: dict) -> tuple[Path, dict] | None:
    """find_resume_state's checkpoint, once check_resumable has accepted its settings for this run."""
    found = find_resume_state(cfg, output_dir, dist, check_sampler)
    if found:
        check_resumable(*found, settings, before)
    return found


def check_resumable(path: Path, meta: dict, settings: dict, before: dict):
    """The run must repeat the checkpoint's settings (one line lists every difference); its length may grow. A
    setting the checkpoint lacks (saved before the setting existed) is compared with `before`, its value then."""
    saved = meta["settings"]
    diffs = []
    for name, now in settings.items():
        if (then := saved.get(name, before.get(name))) == now:
            continue
        if name == "model":
            diffs.append(
                f"--model-name-or-path is another model architecture (fingerprint {now}, checkpoint {saved.get(name)})"
            )
        elif name == "data":
            diffs.append(
                f"--data-path holds other data (fingerprint {now}, checkpoint {saved.get(name)}; the samples kept "
                "count too: a lower --max-tokens-per-gpu or --drop-overlong-samples drops some the run trained on)"
            )
        else:
            diffs.append(f"--{name.replace('_', '-')} {now} (checkpoint: {then})")
    if diffs:
        fail(
            f"cannot resume from {path}: "
            + "; ".join(diffs)
            + "; repeat the checkpoint's settings or use another --output-dir"
        )


PLAIN_NUMBERS = (int, float, bool)


def split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """An optimizer's per-parameter state as (tensors, for DCP; plain numbers, for JSON). DCP would pickle a plain
    number, which no checkpoint reader should unpickle; anything neither is refused in one line."""
    import torch

    tensors, numbers = {}, {}
    for name, entries in state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(name, {})[key] = value
            elif type(value) in PLAIN_NUMBERS:
                numbers.setdefault(name, {})[key] = value
            else:
                fail(
                    f"the optimizer's state {name}.{key} is a {type(value).__name__}: leantrain checkpoints tensors "
                    "and plain numbers (int, float, bool)"
                )
    return tensors, numbers


def shape_of(numbers: dict) -> dict:
    """Which parameter holds which plain numbers, of which types."""
    return {name: {key: type(v).__name__ for key, v in entries.items()} for name, entries in numbers.items()}


def read_optimizer_numbers(folder: Path, files: dict) -> dict:
    """optimizer_numbers.json, checked ({} where the checkpoint has none: an optimizer whose state is all
    tensors), or Damaged."""
    path = folder / OPTIMIZER_NUMBERS
    if OPTIMIZER_NUMBERS not in files:
        return {}
    try:
        numbers = parse_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise Damaged(f"{path}: unreadable ({first_line(e)})") from None
    if not (
        isinstance(numbers, dict)
        and all(isinstance(entries, dict) for entries in numbers.values())
        and all(type(v) in PLAIN_NUMBERS for entries in numbers.values() for v in entries.values())
    ):
        raise Damaged(f"{path}: not an object of plain numbers per parameter")
    return numbers


def load(path: Path, meta: dict, model, optimizer, sampler, dist) -> TrainState:
    """Restore model, optimizer tensors, sampler and counters; DCP reshards to the current world size. The
    optimizer's hyperparameters and the schedule come from the flags (checked equal to the checkpoint's)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors, numbers = split_optimizer_state(optim_sd["state"])
    state = {"model": model_sd, "optim": tensors}
    try:
        dcp.load(state, storage_reader=_safe_reader_class()(path / "dcp", meta["files"]))
    except CheckpointException as e:
        fail(f"cannot load {path / 'dcp'}: {describe_error(e)}")
    saved = meta["optimizer_numbers"]
    if shape_of(saved) != shape_of(numbers):
        fail(f"cannot resume from {path}: the optimizer's plain-number state differs from this run's optimizer's")
    optim = {name: tensors.get(name, {}) | saved.get(name, {}) for name in tensors.keys() | saved.keys()}
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={"state": optim, "param_groups": optim_sd["param_groups"]},
    )
    train_state = TrainState(**meta["state"])  # checked by verify()
    try:
        sampler.load_state_dict(train_state.sampler)
    except ValueError as e:
        fail(f"cannot resume from {path}: {e}")
    rng_file = f"rng_{dist.rank}.safetensors"
    if rng_file in meta["files"] and meta["world_size"] == dist.world_size:
        try:
            torch.set_rng_state(load_file(path / rng_file)["torch"])
        except Exception as e:  # a forged-but-hashed file: refuse it in one line
            fail(f"{path / rng_file}: not a saved random state ({first_line(e)})")
    return train_state


# ---------------------------------------------------------------------------------------------------------------
# Saving


def publish(tmp: Path, final: Path):
    """Atomically make tmp visible as final; an existing final (a replayed step) is replaced."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def fresh_dir(path: Path):
    """An empty folder at path (a leftover of an interrupted save there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def root_cause(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which keeps one (exception, traceback) per failed rank)
    and behind the exceptions raised from it: the OSError, if one is in the chain."""
    for failure in getattr(e, "failures", {}).values():
        e = failure[0] if isinstance(failure, tuple) else failure
        break
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(nxt)
    return next((c for c in chain if isinstance(c, OSError) and c.strerror), e)


def describe_error(e: BaseException) -> str:
    """One line for a failed read or write, e.g. `No space left on device (path)`."""
    cause = root_cause(e)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror + (f" ({cause.filename})" if cause.filename else "")
    if rust_io := re.search(r'(?:message: "|I/O error: )([^"(]+)', str(cause)):  # safetensors' Rust IoError
        return f"{rust_io.group(1).strip()} (safetensors)"
    return f"{type(cause).__name__}: {first_line(cause)}"


def agreed(fn, *args):
    """Run one phase of a save on every rank; if it failed on any rank (a full disk, safetensors' or the tokenizer's
    own errors), every rank stops with one line, rather than the others waiting in the next collective."""
    from torch.distributed.checkpoint.api import CheckpointException

    error, result = None, None
    try:
        result = fn(*args)
    except (Exception, CheckpointException) as e:
        error = describe_error(e)
    stop_if_any(error)
    return result


def write_hf_files(full: dict, model_config, save_dtype: str, tokenizer, generation_config, out: Path):
    import torch
    from huggingface_hub import save_torch_state_dict

    dtype = getattr(torch, save_dtype)
    full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    save_torch_state_dict(full, out, max_shard_size="5GB")
    config = copy.deepcopy(model_config)
    config.dtype = dtype
    config.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


class Saver:
    """Decides when to save (every --min-samples-per-checkpoint samples, at the end, on SIGTERM/SIGUSR1) and
    writes checkpoints. Decisions are agreed across ranks."""

    def __init__(self, cfg, output_dir: Path, dist, model_config, settings: dict, num_steps):
        self.cfg, self.output_dir, self.dist = cfg, Path(output_dir), dist
        self.model_config, self.settings, self.num_steps = model_config, settings, num_steps
        self.last_saved_samples = None
        self.replaces_after = None  # a resumed run's starting point: later checkpoints go after its first step
        self.best = None  # {"val_loss", "samples"} of the best checkpoint, with --keep-best-checkpoint
        self.signal_received = None
        self.tokenizer = self.generation_config = None
        if dist.is_main:
            self.tokenizer, self.generation_config = self._load_extras(cfg.model_name_or_path)

    def resumed(self, meta: dict, state: TrainState):
        self.last_saved_samples = state.samples_seen  # a resumed run does not save its starting point again
        self.best = meta.get("best")
        self.replaces_after = state.samples_seen

    @contextlib.contextmanager
    def catching_preemption(self):
        """SIGTERM/SIGUSR1 (SLURM's warning before the time limit) ask for a save and a clean stop. Only the main
        thread can take signals: a run started from another thread (the Python API) goes without."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.signal_received = signum

    def note_validation(self, val_loss: float, model, optimizer, state: TrainState):
        """With --keep-best-checkpoint, an improved val_loss gets a checkpoint that pruning keeps."""
        if not self.cfg.keep_best_checkpoint or (self.best is not None and val_loss >= self.best["val_loss"]):
            return
        self.best = {"val_loss": val_loss, "samples": state.samples_seen}
        log(f"best val_loss so far: {val_loss:.4f} at step {state.step}")
        self.save(model, optimizer, state)  # validation runs before the step's other saves: none exists yet

    @staticmethod
    def _load_extras(path):
        from transformers import AutoTokenizer, GenerationConfig

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:
            log(f"note: no tokenizer found in {path}; checkpoints will hold the model only")
            tokenizer = None
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except Exception:
            generation_config = None
        return tokenizer, generation_config

    def maybe_save(self, model, optimizer, state: TrainState) -> bool:
        """Save if due; returns True when a preemption signal asks the run to stop (after saving)."""
        from utils import any_rank

        if self.replaces_after is not None:  # the first finished step of a resumed run
            if self.dist.is_main:
                self.remove_replaced(self.replaces_after)
            self.replaces_after = None
        preempted = any_rank(self.signal_received is not None, self.dist.device)
        every = self.cfg.min_samples_per_checkpoint
        last = self.last_saved_samples or 0
        due = every is not None and state.samples_seen // every > last // every
        if due or preempted:
            self.save(model, optimizer, state)
        if preempted:
            log("preemption signal received: checkpoint saved, stopping (rerun with --resume to continue)")
        return preempted

    def save_final(self, model, optimizer, state: TrainState):
        if self.cfg.save_final_checkpoint and state.step > 0 and self.last_saved_samples != state.samples_seen:
            self.save(model, optimizer, state)

    def complete_resumed(self, model, path: Path, state: TrainState):
        """The publish gap: state N without an intact hf_format/samples_N (a crash between the two renames, or a
        damaged HF folder) gets its HF folder rebuilt from the state just loaded."""
        if path.parent != self.output_dir / STATE_DIR:
            return
        hf = self.output_dir / HF_DIR / path.name
        try:
            verify(hf, HF_DIR, self.dist)
        except Damaged as e:
            log(f"rebuilding {hf} from the training state ({e})")
            self._write(HF_DIR, path.name, lambda tmp: self._write_hf(model, tmp))

    def save(self, model, optimizer, state: TrainState):
        name = f"samples_{state.samples_seen}"
        timer = Timer()
        hashing = self._write(STATE_DIR, name, lambda tmp: self._write_state(model, optimizer, state, tmp))
        hashing += self._write(HF_DIR, name, lambda tmp: self._write_hf(model, tmp))
        if self.dist.is_main:
            self.prune()
        self.last_saved_samples = state.samples_seen
        log(f"saved checkpoint {self.output_dir / HF_DIR / name} ({timer.elapsed():.1f} s, hashing {hashing:.1f} s)")

    def _write(self, kind: str, name: str, write) -> float:
        """Write one checkpoint folder under a temporary name, hash it into manifest.json, publish it. A failed
        write (disk full) stops every rank with one line; the partial folder is removed, earlier ones kept.
        Returns the seconds spent hashing."""
        root = self.output_dir / kind
        tmp = root / f".tmp-{name}"
        try:
            agreed(lambda: self.dist.is_main and fresh_dir(tmp))
            mine = agreed(write, tmp)  # the files this rank wrote
            timer = Timer()
            hashes = agreed(hash_files, tmp, mine)
            gathered = gather_objects((hashes, timer.elapsed()))  # one collective: every rank's hashes and time
            seconds = max(t for _, t in gathered)
            everyone = {k: v for h, _ in gathered for k, v in h.items()}
            agreed(lambda: self.dist.is_main and (write_manifest(tmp, everyone), publish(tmp, root / name)))
        except UserError as e:
            # Some writers hide a full disk behind their own message (torch's zip writer: "unexpected pos"): say it.
            free = shutil.disk_usage(self.output_dir).free / 2**20
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"saving checkpoint {root / name} failed: {e} ({free:.0f} MiB free on its disk); partial files "
                "removed, earlier checkpoints kept"
            ) from None
        return seconds

    def _write_state(self, model, optimizer, state: TrainState, tmp: Path) -> list[str]:
        import torch
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        # Tensors only: the optimizer's param_groups come from the flags on resume, its plain numbers go to JSON.
        tensors, numbers = split_optimizer_state(optim_sd["state"])
        dcp.save({"model": model_sd, "optim": tensors}, checkpoint_id=str(tmp / "dcp"))
        rank = self.dist.rank
        save_file({"torch": torch.get_rng_state()}, tmp / f"rng_{rank}.safetensors")
        mine = [f"dcp/{p.name}" for p in (tmp / "dcp").glob(f"__{rank}_*.distcp")] + [f"rng_{rank}.safetensors"]
        if self.dist.is_main:
            if numbers:
                (tmp / OPTIMIZER_NUMBERS).write_text(json.dumps(numbers) + "\n")
                mine.append(OPTIMIZER_NUMBERS)
            meta = {
                "format": FORMAT,
                "state": asdict(state),
                "num_steps": self.num_steps,
                "settings": self.settings,
                "best": self.best,
                "world_size": self.dist.world_size,
                "model_name_or_path": self.cfg.model_name_or_path,
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(meta, indent=2) + "\n")
            mine += [TRAINER_STATE, "dcp/.metadata"]
        return mine

    def _write_hf(self, model, tmp: Path) -> list[str]:
        """Gather full weights to rank 0's CPU (one tensor at a time, offloaded) and write a from_pretrained folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        import osft

        full = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return []
        full = osft.dense_state_dict(full)  # OSFT factors back to the model's own dense weights
        write_hf_files(full, self.model_config, self.cfg.save_dtype, self.tokenizer, self.generation_config, tmp)
        return [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]

    def prune(self):
        """Keep the newest --keep-last-checkpoints (and the best by val_loss with --keep-best-checkpoint)."""
        keep = self.cfg.keep_last_checkpoints
        if keep is None:
            return
        best = self.best["samples"] if self.best else None
        for kind in (HF_DIR, STATE_DIR):
            for samples, path in checkpoints(self.output_dir, kind)[:-keep]:
                if samples != best:
                    shutil.rmtree(path)

    def remove_replaced(self, resumed_samples: int):
        """Checkpoints numbered past the one this run resumed from (--resume-from an earlier one, or --resume past
        a damaged newest) hold the history the run replaces, as it replaced that history's metrics rows: once the
        run has finished a step, they go (else pruning would keep them as the newest and --resume would go back)."""
        for kind in (HF_DIR, STATE_DIR):
            for samples, path in checkpoints(self.output_dir, kind):
                if samples > resumed_samples:
                    log(f"removing {path}: past samples_{resumed_samples}, from the history this run replaced")
                    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder


def holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_OUTPUTS)


def check_output_dir(cfg):
    """Read-only and up front: a fresh run does not go into a folder that holds another run."""
    out = Path(cfg.output_dir)
    if out.is_dir() and holds_a_run(out) and not (cfg.resume or cfg.resume_from or cfg.overwrite):
        fail(
            f"--output-dir {out} already holds a run ({', '.join(n for n in RUN_OUTPUTS if (out / n).exists())}): "
            "add --resume to continue it, --overwrite to replace it, or choose another folder"
        )
    inside = cfg.resume_from and out.resolve() in Path(cfg.resume_from).resolve().parents
    if cfg.overwrite and inside:
        fail("--overwrite would delete the checkpoint --resume-from names: copy it elsewhere first")
    if cfg.resume_from and not inside and not cfg.overwrite and out.is_dir() and holds_a_run(out):
        fail(
            f"--resume-from {cfg.resume_from} is not a checkpoint of --output-dir {out}, which holds another run: "
            "their metrics and checkpoints would mix; add --overwrite to replace that run, or choose another folder"
        )


def lock_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def describe_holder(text: str) -> str:
    try:
        h = parse_json(text)
        job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        return f"host {h['host']}, pid {h['pid']}{job}"
    except (ValueError, TypeError, KeyError):
        return "an unknown holder"


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


class OutputDir:
    """Rank 0's hold on --output-dir: created and locked for the run's life (flock, released by the kernel if the
    process dies, plus a lock file naming the holder). If the run fails before finishing a step, release()
    removes what the run created and restores training_params.json."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main
        self.lock_path = path / LOCK_FILE
        self.fd = None
        self.created: list[Path] = []
        self.params_before: bytes | None = None
        self.metrics_before: bytes | None = None
        self.new_trackers: list[str] = []
        self.rows_at_launch: int | None = None

    def take(self, cfg):
        self.created = make_folders(self.path)
        try:
            self._lock()
            check_output_dir(cfg)  # again, now under the lock: a run that started meanwhile is seen
        except UserError:  # refused: the folder's files are another run's, untouched; only ours are undone
            self._unlock()
            remove_empty_folders(self.created)
            raise
        if cfg.overwrite:
            for name in RUN_OUTPUTS + TRACKER_DIRS:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        remove_partial_saves(self.path)
        params = self.path / PARAMS_FILE
        self.params_before = params.read_bytes() if params.is_file() else None
        self.new_trackers = [name for name in TRACKER_DIRS if not (self.path / name).exists()]

    def _lock(self):
        for _ in range(3):  # a holder that removes the file between our open() and flock(): open the new one
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe_holder(os.read(fd, 4096).decode(errors="replace"))
                os.close(fd)
                fail(
                    f"--output-dir {self.path} is in use by another run ({holder}); wait for it or choose another folder"
                )
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log(f"warning: {self.path}'s filesystem has no flock ({e.strerror}): relying on the lock file alone")
                self._check_lock_file(fd)
            if os.path.exists(self.lock_path) and os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                break
            os.close(fd)
        else:
            fail(f"--output-dir {self.path}: could not take {self.lock_path} (another run keeps replacing it)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(lock_holder()) + "\n").encode(), 0)
        self.fd = fd

    def _check_lock_file(self, fd):
        text = os.read(fd, 4096).decode(errors="replace")
        if not text.strip():
            return
        try:
            holder = parse_json(text)
            stale = holder["host"] == socket.gethostname() and not pid_alive(holder["pid"])
        except (ValueError, TypeError, KeyError):
            stale = False
        if not stale:
            os.close(fd)
            fail(
                f"--output-dir {self.path} may be in use by another run ({describe_holder(text)}; without flock "
                f"leantrain cannot tell): if that run is gone, delete {self.lock_path}"
            )

    def record_launch(self, params: dict, resumed_step: int):
        """Collective. Write training_params.json (this launch, flat, plus earlier launches oldest first) and drop
        metrics rows past the resumed step (steps a crashed run did after its last checkpoint, replayed now)."""
        error = None
        if self.is_main:
            try:
                write_atomically(self.path / PARAMS_FILE, json.dumps(params | self._launches(), indent=2) + "\n")
                metrics = self.path / METRICS_FILE
                self.metrics_before = metrics.read_bytes() if metrics.is_file() else None
                self.rows_at_launch = trim_metrics(metrics, resumed_step)
            except OSError as e:
                error = f"cannot write in --output-dir {self.path}: {describe_error(e)}"
        stop_if_any(error)

    def _launches(self) -> dict:
        if self.params_before is None:  # only a resumed run finds one (a fresh run refused, --overwrite deleted it)
            return {"launches": []}
        try:
            earlier = parse_json(self.params_before)
            launches = earlier.pop("launches", [])
            if not isinstance(launches, list):
                raise TypeError("'launches' is not a list")
            return {"launches": [*launches, earlier]}
        except (ValueError, AttributeError, TypeError):
            log(f"note: {self.path / PARAMS_FILE} was unreadable; earlier launches are not listed")
            return {"launches": []}

    def release(self, failed: bool):
        """Remove the lock; after a failure before any finished step, also undo what this run created."""
        metrics = self.path / METRICS_FILE
        if failed and (self.rows_at_launch is None or count_lines(metrics) == self.rows_at_launch):
            params = self.path / PARAMS_FILE
            with contextlib.suppress(OSError):  # a failure to write it may be why the run failed
                if self.params_before is not None:
                    write_atomically(params, self.params_before)
                elif params.is_file():
                    params.unlink()
            with contextlib.suppress(OSError):  # rows trimmed at launch come back: this launch replaced nothing
                if self.metrics_before is not None:
                    write_atomically(metrics, self.metrics_before)
                elif metrics.exists() and metrics.stat().st_size == 0:
                    metrics.unlink()
            for name in (STATE_DIR, HF_DIR):
                with contextlib.suppress(OSError):
                    (self.path / name).rmdir()
            for name in self.new_trackers:  # else the next fresh run here would continue this run's wandb run
                shutil.rmtree(self.path / name, ignore_errors=True)
        self._unlock()
        if failed:
            remove_empty_folders(self.created)

    def _unlock(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def claimed_output_dir(cfg, dist):
    """Create and lock --output-dir on rank 0 (every rank stops if that fails), and release it at the end."""
    out = OutputDir(Path(cfg.output_dir), dist.is_main)
    error = None
    if dist.is_main:
        try:
            out.take(cfg)
        except UserError as e:
            error = str(e)
    stop_if_any(error)
    failed = True
    try:
        yield out
        failed = False
    finally:
        if dist.is_main:
            out.release(failed)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def trim_metrics(path: Path, step: int) -> int:
    """Keep only rows of steps <= step (atomically); returns the number of rows kept."""
    if not path.exists():
        return 0
    kept, dropped, unreadable = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row_step = parse_json(line)["step"]
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if type(row_step) is int and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped or unreadable:
        write_atomically(path, "".join(line + "\n" for line in kept))
        log(
            f"{path}: removed {counted(dropped, 'row')} past the resumed step {step}"
            + (f" and {counted(unreadable, 'unreadable line')} (a write cut short)" if unreadable else "")
        )
    return len(kept)
