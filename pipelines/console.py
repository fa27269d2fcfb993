"""The demo's console: Loupe's own progress on the terminal, every library's output in a log.

`DemoConsole` points file descriptors 1 and 2 at a log file (so Airflow's task logs,
Lightning's and MLflow's lines, tqdm bars, warnings and the output of the servers it starts,
tritonserver included, all land there), keeps the terminal for one line per stage: what it
is, roughly how long it takes on 2 cores, when it is done and what it made; and a heartbeat
while a stage runs longer than `heartbeat_s` without a line, naming the latest thing Loupe's
own loggers said, so a newcomer never watches a silent terminal for more than 30 s (on a
terminal the heartbeat rewrites one status line in place; piped, it is a line).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

OWN_LOGGERS = ("loupe", "pipelines")  # Loupe's own loggers: the heartbeat quotes them


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Latest(logging.Handler):
    """Keeps the latest message of Loupe's loggers from the running stage's thread (the
    servers' threads log too, and their lines say nothing about the stage)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.message = ""
        self.thread: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self.message = record.getMessage()[:120]
        except Exception:  # a bad format string must not break the demo
            self.message = str(record.msg)[:120]


class DemoConsole:
    """See the module doc; use as a context manager around the whole demo."""

    def __init__(self, log_path: Path, heartbeat_s: float = 30.0,
                 terminal: TextIO | None = None) -> None:
        self.log_path = Path(log_path)
        self.heartbeat_s = heartbeat_s
        self._terminal_arg = terminal
        self._latest = _Latest()
        self._stage: tuple[str, float, float | None, Callable[[], str] | None] | None = None
        self._last_line = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.t0 = time.monotonic()

    def __enter__(self) -> DemoConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.terminal = self._terminal_arg or os.fdopen(os.dup(self._saved[0]), "w",
                                                        buffering=1)
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in __exit__)
        self._tty, self._status_shown = self.terminal.isatty(), False
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        for name in OWN_LOGGERS:  # their INFO progress lines: the heartbeat's, and the log's
            logger = logging.getLogger(name)
            logger.addHandler(self._latest)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        logging.captureWarnings(True)
        self._beat = threading.Thread(target=self._heartbeat, name="demo-heartbeat",
                                      daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join(timeout=2)
        for name in OWN_LOGGERS:
            logging.getLogger(name).removeHandler(self._latest)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._log.close()
        if self._terminal_arg is None:
            self.terminal.close()

    def say(self, text: str) -> None:
        """One line on the terminal (and in the log, to keep the log's story whole)."""
        with self._lock:
            self._clear_status()
            print(text, file=self.terminal, flush=True)
            print(f"[console] {text}", file=self._log, flush=True)
            self._last_line = time.monotonic()

    def _status(self, text: str) -> None:
        """A heartbeat: on a terminal one status line rewritten in place (the console stays
        short however long a stage runs); piped, a line like any other."""
        if not self._tty:
            self.say(text)
            return
        with self._lock:
            self.terminal.write("\r\x1b[K" + text)
            self.terminal.flush()
            self._status_shown = True
            print(f"[console] {text}", file=self._log, flush=True)
            self._last_line = time.monotonic()

    def _clear_status(self) -> None:
        if self._status_shown:
            self.terminal.write("\r\x1b[K")
            self._status_shown = False

    @contextmanager
    def stage(self, name: str, doing: str, estimate_s: float | None = None,
              detail: Callable[[], str] | None = None) -> Iterator[None]:
        """`[name] doing (about M min)` ... `[name] done in m:ss`; `detail()` says what is
        running now for the heartbeat (else the latest line of Loupe's own loggers)."""
        about = f" (about {max(1, round(estimate_s / 60))} min)" if estimate_s else ""
        self.say(f"[{name}] {doing}{about}")
        start = time.monotonic()
        self._latest.thread, self._latest.message = threading.get_ident(), ""
        self._stage = (name, start, estimate_s, detail)
        try:
            yield
        except BaseException:
            self.say(f"[{name}] FAILED after {_clock(time.monotonic() - start)}: see "
                     f"{self.log_path}")
            raise
        finally:
            self._stage = None
        self.say(f"[{name}] done in {_clock(time.monotonic() - start)}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            stage = self._stage
            if stage is None or time.monotonic() - self._last_line < self.heartbeat_s:
                continue
            name, start, estimate, detail = stage
            elapsed = time.monotonic() - start
            left = ""
            if estimate:
                left = (f", about {_clock(estimate - elapsed)} left" if elapsed < estimate
                        else ", longer than the estimate")
            try:
                now = detail() if detail else self._latest.message
            except Exception as err:  # the heartbeat must never stop the demo
                now = f"(status unavailable: {type(err).__name__})"
            self._status(f"[{name}] {_clock(elapsed)} elapsed{left}" + (f": {now}" if now else ""))
