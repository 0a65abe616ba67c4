"""Interop: the crash test (tests/crash.rs) against a real mosquitto, with 30 SIGKILLs.

The Rust test runs the daemon binary as a child under a steady load from the simulator, kills
it with SIGKILL at random moments and restarts it; at the end a subscriber on mosquitto must
have every seq from 1 to the last (duplicates allowed) and every fire alarm the simulator
raised. `cargo test` runs the same test with the embedded broker and 5 kills.

Environment: VGW_CRASH_KILLS (default 30), VGW_CRASH_SEED (replay a run; printed at start).
Run by hand: .venv/bin/python tests/interop/test_crash_mosquitto.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    env = dict(os.environ)
    env.setdefault("VGW_CRASH_KILLS", "30")
    env["VGW_CRASH_MOSQUITTO"] = mosquitto
    cmd = ["cargo", "test", "--test", "crash", "--", "--nocapture"]
    print("running:", " ".join(cmd), f"(VGW_CRASH_KILLS={env['VGW_CRASH_KILLS']}, {mosquitto})")
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    print("PASS crash test against mosquitto" if rc == 0 else f"FAIL crash test (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
