"""Interop: the gateway over mutual TLS (rustls) to a real mosquitto that requires client
certificates and a username/password.

Certificates are generated here with the openssl CLI (a CA, a server certificate for
"localhost", a client certificate); the password file with mosquitto_passwd. mosquitto gets two
listeners: TLS on one port (require_certificate true, password_file, no anonymous) for the
gateway, plain on another (anonymous, 127.0.0.1) for this test's observer. Checks, in order:
  1. no client certificate: the connection is refused, the gateway logs "Cannot connect upstream"
     with the TLS alert (CertificateRequired), keeps running, and nothing of it reaches the
     broker; SIGTERM exits 0
  2. client certificate but a wrong password: refused (NotAuthorized, logged), still running,
     nothing arrives
  3. client certificate and the right password (password_file): retained status online, and
     `alarm 1` -> a fire.alarm event for A-101

Run by hand: .venv/bin/python tests/interop/test_tls.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BIN,
    Failure,
    Observer,
    check_config,
    free_port,
    gateway_config,
    log,
    main,
    tail,
    wait_until,
)
from test_mosquitto import Simulator  # noqa: E402

GW = "interop-tls"
USER = "vgw-interop"
PASSWORD = "s3cret-interop"


def openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise Failure(f"openssl {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")


def make_pki(d: Path) -> None:
    """ca.pem/ca.key, server.pem/server.key (localhost, 127.0.0.1), client.pem/client.key."""
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=interop test CA", cwd=d)
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={'localhost' if name == 'server' else USER}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    # PKCS#8 for the client key (rustls-pemfile reads PKCS#8, PKCS#1 and SEC1 alike).
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "client.key", "-out", "client.pk8.key", cwd=d)


def test(procs) -> None:
    wd = procs.workdir
    pki = wd / "pki"
    make_pki(pki)
    pwfile = wd / "mosquitto.passwd"
    res = subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), USER, PASSWORD],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise Failure(f"mosquitto_passwd failed: {res.stderr}")
    os.chmod(pwfile, 0o600)

    tls_port, plain_port = free_port(), free_port()
    conf = wd / "mosquitto.conf"
    conf.write_text(
        "per_listener_settings true\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        "connection_messages true\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"listener {plain_port} 127.0.0.1\nallow_anonymous true\n"
        + f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\nallow_anonymous false\n"
        f"password_file {pwfile}\n"
    )
    procs.start("mosquitto", ["mosquitto", "-c", str(conf)])
    mqlog = procs.logpath("mosquitto")

    def listening():
        import socket

        try:
            with socket.create_connection(("127.0.0.1", plain_port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(listening, 10, f"mosquitto on {plain_port}", logs=[mqlog])
    sim = Simulator(procs)
    obs = Observer(plain_port, GW)
    base = f"village/{GW}"
    state = wd / "state"
    state.mkdir()
    good_pw = wd / "password"
    good_pw.write_text(PASSWORD + "\n")
    bad_pw = wd / "wrong-password"
    bad_pw.write_text("not-the-password\n")

    def config(name: str, extra: list[str]) -> Path:
        text = gateway_config(GW, tls_port, sim.pty, state, keep_alive="5s")
        text = text.replace(f'url = "mqtt://127.0.0.1:{tls_port}"',
                            "\n".join([f'url = "mqtts://localhost:{tls_port}"'] + extra))
        cfg = wd / f"{name}.toml"
        cfg.write_text(text)
        check_config(cfg)
        return cfg

    def refused(name: str, cfg: Path, what: str, reason: str) -> None:
        gwlog = procs.logpath(name)
        mark = obs.mark()
        gw = procs.start(name, [BIN, "run", "--config", str(cfg)])
        wait_until(lambda: "Cannot connect upstream" in gwlog.read_text(errors="replace"), 20,
                   f"the gateway to log that it cannot connect ({what})", logs=[gwlog, mqlog])
        line = next(l for l in gwlog.read_text(errors="replace").splitlines() if "Cannot connect upstream" in l)
        if reason.lower() not in line.lower():
            raise Failure(f"the refusal ({what}) does not name {reason!r}: {line}")
        # Still running after a few more attempts (backoff), and nothing of it reached mosquitto.
        time.sleep(3)
        if gw.poll() is not None:
            raise Failure(f"the gateway exited with {gw.returncode} after a refused connection ({what})\n{tail(gwlog)}")
        got = [m for m in obs.since(mark) if m.topic.startswith(base)]
        if got:
            raise Failure(f"messages arrived although the connection should be refused ({what}): {got[:3]}")
        rc = procs.stop(name, signal.SIGTERM, timeout=15)
        if rc != 0:
            raise Failure(f"the gateway exited with {rc} after SIGTERM ({what})\n{tail(gwlog)}")
        log(f"PASS {what}: refused, logged, no crash: {line.strip()[-220:]}")

    try:
        common = [f'ca_file = "{pki / "ca.pem"}"', f'username = "{USER}"']
        # 1. no client certificate
        refused("gateway-nocert", config("nocert", common + [f'password_file = "{good_pw}"']),
                "no client certificate", reason="CertificateRequired")
        # 2. the certificate, but a wrong password
        with_cert = common + [f'cert_file = "{pki / "client.pem"}"', f'key_file = "{pki / "client.pk8.key"}"']
        refused("gateway-badpw", config("badpw", with_cert + [f'password_file = "{bad_pw}"']),
                "wrong password", reason="NotAuthorized")
        # 3. everything right
        cfg = config("good", with_cert + [f'password_file = "{good_pw}"'])
        gwlog = procs.logpath("gateway")
        procs.start("gateway", [BIN, "run", "--config", str(cfg)])
        obs.wait_status(True, 20, logs=[gwlog, mqlog])
        log("PASS mutual TLS + password: retained status online")
        mark = obs.mark()
        sim.say("alarm 1")
        ev = obs.wait_event("fire.alarm", "A-101", 15, mark=mark, logs=[gwlog, mqlog])
        log(f"PASS fire.alarm A-101 over mutual TLS, seq {ev.get('seq')}")
        rc = procs.stop("gateway", signal.SIGTERM, timeout=15)
        if rc != 0:
            raise Failure(f"the gateway exited with {rc} after SIGTERM\n{tail(gwlog)}")
    finally:
        obs.close()


if __name__ == "__main__":
    main("tls", test)
