"""Progress bars in logs: at most one redraw per interval, and postfixes never force one."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from hess_utils import progress


def test_a_bar_in_a_log_redraws_at_most_every_interval_even_with_postfixes(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(progress, "interactive", lambda: False)
    log = io.StringIO()
    bar = progress.progress_bar(range(2000), desc="train", file=log)
    assert bar.mininterval == progress.LOG_INTERVAL_S
    for step in bar:
        progress.set_postfix(bar, loss=f"{1 / (step + 1):.3f}")
        progress.set_postfix(bar, f"step {step}")
    bar.close()
    # tqdm's own set_postfix redraws on every call (4000 updates here); ours leave the first and last draw.
    assert log.getvalue().count("\r") <= 3, log.getvalue()[:500]
    assert "2000/2000" in log.getvalue()


def test_a_live_bar_keeps_tqdm_defaults_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(progress, "interactive", lambda: True)
    plain = tqdm(range(3), file=io.StringIO())  # tqdm's own default (TQDM_MININTERVAL as read at its import)
    assert progress.progress_bar(range(3), file=io.StringIO()).mininterval == plain.mininterval
    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert progress.progress_bar(range(3), file=io.StringIO()).mininterval == 5
