//! Fixtures shared by the integration tests: the simulated village, the daemon and a broker
//! as child processes, an upstream subscriber. Each test binary uses a part of them.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::broadcast;

use village_gateway::daemon::Tap;
use village_gateway::event::UnitId;
use village_gateway::field::FieldReport;
use village_gateway::sim::{SimChange, Simulator};
// Re-exported: test files that build their own simulated buses use it with the fixtures.
pub(crate) use village_gateway::sim::SimProfile;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_village-gateway");
/// The relay module of `Config::simulated_village`: coil 0 = the sounder, 4 = the panel
/// disablement LED, 5 = fire LED, 6 = fault LED, 7 = buzzer; discrete input 0 = silence key,
/// 1 = reset key.
pub(crate) const RELAY: UnitId = UnitId(100);

pub(crate) fn village(per_bus: u8) -> Simulator {
    Simulator::new(
        9600,
        (1..=per_bus)
            .map(|u| (UnitId(u), SimProfile::Smoke))
            .chain([(RELAY, SimProfile::Relay)]),
    )
}

/// One simulated bus on a pty (`detectors` generic smoke detectors, units 1.., and the relay
/// module), the embedded broker, a state directory and the config that ties them together
/// (`Config::simulated_village`).
#[cfg(feature = "embedded-broker")]
pub(crate) struct Village {
    pub(crate) sim: Simulator,
    pub(crate) pty: village_gateway::sim::PtyGuard,
    pub(crate) broker: village_gateway::broker::BrokerHandle,
    pub(crate) state: tempfile::TempDir,
    pub(crate) config: village_gateway::config::Config,
}

#[cfg(feature = "embedded-broker")]
impl Village {
    pub(crate) fn on_a_pty(detectors: u8) -> Village {
        let sim = village(detectors);
        let pty = sim.serve_pty().unwrap();
        let broker = village_gateway::broker::start(0).unwrap();
        let state = tempfile::tempdir().unwrap();
        let url = format!("mqtt://127.0.0.1:{}", broker.port());
        let config = village_gateway::config::Config::simulated_village(
            &[pty.path().to_owned()],
            detectors,
            &url,
            state.path(),
        );
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
pub(crate) fn written(t: &Tap, output: &str, level: bool) -> bool {
    matches!(t, Tap::Field(FieldReport::OutputWritten { name, on, ok: true, .. }) if name == output && *on == level)
}

/// The first tap for which `f` holds (lagged items are skipped); panics after `limit`.
pub(crate) async fn until(
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

/// An upstream subscriber: every event payload received, by seq (duplicates counted), and
/// every command result.
pub(crate) struct Subscriber {
    pub(crate) events: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    pub(crate) results: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    pub(crate) client: rumqttc::AsyncClient,
}

impl Subscriber {
    pub(crate) async fn connect(port: u16, id: &str) -> Subscriber {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        // Batches are up to 64 KiB; rumqttc's default limit is 10 KiB.
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        client
            .subscribe("village/#", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (results_tx, results) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                        if p.topic.contains("/event/") || p.topic.ends_with("/events") =>
                    {
                        // One CloudEvent, or a batch of them (a JSON array) on `<gw>/events`.
                        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                        let events = match v {
                            serde_json::Value::Array(batch) => batch,
                            one => vec![one],
                        };
                        for v in events {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                        if p.topic.ends_with("/cmd-result") =>
                    {
                        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                        let _ = results_tx.send(v);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Subscriber {
            events,
            results,
            client,
        }
    }

    /// Publishes command `name` with `payload` and returns its result.
    pub(crate) async fn command(
        &mut self,
        name: &str,
        payload: serde_json::Value,
    ) -> serde_json::Value {
        let id = payload["id"].clone();
        self.client
            .publish(
                format!("village/demo/cmd/{name}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let r = self.results.recv().await.expect("subscriber ended");
                if r["id"] == id {
                    return r;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no result for command {name} {id} within 10 s"))
    }

    /// The next event of `kind`, skipping others; panics after `limit`.
    pub(crate) async fn next_of(&mut self, kind: &str, limit: Duration) -> serde_json::Value {
        tokio::time::timeout(limit, async {
            loop {
                let v = self.events.recv().await.expect("subscriber ended");
                if v["type"] == kind {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} event within {limit:?}"))
    }
}

pub(crate) async fn wait_subscribed(sub: &Subscriber) {
    // A retained status or our own probe tells that the subscription is live.
    let probe = "village/probe/event/probe";
    sub.client
        .publish(
            probe,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"type":"probe"}"#,
        )
        .await
        .unwrap();
}

/// A broker in a child process, so it can really be stopped and started again.
pub(crate) struct BrokerProcess(pub(crate) Child);

impl BrokerProcess {
    pub(crate) fn start(port: u16) -> BrokerProcess {
        let child = Command::new(BIN)
            .args(["broker", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        BrokerProcess(child)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) async fn wait_for_port(port: u16) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("broker did not start listening");
}

/// The daemon as its own process, killed (SIGKILL) when dropped, so a failing test leaves
/// nothing behind.
pub(crate) struct Daemon(pub(crate) Child);

impl Daemon {
    pub(crate) fn spawn(config: &Path) -> Daemon {
        let log = std::fs::File::create(config.with_extension("log")).unwrap();
        Daemon(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config file for one simulated bus (detectors 1..=`detectors`, relay module at unit 100:
/// coil 0 the sounder, coil 5 the panel fire LED).
pub(crate) fn write_config(
    dir: &Path,
    port: &str,
    detectors: u8,
    broker_port: u16,
    state: &Path,
) -> std::path::PathBuf {
    let mut text = format!(
        "[gateway]\nid = \"demo\"\nstate_dir = \"{}\"\n[uplink]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\n\
         [[bus]]\nname = \"a\"\nrtu = {{ port = \"{port}\", baud = 9600 }}\n\
         [[sounder]]\nid = \"A-sounder\"\nzones = [\"A\"]\noutput = {{ bus = \"a\", unit = 100, coil = 0 }}\n\
         [panel]\nfire_led = {{ bus = \"a\", unit = 100, coil = 5 }}\n",
        state.display()
    );
    for u in 1..=detectors {
        text.push_str(&format!(
            "[[detector]]\nid = \"A-{}\"\nbus = \"a\"\nunit = {u}\nzone = \"A\"\n",
            100 + u16::from(u)
        ));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until the simulator has received a write of `on` to the relay's `coil`.
pub(crate) async fn coil_written(
    events: &mut broadcast::Receiver<village_gateway::sim::SimEvent>,
    coil: u16,
    on: bool,
    what: &str,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.unit == RELAY && e.what == (SimChange::CoilWritten { address: coil, on }) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} was not written within 10 s"));
}
