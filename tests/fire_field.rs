//! The field side of a fire alarm control unit (issue 3), end to end: the real daemon in this
//! process over a pseudo-terminal against the built-in simulator, with the embedded MQTT
//! broker. Alarm confirmation by a re-read, relay coil read-back, panel keys on discrete
//! inputs, and `check-config`'s worst-case detection figure.
//!
//! The fixtures are `tests/common`'s: tests await the daemon's tap and the simulator's events,
//! never a sleep.

#![cfg(feature = "embedded-broker")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use village_gateway::config::{Config, InputSpec};
use village_gateway::daemon::{self, Tap};
use village_gateway::event::{Event, EventKind, UnitId};
use village_gateway::field::FieldReport;
use village_gateway::sim::{SimChange, SimEvent, SmokeState};

mod common;
use common::{until, written, Village, BIN, RELAY};

const SILENCE_INPUT: u16 = 0;
const RESET_INPUT: u16 = 1;
const LIMIT: Duration = Duration::from_secs(10);

/// The daemon running in this process, with its tap.
struct Gateway {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    tap: broadcast::Receiver<Tap>,
}

impl Gateway {
    fn start(config: Config) -> Gateway {
        let (tap_tx, tap) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let task = tokio::spawn(daemon::run(config, stop.clone(), Some(tap_tx)));
        Gateway { stop, task, tap }
    }

    /// The first tap for which `f` holds; panics after [`LIMIT`].
    async fn until(&mut self, what: &str, f: impl Fn(&Tap) -> bool) -> Tap {
        until(&mut self.tap, LIMIT, what, f).await
    }

    /// The event of `kind` (about `device`, if given) the engine raises next.
    async fn raised(&mut self, kind: EventKind, device: Option<&str>) -> Event {
        let what = format!("{kind} {}", device.unwrap_or(""));
        let t = self
            .until(&what, |t| {
                matches!(t, Tap::Raised(e) if e.kind == kind
                    && device.is_none_or(|d| e.data.device == Some(d.into())))
            })
            .await;
        let Tap::Raised(e) = t else { unreachable!() };
        e
    }

    /// Every tap until `n` scan cycles of the bus have ended.
    async fn cycles(&mut self, n: usize) -> Vec<Tap> {
        let mut seen = Vec::new();
        let mut cycles = 0;
        tokio::time::timeout(LIMIT, async {
            while cycles < n {
                match self.tap.recv().await {
                    Ok(t) => {
                        if matches!(t, Tap::Field(FieldReport::Cycle { .. })) {
                            cycles += 1;
                        }
                        seen.push(t);
                    }
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        panic!("the test fell {k} taps behind")
                    }
                    Err(broadcast::error::RecvError::Closed) => panic!("gateway stopped"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} scan cycles did not end within {LIMIT:?}"));
        seen
    }

    /// Stops the daemon as SIGTERM would and checks that it ends cleanly.
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A raised event of `kind`.
fn is_raised(t: &Tap, kind: EventKind) -> bool {
    matches!(t, Tap::Raised(e) if e.kind == kind)
}

/// A report of the panel key `name` read as `on`.
fn key_read(t: &Tap, key: &str, level: bool) -> bool {
    matches!(t, Tap::Field(FieldReport::Input { name, on, .. }) if name == key && *on == Some(level))
}

/// Waits until the simulated relay module has received a write of `on` to `coil`.
async fn coil_written(events: &mut broadcast::Receiver<SimEvent>, coil: u16, on: bool) {
    tokio::time::timeout(LIMIT, async {
        loop {
            let e = events.recv().await.unwrap();
            if e.unit == RELAY && e.what == (SimChange::CoilWritten { address: coil, on }) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("coil {coil} was not written {on} within {LIMIT:?}"));
}

/// An event raised by a panel key, not by an upstream command.
fn assert_from_the_panel_key(e: &Event) {
    assert_eq!(e.data.command, None, "{e:?}");
    assert_eq!(e.data.reason.as_deref(), Some("panel key"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_read_alarm_glitch_neither_latches_nor_sounds_but_a_real_alarm_does() {
    let v = Village::on_a_pty(2);
    let mut gw = Gateway::start(v.config.clone());
    gw.cycles(1).await;

    // The next read of A-101 says alarm; the confirming re-read says normal.
    v.sim.glitch_alarm(UnitId(1), 1);
    // Two cycles: one whole scan after the glitch was set, so A-101 has been read.
    let seen = gw.cycles(2).await;
    assert!(
        !seen.iter().any(|t| is_raised(t, EventKind::FireAlarm)),
        "a glitch latched a fire: {seen:?}"
    );
    assert!(
        !seen.iter().any(
            |t| matches!(t, Tap::OutputWanted { output, on: true, .. } if output == "A-sounder")
        ),
        "a glitch asked for the sounder: {seen:?}"
    );
    assert_eq!(v.sim.coil(RELAY, 0), Some(false), "the sounder is silent");

    // Real smoke in the same detector: confirmed by the re-read, latched, sounded.
    v.sim.set_smoke(UnitId(1), SmokeState::Alarm);
    gw.raised(EventKind::FireAlarm, Some("A-101")).await;
    gw.until("the sounder on", |t| written(t, "A-sounder", true))
        .await;
    assert_eq!(v.sim.coil(RELAY, 0), Some(true));
    gw.stop().await;
}

/// The control for the test above: the same glitch does reach the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_confirm_alarm_a_one_read_glitch_latches_a_fire() {
    let mut v = Village::on_a_pty(2);
    for d in &mut v.config.detectors {
        d.confirm_alarm = false;
    }
    let mut gw = Gateway::start(v.config.clone());
    gw.cycles(1).await;
    v.sim.glitch_alarm(UnitId(1), 1);
    gw.raised(EventKind::FireAlarm, Some("A-101")).await;
    gw.until("the sounder on", |t| written(t, "A-sounder", true))
        .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_module_that_lost_its_coils_is_a_sounder_fault_and_is_written_again() {
    let mut v = Village::on_a_pty(2);
    v.config.buses[0].readback_interval = Duration::from_millis(300);
    let mut coils = v.sim.subscribe();
    let mut gw = Gateway::start(v.config.clone());
    v.sim.set_smoke(UnitId(1), SmokeState::Alarm);
    gw.until("the sounder on", |t| written(t, "A-sounder", true))
        .await;
    coil_written(&mut coils, 0, true).await;

    // The module loses power for a moment and comes back with its coils off.
    v.sim.set_coil(RELAY, 0, false);
    let fault = gw.raised(EventKind::SounderFault, Some("A-sounder")).await;
    assert!(
        fault
            .data
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("read-back")),
        "{fault:?}"
    );
    coil_written(&mut coils, 0, true).await;
    gw.raised(EventKind::DeviceFaultCleared, Some("A-sounder"))
        .await;
    assert_eq!(v.sim.coil(RELAY, 0), Some(true), "the sounder sounds again");
    assert_eq!(
        v.sim.coil(RELAY, 5),
        Some(true),
        "the fire LED was never touched"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_silence_and_reset_keys_on_discrete_inputs_silence_and_reset_a_latched_alarm() {
    let v = Village::on_a_pty(2);
    let mut gw = Gateway::start(v.config.clone());
    v.sim.set_smoke(UnitId(2), SmokeState::Alarm);
    gw.raised(EventKind::FireAlarm, Some("A-102")).await;
    gw.until("the sounder on", |t| written(t, "A-sounder", true))
        .await;

    // Silence: the sounder stops, the fire LED stays on.
    v.sim.set_key(RELAY, SILENCE_INPUT, true);
    let silenced = gw.raised(EventKind::AlarmSilenced, None).await;
    assert_from_the_panel_key(&silenced);
    gw.until("the sounder off", |t| written(t, "A-sounder", false))
        .await;
    assert_eq!(
        v.sim.coil(RELAY, 5),
        Some(true),
        "silence keeps the fire LED"
    );
    v.sim.set_key(RELAY, SILENCE_INPUT, false);

    // The smoke clears; the alarm stays latched until the reset key.
    v.sim.set_smoke(UnitId(2), SmokeState::Normal);
    gw.raised(EventKind::FireRestored, Some("A-102")).await;
    assert_eq!(v.sim.coil(RELAY, 5), Some(true), "still latched");
    v.sim.set_key(RELAY, RESET_INPUT, true);
    let reset = gw.raised(EventKind::AlarmReset, None).await;
    assert_from_the_panel_key(&reset);
    gw.until("the fire LED off", |t| written(t, "panel fire LED", false))
        .await;
    v.sim.set_key(RELAY, RESET_INPUT, false);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_key_held_at_start_is_not_a_press() {
    let v = Village::on_a_pty(2);
    // Smoke and a stuck key before the gateway starts: the first scan latches the alarm, then
    // reads the key held.
    v.sim.set_smoke(UnitId(1), SmokeState::Alarm);
    v.sim.set_key(RELAY, SILENCE_INPUT, true);
    let mut gw = Gateway::start(v.config.clone());
    let (mut latched, mut held) = (false, false);
    while !(latched && held) {
        let t = gw
            .until("the alarm latched and the key read held", |t| {
                is_raised(t, EventKind::FireAlarm) || key_read(t, "silence_key", true)
            })
            .await;
        latched |= is_raised(&t, EventKind::FireAlarm);
        held |= key_read(&t, "silence_key", true);
    }
    // Had the engine taken it for a press, the silence would be raised before the next
    // report of the bus (the engine loop handles reports in order).
    let seen = gw.cycles(1).await;
    assert!(
        !seen.iter().any(|t| is_raised(t, EventKind::AlarmSilenced)),
        "a key held at start silenced the alarm: {seen:?}"
    );
    assert_eq!(v.sim.coil(RELAY, 0), Some(true), "the sounder still sounds");

    // Released and pressed again, it is a press.
    v.sim.set_key(RELAY, SILENCE_INPUT, false);
    gw.until("the silence key read released", |t| {
        key_read(t, "silence_key", false)
    })
    .await;
    v.sim.set_key(RELAY, SILENCE_INPUT, true);
    gw.raised(EventKind::AlarmSilenced, None).await;
    gw.stop().await;
}

/// Off a Raspberry Pi a GPIO key cannot be opened: the daemon hears of it through the key's
/// report, and goes on guarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpio_key_that_cannot_be_opened_is_reported_unreadable_and_alarms_still_sound() {
    if std::fs::read_to_string("/proc/device-tree/model").is_ok_and(|m| m.contains("Raspberry")) {
        return;
    }
    let mut v = Village::on_a_pty(2);
    v.config.panel.silence_key = Some(InputSpec::Gpio {
        pin: 13,
        active_low: true,
    });
    let mut gw = Gateway::start(v.config.clone());
    gw.until("the silence key reported unreadable", |t| {
        matches!(t, Tap::Field(FieldReport::Input { name, on: None, .. }) if name == "silence_key")
    })
    .await;
    v.sim.set_smoke(UnitId(2), SmokeState::Alarm);
    gw.until("the sounder on", |t| written(t, "A-sounder", true))
        .await;
    gw.stop().await;
}

fn check_config(text: &str, dir: &Path) -> std::process::Output {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

/// A config of one RTU bus at `baud` with `n` generic-smoke detectors and a sounder.
fn one_bus(n: u8, baud: u32) -> String {
    let mut text = format!(
        "[gateway]\nid = \"t\"\n[uplink]\nurl = \"mqtt://127.0.0.1:1883\"\n\
         [[bus]]\nname = \"a\"\nrtu = {{ port = \"/dev/ttyUSB0\", baud = {baud} }}\n\
         [[sounder]]\nid = \"S\"\nzones = [\"A\"]\noutput = {{ bus = \"a\", unit = 247, coil = 0 }}\n"
    );
    for u in 1..=n {
        text.push_str(&format!(
            "[[detector]]\nid = \"D{u}\"\nbus = \"a\"\nunit = {u}\nzone = \"A\"\n"
        ));
    }
    text
}

#[test]
fn check_config_prints_the_worst_case_per_bus_and_refuses_a_bus_over_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let good = check_config(&one_bus(32, 9600), dir.path());
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        stdout.contains("\n  bus a (9600 baud): ") && stdout.contains("scan cycle "),
        "{stdout}"
    );

    let bad = check_config(&one_bus(200, 1200), dir.path());
    assert_eq!(bad.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    let line = one_bus(200, 1200)
        .lines()
        .position(|l| l == "[[bus]]")
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!(
            "gateway.toml:{line}: bus[0]: bus \"a\": worst-case detection time "
        )) && stderr.contains("exceeds the 10 s"),
        "{stderr}"
    );
}
