//! The daemon end to end: the real gateway code over pseudo-terminals against the built-in
//! simulator, and an embedded MQTT broker (in-process, or as a child process where a test
//! stops and restarts it). Needs nothing but the Rust toolchain.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use village_gateway::config::{BusTransport, Config};
use village_gateway::daemon::{self, Tap};
use village_gateway::event::{EventKind, UnitId};
use village_gateway::field::FieldReport;
use village_gateway::sim::{SimChange, Simulator, SmokeState};
use village_gateway::uplink::UplinkTap;

mod common;
use common::*;

/// The daemon running in this process, with its tap.
struct Gateway {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    fn start(config: Config) -> (Gateway, broadcast::Receiver<Tap>) {
        let (tap_tx, tap) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let task = tokio::spawn(daemon::run(config, stop.clone(), Some(tap_tx)));
        (Gateway { stop, task }, tap)
    }

    /// Stops the daemon as SIGTERM would and checks that it ends cleanly.
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_alarm_reaches_the_sounder_coil_and_the_broker() {
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        config,
    } = Village::on_a_pty(4);

    let mut sub = Subscriber::connect(broker.port(), "it-alarm").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    let (gw, mut tap) = Gateway::start(config);
    let mut coils = sim.subscribe();
    until(&mut tap, Duration::from_secs(10), "a first scan", |t| {
        matches!(
            t,
            Tap::Field(village_gateway::field::FieldReport::Cycle { .. })
        )
    })
    .await;

    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    // The sounder coil (relay unit 100, coil 0) and the panel fire LED (coil 5) are switched
    // on the wire, the sounder first.
    let mut switched = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while switched.len() < 2 {
            let e = coils.recv().await.unwrap();
            if let SimChange::CoilWritten { address, on: true } = e.what {
                if e.unit == RELAY {
                    switched.push(address);
                }
            }
        }
    })
    .await
    .expect("the sounder and fire LED coils were not written within 5 s");
    assert_eq!(switched, [0, 5], "the sounder is written before the panel");
    assert_eq!(sim.coil(RELAY, 0), Some(true), "sounder on");
    assert_eq!(sim.coil(RELAY, 5), Some(true), "panel fire LED on");

    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    assert_eq!(alarm["data"]["device"], "A-102");
    assert_eq!(alarm["data"]["zone"], "A");
    assert_eq!(alarm["source"], "/village/demo");
    let seq = alarm["seq"].as_u64().unwrap();
    assert_eq!(alarm["id"], format!("demo-{seq}"));

    // Silence by MQTT command: sounder off, fire LED stays on; the result names the command.
    sub.client
        .publish(
            "village/demo/cmd/silence",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"id":"c-1"}"#,
        )
        .await
        .unwrap();
    sub.next_of("alarm.silenced", Duration::from_secs(10)).await;
    until(&mut tap, Duration::from_secs(5), "sounder off", |t| {
        written(t, "A-sounder", false)
    })
    .await;
    assert_eq!(sim.coil(RELAY, 0), Some(false));
    assert_eq!(
        sim.coil(RELAY, 5),
        Some(true),
        "silence never clears the fire LED"
    );

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_detector_goes_offline_and_lights_the_fault_led() {
    let Village {
        sim,
        pty: _pty,
        broker: _broker,
        state: _state,
        config,
    } = Village::on_a_pty(3);
    let (gw, mut tap) = Gateway::start(config);

    sim.set_offline(UnitId(2), true);
    let t = until(
        &mut tap,
        Duration::from_secs(20),
        "device.offline",
        |t| matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOffline),
    )
    .await;
    let Tap::Raised(e) = t else { unreachable!() };
    assert_eq!(e.data.device, Some("A-102".into()));
    until(&mut tap, Duration::from_secs(5), "fault LED", |t| {
        written(t, "panel fault LED", true)
    })
    .await;
    assert_eq!(sim.coil(RELAY, 6), Some(true));

    sim.set_offline(UnitId(2), false);
    until(
        &mut tap,
        Duration::from_secs(10),
        "device.online",
        |t| matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceOnline),
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_state_dir_is_a_gateway_fault_and_alarms_still_sound_and_go_upstream() {
    let Village {
        sim,
        pty: _pty,
        broker,
        state,
        mut config,
    } = Village::on_a_pty(3);
    // Like a read-only SD card: the state directory cannot be created.
    let blocker = state.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    config.gateway.state_dir = blocker.join("state");
    let mut sub = Subscriber::connect(broker.port(), "it-volatile").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    let (gw, mut tap) = Gateway::start(config);
    until(&mut tap, Duration::from_secs(10), "the outbox fault", |t| {
        raised(t, EventKind::DeviceFault, daemon::OUTBOX_COMPONENT)
    })
    .await;
    until(&mut tap, Duration::from_secs(10), "fault LED", |t| {
        written(t, "panel fault LED", true)
    })
    .await;
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "sounder on", |t| {
        written(t, "A-sounder", true)
    })
    .await;
    let fault = sub.next_of("device.fault", Duration::from_secs(10)).await;
    assert_eq!(fault["data"]["device"], daemon::OUTBOX_COMPONENT, "{fault}");
    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    assert_eq!(alarm["data"]["device"], "A-101", "{alarm}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_module_is_a_sounder_fault_and_sounds_when_it_returns() {
    let Village {
        sim,
        pty: _pty,
        broker: _broker,
        state: _state,
        config,
    } = Village::on_a_pty(2);
    sim.set_offline(RELAY, true);
    let (gw, mut tap) = Gateway::start(config);
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    let t = until(&mut tap, Duration::from_secs(10), "sounder.fault", |t| {
        matches!(t, Tap::Raised(e) if e.kind == EventKind::SounderFault && e.data.device == Some("A-sounder".into()))
    })
    .await;
    let Tap::Raised(e) = t else { unreachable!() };
    assert!(
        e.data.reason.as_deref().unwrap_or("").contains("timeout"),
        "{e:?}"
    );

    // The relay module answers again: the pending sounder write goes out, the fault clears.
    sim.set_offline(RELAY, false);
    until(&mut tap, Duration::from_secs(10), "the fault cleared", |t| {
        matches!(t, Tap::Raised(e) if e.kind == EventKind::DeviceFaultCleared && e.data.device == Some("A-sounder".into()))
    })
    .await;
    assert_eq!(
        sim.coil(RELAY, 0),
        Some(true),
        "the sounder sounds once its module is back"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_on_modbus_tcp_is_polled_like_a_serial_one() {
    let sim = village(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = sim.clone();
    tokio::spawn(async move { s.serve_tcp(listener).await });
    let broker = village_gateway::broker::start(0).unwrap();
    let state = tempfile::tempdir().unwrap();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let mut config = Config::simulated_village(&["unused".to_owned()], 2, &url, state.path());
    config.buses[0].transport = BusTransport::Tcp {
        addr: addr.to_string(),
    };
    let (gw, mut tap) = Gateway::start(config);
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    until(
        &mut tap,
        Duration::from_secs(10),
        "sounder on over TCP",
        |t| written(t, "A-sounder", true),
    )
    .await;
    assert_eq!(sim.coil(RELAY, 0), Some(true));
    gw.stop().await;
}

/// A TCP gate between the gateway and the broker: closed, it drops every connection at once,
/// so the test decides when the gateway may reach a restarted broker (after the test's own
/// subscriber is in place).
struct Gate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    async fn start(broker_port: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !gate.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut broker) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
            }
        });
        Gate { port, open }
    }

    fn set(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_restarted_loses_no_event_and_keeps_seq_order() {
    let sim = village(4);
    let pty = sim.serve_pty().unwrap();
    let port = free_port();
    let broker = BrokerProcess::start(port);
    wait_for_port(port).await;
    let gate = Gate::start(port).await;
    let state = tempfile::tempdir().unwrap();
    let url = format!("mqtt://127.0.0.1:{}", gate.port);
    let config = Config::simulated_village(&[pty.path().to_owned()], 4, &url, state.path());
    let (gw, mut tap) = Gateway::start(config);
    until(
        &mut tap,
        Duration::from_secs(10),
        "gateway.started acked",
        |t| {
            matches!(
                t,
                Tap::Uplink(UplinkTap::Acked {
                    kind: EventKind::GatewayStarted,
                    ..
                })
            )
        },
    )
    .await;

    // The broker process is killed: the gateway loses its connection.
    gate.set(false);
    drop(broker);
    until(&mut tap, Duration::from_secs(10), "disconnected", |t| {
        matches!(t, Tap::Uplink(UplinkTap::Disconnected { .. }))
    })
    .await;

    // Events while the broker is down: alarms on two detectors, restores, a fault.
    let mut last_seq = 0;
    for (unit, state) in [
        (1, SmokeState::Alarm),
        (1, SmokeState::Normal),
        (3, SmokeState::Alarm),
        (3, SmokeState::Normal),
        (4, SmokeState::Fault),
        (4, SmokeState::Normal),
    ] {
        sim.set_smoke(UnitId(unit), state);
        let t = until(&mut tap, Duration::from_secs(10), "stored", |t| {
            matches!(t, Tap::Stored { .. })
        })
        .await;
        if let Tap::Stored { seq, .. } = t {
            last_seq = seq.0;
        }
    }
    assert_eq!(
        last_seq, 7,
        "gateway.started (1) and six events stored while the broker was down"
    );

    // A new broker process; the upstream subscriber is in place before the gateway may connect.
    let _broker = BrokerProcess::start(port);
    wait_for_port(port).await;
    let mut sub = Subscriber::connect(port, "it-restart").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;
    gate.set(true);

    // Every event stored during the outage arrives (duplicates allowed), in seq order.
    let mut arrived: Vec<(u64, String)> = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(2..=last_seq).all(|s| arrived.iter().any(|(seq, _)| *seq == s)) {
            let v = sub.events.recv().await.unwrap();
            arrived.push((
                v["seq"].as_u64().unwrap(),
                v["type"].as_str().unwrap().to_owned(),
            ));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events missing after the broker restart; got {arrived:?}"));
    let mut first_arrivals: Vec<u64> = Vec::new();
    for (seq, _) in &arrived {
        if !first_arrivals.contains(seq) {
            first_arrivals.push(*seq);
        }
    }
    assert_eq!(
        first_arrivals,
        (2..=last_seq).collect::<Vec<_>>(),
        "fire-lane events arrive in seq order"
    );
    let kinds: BTreeMap<u64, &str> = arrived.iter().map(|(s, k)| (*s, k.as_str())).collect();
    assert_eq!(
        kinds.values().copied().collect::<Vec<_>>(),
        [
            "fire.alarm",
            "fire.restored",
            "fire.alarm",
            "fire.restored",
            "device.fault",
            "device.fault_cleared"
        ]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latched_alarm_survives_a_kill_9_and_sounds_again_after_the_restart() {
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sub = Subscriber::connect(broker.port(), "it-restart-fire").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    // First life: smoke in A-102, the sounder sounds, the smoke clears (the alarm stays latched).
    let sim = village(3);
    let pty = sim.serve_pty().unwrap();
    let mut coils = sim.subscribe();
    let config = write_config(dir.path(), pty.path(), 3, broker.port(), &state);
    let mut first = Daemon::spawn(&config);
    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    coil_written(&mut coils, 0, true, "the sounder").await;
    sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    sim.set_smoke(UnitId(2), SmokeState::Normal);
    sub.next_of("fire.restored", Duration::from_secs(10)).await;

    // Power cut: the gateway dies without a word; the relay module loses its coils too (a new
    // simulator with every coil off, on a new port).
    first.kill();
    drop(pty);
    let sim = village(3);
    let pty = sim.serve_pty().unwrap();
    let mut coils = sim.subscribe();
    let config = write_config(dir.path(), pty.path(), 3, broker.port(), &state);
    let second = Daemon::spawn(&config);

    // The detector reads normal now, yet the latched alarm drives the sounder and the panel
    // again, and upstream is told which alarms were restored.
    let mut on = std::collections::BTreeSet::new();
    let mut written = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while on.len() < 2 {
            let e = coils.recv().await.unwrap();
            if let (RELAY, SimChange::CoilWritten { address, on: level }) = (e.unit, e.what) {
                written.push((address, level));
                if level {
                    on.insert(address);
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sounder and fire LED not both on within 10 s: {written:?}"));
    assert_eq!(
        on,
        [0, 5].into(),
        "the sounder and the panel fire LED sound again"
    );
    assert!(
        written.iter().all(|&(_, level)| level),
        "no output is switched off on the way: {written:?}"
    );
    // The first life's gateway.started may still be on its way; the second one names the
    // restored alarm.
    let mut started = sub
        .next_of("gateway.started", Duration::from_secs(10))
        .await;
    if started["data"].get("extra").is_none() {
        started = sub
            .next_of("gateway.started", Duration::from_secs(10))
            .await;
    }
    assert_eq!(
        started["data"]["extra"]["restored_fire_alarms"],
        serde_json::json!(["A-102"]),
        "{started}"
    );
    drop(second);
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

#[test]
fn a_bad_config_is_refused_with_its_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let example = include_str!("../config/gateway.example.toml");
    let good = check_config(example, dir.path());
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );

    let bad = example.replacen("unit = 2\n", "unit = 248\n", 1);
    let line = bad.lines().position(|l| l == "unit = 248").unwrap() + 1;
    let out = check_config(&bad, dir.path());
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "gateway.toml:{line}: detector[1].unit: unit id 248 is outside 1..=247"
        )),
        "{stderr}"
    );

    // `run` refuses it the same way, before touching any port.
    let path = dir.path().join("gateway.toml");
    let run = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(78));
}

// ---------------------------------------------------------------------------------------------
// Behaving like a fire alarm control unit (issue 3): pre-alarm, test, disablement,
// supervision, linkage with coincidence, restart safety.

/// The engine raised an event of `kind` about `device`.
fn raised(t: &Tap, kind: EventKind, device: &str) -> bool {
    matches!(t, Tap::Raised(e) if e.kind == kind && e.data.device.as_ref().is_some_and(|d| d.0 == device))
}

/// The engine wanted `output` at `level`.
fn wanted(t: &Tap, output: &str, level: bool) -> bool {
    matches!(t, Tap::OutputWanted { output: o, on, .. } if o == output && *on == level)
}

/// Every tap up to and including the one that makes `done` true.
async fn collect_until(
    tap: &mut broadcast::Receiver<Tap>,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&Tap) -> bool,
) -> Vec<Tap> {
    let mut seen = Vec::new();
    tokio::time::timeout(limit, async {
        loop {
            match tap.recv().await {
                Ok(t) => {
                    let end = done(&t);
                    seen.push(t);
                    if end {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("tap lagged by {n} while waiting for {what}")
                }
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("gateway stopped while waiting for {what}")
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"));
    seen
}

/// Every tap until detector `detector` has been read with `status` and the engine has had
/// the bus's next scan cycle after it: whatever that reading makes the engine do is in there.
async fn read_and_handled(
    tap: &mut broadcast::Receiver<Tap>,
    detector: usize,
    status: village_gateway::event::DetectorStatus,
) -> Vec<Tap> {
    let mut read = false;
    collect_until(
        tap,
        Duration::from_secs(10),
        "the reading and the next scan cycle",
        |t| match t {
            Tap::Field(FieldReport::Reading {
                detector: d,
                reading,
                ..
            }) if *d == detector && reading.status == status => {
                read = true;
                false
            }
            Tap::Field(FieldReport::Cycle { .. }) => read,
            _ => false,
        },
    )
    .await
}

/// A connected upstream subscriber (its subscription live) and a started gateway whose uplink
/// has subscribed to its commands.
async fn with_uplink(
    config: Config,
    broker_port: u16,
    name: &str,
) -> (Subscriber, Gateway, broadcast::Receiver<Tap>) {
    let sub = Subscriber::connect(broker_port, name).await;
    wait_subscribed(&sub).await;
    let mut sub = sub;
    sub.next_of("probe", Duration::from_secs(10)).await;
    let (gw, mut tap) = Gateway::start(config);
    until(&mut tap, Duration::from_secs(10), "the uplink", |t| {
        matches!(t, Tap::Uplink(UplinkTap::Connected))
    })
    .await;
    (sub, gw, tap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_alarm_and_the_test_button_are_reported_and_never_sound() {
    use village_gateway::event::DetectorStatus;
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        config,
    } = Village::on_a_pty(3);
    let (mut sub, gw, mut tap) = with_uplink(config, broker.port(), "it-prealarm").await;

    sim.set_smoke(UnitId(1), SmokeState::PreAlarm);
    let mut seen = read_and_handled(&mut tap, 0, DetectorStatus::PreAlarm).await;
    sim.set_smoke(UnitId(2), SmokeState::Test);
    seen.extend(read_and_handled(&mut tap, 1, DetectorStatus::Test).await);
    assert!(
        seen.iter()
            .any(|t| raised(t, EventKind::FirePreAlarm, "A-101")),
        "fire.pre_alarm raised"
    );
    assert!(
        seen.iter()
            .any(|t| raised(t, EventKind::DeviceTest, "A-102")),
        "device.test raised"
    );
    let sounded: Vec<&Tap> = seen
        .iter()
        .filter(|t| matches!(t, Tap::OutputWanted { on: true, .. }))
        .collect();
    assert!(sounded.is_empty(), "nothing sounds: {sounded:?}");
    assert!(
        !seen
            .iter()
            .any(|t| matches!(t, Tap::Raised(e) if e.kind == EventKind::FireAlarm)),
        "neither is a fire"
    );
    assert_eq!(sim.coil(RELAY, 0), Some(false), "the sounder is off");

    let pre = sub.next_of("fire.pre_alarm", Duration::from_secs(10)).await;
    assert_eq!(pre["data"]["device"], "A-101");
    let test = sub.next_of("device.test", Duration::from_secs(10)).await;
    assert_eq!(test["data"]["device"], "A-102");

    // Both clear; the poller may reach unit 2 first.
    sim.set_smoke(UnitId(1), SmokeState::Normal);
    sim.set_smoke(UnitId(2), SmokeState::Normal);
    let mut ended: Vec<String> = Vec::new();
    while ended.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.events.recv())
            .await
            .expect("pre-alarm and test not both ended within 10 s")
            .expect("subscriber ended");
        let kind = e["type"].as_str().unwrap_or_default().to_owned();
        if kind == "fire.pre_alarm_cleared" || kind == "device.test_ended" {
            ended.push(kind);
        }
    }
    ended.sort();
    assert_eq!(ended, ["device.test_ended", "fire.pre_alarm_cleared"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_disabled_by_an_mqtt_command_does_not_sound_on_its_alarm() {
    use village_gateway::event::DetectorStatus;
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        config,
    } = Village::on_a_pty(3);
    let (mut sub, gw, mut tap) = with_uplink(config, broker.port(), "it-disable").await;

    let result = sub
        .command(
            "disable",
            serde_json::json!({"id": "d-1", "device": "A-101"}),
        )
        .await;
    assert_eq!(result["ok"], true, "{result}");
    let disabled = sub
        .next_of("device.disabled", Duration::from_secs(10))
        .await;
    assert_eq!(disabled["data"]["device"], "A-101");
    assert_eq!(disabled["data"]["command"], "d-1", "who asked");
    until(
        &mut tap,
        Duration::from_secs(10),
        "the disablement LED",
        |t| written(t, "panel disablement LED", true),
    )
    .await;
    assert_eq!(sim.coil(RELAY, 4), Some(true));

    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    let seen = read_and_handled(&mut tap, 0, DetectorStatus::Alarm).await;
    assert!(
        !seen
            .iter()
            .any(|t| matches!(t, Tap::Raised(e) if e.kind == EventKind::FireAlarm)),
        "a disabled detector raises no fire alarm"
    );
    assert!(
        !seen
            .iter()
            .any(|t| matches!(t, Tap::OutputWanted { on: true, .. })),
        "nothing sounds"
    );
    assert_eq!(sim.coil(RELAY, 0), Some(false));

    // Bad commands get an error result, never a crash.
    let unknown = sub
        .command(
            "disable",
            serde_json::json!({"id": "d-2", "device": "Z-999"}),
        )
        .await;
    assert_eq!(unknown["ok"], false);
    assert_eq!(
        unknown["error"],
        "no detector is named \"Z-999\"; disable and enable take a [[detector]] id"
    );
    let no_device = sub
        .command("enable", serde_json::json!({"id": "d-3"}))
        .await;
    assert_eq!(no_device["ok"], false, "{no_device}");

    // Enabled again, the detector still in alarm sounds at once.
    let result = sub
        .command(
            "enable",
            serde_json::json!({"id": "d-4", "device": "A-101"}),
        )
        .await;
    assert_eq!(result["ok"], true, "{result}");
    let enabled = sub.next_of("device.enabled", Duration::from_secs(10)).await;
    assert_eq!(enabled["data"]["command"], "d-4");
    // Both go out in the poller's next output pass, in either order.
    let (mut led_off, mut sounder) = (false, false);
    collect_until(
        &mut tap,
        Duration::from_secs(10),
        "the disablement LED off and the sounder on",
        |t| {
            led_off |= written(t, "panel disablement LED", false);
            sounder |= written(t, "A-sounder", true);
            led_off && sounder
        },
    )
    .await;
    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    assert_eq!(alarm["data"]["device"], "A-101");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_heartbeat_is_a_device_fault_that_lights_the_fault_led() {
    let Village {
        sim,
        pty: _pty,
        broker: _broker,
        state: _state,
        mut config,
    } = Village::on_a_pty(2);
    // generic-smoke's limit is 60 s; the key that shortens it keeps the test short.
    config.detectors[1].heartbeat_timeout = Some(Duration::from_secs(2));
    let (gw, mut tap) = Gateway::start(config);
    until(&mut tap, Duration::from_secs(10), "a first scan", |t| {
        matches!(t, Tap::Field(FieldReport::Cycle { .. }))
    })
    .await;

    sim.set_heartbeat_frozen(UnitId(2), true);
    let t = until(&mut tap, Duration::from_secs(15), "device.fault", |t| {
        raised(t, EventKind::DeviceFault, "A-102")
    })
    .await;
    let Tap::Raised(e) = t else { unreachable!() };
    assert_eq!(
        e.data.reason.as_deref(),
        Some("heartbeat frozen for 2 s (stuck firmware)")
    );
    until(&mut tap, Duration::from_secs(5), "the fault LED", |t| {
        written(t, "panel fault LED", true)
    })
    .await;
    assert_eq!(sim.coil(RELAY, 6), Some(true));

    sim.set_heartbeat_frozen(UnitId(2), false);
    until(
        &mut tap,
        Duration::from_secs(10),
        "device.fault_cleared",
        |t| raised(t, EventKind::DeviceFaultCleared, "A-102"),
    )
    .await;
    until(&mut tap, Duration::from_secs(5), "the fault LED off", |t| {
        written(t, "panel fault LED", false)
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_pulses_the_buzzer_until_silenced_and_a_new_fault_pulses_it_again() {
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        config,
    } = Village::on_a_pty(3);
    let (mut sub, gw, mut tap) = with_uplink(config, broker.port(), "it-pulse").await;

    sim.set_offline(UnitId(3), true);
    // On, off, on again on the wire: a pulse, not a level.
    for (level, what) in [(true, "on"), (false, "off"), (true, "on again")] {
        until(&mut tap, Duration::from_secs(20), what, |t| {
            written(t, "panel buzzer", level)
        })
        .await;
    }
    assert_eq!(sim.coil(RELAY, 6), Some(true), "fault LED steady on");

    let result = sub
        .command("silence", serde_json::json!({"id": "s-1"}))
        .await;
    assert_eq!(result["ok"], true, "{result}");
    until(
        &mut tap,
        Duration::from_secs(5),
        "alarm.silenced",
        |t| matches!(t, Tap::Raised(e) if e.kind == EventKind::AlarmSilenced),
    )
    .await;
    // Three ticks of the pulse's clock: the buzzer is never wanted on again.
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(t) = tokio::time::timeout_at(window, tap.recv()).await {
        let t = t.unwrap();
        assert!(!wanted(&t, "panel buzzer", true), "silenced buzzer pulsed");
    }
    assert_eq!(sim.coil(RELAY, 7), Some(false), "buzzer off");
    assert_eq!(sim.coil(RELAY, 6), Some(true), "the fault LED stays on");

    sim.set_offline(UnitId(2), true);
    until(
        &mut tap,
        Duration::from_secs(20),
        "a new fault's pulse",
        |t| written(t, "panel buzzer", true),
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_is_released_on_fire_once_a_second_detector_confirms_it() {
    use village_gateway::config::{Door, Zone};
    const DOOR: UnitId = UnitId(50);
    let sim = Simulator::new(
        9600,
        (1..=3)
            .map(|u| (UnitId(u), SimProfile::Smoke))
            .chain([(RELAY, SimProfile::Relay), (DOOR, SimProfile::Door)]),
    );
    let pty = sim.serve_pty().unwrap();
    let broker = village_gateway::broker::start(0).unwrap();
    let state = tempfile::tempdir().unwrap();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let mut config = Config::simulated_village(&[pty.path().to_owned()], 3, &url, state.path());
    config.doors.push(Door {
        id: "A-gate".into(),
        bus: 0,
        unit: DOOR,
        profile: "generic-door".into(),
        zone: "A".into(),
        location: "A栋大门".into(),
        release_on_fire: true,
    });
    config.zones.push(Zone {
        id: "A".into(),
        coincidence: true,
    });
    let (mut sub, gw, mut tap) = with_uplink(config, broker.port(), "it-door").await;
    let mut field = sim.subscribe();

    // The first detector sounds the zone at once; the door waits for a second one.
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    let seen = collect_until(&mut tap, Duration::from_secs(10), "the sounder", |t| {
        written(t, "A-sounder", true)
    })
    .await;
    assert!(
        !seen
            .iter()
            .any(|t| matches!(t, Tap::Raised(e) if e.kind == EventKind::DoorReleased)),
        "one detector does not release a coincidence zone's door"
    );
    assert_eq!(sim.coil(DOOR, 0), Some(false), "the door is locked");

    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    let released = sub.next_of("door.released", Duration::from_secs(10)).await;
    assert_eq!(released["data"]["device"], "A-gate");
    assert_eq!(
        released["data"]["devices"],
        serde_json::json!(["A-101", "A-102"])
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = field.recv().await.unwrap();
            if e.unit == DOOR
                && e.what
                    == (SimChange::CoilWritten {
                        address: 0,
                        on: true,
                    })
            {
                return;
            }
        }
    })
    .await
    .expect("lock_release (coil 0) of the door was not written on within 10 s");

    // The smoke clears: the door stays released until reset.
    sim.set_smoke(UnitId(1), SmokeState::Normal);
    sim.set_smoke(UnitId(2), SmokeState::Normal);
    sub.next_of("fire.restored", Duration::from_secs(10)).await;
    sub.next_of("fire.restored", Duration::from_secs(10)).await;
    assert_eq!(sim.coil(DOOR, 0), Some(true), "released until reset");
    let result = sub.command("reset", serde_json::json!({"id": "r-1"})).await;
    assert_eq!(result["ok"], true, "{result}");
    until(&mut tap, Duration::from_secs(10), "the door locked", |t| {
        written(t, "A-gate", false)
    })
    .await;
    assert_eq!(sim.coil(DOOR, 0), Some(false));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_fire_keeps_the_silence_and_the_disablements() {
    use village_gateway::event::DetectorStatus;
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        config,
    } = Village::on_a_pty(3);
    let (mut sub, gw, mut tap) =
        with_uplink(config.clone(), broker.port(), "it-restart-silence").await;
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "the sounder", |t| {
        written(t, "A-sounder", true)
    })
    .await;
    let result = sub
        .command("silence", serde_json::json!({"id": "s-1"}))
        .await;
    assert_eq!(result["ok"], true, "{result}");
    until(
        &mut tap,
        Duration::from_secs(10),
        "the sounder silenced",
        |t| written(t, "A-sounder", false),
    )
    .await;
    let result = sub
        .command(
            "disable",
            serde_json::json!({"id": "d-1", "device": "A-103"}),
        )
        .await;
    assert_eq!(result["ok"], true, "{result}");
    sub.next_of("device.disabled", Duration::from_secs(10))
        .await;
    gw.stop().await;

    // The second life: the smoke is still there, the alarm still latched and silenced.
    let (gw, mut tap) = Gateway::start(config);
    let t = until(
        &mut tap,
        Duration::from_secs(10),
        "gateway.started",
        |t| matches!(t, Tap::Raised(e) if e.kind == EventKind::GatewayStarted),
    )
    .await;
    let Tap::Raised(started) = t else {
        unreachable!()
    };
    assert_eq!(
        started.data.extra["restored_fire_alarms"],
        serde_json::json!(["A-101"])
    );
    assert_eq!(
        started.data.extra["disabled_detectors"],
        serde_json::json!(["A-103"])
    );
    let mut seen = Vec::new();
    let (mut led, mut sounder) = (false, false);
    seen.extend(
        collect_until(
            &mut tap,
            Duration::from_secs(10),
            "the fire LED on and the sounder off, confirmed",
            |t| {
                led |= written(t, "panel fire LED", true);
                sounder |= written(t, "A-sounder", false);
                led && sounder
            },
        )
        .await,
    );
    // A-101 is read in alarm again: latched already, so the silence holds.
    seen.extend(read_and_handled(&mut tap, 0, DetectorStatus::Alarm).await);
    assert!(
        !seen.iter().any(|t| wanted(t, "A-sounder", true)),
        "the silenced sounder never sounds after the restart"
    );
    assert_eq!(sim.coil(RELAY, 0), Some(false));
    assert_eq!(sim.coil(RELAY, 5), Some(true));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_output_sounds_while_the_sounder_is_in_fault() {
    use village_gateway::config::OutputSpec;
    let Village {
        sim,
        pty: _pty,
        broker: _broker,
        state: _state,
        mut config,
    } = Village::on_a_pty(2);
    // The sounder's own relay module (unit 101) is not on the bus; its fallback is coil 3 of
    // the panel's module.
    config.sounders[0].output = OutputSpec::Coil {
        bus: 0,
        unit: UnitId(101),
        coil: 0,
    };
    config.sounders[0].fallback = Some(OutputSpec::Coil {
        bus: 0,
        unit: RELAY,
        coil: 3,
    });
    let (gw, mut tap) = Gateway::start(config);
    let seen = collect_until(&mut tap, Duration::from_secs(10), "sounder.fault", |t| {
        raised(t, EventKind::SounderFault, "A-sounder")
    })
    .await;
    assert!(
        !seen.iter().any(|t| wanted(t, "A-sounder fallback", true)),
        "no fire, no fallback"
    );

    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "the fallback", |t| {
        written(t, "A-sounder fallback", true)
    })
    .await;
    assert_eq!(sim.coil(RELAY, 3), Some(true));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silenced_sounders_resound_after_the_auto_resound_time() {
    let Village {
        sim,
        pty: _pty,
        broker,
        state: _state,
        mut config,
    } = Village::on_a_pty(2);
    // The daemon takes any duration; validation's 10 s floor is for installers, and 2 s keeps
    // the test short.
    config.panel.auto_resound = Some(Duration::from_secs(2));
    let (mut sub, gw, mut tap) = with_uplink(config, broker.port(), "it-resound").await;
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    until(&mut tap, Duration::from_secs(10), "the sounder", |t| {
        written(t, "A-sounder", true)
    })
    .await;
    let result = sub
        .command("silence", serde_json::json!({"id": "s-1"}))
        .await;
    assert_eq!(result["ok"], true, "{result}");
    until(
        &mut tap,
        Duration::from_secs(10),
        "the sounder silenced",
        |t| written(t, "A-sounder", false),
    )
    .await;
    // The sounder is wanted on again in the step that raises alarm.resounded (outputs go
    // first, then the step's events), not before.
    until(
        &mut tap,
        Duration::from_secs(10),
        "the sounder wanted again",
        |t| wanted(t, "A-sounder", true),
    )
    .await;
    let t = until(&mut tap, Duration::from_secs(5), "the step's event", |t| {
        matches!(t, Tap::Raised(_))
    })
    .await;
    let Tap::Raised(e) = t else { unreachable!() };
    assert_eq!(e.kind, EventKind::AlarmResounded, "{e:?}");
    until(
        &mut tap,
        Duration::from_secs(10),
        "the sounder again",
        |t| written(t, "A-sounder", true),
    )
    .await;
    assert_eq!(sim.coil(RELAY, 0), Some(true));
    let resounded = sub
        .next_of("alarm.resounded", Duration::from_secs(10))
        .await;
    assert_eq!(resounded["data"]["devices"], serde_json::json!(["A-101"]));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_a_silenced_fire_keeps_the_silence_and_the_disablement() {
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sub = Subscriber::connect(broker.port(), "it-kill-silence").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    // First life: fire in A-102, silenced, A-103 disabled. The events arrive upstream only
    // after the state record holding them was made durable.
    let sim = village(3);
    let pty = sim.serve_pty().unwrap();
    let mut coils = sim.subscribe();
    let config = write_config(dir.path(), pty.path(), 3, broker.port(), &state);
    let mut first = Daemon::spawn(&config);
    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    coil_written(&mut coils, 0, true, "the sounder").await;
    sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    let result = sub
        .command("silence", serde_json::json!({"id": "s-1"}))
        .await;
    assert_eq!(result["ok"], true, "{result}");
    sub.next_of("alarm.silenced", Duration::from_secs(10)).await;
    let result = sub
        .command(
            "disable",
            serde_json::json!({"id": "d-1", "device": "A-103"}),
        )
        .await;
    assert_eq!(result["ok"], true, "{result}");
    sub.next_of("device.disabled", Duration::from_secs(10))
        .await;

    // Power cut: the gateway and the relay module lose everything but the disk.
    first.kill();
    drop(pty);
    let sim = village(3);
    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    sim.set_smoke(UnitId(3), SmokeState::Alarm);
    let pty = sim.serve_pty().unwrap();
    let mut coils = sim.subscribe();
    let config = write_config(dir.path(), pty.path(), 3, broker.port(), &state);
    let _second = Daemon::spawn(&config);
    coil_written(&mut coils, 5, true, "the panel fire LED").await;
    // A-103 is still disabled, so its alarm is ignored.
    let mut started = sub
        .next_of("gateway.started", Duration::from_secs(10))
        .await;
    // The first life's may still be on its way (routine lane, after the fire events).
    if started["data"]["extra"].get("disabled_detectors").is_none() {
        started = sub
            .next_of("gateway.started", Duration::from_secs(10))
            .await;
    }
    assert_eq!(
        started["data"]["extra"]["disabled_detectors"],
        serde_json::json!(["A-103"]),
        "{started}"
    );
    // Two events from two scan cycles of unit 1: units 2 and 3 (both in alarm) were polled
    // and handled in between.
    sim.set_smoke(UnitId(1), SmokeState::PreAlarm);
    sub.next_of("fire.pre_alarm", Duration::from_secs(10)).await;
    sim.set_smoke(UnitId(1), SmokeState::Normal);
    sub.next_of("fire.pre_alarm_cleared", Duration::from_secs(10))
        .await;
    let mut written = Vec::new();
    while let Ok(e) = coils.try_recv() {
        if let (RELAY, SimChange::CoilWritten { address, on }) = (e.unit, e.what) {
            written.push((address, on));
        }
    }
    assert!(
        !written.contains(&(0, true)),
        "the silenced sounder stays off: {written:?}"
    );
    assert_eq!(sim.coil(RELAY, 0), Some(false));
    assert_eq!(sim.coil(RELAY, 5), Some(true));
}
