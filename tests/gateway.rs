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

/// One simulated bus on a pty, the embedded broker, a state directory and the config that
/// ties them together (`Config::simulated_village`).
struct Village {
    sim: Simulator,
    pty: village_gateway::sim::PtyGuard,
    broker: village_gateway::broker::BrokerHandle,
    state: tempfile::TempDir,
    config: Config,
}

impl Village {
    fn on_a_pty(detectors: u8) -> Village {
        let sim = village(detectors);
        let pty = sim.serve_pty().unwrap();
        let broker = village_gateway::broker::start(0).unwrap();
        let state = tempfile::tempdir().unwrap();
        let url = format!("mqtt://127.0.0.1:{}", broker.port());
        let config =
            Config::simulated_village(&[pty.path().to_owned()], detectors, &url, state.path());
        Village {
            sim,
            pty,
            broker,
            state,
            config,
        }
    }
}

/// A field report of a confirmed write of `level` to the output `output`.
fn written(t: &Tap, output: &str, level: bool) -> bool {
    matches!(t, Tap::Field(FieldReport::OutputWritten { name, on, ok: true, .. }) if name == output && *on == level)
}

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

async fn until(
    tap: &mut broadcast::Receiver<Tap>,
    limit: Duration,
    what: &str,
    f: impl Fn(&Tap) -> bool,
) -> Tap {
    tokio::time::timeout(limit, async {
        loop {
            match tap.recv().await {
                Ok(t) if f(&t) => return t,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("gateway stopped while waiting for {what}")
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
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
