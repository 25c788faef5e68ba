"""batch_metrics: the console's ETA leaves out the first step (compilation, warm-up); a progress bar only in a
terminal, stopped on any exit; the plot of a metrics file, also while a run is writing it."""

import io
import json
import re
import struct
import sys

import pytest

from batch_metrics import MetricsLog, plot, read_metrics
from conftest import ROOT, run_script
from utils import UserError


def test_eta_ignores_the_first_step(tmp_path, capsys):
    log = MetricsLog(tmp_path, is_main=True, total_steps=101)
    base = dict(loss=1.0, grad_norm=1.0, lr=1e-3, tokens_per_second=1.0, num_minibatches=1)
    log.write(base | {"step": 1, "time_per_step": 500.0})
    assert "ETA 13:53:20" in capsys.readouterr().out  # only the first step known: 100 x 500 s
    log.write(base | {"step": 2, "time_per_step": 2.0})
    assert "ETA 0:03:18" in capsys.readouterr().out  # 99 steps x 2 s, not the mean with the 500 s step
    assert len((tmp_path / "training_metrics_0.jsonl").read_text().splitlines()) == 2


def write_run(folder, steps=30, val_every=10, tail='{"step": 31, "epoch": 0, "lr": 0.00'):
    """A metrics file as a run in progress leaves it: training rows, validation rows, a half-written last line."""
    folder.mkdir(exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        loss = 8.0 * 0.9**step + 0.5
        lines.append(
            {"step": step, "epoch": step // 20, "lr": 1e-3 * min(1, step / 5), "loss": loss, "grad_norm": 4 / step}
            | {"tokens_per_second": 3000.0 + step, "num_minibatches": 2, "time_per_step": 0.5}
        )
        if step % val_every == 0:
            lines.append({"step": step, "val_loss": loss * 1.1, "val_num_loss_counted_tokens": 900, "val_time": 0.2})
    (folder / "training_metrics_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return folder


def test_plot_is_a_png_of_a_run_in_progress(tmp_path):
    run = write_run(tmp_path / "run")
    train, val = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 31)) and [r["step"] for r in val] == [10, 20, 30]
    png = plot(run).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1200, 750)  # 2x2 panels at 12 x 7.5 inches, 100 dpi
    assert len(png) > 50_000  # four drawn panels, not a blank canvas (~100 KB)
    assert sorted(p.name for p in run.iterdir()) == ["training_curves.png", "training_metrics_0.jsonl"]  # no temp


def test_plot_skips_and_counts_lines_that_are_not_metrics_rows(tmp_path, capsys):
    """A damaged or hand-edited metrics file: odd rows are skipped and counted, never a traceback."""
    odd = ['{"step": 3}', '{"loss": 1.0}', '{"step": "4", "epoch": 0, "loss": 1, "lr": 1, "grad_norm": 1}', "7"]
    odd += [
        "[" * 50_000,
        '{"step": 5, "val_loss": null}',
        '{"step": [1], "val_loss": 1.0}',
        '{"step": 1, "val_loss": 1',
    ]
    odd[-1] += "0" * 400 + "}"  # an integer past float range
    run = write_run(tmp_path / "run", tail="\n".join(odd) + "\n")
    train, val = read_metrics(run)
    assert len(train) == 30 and len(val) == 3
    assert "skipped 8 lines that are not metrics rows" in capsys.readouterr().out
    assert plot(run).stat().st_size > 50_000


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d, r"no such folder"),
        (lambda d: d.mkdir(), r"training_metrics_0.jsonl: no such file"),
        (lambda d: write_run(d, steps=0), r"no training steps yet"),  # only the half-written line
        (lambda d: write_run(d, steps=0, tail=json.dumps({"step": 5, "val_loss": 1.0}) + "\n"), r"no training steps"),
    ],
    ids=["no-folder", "no-file", "half-line-only", "validation-only"],
)
def test_plot_refuses_a_folder_without_training_rows(tmp_path, make, message):
    make(tmp_path / "run")
    with pytest.raises(UserError, match=message):
        plot(tmp_path / "run")
    assert not (tmp_path / "run" / "training_curves.png").exists()


def test_plot_cli(tmp_path):
    r = run_script(ROOT / "batch_metrics.py", "plot", write_run(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'run' / 'training_curves.png'}"
    r = run_script(ROOT / "batch_metrics.py", "plot", tmp_path / "missing")
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'missing'}: no such folder\n")


STEP = dict(loss=1.0, grad_norm=1.0, lr=1e-3, tokens_per_second=1.0, num_minibatches=1, time_per_step=0.5)


class Terminal(io.StringIO):
    """stdout as an interactive terminal."""

    def isatty(self):
        return True


def cursor_shown_again(out):
    """The bar hid the terminal's cursor while it ran, and showed it again when it stopped."""
    return out.count("\x1b[?25l") == 1 and out.index("\x1b[?25l") < out.rindex("━") < out.index("\x1b[?25h")


def test_no_progress_bar_outside_a_terminal(tmp_path, capsys):
    with MetricsLog(tmp_path, is_main=True, total_steps=3) as log:
        for step in (1, 2, 3):
            log.write(STEP | {"step": step})
    out = capsys.readouterr().out  # a pipe or a SLURM log file: no terminal
    assert [line.split(" | ")[0] for line in out.splitlines()] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "━" not in out and "\x1b" not in out


def test_progress_bar_in_a_terminal_stops_at_the_end_and_on_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    log = MetricsLog(tmp_path, is_main=True, total_steps=2)
    log.write(STEP | {"step": 1})
    assert sys.stdout is not term  # rich holds stdout while the bar runs: prints go above it
    log.write(STEP | {"step": 2})
    assert sys.stdout is term and cursor_shown_again(term.getvalue())  # the last step stops it
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())  # without colours and cursor moves
    assert "step 1/2 | loss 1.0000" in out and "step 2/2 | loss" in out and "━ 1/2 steps | ETA 0:00:00" in out

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    with pytest.raises(RuntimeError), MetricsLog(tmp_path, is_main=True, total_steps=10) as log:
        log.write(STEP | {"step": 1})
        log.write(STEP | {"step": 2})
        raise RuntimeError("the run fails at step 3")
    assert sys.stdout is term and cursor_shown_again(term.getvalue())
    assert "━  2/10 steps | ETA 0:00:04" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())
