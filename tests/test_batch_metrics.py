"""batch_metrics: the console's ETA leaves out the first step (compilation, warm-up)."""

from batch_metrics import MetricsLog


def test_eta_ignores_the_first_step(tmp_path, capsys):
    log = MetricsLog(tmp_path, is_main=True, total_steps=101)
    base = dict(loss=1.0, grad_norm=1.0, lr=1e-3, tokens_per_second=1.0, num_minibatches=1)
    log.write(base | {"step": 1, "time_per_step": 500.0})
    assert "ETA 13:53:20" in capsys.readouterr().out  # only the first step known: 100 x 500 s
    log.write(base | {"step": 2, "time_per_step": 2.0})
    assert "ETA 0:03:18" in capsys.readouterr().out  # 99 steps x 2 s, not the mean with the 500 s step
    assert len((tmp_path / "training_metrics_0.jsonl").read_text().splitlines()) == 2
