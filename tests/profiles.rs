//! Detector profiles of the installer's own (`[profile.NAME]`) through the real daemon, over a
//! pseudo-terminal against the built-in simulator: the read plan reads the status every scan
//! cycle and the slow points every Nth cycle, and an alarm still latches and sounds.
// Needs the embedded broker (like `tests/gateway.rs`, whose `required-features` say so).
#![cfg(feature = "embedded-broker")]

use std::time::Duration;

use village_gateway::event::UnitId;
use village_gateway::sim::SmokeState;

mod common;
use common::*;

/// `generic-smoke`'s points, with the heartbeat (register 3) read every 4th scan cycle.
/// (Density, register 1, lies in the gap between status and fault bits, so it is read with
/// them anyway: reading a 1-register gap is cheaper than a request of its own.)
const SLOW_PROFILE: &str = r#"
[profile.slow]
status = { table = "input", address = 0, values = { normal = 0, alarm = 1, fault = 2, pre_alarm = 3, test = 4 } }
smoke_density = { table = "input", address = 1, scale = 0.01, every = 4 }
fault_bits = { table = "input", address = 2 }
heartbeat = { table = "input", address = 3, every = 4 }
remote_reset = { address = 16, value = 1 }
"#;

/// Waits until `done` holds, checking the simulator's counters every 20 ms; panics after 20 s.
async fn until_sim(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen within 20 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_with_slow_points_reads_them_every_4th_cycle_and_still_sounds_an_alarm() {
    let sim = village(4);
    let pty = sim.serve_pty().unwrap();
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = write_config(dir.path(), pty.path(), 4, broker.port(), &state);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("zone = \"A\"\n", "zone = \"A\"\nprofile = \"slow\"\n");
    assert_eq!(text.matches("profile = \"slow\"").count(), 4, "{text}");
    std::fs::write(&path, format!("{text}{SLOW_PROFILE}")).unwrap();

    let mut sub = Subscriber::connect(broker.port(), "it-profiles").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;
    let _daemon = Daemon::spawn(&path);

    // Let the daemon scan at least 40 cycles (unit 1's status register read 40 times).
    until_sim("40 scan cycles", || {
        sim.input_register_reads(UnitId(1), 0) >= 40
    })
    .await;
    for unit in 1..=4 {
        let unit = UnitId(unit);
        let status = sim.input_register_reads(unit, 0);
        let fault_bits = sim.input_register_reads(unit, 2);
        let heartbeat = sim.input_register_reads(unit, 3);
        // Alarm and fault points: every cycle (the counters are read one after the other
        // while the daemon keeps scanning, hence the slack of one cycle).
        assert!(
            fault_bits.abs_diff(status) <= 1,
            "unit {unit}: status {status}, fault bits {fault_bits}"
        );
        // The heartbeat: once every 4 cycles, plus the first poll that reads every point.
        let expected = status / 4;
        assert!(
            heartbeat.abs_diff(expected) <= 2,
            "unit {unit}: heartbeat read {heartbeat} times in {status} cycles, expected about {expected}"
        );
    }

    // An alarm still latches and drives the sounder (relay unit 100, coil 0).
    let mut events = sim.subscribe();
    sim.set_smoke(UnitId(3), SmokeState::Alarm);
    coil_written(&mut events, 0, true, "the sounder").await;
    assert_eq!(sim.coil(RELAY, 0), Some(true));
    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    assert_eq!(alarm["data"]["device"], "A-103");
    // Latched: the detector going back to normal does not clear it.
    sim.set_smoke(UnitId(3), SmokeState::Normal);
    let before = sim.input_register_reads(UnitId(3), 0);
    until_sim("more cycles after the detector is normal again", || {
        sim.input_register_reads(UnitId(3), 0) >= before + 8
    })
    .await;
    assert_eq!(sim.coil(RELAY, 0), Some(true), "the alarm stays latched");
}

/// The Calectro UG-3-O-MB-R's discrete inputs (`shared/devices/smoke_detector.toml`):
/// 1x0001 mounted, 1x0002 service alarm, 1x0003 smoke alarm.
const CALECTRO_PROFILE: &str = r#"
[profile.calectro-ug3]
alarm = { table = "discrete_input", address = 2 }
fault = { table = "discrete_input", address = 1 }
mounted = { table = "discrete_input", address = 0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_with_alarm_and_mounted_bits_reports_head_removed_and_sounds_an_alarm() {
    let sim = village_gateway::sim::Simulator::new(
        9600,
        [
            (UnitId(1), SimProfile::SmokeBits),
            (UnitId(2), SimProfile::Smoke),
            (RELAY, SimProfile::Relay),
        ],
    );
    let pty = sim.serve_pty().unwrap();
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = write_config(dir.path(), pty.path(), 2, broker.port(), &state);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "unit = 1\nzone = \"A\"\n",
        "unit = 1\nzone = \"A\"\nprofile = \"calectro-ug3\"\n",
        1,
    );
    assert!(text.contains("profile = \"calectro-ug3\""), "{text}");
    std::fs::write(&path, format!("{text}{CALECTRO_PROFILE}")).unwrap();

    let mut sub = Subscriber::connect(broker.port(), "it-calectro").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;
    let _daemon = Daemon::spawn(&path);

    // Head removed (mounted bit clear): a device fault, not a fire.
    sim.set_smoke(UnitId(1), SmokeState::Fault);
    let fault = sub.next_of("device.fault", Duration::from_secs(10)).await;
    assert_eq!(fault["data"]["device"], "A-101");
    sim.set_smoke(UnitId(1), SmokeState::Normal);
    let cleared = sub
        .next_of("device.fault_cleared", Duration::from_secs(10))
        .await;
    assert_eq!(cleared["data"]["device"], "A-101");
    assert_eq!(sim.coil(RELAY, 0), Some(false), "a fault sounds nothing");

    // The smoke alarm bit: the sounder is driven and the alarm latched.
    let mut events = sim.subscribe();
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    coil_written(&mut events, 0, true, "the sounder").await;
    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    assert_eq!(alarm["data"]["device"], "A-101");
}
