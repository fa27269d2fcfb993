"""The demo console's heartbeat quotes the running stage's own progress lines, not what
server threads log meanwhile, and keeps library output off the terminal."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

from pipelines.console import DemoConsole


def test_heartbeat_quotes_the_stage_thread_and_not_server_threads(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "demo.log"
    with DemoConsole(log, heartbeat_s=1.5, terminal=terminal) as console:
        with console.stage("world", "generating", estimate_s=60):
            logging.getLogger("pipelines.world.generate").info("world: 10 of 20 rendered")
            server = threading.Thread(target=logging.getLogger("loupe.shard").info,
                                      args=("shard 1: serving v1",))
            server.start()
            server.join()
            os.write(1, b"a library line\n")  # fd 1 goes to the log file, not the terminal
            time.sleep(3.2)
    lines = terminal.getvalue().splitlines()
    assert lines[0] == "[world] generating (about 1 min)"
    beats = [line for line in lines if "elapsed" in line]
    assert beats and all(line.endswith(": world: 10 of 20 rendered") for line in beats), lines
    assert lines[-1].startswith("[world] done in 0:0")
    assert "a library line" not in terminal.getvalue()
    assert "a library line" in log.read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_heartbeat_rewrites_one_status_line(tmp_path):
    terminal = _Terminal()
    with DemoConsole(tmp_path / "demo.log", heartbeat_s=1.0, terminal=terminal) as console:
        with console.stage("detector", "training", estimate_s=120):
            logging.getLogger("pipelines.train_detector").info("epoch 3/12")
            time.sleep(3.3)
    out = terminal.getvalue()
    lines = out.split("\n")
    # plan line, then the status rewritten in place (\r + erase), cleared before "done"
    assert lines[0] == "[detector] training (about 2 min)"
    assert out.count("\r\x1b[K[detector] 0:0") >= 2 and lines[-2].startswith("\r\x1b[K")
    assert lines[-2].endswith("[detector] done in 0:03") and lines[-1] == ""
    assert len(lines) == 3  # however many heartbeats: two lines on screen
    assert (tmp_path / "demo.log").read_text().count("elapsed") >= 2
