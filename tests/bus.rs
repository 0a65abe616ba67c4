//! The field layer on bad buses, end to end: the real daemon (in this process, with its tap)
//! over pseudo-terminals against the built-in simulator, whose fault injection
//! ([`Simulator::inject`]) mangles replies on the wire. No MQTT broker: the uplink keeps
//! retrying a closed port, which never holds up alarming.
//!
//! "Within one scan cycle" is checked by counting, never by timing: between the instant a
//! detector's smoke starts and the sounder's confirmed write, the bus may complete at most one
//! scan cycle (the detector was polled just before the smoke, and is polled once more).

use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use village_gateway::config::{BusTransport, Config};
use village_gateway::daemon::{self, Tap};
use village_gateway::event::{DetectorStatus, EventKind, UnitId};
use village_gateway::field::frame::ExceptionCode;
use village_gateway::field::link::LinkStats;
use village_gateway::field::{BusStats, FieldReport};
use village_gateway::sim::{PtyGuard, ReplyFault, SimProfile, Simulator, SmokeState};

mod common;
use common::{village, BIN, RELAY};

/// Smoke density of the unit under fault: a marker no other detector reports.
const MARKER_DB_PER_M: f32 = 5.55;

/// A closed port: the uplink retries it in the background.
fn no_broker() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("mqtt://127.0.0.1:{port}")
}

/// The daemon running in this process, with its tap.
struct Gateway {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _state: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway for buses on `ports` (bus a, b, c... with zones A, B, C...), each with
    /// `per_bus` detectors (units 1..=per_bus) and a relay module (unit 100, sounder on coil 0).
    fn start(
        ports: &[String],
        per_bus: u8,
        tune: impl FnOnce(&mut Config),
    ) -> (Gateway, broadcast::Receiver<Tap>) {
        let state = tempfile::tempdir().unwrap();
        let mut config = Config::simulated_village(ports, per_bus, &no_broker(), state.path());
        tune(&mut config);
        let (tap_tx, tap) = broadcast::channel(8192);
        let stop = CancellationToken::new();
        let task = tokio::spawn(daemon::run(config, stop.clone(), Some(tap_tx)));
        (
            Gateway {
                stop,
                task,
                _state: state,
            },
            tap,
        )
    }

    /// Stops the daemon as SIGTERM would and checks that it ends cleanly (no poller panicked).
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits for the first tap item `f` maps to `Some`; panics after `limit`.
async fn until<T>(
    tap: &mut broadcast::Receiver<Tap>,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&Tap) -> Option<T>,
) -> T {
    tokio::time::timeout(limit, async {
        loop {
            match tap.recv().await {
                Ok(t) => {
                    if let Some(v) = f(&t) {
                        return v;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("tap lagged by {n}"),
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("gateway stopped while waiting for {what}")
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// The stats of a completed cycle of `bus`.
fn cycle_of<'a>(t: &'a Tap, bus: &str) -> Option<&'a BusStats> {
    match t {
        Tap::Field(FieldReport::Cycle { bus: b, stats, .. }) if b == bus => Some(stats),
        _ => None,
    }
}

fn sounder_on(t: &Tap, zone: &str) -> bool {
    matches!(t, Tap::Field(FieldReport::OutputWritten { name, on: true, ok: true, .. }) if *name == format!("{zone}-sounder"))
}

/// Waits for the sounder of `zone` to be confirmed on after the smoke started, and returns how
/// many scan cycles of `bus` completed in between. On the way, checks every reading: `forbid`
/// (a detector index) must never get one, and no detector but `marked` may carry the marker
/// density.
async fn cycles_until_sounder(
    tap: &mut broadcast::Receiver<Tap>,
    bus: &str,
    zone: &str,
    marked: usize,
    forbid: Option<usize>,
) -> usize {
    let mut cycles = 0;
    until(tap, Duration::from_secs(20), "sounder on", |t| {
        check_attribution(t, marked, forbid);
        if cycle_of(t, bus).is_some() {
            cycles += 1;
        }
        sounder_on(t, zone).then_some(cycles)
    })
    .await
}

fn check_attribution(t: &Tap, marked: usize, forbid: Option<usize>) {
    if let Tap::Field(FieldReport::Reading {
        detector, reading, ..
    }) = t
    {
        assert_ne!(
            Some(*detector),
            forbid,
            "a reading was attributed to the unit whose every reply is mangled: {reading:?}"
        );
        if *detector != marked {
            let marker = reading
                .smoke_db_per_m
                .is_some_and(|d| (d - MARKER_DB_PER_M).abs() < 0.001);
            assert!(
                !marker,
                "detector {detector} got the registers of detector {marked}"
            );
        }
    }
}

/// One bad-frame scenario on bus a (4 detectors, relay module): unit 2's replies are mangled
/// by `fault` (`replies` of them) while detector 3 starts to smoke. Checks that the alarm
/// reaches the sounder within one scan cycle, that no value lands on the wrong unit, that the
/// counters in the cycle reports satisfy `counted` (bus stats, then unit 2's), and that unit 2
/// is read again once the fault is gone (the line resynchronised).
async fn bad_frames(
    fault: ReplyFault,
    replies: u32,
    every_reply_mangled: bool,
    counted: impl Fn(&LinkStats, &LinkStats) -> bool,
) -> BusStats {
    let sim = village(4);
    let pty = sim.serve_pty().unwrap();
    let (gw, mut tap) = Gateway::start(&[pty.path().to_owned()], 4, |c| {
        c.buses[0].probe_interval = Duration::from_millis(300);
    });
    sim.set_density(UnitId(2), MARKER_DB_PER_M);
    // One full cycle with every unit answering first.
    let before = until(&mut tap, Duration::from_secs(10), "first cycle", |t| {
        cycle_of(t, "a").cloned()
    })
    .await;
    assert_eq!(before.link.failures(), 0, "a clean bus to start with");

    sim.inject(UnitId(2), fault, replies);
    sim.set_smoke(UnitId(3), SmokeState::Alarm);
    let forbid = every_reply_mangled.then_some(1);
    let cycles = cycles_until_sounder(&mut tap, "a", "A", 1, forbid).await;
    assert!(
        cycles <= 1,
        "the alarm took {cycles} complete scan cycles to reach the sounder"
    );
    let stats = until(
        &mut tap,
        Duration::from_secs(10),
        "the fault counted",
        |t| {
            check_attribution(t, 1, forbid);
            cycle_of(t, "a")
                .filter(|s| counted(&s.link, &s.units.get(&2).copied().unwrap_or_default()))
                .cloned()
        },
    )
    .await;
    // Only the faulty unit's transactions failed (a late reply may also cost the next one).
    for (unit, s) in &stats.units {
        assert!(
            *unit == 2 || *unit == 3 || s.failures() == 0,
            "unit {unit} was charged for unit 2's bad replies: {s:?}"
        );
    }

    sim.inject(UnitId(2), ReplyFault::Silent, 0);
    until(
        &mut tap,
        Duration::from_secs(10),
        "unit 2 read again",
        |t| {
            matches!(t, Tap::Field(FieldReport::Reading { detector: 1, reading, .. })
            if reading.status == DetectorStatus::Normal)
            .then_some(())
        },
    )
    .await;
    gw.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_before_a_reply_are_skipped_and_the_reply_is_still_read() {
    let stats = bad_frames(
        ReplyFault::StrayBytes(vec![0x00, 0xFF, 0x02, 0x04]),
        u32::MAX,
        false,
        |bus, unit| bus.skipped_bytes >= 8 && unit.skipped_bytes >= 8,
    )
    .await;
    // The reply after the noise was accepted: no poll of unit 2 was lost to it.
    assert_eq!(stats.units.get(&2).map_or(0, |u| u.timeouts), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_from_another_unit_is_counted_as_foreign_and_never_attributed() {
    bad_frames(
        ReplyFault::FromUnit(UnitId(3)),
        u32::MAX,
        true,
        |bus, unit| bus.foreign_frames >= 2 && unit.foreign_frames >= 2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_another_function_code_is_a_counted_frame_error() {
    bad_frames(ReplyFault::Function(0x03), u32::MAX, true, |bus, unit| {
        bus.frame_errors >= 2 && unit.frame_errors >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_reply_is_a_counted_timeout() {
    bad_frames(ReplyFault::Truncated(3), u32::MAX, true, |bus, unit| {
        bus.truncated >= 2 && unit.truncated >= 2 && unit.timeouts >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crc_error_is_counted_and_the_next_reply_is_read() {
    bad_frames(ReplyFault::BadCrc, u32::MAX, true, |bus, unit| {
        bus.crc_errors >= 2 && unit.crc_errors >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_reply_is_counted_with_its_code() {
    bad_frames(
        ReplyFault::Exception(ExceptionCode::SERVER_DEVICE_BUSY),
        u32::MAX,
        true,
        |bus, unit| bus.exceptions >= 2 && unit.exceptions >= 2 && unit.last_exception == Some(6),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_to_an_earlier_request_is_never_taken_for_the_next_units_reply() {
    // Later than the timeout (145 ms at 9600) plus the guard delay: it lands in the next
    // transaction (unit 3's), where it is skipped as a foreign frame, or is discarded as stale
    // input before the next request.
    bad_frames(
        ReplyFault::Late(Duration::from_millis(200)),
        1,
        false,
        |bus, unit| unit.timeouts >= 1 && (bus.foreign_frames >= 1 || bus.stale_bytes >= 13),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_adapter_is_read_past_and_a_write_to_a_dead_relay_still_fails() {
    let sim = village(4);
    sim.set_adapter_echo(true);
    let pty = sim.serve_pty().unwrap();
    let (gw, mut tap) = Gateway::start(&[pty.path().to_owned()], 4, |c| {
        if let BusTransport::Rtu { echo, .. } = &mut c.buses[0].transport {
            *echo = true;
        }
    });
    let before = until(&mut tap, Duration::from_secs(10), "first cycle", |t| {
        cycle_of(t, "a").cloned()
    })
    .await;
    assert_eq!(before.link.failures(), 0, "{before:?}");

    // The FC05 reply is byte-identical to the request: only reading the echo apart shows that
    // the dead module never answered.
    sim.set_offline(RELAY, true);
    sim.set_smoke(UnitId(3), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "a failed sounder write", |t| {
        matches!(t, Tap::Field(FieldReport::OutputWritten { name, on: true, ok: false, .. }) if name == "A-sounder")
            .then_some(())
    })
    .await;
    sim.set_offline(RELAY, false);
    until(&mut tap, Duration::from_secs(10), "sounder on", |t| {
        sounder_on(t, "A").then_some(())
    })
    .await;
    gw.stop().await;
}

/// Timeouts counted in a cycle report, and the probes.
fn timeouts(s: &BusStats) -> (u64, u64) {
    (s.link.timeouts, s.probes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_units_leave_the_scan_cost_at_most_one_timeout_per_cycle_and_rejoin_at_once() {
    let sim = village(8);
    let pty = sim.serve_pty().unwrap();
    let dead = [2u8, 3, 5, 8];
    for u in dead {
        sim.set_offline(UnitId(u), true);
    }
    let (gw, mut tap) = Gateway::start(&[pty.path().to_owned()], 8, |c| {
        c.buses[0].probe_interval = Duration::from_millis(200);
    });
    let mut offline_events = 0;
    let out = until(
        &mut tap,
        Duration::from_secs(20),
        "dead units out of the scan",
        |t| {
            if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOffline) {
                offline_events += 1;
            }
            cycle_of(t, "a")
                .filter(|s| s.offline_units == dead)
                .cloned()
        },
    )
    .await;

    // From now on: at most one timeout per completed cycle, and probes do happen.
    let (mut last_timeouts, first_probes) = timeouts(&out);
    let mut cycles = 0;
    let mut probes = first_probes;
    while cycles < 12 || probes < first_probes + 4 {
        let s = until(&mut tap, Duration::from_secs(10), "a cycle", |t| {
            if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOnline) {
                panic!("an offline unit flapped online: {t:?}");
            }
            if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOffline) {
                offline_events += 1;
            }
            cycle_of(t, "a").cloned()
        })
        .await;
        let (t, p) = timeouts(&s);
        assert!(
            t - last_timeouts <= 1,
            "a cycle with {} timeouts ({s:?})",
            t - last_timeouts
        );
        last_timeouts = t;
        probes = p;
        cycles += 1;
    }
    assert_eq!(
        offline_events,
        dead.len(),
        "each dead unit went offline once"
    );

    // Unit 5 comes back: it answers a probe and is in the very next cycle's scan.
    sim.set_offline(UnitId(5), false);
    until(&mut tap, Duration::from_secs(10), "device.online", |t| {
        matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOnline && e.data.device == Some("A-105".into()))
            .then_some(())
    })
    .await;
    let s = until(&mut tap, Duration::from_secs(10), "the next cycle", |t| {
        cycle_of(t, "a").cloned()
    })
    .await;
    assert_eq!(s.offline_units, [2, 3, 8]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bus_or_a_missing_port_does_not_delay_another_buses_alarm() {
    // Bus a: every unit dead (relay module included). Bus b: alive. Bus c: no such port.
    let dead = village(4);
    for u in (1..=4).map(UnitId).chain([RELAY]) {
        dead.set_offline(u, true);
    }
    let live = village(4);
    let (pty_a, pty_b) = (dead.serve_pty().unwrap(), live.serve_pty().unwrap());
    let ports = [
        pty_a.path().to_owned(),
        pty_b.path().to_owned(),
        "/dev/vgw-test-no-such-port".to_owned(),
    ];
    let (gw, mut tap) = Gateway::start(&ports, 4, |_| {});
    // Bus a's units are out of the scan, bus c has failed to open: both are at their worst.
    let mut a_out = false;
    let mut c_missed = 0;
    until(
        &mut tap,
        Duration::from_secs(20),
        "buses a and c dead",
        |t| {
            if cycle_of(t, "a").is_some_and(|s| s.offline_units.len() == 4) {
                a_out = true;
            }
            // Bus c's detectors are indices 8..12.
            if matches!(t, Tap::Field(FieldReport::Missed { detector, .. }) if *detector >= 8) {
                c_missed += 1;
            }
            (a_out && c_missed >= 8).then_some(())
        },
    )
    .await;
    until(&mut tap, Duration::from_secs(10), "a cycle of bus b", |t| {
        cycle_of(t, "b").map(|_| ())
    })
    .await;

    live.set_smoke(UnitId(2), SmokeState::Alarm);
    let cycles = cycles_until_sounder(&mut tap, "b", "B", usize::MAX, None).await;
    assert!(cycles <= 1, "bus b's alarm took {cycles} complete cycles");
    gw.stop().await;
}

/// A serial device path that can disappear and come back, like `/dev/serial/by-id/...` of a
/// USB adapter: a symlink to the simulator's current pty.
struct Adapter {
    link: std::path::PathBuf,
    pty: Option<PtyGuard>,
}

impl Adapter {
    fn plug(&mut self, sim: &Simulator) {
        let pty = sim.serve_pty().unwrap();
        std::os::unix::fs::symlink(pty.path(), &self.link).unwrap();
        self.pty = Some(pty);
    }

    fn unplug(&mut self) {
        std::fs::remove_file(&self.link).unwrap();
        // Closes the pty: the gateway's reads fail, and its path is gone.
        self.pty = None;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_adapter_takes_its_units_offline_and_back_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim_a = village(3);
    let mut adapter = Adapter {
        link: dir.path().join("usb-FTDI_FT232R-if00-port0"),
        pty: None,
    };
    adapter.plug(&sim_a);
    let sim_b = village(3);
    let pty_b = sim_b.serve_pty().unwrap();
    let ports = [
        adapter.link.to_string_lossy().into_owned(),
        pty_b.path().to_owned(),
    ];
    let (gw, mut tap) = Gateway::start(&ports, 3, |_| {});
    until(&mut tap, Duration::from_secs(10), "a cycle of bus a", |t| {
        cycle_of(t, "a").map(|_| ())
    })
    .await;

    adapter.unplug();
    // Bus a's three detectors go offline; bus b keeps scanning meanwhile.
    // The relay module behind it is out of reach too: its sounder is a sounder fault, even
    // while nothing asks it to sound.
    let mut offline = Vec::new();
    let mut sounder_fault = false;
    let mut b_cycles = 0;
    until(&mut tap, Duration::from_secs(20), "bus a offline", |t| {
        if cycle_of(t, "b").is_some() {
            b_cycles += 1;
        }
        if let Tap::Raised(e) = t {
            if e.kind == EventKind::DeviceOffline {
                offline.push(e.data.device.clone().map(|d| d.0).unwrap_or_default());
            }
            if e.kind == EventKind::SounderFault && e.data.device == Some("A-sounder".into()) {
                sounder_fault = true;
            }
        }
        (offline.len() == 3 && sounder_fault).then_some(())
    })
    .await;
    offline.sort();
    assert_eq!(offline, ["A-101", "A-102", "A-103"]);
    assert!(b_cycles >= 1, "bus b stopped while bus a was unplugged");

    // An alarm on bus b while bus a is gone.
    sim_b.set_smoke(UnitId(1), SmokeState::Alarm);
    let cycles = cycles_until_sounder(&mut tap, "b", "B", usize::MAX, None).await;
    assert!(cycles <= 1, "bus b's alarm took {cycles} complete cycles");

    // Plugged in again (a new pty behind the same path): back without a restart.
    adapter.plug(&sim_a);
    let mut online = Vec::new();
    let mut sounder_back = false;
    let stats = until(&mut tap, Duration::from_secs(20), "bus a online", |t| {
        if let Tap::Raised(e) = t {
            if e.kind == EventKind::DeviceOnline {
                online.push(e.data.device.clone().map(|d| d.0).unwrap_or_default());
            }
            if e.kind == EventKind::DeviceFaultCleared && e.data.device == Some("A-sounder".into())
            {
                sounder_back = true;
            }
        }
        cycle_of(t, "a")
            .filter(|_| online.len() == 3 && sounder_back)
            .cloned()
    })
    .await;
    assert!(stats.reopens >= 1, "{stats:?}");
    assert!(stats.offline_units.is_empty(), "{stats:?}");
    gw.stop().await;
}

/// Runs the binary with `args`; (exit ok, stdout, stderr).
async fn gateway_cli(args: Vec<String>) -> (bool, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_lists_the_units_that_answer_and_the_profile_they_fit() {
    let sim = Simulator::new(
        9600,
        [
            (UnitId(1), SimProfile::Smoke),
            (UnitId(3), SimProfile::Smoke),
            (UnitId(50), SimProfile::Door),
            (RELAY, SimProfile::Relay),
        ],
    );
    sim.set_smoke(UnitId(3), SmokeState::Alarm);
    sim.set_offline(UnitId(1), true);
    let pty = sim.serve_pty().unwrap();
    let (ok, out, err) = gateway_cli(args(&format!(
        "scan --port {} --baud 9600 --units 1-5,50,99-100 --timeout 300ms",
        pty.path()
    )))
    .await;
    assert!(ok, "{out}\n{err}");
    let units: Vec<&str> = out.lines().filter(|l| l.starts_with("unit ")).collect();
    assert_eq!(
        units,
        [
            "unit 3: generic-smoke",
            "unit 50: generic-door",
            "unit 100: generic-relay"
        ],
        "{out}"
    );
    assert!(out.contains("status ALARM"), "{out}");
    assert!(out.contains("3 unit(s) answered"), "{out}");
    // Units 1, 2, 4, 5 and 99 are silent: one timeout each.
    assert!(out.contains(" 5 timeouts,"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_prints_registers_coils_and_discrete_inputs_over_rtu_and_tcp() {
    let sim = village(2);
    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    sim.set_density(UnitId(2), 1.25);
    sim.set_coil(RELAY, 1, true);
    sim.set_key(RELAY, 2, true);
    let pty = sim.serve_pty().unwrap();
    let port = format!("--port {}", pty.path());

    let (ok, out, err) = gateway_cli(args(&format!("read {port} --unit 2 --input 0 2"))).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("input register 0 = 1 (0x0001)\ninput register 1 = 125 (0x007d)\n"),
        "{out}"
    );
    assert!(out.contains("bus: 1 transactions, 0 timeouts"), "{out}");

    let (ok, out, _) = gateway_cli(args(&format!("read {port} --unit 100 --coil 0 3"))).await;
    assert!(ok);
    assert!(
        out.starts_with("coil 0 = 0\ncoil 1 = 1\ncoil 2 = 0\n"),
        "{out}"
    );
    let (ok, out, _) = gateway_cli(args(&format!("read {port} --unit 100 --discrete 2 1"))).await;
    assert!(ok);
    assert!(out.starts_with("discrete input 2 = 1\n"), "{out}");
    let (ok, out, _) = gateway_cli(args(&format!("read {port} --unit 1 --holding 16 1"))).await;
    assert!(ok);
    assert!(
        out.starts_with("holding register 16 = 0 (0x0000)\n"),
        "{out}"
    );

    // A refusal is an error with its exception code; a silent unit is an error.
    let (ok, _, err) = gateway_cli(args(&format!("read {port} --unit 1 --input 10 1"))).await;
    assert!(!ok);
    assert!(
        err.contains("exception 0x02 (illegal data address)"),
        "{err}"
    );
    let (ok, _, err) = gateway_cli(args(&format!(
        "read {port} --unit 9 --input 0 1 --timeout 30ms"
    )))
    .await;
    assert!(!ok);
    assert!(err.contains("no complete reply"), "{err}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = sim.clone();
    let server = tokio::spawn(async move { served.serve_tcp(listener).await });
    let (ok, out, err) =
        gateway_cli(args(&format!("read --tcp {addr} --unit 2 --input 0 1"))).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("input register 0 = 1 (0x0001)\n"), "{out}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_bus_that_comes_back_rejoins_one_unit_per_cycle_not_one_per_probe_interval() {
    let sim = village(4);
    let pty = sim.serve_pty().unwrap();
    // The default probe_interval (5 s): the units must not wait for it one after the other.
    let (gw, mut tap) = Gateway::start(&[pty.path().to_owned()], 4, |_| {});
    until(&mut tap, Duration::from_secs(10), "a cycle", |t| {
        cycle_of(t, "a").map(|_| ())
    })
    .await;
    // The cable is cut: every detector times out (the port itself is fine).
    for u in 1..=4 {
        sim.set_offline(UnitId(u), true);
    }
    until(
        &mut tap,
        Duration::from_secs(20),
        "all out of the scan",
        |t| {
            cycle_of(t, "a")
                .filter(|s| s.offline_units.len() == 4)
                .map(|_| ())
        },
    )
    .await;
    for u in 1..=4 {
        sim.set_offline(UnitId(u), false);
    }
    // Every unit is due: one probe per cycle brings them back, not one per probe_interval.
    let mut online = 0;
    let mut cycles_since_first = 0;
    until(&mut tap, Duration::from_secs(20), "all back", |t| {
        if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOnline) {
            online += 1;
        }
        if online > 0 && cycle_of(t, "a").is_some() {
            cycles_since_first += 1;
        }
        (online == 4).then_some(())
    })
    .await;
    assert!(
        cycles_since_first <= 4,
        "the last unit came back {cycles_since_first} cycles after the first"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_converter_that_drops_its_connections_is_reconnected_without_a_restart() {
    let sim = village(3);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = sim.clone();
    let server = tokio::spawn(async move { served.serve_tcp(listener).await });
    let (gw, mut tap) = Gateway::start(&["unused".to_owned()], 3, |c| {
        c.buses[0].transport = BusTransport::Tcp {
            addr: addr.to_string(),
        };
    });
    until(&mut tap, Duration::from_secs(10), "a cycle", |t| {
        cycle_of(t, "a").map(|_| ())
    })
    .await;

    // The converter reboots: its connections drop and it refuses new ones for a while.
    server.abort();
    let _ = server.await;
    let mut offline = 0;
    until(&mut tap, Duration::from_secs(20), "all offline", |t| {
        if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOffline) {
            offline += 1;
        }
        (offline == 3).then_some(())
    })
    .await;

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let served = sim.clone();
    let server = tokio::spawn(async move { served.serve_tcp(listener).await });
    let mut online = 0;
    let stats = until(&mut tap, Duration::from_secs(20), "all online", |t| {
        if matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOnline) {
            online += 1;
        }
        cycle_of(t, "a").filter(|_| online == 3).cloned()
    })
    .await;
    assert!(stats.reopens >= 1, "{stats:?}");
    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "sounder on", |t| {
        sounder_on(t, "A").then_some(())
    })
    .await;
    server.abort();
    gw.stop().await;
}

/// The per-bus counters reach upstream in the retained status, refreshed by a `status` command.
#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_message_carries_each_buses_counters() {
    let broker = village_gateway::broker::start(0).unwrap();
    let sim = village(2);
    let pty = sim.serve_pty().unwrap();
    sim.inject(UnitId(2), ReplyFault::BadCrc, 1);
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let (gw, mut tap) = Gateway::start(&[pty.path().to_owned()], 2, |c| {
        c.uplink.url = url;
    });
    until(
        &mut tap,
        Duration::from_secs(10),
        "a counted CRC error",
        |t| {
            cycle_of(t, "a")
                .filter(|s| s.link.crc_errors == 1)
                .map(|_| ())
        },
    )
    .await;

    let mut opts = rumqttc::MqttOptions::new("officer", "127.0.0.1", broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    client
        .subscribe("village/demo/status", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "village/demo/cmd/status",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"id":"s1"}"#,
        )
        .await
        .unwrap();
    let bus = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                eventloop.poll().await.unwrap()
            {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                if v["buses"]["a"]["transactions"].as_u64().unwrap_or(0) > 0 {
                    return v["buses"]["a"].clone();
                }
            }
        }
    })
    .await
    .expect("a status with bus a's counters");
    assert_eq!(bus["crc_errors"], 1, "{bus}");
    assert_eq!(bus["units"]["2"]["crc_errors"], 1, "{bus}");
    assert!(bus["worst_cycle_ms"].as_u64().unwrap() >= bus["cycle_ms"].as_u64().unwrap());
    gw.stop().await;
}
