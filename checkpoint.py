"""Checkpoints: HF-format models anyone can load, and the full training state for an exact, reshardable resume
(found, checked against the run, loaded; decided, written and published atomically).

Layout, N = samples seen when saved:

    output_dir/full_state/samples_N/   dcp/ (model weights and optimizer tensors, torch.distributed.checkpoint,
                                       sharded, reshardable on load), trainer_state.json (counters, sampler
                                       position, run length, the settings a resume must match),
                                       rng_RANK.safetensors, manifest.json
    output_dir/hf_format/samples_N/    safetensors (sharded when large), config.json (dtype = saved dtype),
                                       generation_config.json, tokenizer files, manifest.json

Trust and integrity (integrity.py): nothing read from a checkpoint can run code, and `manifest.json` (size and
sha256 of every file, written last) is checked before a checkpoint is used; `--resume` skips damaged checkpoints,
newest first, saying which and why. The optimizer's hyperparameters come from the flags, which a resume must
repeat; its plain numbers are in optimizer_numbers.json. The output folder's lifecycle: run_folder.py.

Atomicity. Every folder is written under a temporary name (`.tmp-samples_N`) and renamed when complete: the
state first, then the HF folder. A crash between the two leaves state N without its HF folder; `--resume`
rebuilds it from the state, so the final model is never lost. Leftover temporary folders are removed at start.
"""

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from integrity import (
    FORMAT,
    HF_DIR,
    OPTIMIZER_NUMBERS,
    PLAIN_NUMBERS,
    STATE_DIR,
    TRAINER_STATE,
    Damaged,
    hash_files,
    is_count,
    safe_reader_class,
    verify,
    write_manifest,
)
from utils import (
    Timer,
    UserError,
    fail,
    first_line,
    gather_objects,
    log,
    stop_if_any,
)

NAME = re.compile(r"^samples_(\d+)$")


@dataclass
class TrainState:
    """The loop's counters and the sampler's position after the last finished step."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    sampler: dict = field(default_factory=dict)

    @classmethod
    def checked(cls, state: dict) -> "TrainState":
        """The state as saved, its meaning checked (ValueError says what is wrong): these counters here, the
        sampler's state by the sampler that wrote it, which alone knows its fields."""
        import sampler

        names = [f.name for f in fields(cls)]
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            raise ValueError(f"state fields {sorted(state) if isinstance(state, dict) else state!r}, expected {names}")
        for name in ("step", "samples_seen", "tokens_seen"):
            if not is_count(state[name]):
                raise ValueError(f"{name} {state[name]!r} is not a count")
        if not isinstance(state["sampler"], dict):
            raise ValueError("the sampler's state is not a JSON object")
        sampler.check_state(state["sampler"])
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


def find_resume_state(cfg, output_dir: Path, dist) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state: --resume-from as given (refused if damaged), or with
    --resume the newest intact one in output_dir (damaged ones are reported and skipped, never all of them)."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if path.is_file():
            fail(f"--resume-from {path}: a file; give a checkpoint folder ({STATE_DIR}/samples_N)")
        try:
            return path, verify(path, STATE_DIR, dist, TrainState.checked)
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
            return path, verify(path, STATE_DIR, dist, TrainState.checked)
        except Damaged as e:
            log(f"warning: skipping damaged checkpoint {path}: {e}")
    fail(
        f"--resume: every checkpoint in {output_dir / STATE_DIR} is damaged (see above); not starting from scratch "
        "over them: use --overwrite to start over, or --resume-from an intact copy"
    )


def resume_state(cfg, output_dir: Path, dist, settings: dict, before: dict) -> tuple[Path, dict] | None:
    """find_resume_state's checkpoint, once check_resumable has accepted its settings for this run."""
    found = find_resume_state(cfg, output_dir, dist)
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
        elif name == "data_weights":
            diffs.append(f"--data-path weights {now} (checkpoint: {then}; None: the sources concatenated)")
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
        dcp.load(state, storage_reader=safe_reader_class()(path / "dcp", meta["files"]))
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

    def note_validation(self, val_loss: float, model, optimizer, state: TrainState, name: str | None = None):
        """With --keep-best-checkpoint, an improved val_loss (of the set `name`, --best-checkpoint-set's) gets a
        checkpoint that pruning keeps. A best measured on another set (a resume that watches another) starts over."""
        if not self.cfg.keep_best_checkpoint:
            return
        if self.best is not None and self.best.get("set", name) != name:
            log(f"--best-checkpoint-set {name}: the best so far was measured on {self.best['set']}; starting over")
            self.best = None
        if self.best is not None and val_loss >= self.best["val_loss"]:
            return
        self.best = {"val_loss": val_loss, "samples": state.samples_seen} | ({"set": name} if name else {})
        log(f"best val_loss so far: {val_loss:.4f}{f' ({name})' if name else ''} at step {state.step}")
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
                "osft_ranks": model.osft_ranks,  # the model's shape: a resume builds it with these
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
