"""docs/ says what the code does: the API reference is regenerated from the code, and every
Python example in docs/*.md runs.

Convention (docs/README.md): a block fenced ```python runs; one fenced ```python no-run (or
any other language) does not. Each block runs on its own, in a fresh namespace, in this
process (importing torch again per block would cost seconds), on one intra-op thread, with a
time limit, the environment, torch's RNG and thread count restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK_TIMEOUT_S = 30.0
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE
)


def python_blocks() -> list[tuple[str, int, str, str]]:
    """(file name, line number, info string, code) of every python-fenced block in docs/*.md."""
    blocks = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            words = match.group("info").split()
            if words[:1] == ["python"]:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((path.name, line, " ".join(words[1:]), textwrap.dedent(match.group("body"))))
    return blocks


BLOCKS = python_blocks()
RUNNABLE = [b for b in BLOCKS if b[2] != "no-run"]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (main thread on POSIX; elsewhere no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"a docs example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_generated_from_the_current_code():
    expected = load_generator().render()
    assert (DOCS / "api.md").read_text(encoding="utf-8") == expected, (
        "docs/api.md is out of date with the docstrings and signatures: run python docs/gen_api.py"
    )


def test_the_docs_have_runnable_examples():
    files = {name for name, *_ in RUNNABLE}
    for page in ("sgd.md", "sgdl.md", "autodrop.md", "tlr.md", "rdbd.md", "sgdhd.md", "aalr.md", "backends.md"):
        assert page in files, f"docs/{page} has no runnable python block"
    unknown = {info for _, _, info, _ in BLOCKS if info not in ("", "no-run")}
    assert not unknown, f"unknown python fence options {unknown}: use ```python or ```python no-run"


@pytest.mark.parametrize("name,line,info,code", RUNNABLE, ids=[f"{n}:{line}" for n, line, _, _ in RUNNABLE])
def test_docs_example_runs(name, line, info, code):
    environ, threads = dict(os.environ), torch.get_num_threads()
    compiled = compile(code, f"docs/{name}:{line}", "exec")
    # One intra-op thread: the examples are tiny, and on a busy machine thread hand-offs cost
    # more than the work itself.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), time_limit(BLOCK_TIMEOUT_S):
            exec(compiled, {"__name__": "__docs__"})
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
