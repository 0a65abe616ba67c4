"""Shared helpers for the interop tests: child processes (always cleaned up), a local mosquitto,
an MQTT observer that records everything under the gateway's topics, and bounded waits.

Every wait has a timeout and fails with a message that says what did not happen, followed by the
tail of the relevant logs. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("VGW_BIN", str(ROOT / "target" / "release" / "village-gateway"))
PREFIX = "village"


class Failure(Exception):
    """A check failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path | str, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  (no log {path}: {exc})"
    return "\n".join("  | " + line for line in text[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, interval: float = 0.05, logs: list | None = None):
    """Poll `pred` until it returns a truthy value (returned) or `timeout` s pass (Failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = "".join(f"\n--- {p}:\n{tail(p)}" for p in (logs or []))
            raise Failure(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


class Procs:
    """Child processes of one test, killed (by pid) on every kind of exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: dict[str, subprocess.Popen] = {}
        self.pidfile = os.environ.get("INTEROP_PIDFILE")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        raise SystemExit(f"interrupted by signal {signum}")

    def start(self, name: str, argv: list[str], stdin=subprocess.DEVNULL, stdout=None) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C at the terminal reaches us, and we stop them
        )
        logf.close()
        self.children[name] = proc
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{proc.pid}\n")
        log(f"started {name} (pid {proc.pid}): {' '.join(argv)}")
        return proc

    def logpath(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc = self.children.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise Failure(f"{name} did not exit within {timeout:.0f} s of signal {sig}; killed")
        return proc.returncode

    def kill_all(self) -> None:
        for name, proc in list(self.children.items()):
            if proc.poll() is None:
                try:
                    proc.kill()
                    proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self.children.pop(name, None)


class Mosquitto:
    """A mosquitto on 127.0.0.1:port, anonymous, with persistence (sessions survive a restart)."""

    def __init__(self, procs: Procs, port: int):
        self.procs = procs
        self.port = port
        self.dir = procs.workdir / "mosquitto"
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            # as root, mosquitto would drop to user `mosquitto` and could not write our temp dir
            + ("user root\n" if os.geteuid() == 0 else "")
        )

    def start(self) -> None:
        self.procs.start("mosquitto", ["mosquitto", "-c", str(self.conf)])

        def up():
            proc = self.procs.children.get("mosquitto")
            if proc is not None and proc.poll() is not None:
                raise Failure(f"mosquitto exited with {proc.returncode}\n{tail(self.procs.logpath('mosquitto'))}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(up, 10, f"mosquitto to listen on 127.0.0.1:{self.port}", logs=[self.procs.logpath("mosquitto")])

    def stop(self) -> None:
        rc = self.procs.stop("mosquitto")
        log(f"mosquitto stopped (exit {rc})")


def parse_events(payload: bytes) -> list[dict]:
    """CloudEvents in a message: one object, or a batch (a JSON array of them)."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return []
    items = doc if isinstance(doc, list) else [doc]
    return [e for e in items if isinstance(e, dict) and "specversion" in e]


class Msg:
    def __init__(self, topic: str, payload: bytes, retain: bool):
        self.t = time.monotonic()
        self.topic = topic
        self.payload = payload
        self.retain = retain
        try:
            self.json = json.loads(payload)
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"{self.topic} retain={int(self.retain)} {self.payload[:300]!r}"


class Observer:
    """Subscribes to <prefix>/<gw>/# with a persistent session (QoS 1) and records every message.

    The session survives a broker restart (mosquitto persistence), so events the gateway sends
    before this client reconnects are still delivered to it.
    """

    def __init__(self, port: int, gw: str, client_id: str = "interop-observer"):
        self.gw = gw
        self.base = f"{PREFIX}/{gw}"
        self.lock = threading.Lock()
        self.msgs: list[Msg] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10, "the MQTT observer to connect to mosquitto")

    def _on_connect(self, client, _userdata, _flags, reason_code, _props):
        if reason_code == 0:
            client.subscribe(f"{self.base}/#", qos=1)
            self.connected.set()

    def _on_disconnect(self, _client, _userdata, _flags, _reason_code, _props):
        self.connected.clear()

    def _on_message(self, _client, _userdata, message):
        with self.lock:
            self.msgs.append(Msg(message.topic, message.payload, bool(message.retain)))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def mark(self) -> int:
        with self.lock:
            return len(self.msgs)

    def since(self, mark: int = 0) -> list[Msg]:
        with self.lock:
            return self.msgs[mark:]

    def publish(self, topic: str, payload: dict | str) -> None:
        body = payload if isinstance(payload, str) else json.dumps(payload)
        info = self.client.publish(topic, body, qos=1)
        info.wait_for_publish(10)

    # --- what the gateway sent ---------------------------------------------------------------
    def events(self, mark: int = 0) -> list[tuple[Msg, dict]]:
        out = []
        for m in self.since(mark):
            if m.topic.startswith(f"{self.base}/event"):
                for e in parse_events(m.payload):
                    out.append((m, e))
        return out

    def wait_event(self, etype: str, device: str | None, timeout: float, mark: int = 0, logs=None) -> dict:
        def find():
            for m, e in self.events(mark):
                if e.get("type") != etype:
                    continue
                if device is not None and (e.get("data") or {}).get("device") != device:
                    continue
                expect = f"{self.base}/event/{etype}"
                if m.topic != expect and not m.topic.startswith(f"{self.base}/events"):
                    raise Failure(f"{etype} event came on topic {m.topic!r}, expected {expect!r}")
                return e
            return None

        what = f"a {etype} event" + (f" for device {device}" if device else "") + f" on {self.base}/event/{etype}"
        try:
            return wait_until(find, timeout, what, logs=logs)
        except Failure as exc:
            raise Failure(f"{exc}\n--- events seen: {self.summary(mark)}") from None

    def wait_status(self, online: bool, timeout: float, mark: int = 0, logs=None) -> Msg:
        def find():
            for m in self.since(mark):
                if m.topic == f"{self.base}/status" and isinstance(m.json, dict) and m.json.get("online") is online:
                    return m
            return None

        try:
            return wait_until(find, timeout, f'a status message with "online": {str(online).lower()} on {self.base}/status', logs=logs)
        except Failure as exc:
            seen = [m for m in self.since(mark) if m.topic == f"{self.base}/status"]
            raise Failure(f"{exc}\n--- status messages seen: {seen[-5:]}") from None

    def summary(self, mark: int = 0) -> str:
        evs = self.events(mark)
        return ", ".join(f"{e.get('seq')}:{e.get('type')}:{(e.get('data') or {}).get('device')}" for _, e in evs) or "(none)"

    def check_seq(self) -> list[int]:
        """Every event seen so far: ids unique per seq (duplicates allowed: QoS 1), seq gap-free."""
        by_seq: dict[int, dict] = {}
        for m, e in self.events():
            seq = e.get("seq")
            if not isinstance(seq, int):
                raise Failure(f"event without an integer seq: {m}")
            if e.get("id") != f"{self.gw}-{seq}":
                raise Failure(f'event id {e.get("id")!r} is not "<gw>-<seq>" = {self.gw}-{seq!r}')
            prev = by_seq.get(seq)
            if prev is not None and (prev.get("type"), prev.get("data")) != (e.get("type"), e.get("data")):
                raise Failure(f"seq {seq} used for two different events: {prev} and {e}")
            by_seq[seq] = e
        seqs = sorted(by_seq)
        if not seqs:
            raise Failure("no events at all")
        missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
        if missing:
            raise Failure(f"gap in seq: missing {missing} (seen {seqs[0]}..{seqs[-1]}): {self.summary()}")
        return seqs


def retained(port: int, topic: str, timeout: float = 5.0) -> Msg | None:
    """What a fresh subscriber gets as the retained message on `topic` (None if none)."""
    got: list[Msg] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"interop-probe-{os.getpid()}-{time.monotonic_ns()}", clean_session=True)

    def on_connect(c, _u, _f, rc, _p):
        if rc == 0:
            c.subscribe(topic, qos=1)

    def on_subscribe(*_args):
        # a retained message, if any, is delivered right after SUBACK; allow it a moment
        threading.Timer(1.0, done.set).start()

    def on_message(_c, _u, message):
        if message.retain:
            got.append(Msg(message.topic, message.payload, True))
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    done.wait(timeout)
    client.loop_stop()
    client.disconnect()
    return got[-1] if got else None


def gateway_config(gw: str, port: int, bus_port: str, state_dir: Path, keep_alive: str, units=(1, 2, 3, 4), timeout: str | None = None) -> str:
    """A config in the shape of config/gateway.example.toml: detectors on units 1..4 (ids A-10N),
    a sounder on relay unit 100 coil 0, the panel's fire LED on coil 5, all on one RTU bus."""
    lines = [
        "[gateway]",
        f'id = "{gw}"',
        'name = "interop"',
        f'state_dir = "{state_dir}"',
        "",
        "[uplink]",
        f'url = "mqtt://127.0.0.1:{port}"',
        f'topic_prefix = "{PREFIX}"',
        f'keep_alive = "{keep_alive}"',
        "",
        "[[bus]]",
        'name = "a"',
        f'rtu = {{ port = "{bus_port}", baud = 9600, parity = "none", stop_bits = 1 }}',
    ]
    if timeout:
        lines.append(f'timeout = "{timeout}"')
    for u in units:
        lines += [
            "",
            "[[detector]]",
            f'id = "A-{100 + u}"',
            'bus = "a"',
            f"unit = {u}",
            'profile = "generic-smoke"',
            'zone = "A"',
            f'location = "interop room {100 + u}"',
        ]
    lines += [
        "",
        "[[sounder]]",
        'id = "A-sounder"',
        'zones = ["A"]',
        'output = { bus = "a", unit = 100, coil = 0 }',
        "",
        "[panel]",
        'fire_led = { bus = "a", unit = 100, coil = 5 }',
        "",
    ]
    return "\n".join(lines)


def check_config(path: Path) -> None:
    res = subprocess.run([BIN, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise Failure(f"check-config refused {path} (exit {res.returncode}):\n{res.stdout}{res.stderr}\n--- config:\n{path.read_text()}")
    log(f"check-config: ok ({(res.stdout + res.stderr).strip().splitlines()[-1:] or ''})")


def workdir(name: str) -> Path:
    base = os.environ.get("INTEROP_TMP")
    d = Path(tempfile.mkdtemp(prefix=f"vgw-{name}-", dir=base))
    return d


def main(name: str, body) -> None:
    """Run `body(procs)`; print PASS/FAIL; always kill the children; exit 0/1."""
    if not os.access(BIN, os.X_OK):
        print(f"FAIL {name}: no gateway binary at {BIN} (cargo build --release, or set VGW_BIN)", flush=True)
        sys.exit(1)
    wd = workdir(name)
    procs = Procs(wd)
    t0 = time.monotonic()
    ok = False
    try:
        body(procs)
        ok = True
    except Failure as exc:
        print(f"FAIL {name}: {exc}", flush=True)
    except SystemExit as exc:
        print(f"FAIL {name}: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a crash of the test is a failure with a traceback
        import traceback

        traceback.print_exc()
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    finally:
        procs.kill_all()
    if ok:
        print(f"PASS {name} ({time.monotonic() - t0:.1f} s)", flush=True)
    else:
        print(f"  (logs kept in {wd})", flush=True)
    sys.exit(0 if ok else 1)


__all__ = [
    "BIN", "PREFIX", "Failure", "Mosquitto", "Observer", "Procs", "check_config", "free_port",
    "gateway_config", "log", "main", "re", "retained", "tail", "wait_until",
]
