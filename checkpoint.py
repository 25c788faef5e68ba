"""Checkpoints: HF-format models anyone can load, and full training state for exact, reshardable resume.

Layout, N = samples seen when saved:

    output_dir/full_state/samples_N/   model + optimizer (torch.distributed.checkpoint, sharded, reshardable on
                                       load), trainer_state.json (counters, sampler position, scheduler, run
                                       identity), rng_RANK.pt
    output_dir/hf_format/samples_N/    safetensors (sharded when large), config.json (dtype = saved dtype),
                                       generation_config.json, tokenizer files

Every folder is written under a temporary name that does not match `samples_*` (`.tmp-samples_N`) and renamed
when complete: the state first, then the HF folder, so a visible HF checkpoint always has its state, and a crash
at any point leaves earlier checkpoints untouched. Leftover temporary folders are removed at start.
"""

import copy
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils import any_rank, barrier, fail, log

STATE_DIR, HF_DIR = "full_state", "hf_format"
NAME = re.compile(r"^samples_(\d+)$")


@dataclass
class TrainState:
    """The loop's counters and the sampler's position after the last finished step."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    sampler: dict = field(default_factory=dict)

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
# Finding checkpoints


def checkpoints(output_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """Complete checkpoints of one kind (STATE_DIR or HF_DIR), oldest first."""
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


def find_resume_path(cfg, output_dir: Path) -> Path | None:
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not (path / "trainer_state.json").is_file():
            fail(
                f"--resume-from {path}: not a complete training state (expected {STATE_DIR}/samples_N with "
                "trainer_state.json)"
            )
        return path
    if cfg.resume:
        found = checkpoints(output_dir, STATE_DIR)
        if found:
            return found[-1][1]
        log(f"--resume: no checkpoint in {output_dir / STATE_DIR}, starting from scratch")
    return None


def load(path: Path, model, optimizer, scheduler, sampler, identity: dict, dist) -> TrainState:
    """Restore model, optimizer, scheduler, sampler and counters; DCP reshards to the current world size."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / "trainer_state.json").read_text())
    saved = meta["identity"]
    for key, what in (("model", "another model architecture"), ("data", "other data")):
        if saved[key] != identity[key]:
            fail(
                f"cannot resume from {path}: it was saved by a run on {what} (its {key} fingerprint "
                f"{saved[key]} != {identity[key]}); use another --output-dir or the original --{key}-"
                f"{'name-or-path' if key == 'model' else 'path'}"
            )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    train_state = TrainState(**meta["state"])
    sampler.load_state_dict(train_state.sampler)
    rng_file = path / f"rng_{dist.rank}.pt"
    if rng_file.is_file() and meta["world_size"] == dist.world_size:
        torch.set_rng_state(torch.load(rng_file, weights_only=False)["torch"])
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


def save_hf(lm, model_config, save_dtype: str, tokenizer, generation_config, out: Path, dist):
    """Gather full weights to rank 0's CPU (one tensor at a time, offloaded) and write a from_pretrained folder."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return
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

    def __init__(self, cfg, output_dir: Path, dist, model_config, identity: dict, resumed_at: int = 0):
        self.cfg, self.output_dir, self.dist = cfg, Path(output_dir), dist
        self.model_config, self.identity = model_config, identity
        self.last_saved_samples = resumed_at or None  # a resumed run does not save its starting point again
        self.signal_received = None
        self.tokenizer = self.generation_config = None
        if dist.is_main:
            self.tokenizer, self.generation_config = self._load_extras(cfg.model_name_or_path)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signum

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

    def maybe_save(self, model, optimizer, scheduler, state: TrainState) -> bool:
        """Save if due; returns True when a preemption signal asks the run to stop (after saving)."""
        preempted = any_rank(self.signal_received is not None, self.dist.device)
        every = self.cfg.min_samples_per_checkpoint
        last = self.last_saved_samples or 0
        due = every is not None and state.samples_seen // every > last // every
        if due or preempted:
            self.save(model, optimizer, scheduler, state)
        if preempted:
            log("preemption signal received: checkpoint saved, stopping (rerun with --resume to continue)")
        return preempted

    def save_final(self, model, optimizer, scheduler, state: TrainState):
        if self.cfg.save_final_checkpoint and state.step > 0 and self.last_saved_samples != state.samples_seen:
            self.save(model, optimizer, scheduler, state)

    def save(self, model, optimizer, scheduler, state: TrainState):
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"samples_{state.samples_seen}"
        state_root, hf_root = self.output_dir / STATE_DIR, self.output_dir / HF_DIR
        tmp_state, tmp_hf = state_root / f".tmp-{name}", hf_root / f".tmp-{name}"
        if self.dist.is_main:
            fresh_dir(tmp_state)
            fresh_dir(tmp_hf)
        barrier()

        # 1. Full training state, published before the HF folder.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_state / "dcp"))
        torch.save({"torch": torch.get_rng_state()}, tmp_state / f"rng_{self.dist.rank}.pt")
        if self.dist.is_main:
            meta = {
                "state": asdict(state),
                "scheduler": scheduler.state_dict(),
                "identity": self.identity,
                "world_size": self.dist.world_size,
                "model_name_or_path": self.cfg.model_name_or_path,
            }
            (tmp_state / "trainer_state.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        barrier()
        if self.dist.is_main:
            publish(tmp_state, state_root / name)

        # 2. The HF model.
        save_hf(
            model.lm, self.model_config, self.cfg.save_dtype, self.tokenizer, self.generation_config, tmp_hf, self.dist
        )
        if self.dist.is_main:
            publish(tmp_hf, hf_root / name)
            self.prune()
        barrier()
        self.last_saved_samples = state.samples_seen
        log(f"saved checkpoint {hf_root / name}")

    def prune(self):
        keep = self.cfg.keep_last_checkpoints
        if keep is None:
            return
        for kind in (HF_DIR, STATE_DIR):
            for _, path in checkpoints(self.output_dir, kind)[:-keep]:
                shutil.rmtree(path)
