"""The runnable examples do what they say."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_autodrop_drops_the_lr_and_reaches_the_noise_floor(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(rows) == 6
    final = rows[-1]
    loss, lr, drops = float(final[3]), float(final[5]), int(final[10])
    assert drops >= 1 and lr < 0.01  # the lr dropped by itself from its initial 0.01
    assert loss < 0.02  # the targets' noise variance is 0.01
