"""Interop: the gateway's uplink against a real mosquitto (not our embedded broker).

The field side is `village-gateway simulate` (its pty path is on its first stdout line; its stdin
takes `alarm N`, `fault N`, `normal N`, `offline N`). Checks, in order:
  1. retained status with "online": true
  2. `alarm 1` -> a fire.alarm event for A-101
  3. cmd/silence {"id":"t1"} -> {"id":"t1","ok":true} on cmd-result
  4. mosquitto stopped; `alarm 2`, `fault 3`; mosquitto restarted on the same port ->
     fire.alarm A-102 and device.fault A-103 arrive, and seq has no gap over everything seen
  5. SIGTERM -> the gateway exits 0 and the retained status says "online": false
  6. restarted, online again; SIGKILL -> mosquitto publishes the will {"online": false} (socket
     closed), retained; once more with SIGSTOP -> the will after keep-alive expiry
     (keep_alive = "2s": 1.5 x 2 s), retained
  7. seq still gap-free across the restart

Run by hand: .venv/bin/python tests/interop/test_mosquitto.py
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BIN,
    PREFIX,
    Failure,
    Mosquitto,
    Observer,
    check_config,
    free_port,
    gateway_config,
    log,
    main,
    retained,
    wait_until,
)

GW = "interop-mq"
KEEP_ALIVE_S = 2


class Simulator:
    """`village-gateway simulate` with its stdin as a console and its stdout collected."""

    def __init__(self, procs):
        self.proc = procs.start(
            "simulate", [BIN, "simulate", "--detectors", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.logfile = procs.logpath("simulate")
        threading.Thread(target=self._read, daemon=True).start()
        first = wait_until(lambda: self.lines[:1] or self.proc.poll() is not None, 15,
                           "the simulator's first stdout line", logs=[self.logfile])
        if self.proc.poll() is not None and not self.lines:
            raise Failure(f"simulate exited with {self.proc.returncode} before printing its pty")
        m = re.search(r"(/dev/pts/\d+)", first[0])
        if not m:
            raise Failure(f"no /dev/pts/N on the simulator's first line: {first[0]!r}")
        self.pty = m.group(1)
        log(f"simulator: {first[0].strip()}")

    def _read(self) -> None:
        with open(self.logfile, "a") as f:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                f.write("stdout: " + line)
                f.flush()

    def say(self, cmd: str) -> None:
        if self.proc.poll() is not None:
            raise Failure(f"the simulator exited with {self.proc.returncode}")
        self.proc.stdin.write((cmd + "\n").encode())
        self.proc.stdin.flush()
        log(f"simulator <- {cmd}")


def test(procs) -> None:
    wd = procs.workdir
    port = free_port()
    broker = Mosquitto(procs, port)
    broker.start()
    sim = Simulator(procs)
    obs = Observer(port, GW)
    base = f"{PREFIX}/{GW}"
    try:
        state = wd / "state"
        state.mkdir()
        cfg = wd / "gateway.toml"
        cfg.write_text(gateway_config(GW, port, sim.pty, state, keep_alive=f"{KEEP_ALIVE_S}s"))
        check_config(cfg)
        gwlog = procs.logpath("gateway")
        logs = [gwlog, procs.logpath("mosquitto")]

        def start_gateway():
            return procs.start("gateway", [BIN, "run", "--config", str(cfg)])

        gateway = start_gateway()

        # 1. online
        obs.wait_status(True, 20, logs=logs)
        r = retained(port, f"{base}/status")
        if r is None or not isinstance(r.json, dict) or r.json.get("online") is not True:
            raise Failure(f"the retained status is not online=true: {r}")
        log(f"PASS retained status: {r.payload.decode()[:200]}")

        # 2. alarm
        mark = obs.mark()
        sim.say("alarm 1")
        ev = obs.wait_event("fire.alarm", "A-101", 10, mark=mark, logs=logs)
        log(f"PASS fire.alarm A-101, seq {ev.get('seq')}")

        # 3. a command
        mark = obs.mark()
        obs.publish(f"{base}/cmd/silence", {"id": "t1"})

        def result():
            for m in obs.since(mark):
                if m.topic == f"{base}/cmd-result" and isinstance(m.json, dict) and m.json.get("id") == "t1":
                    return m
            return None

        m = wait_until(result, 10, f'a result for command t1 on {base}/cmd-result', logs=logs)
        if m.json.get("ok") is not True:
            raise Failure(f'cmd/silence {{"id":"t1"}} answered {m.payload!r}, expected "ok": true')
        log(f"PASS cmd-result {m.payload.decode()}")

        # 4. an outage of the broker
        broker.stop()
        mark = obs.mark()
        sim.say("alarm 2")
        sim.say("fault 3")
        time.sleep(4)  # the gateway detects both and stores them while the broker is away
        if gateway.poll() is not None:
            raise Failure(f"the gateway exited with {gateway.returncode} during the broker outage")
        broker.start()
        t0 = time.monotonic()
        obs.wait_event("fire.alarm", "A-102", 60, mark=mark, logs=logs)
        obs.wait_event("device.fault", "A-103", 60, mark=mark, logs=logs)
        log(f"PASS events raised during the outage arrived {time.monotonic() - t0:.1f} s after the broker came back")
        seqs = obs.check_seq()
        log(f"PASS seq gap-free: {seqs[0]}..{seqs[-1]} ({obs.summary()})")

        # 5. SIGTERM: a clean exit, and the status says offline
        mark = obs.mark()
        t0 = time.monotonic()
        rc = procs.stop("gateway", signal.SIGTERM, timeout=15)
        log(f"gateway exited {rc} {time.monotonic() - t0:.1f} s after SIGTERM")
        if rc != 0:
            raise Failure(f"the gateway exited with {rc} after SIGTERM (expected 0)\n{open(gwlog).read()[-3000:]}")
        obs.wait_status(False, 10, mark=mark, logs=logs)
        r = retained(port, f"{base}/status")
        if r is None or not isinstance(r.json, dict) or r.json.get("online") is not False:
            raise Failure(f"after SIGTERM the retained status is not online=false: {r}")
        log("PASS SIGTERM: exit 0, retained status online=false")

        # 6. the will. SIGKILL: the kernel closes the socket, mosquitto sends the will at once.
        #    SIGSTOP: the socket stays open and silent; mosquitto sends the will only when the
        #    keep-alive expires (1.5 x keep_alive), the case of a hung gateway or a dead link.
        for how in (signal.SIGKILL, signal.SIGSTOP):
            mark = obs.mark()
            gateway = start_gateway()
            obs.wait_status(True, 20, mark=mark, logs=logs)
            time.sleep(1)
            mark = obs.mark()
            t0 = time.monotonic()
            if how == signal.SIGKILL:
                procs.stop("gateway", signal.SIGKILL)
            else:
                gateway.send_signal(signal.SIGSTOP)
            m = obs.wait_status(False, 3 * KEEP_ALIVE_S + 15, mark=mark, logs=logs)
            after = m.t - t0
            log(f"will arrived {after:.1f} s after {how.name}: {m.payload.decode()}")
            if m.json != {"online": False}:
                raise Failure(f'the will is {m.payload!r}, expected {{"online":false}}')
            if how == signal.SIGSTOP:
                procs.stop("gateway", signal.SIGKILL)
                if after < KEEP_ALIVE_S:
                    raise Failure(f"offline status {after:.1f} s after SIGSTOP, before keep-alive ({KEEP_ALIVE_S} s) could expire: not the will?")
            r = retained(port, f"{base}/status")
            if r is None or not isinstance(r.json, dict) or r.json.get("online") is not False:
                raise Failure(f"after the will ({how.name}), the retained status is not online=false: {r}")
            log(f'PASS {how.name}: the will {{"online":false}} is published and retained')

        # 7. seq across the restart
        seqs = obs.check_seq()
        log(f"PASS seq gap-free over the whole run: {seqs[0]}..{seqs[-1]}")
    finally:
        obs.close()


if __name__ == "__main__":
    main("mosquitto", test)
