"""Small shared helpers: one-line user errors, rank-0 logging, and every torch.distributed call of the trainer.

Keeping all collectives here makes the distributed surface of leantrain readable in one screen: init, the
two reductions the loop needs (a sum and an agreement), gathering small objects (checkpoint hashes,
errors every rank must stop on), and the weight broadcast at load time.
"""

import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or flags: printed as one line, exit code 2, no traceback."""


def fail(message: str):
    raise UserError(message)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_on_user_error(fn):
    """Decorate a CLI entry point: a UserError becomes `error: ...` on stderr and exit code 2. Under torchrun every
    rank exits 2 and the first process of each node prints the line (every rank of a node sees the same error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def parse_json(text: str | bytes):
    """json.loads for files leantrain did not write itself: anything malformed raises ValueError (json.loads raises
    RecursionError on deep nesting, and ValueError on integers of thousands of digits)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def numbered_lines(f):
    """(1-based line number, raw bytes) of a file opened in binary mode, without the UTF-8 byte-order mark that
    editors on Windows put at the start of a file."""
    for lineno, raw in enumerate(f, start=1):
        yield lineno, raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw


def check_can_create(folder: Path, what: str):
    """`folder` is, or can be made as, a folder this process may write in; else a one-line error about `what`."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        fail(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{what}: {existing} is not writable")


def make_folders(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created, outermost first (a failed run removes them again)."""
    created = [p for p in reversed((folder, *folder.parents)) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def write_atomically(path: Path, content: str | bytes):
    """Write a small file so that a reader (or a kill) never sees half of it: a temp file, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def remove_empty_folders(created: list[Path]):
    """Undo make_folders, innermost first, leaving any folder that something has written into."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def log(*args):
    """Print on rank 0 only, flushed (torchrun interleaves ranks' stdout otherwise)."""
    if rank() == 0:
        print(*args, flush=True)


def counted(n: int, noun: str) -> str:
    """'1 sample', '3 samples'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------------------------------------------
# Distributed: the only place that talks to torch.distributed's process group.


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: "object"  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_excepthook_before = None  # init_process_group prefixes uncaught errors with the rank; destroy_distributed undoes it


def init_distributed():
    """Start the process group: NCCL on CUDA, gloo on CPU. Without torchrun, a 1-process group in memory."""
    import torch
    import torch.distributed as dist

    global _excepthook_before
    _excepthook_before = sys.excepthook

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:  # torchrun (single node or multi-node rendezvous)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if use_cuda and local_ranks > torch.cuda.device_count():
            fail(
                f"{local_ranks} processes per node but {torch.cuda.device_count()} visible GPU(s): set "
                f"--nproc-per-node to at most {torch.cuda.device_count()} (or CUDA_VISIBLE_DEVICES= to train on CPU)"
            )
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:  # plain `python train.py`: one process, no rendezvous needed
        local_rank = 0
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def all_reduce_sum(tensor):
    """Sum a float64 tensor over ranks (loss sums and counters); returns it as a numpy array on the host."""
    all_reduce_sum_(tensor)
    return tensor.cpu().numpy()


def all_reduce_sum_(tensor):
    """Sum a tensor over ranks, in place (nothing to do outside a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def any_rank(flag: bool, device) -> bool:
    """Agree on a control decision (stop, save): true on every rank if it is true on any rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank ([obj] outside a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def stop_if_any(error: str | None):
    """Collective: if any rank hit a user-facing error (a full disk, a lock held elsewhere), every rank stops with
    the first such message, so no rank is left waiting in a collective."""
    first = next((e for e in gather_objects(error) if e is not None), None)
    if first is not None:
        fail(first)


def broadcast_buffers(model):
    """Copy rank 0's buffers (e.g. rotary `inv_freq`, which no state dict carries) to every rank."""
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def destroy_distributed():
    """End the process group, its threads included. FSDP2's DeviceMesh holds the group in `_pg_registry`, and
    meshes outlive their model in DTensor's sharding caches, so destroy_process_group alone leaves gloo's (or
    NCCL's) threads running until the interpreter tears down, where they now and then abort the process ("terminate
    called without an active exception", pytorch#190489): the meshes let go of their groups here."""
    import gc

    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if dist.is_initialized():
        dist.destroy_process_group()
        for mesh in (o for o in gc.get_objects() if issubclass(type(o), DeviceMesh)):  # not isinstance: dead proxies
            getattr(mesh, "_pg_registry", {}).clear()  # where torch keeps them (2.13); nothing to do where it does not
        gc.collect()
    if _excepthook_before is not None:  # a notebook that called train.train() gets its own hook back
        sys.excepthook = _excepthook_before
