"""Checkpoint integrity and trust: a checkpoint is checked against its manifest before use, and read without
running anything it contains. State is JSON and safetensors; DCP's pickled `.metadata` goes through an unpickler
that knows only DCP's own index classes; an optimizer's plain numbers are JSON, never pickled. Anything that fails
is Damaged (`--resume` skips it, saying why); an intact checkpoint holding a DCP storage kind leantrain does not
read is unsupported (refused in one line)."""

import hashlib
import json
import pickle
import re
from pathlib import Path

from utils import fail, first_line, gather_objects, parse_json

STATE_DIR, HF_DIR = "full_state", "hf_format"
MANIFEST, TRAINER_STATE, OPTIMIZER_NUMBERS = "manifest.json", "trainer_state.json", "optimizer_numbers.json"
FORMAT = 2  # trainer_state.json's format: checkpoints of another format are not resumed
PLAIN_NUMBERS = (int, float, bool)  # what an optimizer's state may hold beside tensors


class Damaged(Exception):
    """A checkpoint file is missing, truncated, altered or not what leantrain writes."""


class Unsupported(Exception):
    """A checkpoint intact by its manifest that holds a DCP storage kind leantrain does not read."""


# ---------------------------------------------------------------------------------------------------------------
# manifest.json


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


def safe_reader_class():
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


def is_count(x) -> bool:
    return type(x) is int and x >= 0


def read_trainer_state(folder: Path, check_state) -> dict:
    """trainer_state.json, checked: its format and the checkpoint's own fields here, the loop's state by its
    owners (`check_state` raises ValueError saying what is wrong). Anything wrong is Damaged."""
    path = folder / TRAINER_STATE
    try:
        meta = json.loads(path.read_bytes())
        if meta["format"] != FORMAT:
            raise Damaged(f"{path}: format {meta['format']!r}, expected {FORMAT} (saved by another leantrain version)")
        valid = (
            (
                meta.get("best") is None
                or (type(meta["best"]["val_loss"]) is float and is_count(meta["best"]["samples"]))
            )
            and (meta["num_steps"] is None or is_count(meta["num_steps"]))
            and is_count(meta["world_size"])
            and isinstance(meta["settings"], dict)
        )
    except (OSError, ValueError, RecursionError) as e:
        raise Damaged(f"{path}: unreadable ({first_line(e)})") from None
    except (KeyError, TypeError) as e:
        raise Damaged(f"{path}: missing or malformed field ({first_line(e)})") from None
    if not valid:
        raise Damaged(f"{path}: a counter or setting is missing, unknown or out of range")
    try:
        check_state(meta["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise Damaged(f"{path}: {first_line(e)}") from None
    return meta


def verify(folder: Path, kind: str, dist, check_state=None) -> dict | None:
    """Check a checkpoint folder before use; returns its trainer state (STATE_DIR, whose loop state `check_state`
    checks) or raises Damaged."""
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
    meta = read_trainer_state(folder, check_state)
    read_dcp_index(folder, files)
    meta["files"], meta["optimizer_numbers"] = files, read_optimizer_numbers(folder, files)
    return meta


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
