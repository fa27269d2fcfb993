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
