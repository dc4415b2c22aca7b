"""The README's main command: the demo trains every method and writes its table and figures."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from autolr_fused.__main__ import main  # noqa: E402
from autolr_fused.demo import run  # noqa: E402


def test_demo_trains_every_method_and_writes_figures(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in run.methods().values():
        row = next(line for line in out.splitlines() if line.startswith(method.label))
        loss, accuracy = row[len(method.label) :].split()[:2]
        assert math.isfinite(float(loss))
        assert 0.0 <= float(accuracy.rstrip("%")) <= 100.0
    for name in ("loss.png", "lr.png", "autodrop_angle.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_learns_the_digits_with_an_automatic_lr(tmp_path, capsys):
    """Five epochs of AutoDrop and window-mode TLR reach well above chance (10%) on held-out digits."""
    data = run.load_digits(0, run.torch.device("cpu"))

    class Quiet:
        def update(self, n):
            pass

    for name in ("autodrop", "tlr"):
        result = run.train(run.methods()[name], data, epochs=5, batch_size=64, seed=0, progress=Quiet())
        assert result.test_accuracy > 0.85, (name, result.test_accuracy)


def test_demo_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "nonsense"])
    assert "unknown methods" in capsys.readouterr().err


def test_cli_without_command_prints_usage(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
