"""The output folder's lifecycle: one run per folder (a lock naming its holder), what a fresh run may go into,
--overwrite, each launch's record in training_params.json, the rows a resumed run replays (metrics, generation
samples), and the undo of a launch that fails before its first finished step.

    output_dir/leantrain.lock          the running run's host, pid and SLURM job (held with flock)
    output_dir/training_params.json    this launch's resolved flags, earlier launches listed oldest first
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from batch_metrics import METRICS_FILE
from checkpoint import HF_DIR, STATE_DIR, describe_error, remove_partial_saves
from generation import GENERATIONS_FILE
from utils import (
    UserError,
    counted,
    fail,
    log,
    make_folders,
    parse_json,
    remove_empty_folders,
    stop_if_any,
    write_atomically,
)

PARAMS_FILE, LOCK_FILE = "training_params.json", "leantrain.lock"
# JSONL files of rows by step: a resume drops the rows past its step (replayed), a failed launch puts them back.
ROW_FILES = (METRICS_FILE, GENERATIONS_FILE)
# A folder holding any of these holds a run. --overwrite deletes exactly these (trackers' folders included).
RUN_OUTPUTS = (PARAMS_FILE, *ROW_FILES, STATE_DIR, HF_DIR)
TRACKER_DIRS = ("wandb", "tensorboard")


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
        self.rows_before: dict[str, bytes | None] = {}  # each of ROW_FILES as the launch found it
        self.new_trackers: list[str] = []
        self.rows_at_launch: int | None = None  # the metrics rows kept at launch: one more is a finished step

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
        the rows (metrics, generation samples) past the resumed step (steps a crashed run did after its last
        checkpoint, replayed now)."""
        error = None
        if self.is_main:
            try:
                write_atomically(self.path / PARAMS_FILE, json.dumps(params | self._launches(), indent=2) + "\n")
                kept = {}
                for name in ROW_FILES:
                    path = self.path / name
                    self.rows_before[name] = path.read_bytes() if path.is_file() else None
                    kept[name] = trim_rows(path, resumed_step)
                self.rows_at_launch = kept[METRICS_FILE]
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
        if failed and (self.rows_at_launch is None or count_lines(self.path / METRICS_FILE) == self.rows_at_launch):
            params = self.path / PARAMS_FILE
            with contextlib.suppress(OSError):  # a failure to write it may be why the run failed
                if self.params_before is not None:
                    write_atomically(params, self.params_before)
                elif params.is_file():
                    params.unlink()
            for name, before in self.rows_before.items():
                path = self.path / name
                with contextlib.suppress(OSError):  # rows trimmed at launch come back: this launch replaced nothing
                    if before is not None:
                        write_atomically(path, before)
                    elif path.exists() and path.stat().st_size == 0:
                        path.unlink()
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


def trim_rows(path: Path, step: int, why: str = "") -> int:
    """Keep only the rows of steps <= step in a JSONL of rows by step (atomically); returns the number kept. `why`:
    what the log line calls the rows dropped (by default, those past the resumed step)."""
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
            f"{path}: removed {counted(dropped, 'row')} {why or f'past the resumed step {step}'}"
            + (f" and {counted(unreadable, 'unreadable line')} (a write cut short)" if unreadable else "")
        )
    return len(kept)
