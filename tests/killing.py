"""SIGKILL at a random instant: the crash harness shared by the crash-safety tests.

A command runs in its own session with `--json`; it is killed after a random number of event
lines or after a random delay, both drawn from a seeded `random.Random`, so a failing trial can
be replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import SAFEMIGRATE

HANG_AFTER = 60  # seconds of silence from a killed-to-be process that count as a hang


@dataclass
class Killed:
    returncode: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    killed: bool = False


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """The CLI in its own session, configured only by `cwd` (no SAFEMIGRATE_DB from outside)."""
    env = {k: v for k, v in os.environ.items() if k != "SAFEMIGRATE_DB"}
    return subprocess.Popen([str(SAFEMIGRATE), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def run_and_kill(args: list[str], cwd: Path, rng: random.Random, max_lines: int,
                 max_delay: float, min_lines: int = 0) -> Killed:
    """Start a command and SIGKILL it after a random number of event lines or a random delay
    (counted from the `min_lines`-th line). A command that ends first is simply waited for."""
    proc = start(args, cwd)
    lines: list[dict[str, Any]] = []
    changed = threading.Condition()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                item = json.loads(raw)
            except ValueError:
                item = {"kind": "unparsed", "raw": raw}
            with changed:
                lines.append(item)
                changed.notify_all()
        with changed:
            changed.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def reached(count: int) -> None:
        deadline = time.monotonic() + HANG_AFTER
        with changed:
            while len(lines) < count and proc.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pytest.fail(f"`{args[0]}` printed nothing for {HANG_AFTER}s: hung after "
                                f"{lines[-1:]}")
                changed.wait(timeout=0.05)

    if rng.random() < 0.6:
        reached(rng.randint(min_lines, max_lines))
    else:  # a delay counted from the first event: the interpreter's start-up is not the point
        reached(max(min_lines, 1))
        deadline = time.monotonic() + rng.uniform(0, max_delay)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    returncode = proc.wait(timeout=60)
    # transform workers of a SIGKILLed runner are orphans: clean them up (our own session)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    return Killed(returncode, lines, killed)
