"""A `safemerge search run` (or resume) driver process whose console a test reads line by line as it runs, to
inject a fault at a known point of the search."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


class SearchDriver:
    """The driver in its own session; `lines` fills as it prints (the CLI's stdout is line-buffered)."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            start_new_session=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_line(self, prefix: str, timeout_s: float = 600.0) -> bool:
        """Wait until a line starts with `prefix`; False when the driver ended first or the time ran out."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(line.startswith(prefix) for line in self.lines):
                return True
            if not self.running():
                self._reader.join(timeout=10)
                return any(line.startswith(prefix) for line in self.lines)
            time.sleep(0.1)
        return False

    def finish(self, timeout_s: float = 900.0) -> int:
        """Wait for the driver to end (killed after `timeout_s`) and return its exit code."""
        try:
            self.process.wait(timeout=timeout_s)
        finally:
            self.kill()
        self._reader.join(timeout=30)
        return self.process.returncode

    def kill(self) -> None:
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
