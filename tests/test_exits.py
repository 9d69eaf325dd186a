"""Processes end cleanly and log readably: an AppTest run exits 0 without an abort, the backbone
preload is finished before the interpreter tears down, and a CLI whose stderr is not a terminal
writes plain lines instead of progress-bar frames.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "hymenoptera"


def _python(code: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFER_STUDIO_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_process_that_ran_apptest_exits_cleanly(tmp_path):
    proc = _python(
        """
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file("app.py", default_timeout=240).run()
        assert not at.exception, [e.value for e in at.exception]
        print("ran")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran" in proc.stdout
    assert "terminate called" not in proc.stderr


def test_exit_during_the_backbone_preload_waits_for_it(tmp_path):
    # The check is registered first, so it runs after the preload's exit hook (atexit is last-in,
    # first-out): by then the preload must have ended, whatever it was doing when the script ended.
    proc = _python(
        """
        import atexit

        def check():
            import ui.cache
            t = ui.cache._warm_thread
            print("preload alive at exit:", t is not None and t.is_alive())

        atexit.register(check)
        from ui.cache import warm_default_backbone
        warm_default_backbone()
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preload alive at exit: False" in proc.stdout
    assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_a_run_that_ends_during_the_preload_leaves_it_intact(tmp_path):
    # app.py (run bare, as a script) starts the preload, renders the sidebar (which imports torch) and
    # ends at once. The preload used to import torch, torchvision and timm on its own thread while the
    # main thread imported torch and then started the interpreter's exit, whose hooks (torch's own,
    # registered after the preload's) tore torch down under it: "'_OpNamespace' 'prims' object has no
    # attribute ...", or an abort.
    proc = _python("import app", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not preload" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_train_with_stderr_to_a_pipe_writes_lines_not_bar_frames(tmp_path):
    data = tmp_path / "data"
    for cls in ("ants", "bees"):
        (data / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / cls).iterdir())[:6]:
            shutil.copy(f, data / cls / f.name)
    # An empty feature cache of its own: with every feature already cached (earlier tests train on the
    # same photos) there is no feature phase to report.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFER_STUDIO_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "tl_core", "train", str(data), "--epochs", "3", "--out", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert sum(ln.startswith("epoch ") for ln in lines) == 3
    assert any(ln.startswith("features: done") for ln in lines)
    assert len(lines) <= 12, lines  # phases + one line per epoch (+ at most a message or two)


def _state(**kw):
    base = dict(phase="features", batches=4, epochs=2, images_per_sec=10.0, history=[])
    base.update(kw)
    return SimpleNamespace(**base)


def test_progress_draws_bars_on_a_terminal_and_lines_elsewhere(monkeypatch):
    from tl_core.cli import TqdmProgress

    def run(bars: bool) -> str:
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        p = TqdmProgress(bars=bars)
        s = _state()
        p.on_fit_start(s)
        p.on_phase_start(s)
        for _ in range(4):
            p.on_batch_end(s)
        s.phase = "train"
        p.on_phase_start(s)
        for epoch in (1, 2):
            s.history.append({"epoch": epoch, "train_loss": 0.5 / epoch, "val_accuracy": 0.8})
            p.on_epoch_end(s)
        p.on_fit_end(s)
        return buf.getvalue()

    plain = run(bars=False)
    assert "\r" not in plain
    assert plain.splitlines() == [
        "features: computing, 4 batches",
        plain.splitlines()[1],
        "training: 2 epochs",
        "epoch 1/2: loss 0.500, val accuracy 0.800",
        "epoch 2/2: loss 0.250, val accuracy 0.800",
    ]
    assert plain.splitlines()[1].startswith("features: done in ")
    assert "\r" in run(bars=True)  # tqdm redraws its bar in place
