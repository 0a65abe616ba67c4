"""Interop: the gateway against a third-party Modbus RTU slave (pymodbus) over a socat pty pair.

pymodbus serves the generic layout of shared/devices/generic.toml at 9600 8N1:
  units 1..4  generic-smoke: input registers 0..3 = status, smoke density, fault bits, heartbeat;
              holding register 16 = remote reset
  unit 100    generic-relay: coils 0..7 (sounders, LEDs), discrete inputs 0..7 (panel keys)
The gateway polls it through the other end of the pty pair. After it has polled unit 2 a few
times, unit 2's status register goes to 1 (alarm); within 10 s the sounder coil (unit 100 coil 0)
and the panel's fire LED (coil 5) must be 1 in pymodbus's datastore, and a fire.alarm event for
A-102 must arrive on mosquitto.

Run by hand: .venv/bin/python tests/interop/test_rtu_pymodbus.py (needs target/release/village-gateway,
socat and mosquitto on PATH).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pymodbus  # noqa: E402
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext  # noqa: E402
from pymodbus.framer import FramerType  # noqa: E402
from pymodbus.server import ModbusSerialServer  # noqa: E402

try:  # pymodbus >= 3.10
    from pymodbus.datastore import ModbusDeviceContext as DeviceContext

    DEVICES_KW = "devices"
except ImportError:  # pymodbus 3.0 .. 3.9
    from pymodbus.datastore import ModbusSlaveContext as DeviceContext

    DEVICES_KW = "slaves"

from common import (  # noqa: E402
    BIN,
    Failure,
    Mosquitto,
    Observer,
    check_config,
    free_port,
    gateway_config,
    log,
    main,
    wait_until,
)

GW = "interop-rtu"
FC_COILS, FC_DI, FC_HR, FC_IR = 1, 2, 3, 4
SMOKE_UNITS = (1, 2, 3, 4)
RELAY_UNIT = 100
ALARM_UNIT = 2


class CountingContext(DeviceContext):
    """A device context that counts the requests it answers (to know the gateway is polling)."""

    def __init__(self, unit: int, **blocks):
        super().__init__(**blocks)
        self.unit = unit
        self.reads = 0
        self.writes = 0

    def getValues(self, func_code, address, count=1):  # noqa: N802 - pymodbus's name
        self.reads += 1
        return super().getValues(func_code, address, count)

    def setValues(self, func_code, address, values):  # noqa: N802
        self.writes += 1
        return super().setValues(func_code, address, values)

    def poke(self, func_code: int, address: int, values: list[int]) -> None:
        """Change the device's own data (not counted as a write from the bus)."""
        DeviceContext.setValues(self, func_code, address, values)

    def peek(self, func_code: int, address: int) -> int:
        return DeviceContext.getValues(self, func_code, address, 1)[0]


def block(n: int) -> ModbusSequentialDataBlock:
    # pymodbus's device context adds 1 to every PDU address before it reaches the block, so a
    # block starting at 1 maps PDU address 0 to its first value.
    return ModbusSequentialDataBlock(1, [0] * n)


def build_context() -> tuple[ModbusServerContext, dict[int, CountingContext]]:
    devices: dict[int, CountingContext] = {}
    for u in SMOKE_UNITS:
        # input 0..3: status, density, fault bits, heartbeat; holding 0..31 (16 = remote reset)
        devices[u] = CountingContext(u, ir=block(8), hr=block(32), co=block(8), di=block(8))
    devices[RELAY_UNIT] = CountingContext(RELAY_UNIT, co=block(8), di=block(8), ir=block(8), hr=block(8))
    ctx = ModbusServerContext(**{DEVICES_KW: devices, "single": False})
    return ctx, devices


class SlaveThread(threading.Thread):
    """pymodbus's asyncio RTU server in its own thread and event loop, plus a 1 Hz heartbeat."""

    def __init__(self, port: str, ctx: ModbusServerContext, devices: dict[int, CountingContext]):
        super().__init__(daemon=True, name="pymodbus")
        self.port = port
        self.ctx = ctx
        self.devices = devices
        self.loop = asyncio.new_event_loop()
        self.server: ModbusSerialServer | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    async def _main(self) -> None:
        self.server = ModbusSerialServer(
            self.ctx,
            framer=FramerType.RTU,
            port=self.port,
            baudrate=9600,
            bytesize=8,
            parity="N",
            stopbits=1,
            # units without a context stay silent, like an absent device on RS-485
            ignore_missing_devices=True,
        )
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self.server.serve_forever()
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        n = 0
        while True:
            n = (n + 1) & 0xFFFF
            for u in SMOKE_UNITS:
                self.devices[u].poke(FC_IR, 3, [n])  # input register 3: heartbeat
            await asyncio.sleep(1)

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
            try:
                fut.result(5)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def test(procs) -> None:
    wd = procs.workdir
    log(f"pymodbus {pymodbus.__version__}, device contexts: {DeviceContext.__name__}({DEVICES_KW}=...)")

    # 1. the wire: a pty pair; the gateway gets one end, pymodbus the other
    gw_end, slave_end = wd / "gw", wd / "slave"
    procs.start("socat", ["socat", "-d", "-d", f"pty,raw,echo=0,link={gw_end}", f"pty,raw,echo=0,link={slave_end}"])
    wait_until(lambda: gw_end.exists() and slave_end.exists(), 10, f"socat to create {gw_end} and {slave_end}",
               logs=[procs.logpath("socat")])

    # 2. the broker and an observer
    port = free_port()
    broker = Mosquitto(procs, port)
    broker.start()
    obs = Observer(port, GW)

    # 3. the third-party slave
    ctx, devices = build_context()
    slave = SlaveThread(str(slave_end), ctx, devices)
    slave.start()
    try:
        time.sleep(0.5)
        if slave.error:
            raise Failure(f"pymodbus server failed to start: {slave.error!r}")

        # 4. the gateway
        state = wd / "state"
        state.mkdir()
        cfg = wd / "gateway.toml"
        cfg.write_text(gateway_config(GW, port, str(gw_end), state, keep_alive="5s", timeout="300ms"))
        check_config(cfg)
        gwlog = procs.logpath("gateway")
        gateway = procs.start("gateway", [BIN, "run", "--config", str(cfg)])
        logs = [gwlog]

        def polling():
            if gateway.poll() is not None:
                raise Failure(f"the gateway exited with {gateway.returncode}\n{open(gwlog).read()[-3000:]}")
            if slave.error:
                raise Failure(f"pymodbus server died: {slave.error!r}")
            return devices[ALARM_UNIT].reads >= 3

        wait_until(polling, 20, f"the gateway to poll unit {ALARM_UNIT} on the pymodbus slave (3 reads)", logs=logs)
        log("gateway polls: " + ", ".join(f"unit {u}: {d.reads} reads/{d.writes} writes" for u, d in devices.items()))
        obs.wait_status(True, 15, logs=logs)
        log("status online=true seen")
        for coil in (0, 5):
            value = devices[RELAY_UNIT].peek(FC_COILS, coil)
            if value:
                raise Failure(f"unit {RELAY_UNIT} coil {coil} is already on before any alarm")

        # 5. the alarm
        mark = obs.mark()
        devices[ALARM_UNIT].poke(FC_IR, 0, [1])
        t0 = time.monotonic()
        log(f"unit {ALARM_UNIT} status := 1 (alarm)")

        wait_until(lambda: devices[RELAY_UNIT].peek(FC_COILS, 0), 10,
                   f"the sounder coil (unit {RELAY_UNIT} coil 0) to turn on", logs=logs)
        log(f"PASS sounder coil 0 on after {time.monotonic() - t0:.2f} s")
        wait_until(lambda: devices[RELAY_UNIT].peek(FC_COILS, 5), max(0.5, 10 - (time.monotonic() - t0)),
                   f"the panel fire LED (unit {RELAY_UNIT} coil 5) to turn on", logs=logs)
        log(f"PASS fire LED coil 5 on after {time.monotonic() - t0:.2f} s")
        ev = obs.wait_event("fire.alarm", "A-102", max(0.5, 10 - (time.monotonic() - t0)), mark=mark, logs=logs)
        log(f"PASS fire.alarm for A-102 on mosquitto after {time.monotonic() - t0:.2f} s: seq {ev.get('seq')}")
        others = [u for u in SMOKE_UNITS if u != ALARM_UNIT and devices[u].reads == 0]
        if others:
            raise Failure(f"units {others} were never polled")
        obs.check_seq()
        procs.stop("gateway")
    finally:
        obs.close()
        slave.stop()


if __name__ == "__main__":
    main("rtu-pymodbus", test)
