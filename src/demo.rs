//! `village-gateway demo`: the main job on the built-in simulated village.
//!
//! It starts two simulated RS-485 buses (pseudo-terminals with detectors and a relay module
//! each), an embedded MQTT broker (or uses `--broker`), the real gateway on them, and an
//! upstream subscriber standing in for the fire command centre. Then it plays a scenario and
//! prints, as it happens, what the gateway saw, which outputs it drove (as the simulated relay
//! module received the coil writes), and which events the broker acknowledged.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OutputSpec};
use crate::daemon::{self, Tap};
use crate::event::{EventKind, UnitId};
use crate::field::FieldReport;
use crate::sim::{SimChange, SimEvent, SimProfile, Simulator, SmokeState};
use crate::uplink::UplinkTap;

const RELAY: UnitId = UnitId(100);

/// Keeps the embedded broker running for the demo, when this build has one.
#[cfg(feature = "embedded-broker")]
type BrokerGuard = crate::broker::BrokerHandle;
#[cfg(not(feature = "embedded-broker"))]
type BrokerGuard = ();

/// Runs the demo; `broker` is an `mqtt://host:port` URL or `None` for the embedded broker.
///
/// # Errors
/// A simulator, broker or the gateway could not start, or a step of the scenario did not
/// happen within its time limit (the gateway misbehaved).
pub async fn run(
    broker: Option<String>,
    per_bus: u8,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let say = move |who: &str, what: String| {
        let t = t0.elapsed();
        println!(
            "{:>3}.{:03}  {who:<9} {what}",
            t.as_secs(),
            t.subsec_millis()
        );
    };

    println!(
        "village-gateway demo: a simulated village with two RS-485 buses (9600 baud; the simulator"
    );
    println!("answers as slowly as a real line would), {per_bus} smoke detectors on each, and a relay module per");
    println!(
        "bus (Modbus unit 100) whose coils drive the sounders and the micro fire-station panel."
    );
    println!();
    println!("How to read it: seconds since start, then who speaks:");
    println!("  scenario  what happens in the village        gateway  what the gateway decided and drove");
    println!("  field     what the devices received on the wire   store  its outbox on disk (seq = gap-free number)");
    println!("  broker    the MQTT broker acknowledged (PUBACK) an event, so the gateway deletes it from disk");
    println!(
        "A fire alarm latches: it stays until an officer resets it, even when the smoke clears."
    );
    println!();

    let sims: Vec<Simulator> = (0..2)
        .map(|_| {
            let devices = (1..=per_bus)
                .map(|u| (UnitId(u), SimProfile::Smoke))
                .chain([(RELAY, SimProfile::Relay)]);
            Simulator::new(9600, devices)
        })
        .collect();
    let mut guards = Vec::new();
    let mut ports = Vec::new();
    for sim in &sims {
        let g = sim
            .serve_pty()
            .context("cannot open a pseudo-terminal for the simulator")?;
        ports.push(g.path().to_owned());
        guards.push(g);
    }
    say(
        "field",
        format!("bus a on {}, bus b on {}", ports[0], ports[1]),
    );

    let (url, _broker) = match broker {
        Some(url) => (url, None::<BrokerGuard>),
        #[cfg(feature = "embedded-broker")]
        None => {
            let b = crate::broker::start(0).context("cannot start the embedded MQTT broker")?;
            let url = format!("mqtt://127.0.0.1:{}", b.port());
            (url, Some(b))
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => bail!("this build has no embedded MQTT broker (feature embedded-broker); pass --broker mqtt://host:port"),
    };
    say("broker", format!("MQTT broker at {url}"));

    let state = std::env::temp_dir().join(format!("village-gateway-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let config = Config::simulated_village(&ports, per_bus, &url, &state);

    // The fire command centre subscribes before the gateway starts, so it sees every event.
    let upstream = Upstream::connect(&url).await?;
    let (tap_tx, mut tap) = broadcast::channel::<Tap>(4096);
    let gateway_stop = shutdown.child_token();
    let gateway = tokio::spawn(daemon::run(
        config.clone(),
        gateway_stop.clone(),
        Some(tap_tx),
    ));

    // Print what the simulated relay modules receive: the outputs really driven on the wire,
    // named as the gateway names them.
    for (b, sim) in sims.iter().enumerate() {
        let mut rx = sim.subscribe();
        let bus = config.buses[b].name.clone();
        let names: std::collections::HashMap<(UnitId, u16), String> = config
            .outputs()
            .into_iter()
            .filter_map(|(_, name, spec)| match spec {
                OutputSpec::Coil { bus, unit, coil } if bus == b => Some(((unit, coil), name)),
                _ => None,
            })
            .collect();
        tokio::spawn(async move {
            while let Ok(SimEvent { unit, what, .. }) = rx.recv().await {
                if let SimChange::CoilWritten { address, on } = what {
                    if unit == RELAY {
                        let name = names
                            .get(&(unit, address))
                            .cloned()
                            .unwrap_or_else(|| format!("coil {address}"));
                        say(
                            "field",
                            format!(
                                "relay unit {unit} on bus {bus} switched coil {address} ({name}) {}",
                                if on { "ON" } else { "off" }
                            ),
                        );
                    }
                }
            }
        });
    }

    // The scenario waits on what the gateway reports.
    let mut step = Scenario {
        tap: &mut tap,
        say: &say,
    };
    let (mut scanned, mut connected) = (std::collections::HashSet::new(), false);
    step.until(
        "the first scan of both buses and the broker connection",
        Duration::from_secs(20),
        |t| {
            match t {
                Tap::Field(FieldReport::Cycle { bus, .. }) => {
                    scanned.insert(bus.clone());
                }
                Tap::Uplink(UplinkTap::Connected) => connected = true,
                _ => {}
            }
            connected && scanned.len() == 2
        },
    )
    .await?;
    say(
        "gateway",
        format!("scanning {} detectors; all quiet", config.detectors.len()),
    );

    pause().await;
    say(
        "scenario",
        "Smoke rises in A-103: detector unit 3 on bus a reports pre-alarm.".to_owned(),
    );
    sims[0].set_smoke(UnitId(3), SmokeState::PreAlarm);
    step.all(
        "fire.pre_alarm",
        Duration::from_secs(10),
        &[&|t| acked(t, EventKind::FirePreAlarm)],
    )
    .await?;
    say(
        "gateway",
        "a warning upstream only: nothing sounds for a pre-alarm".to_owned(),
    );

    pause().await;
    say(
        "scenario",
        "Smoke fills room A-103: the detector goes into alarm.".to_owned(),
    );
    let smoke_at = Instant::now();
    sims[0].set_smoke(UnitId(3), SmokeState::Alarm);
    let sounder_at = std::cell::Cell::new(None);
    step.all(
        "fire.alarm, the sounder and the broker's PUBACK",
        Duration::from_secs(10),
        &[
            &|t| raised(t, EventKind::FireAlarm),
            &|t| {
                let on = written(t, "A-sounder", true);
                if on {
                    if let Tap::Field(FieldReport::OutputWritten { at, .. }) = t {
                        sounder_at.set(Some(*at));
                    }
                }
                on
            },
            &|t| acked(t, EventKind::FireAlarm),
        ],
    )
    .await?;
    if let Some(at) = sounder_at.get() {
        say(
            "gateway",
            format!(
                "A-sounder confirmed ON by the relay module {} ms after the smoke",
                at.duration_since(smoke_at).as_millis()
            ),
        );
    }

    pause().await;
    say(
        "scenario",
        "The officer at the micro fire-station silences the sounders (MQTT command).".to_owned(),
    );
    upstream.command("silence", "demo-silence-1").await?;
    step.all(
        "alarm.silenced and the sounder off",
        Duration::from_secs(10),
        &[
            &|t| acked(t, EventKind::AlarmSilenced),
            &|t| written(t, "A-sounder", false),
            &|t| written(t, "panel buzzer", false),
        ],
    )
    .await?;
    say(
        "gateway",
        "sounders silenced; the panel's fire LED stays on until reset".to_owned(),
    );

    pause().await;
    say("scenario", "The smoke clears in A-103.".to_owned());
    sims[0].set_smoke(UnitId(3), SmokeState::Normal);
    step.all(
        "fire.restored",
        Duration::from_secs(10),
        &[&|t| acked(t, EventKind::FireRestored)],
    )
    .await?;
    say(
        "gateway",
        "detector back to normal; the alarm stays latched until reset".to_owned(),
    );

    pause().await;
    say(
        "scenario",
        "Smoke in B-105 (bus b) while A is silenced: a new alarm re-sounds every sounder."
            .to_owned(),
    );
    sims[1].set_smoke(UnitId(5), SmokeState::Alarm);
    step.all(
        "fire.alarm B-105 and both sounders",
        Duration::from_secs(10),
        &[
            &|t| acked(t, EventKind::FireAlarm),
            &|t| written(t, "B-sounder", true),
            &|t| written(t, "A-sounder", true),
        ],
    )
    .await?;
    pause().await;
    say(
        "scenario",
        "The smoke clears in B-105 too; both alarms stay latched.".to_owned(),
    );
    sims[1].set_smoke(UnitId(5), SmokeState::Normal);
    step.all(
        "fire.restored B-105",
        Duration::from_secs(10),
        &[&|t| acked(t, EventKind::FireRestored)],
    )
    .await?;

    pause().await;
    say(
        "scenario",
        "The officer resets the panel (MQTT command).".to_owned(),
    );
    upstream.command("reset", "demo-reset-1").await?;
    step.all(
        "alarm.reset and the outputs off",
        Duration::from_secs(10),
        &[
            &|t| acked(t, EventKind::AlarmReset),
            &|t| written(t, "A-sounder", false),
            &|t| written(t, "B-sounder", false),
            &|t| written(t, "panel fire LED", false),
            &|t| written(t, "panel buzzer", false),
        ],
    )
    .await?;
    say(
        "gateway",
        "alarms cleared, remote reset written to the detectors, sounders and fire LED off"
            .to_owned(),
    );

    pause().await;
    say(
        "scenario",
        "Detector A-107 goes dead (wire cut).".to_owned(),
    );
    sims[0].set_offline(UnitId(7), true);
    step.all(
        "device.offline, the fault LED and the buzzer's pulse",
        Duration::from_secs(20),
        &[
            &|t| acked(t, EventKind::DeviceOffline),
            &|t| written(t, "panel fault LED", true),
            &|t| written(t, "panel buzzer", true),
        ],
    )
    .await?;
    say(
        "gateway",
        "A-107 offline after 3 missed polls in a row; panel fault LED on, buzzer pulsing"
            .to_owned(),
    );

    pause().await;
    say(
        "scenario",
        "The officer silences the fault buzzer (MQTT command); the fault LED stays on.".to_owned(),
    );
    upstream.command("silence", "demo-silence-2").await?;
    step.all(
        "alarm.silenced",
        Duration::from_secs(10),
        &[&|t| acked(t, EventKind::AlarmSilenced)],
    )
    .await?;

    pause().await;
    say(
        "scenario",
        "Until the wire is repaired, the officer disables A-107 (MQTT command).".to_owned(),
    );
    upstream
        .command_with("disable", "demo-disable-1", &[("device", "A-107")])
        .await?;
    step.all(
        "device.disabled, the disablement LED on and the fault LED off",
        Duration::from_secs(10),
        &[
            &|t| acked(t, EventKind::DeviceDisabled),
            &|t| written(t, "panel disablement LED", true),
            &|t| written(t, "panel fault LED", false),
        ],
    )
    .await?;
    say(
        "gateway",
        "A-107 disabled: its fault no longer shows, the disablement LED tells the officer a detector is out of service"
            .to_owned(),
    );

    pause().await;
    let received = upstream.received();
    say(
        "upstream",
        format!(
            "the command centre received {} events, seq {}",
            received.len(),
            ranges(&received)
        ),
    );
    gateway_stop.cancel();
    match gateway.await {
        Ok(r) => r?,
        Err(e) => bail!("the gateway task failed: {e}"),
    }
    let _ = std::fs::remove_dir_all(&state);
    drop(guards);
    println!("\nDone. Run `village-gateway simulate` to drive a simulated bus by hand, or see README.md to run the gateway on your own config.");
    Ok(())
}

struct Scenario<'a, S: Fn(&str, String)> {
    tap: &'a mut broadcast::Receiver<Tap>,
    say: &'a S,
}

impl<S: Fn(&str, String)> Scenario<'_, S> {
    /// Prints what the gateway does until every one of `wanted` has matched a tap (in any
    /// order), or fails after `limit`.
    async fn all(
        &mut self,
        what: &str,
        limit: Duration,
        wanted: &[&dyn Fn(&Tap) -> bool],
    ) -> anyhow::Result<()> {
        let mut seen = vec![false; wanted.len()];
        self.until(what, limit, |t| {
            for (s, w) in seen.iter_mut().zip(wanted) {
                *s |= w(t);
            }
            seen.iter().all(|s| *s)
        })
        .await
    }

    /// Prints what the gateway does until `done` matches a tap, or fails after `limit`.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Tap) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let t = match tokio::time::timeout_at(deadline, self.tap.recv()).await {
                Ok(Ok(t)) => t,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    bail!("the gateway stopped while waiting for {what}")
                }
                Err(_) => bail!("{what} did not happen within {} s", limit.as_secs()),
            };
            self.print(&t);
            if done(&t) {
                return Ok(());
            }
        }
    }

    fn print(&self, t: &Tap) {
        match t {
            Tap::Raised(e) => {
                let device = e
                    .data
                    .device
                    .as_ref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default();
                let loc = e
                    .data
                    .location
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default();
                let reason = e
                    .data
                    .reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                (self.say)("gateway", format!("raised {}{device}{loc}{reason}", e.kind));
            }
            Tap::OutputWanted { output, on, .. } => (self.say)(
                "gateway",
                format!(
                    "drives {output} {}: coil write goes out before the next poll",
                    if *on { "ON" } else { "off" }
                ),
            ),
            Tap::Stored { seq, kind } => (self.say)("store", format!("seq {seq} {kind} stored")),
            Tap::Uplink(UplinkTap::Acked { seq, kind }) => {
                (self.say)("broker", format!("PUBACK seq {seq} {kind}"));
            }
            Tap::Uplink(UplinkTap::Connected) => {
                (self.say)("uplink", "connected to the broker".to_owned());
            }
            Tap::Uplink(UplinkTap::Disconnected { reason }) => {
                (self.say)("uplink", format!("disconnected: {reason}"));
            }
            Tap::Field(FieldReport::OutputWritten {
                name,
                on,
                ok: false,
                ..
            }) => {
                (self.say)(
                    "gateway",
                    format!(
                        "write of {name} {} FAILED; retrying",
                        if *on { "ON" } else { "off" }
                    ),
                );
            }
            _ => {}
        }
    }
}

/// A moment for the viewer to read, between scenes (pacing only, not synchronisation).
async fn pause() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!();
}

fn raised(t: &Tap, kind: EventKind) -> bool {
    matches!(t, Tap::Raised(e) if e.kind == kind)
}

fn acked(t: &Tap, kind: EventKind) -> bool {
    matches!(t, Tap::Uplink(UplinkTap::Acked { kind: k, .. }) if *k == kind)
}

fn written(t: &Tap, output: &str, level: bool) -> bool {
    matches!(t, Tap::Field(FieldReport::OutputWritten { name, on, ok: true, .. }) if name == output && *on == level)
}

/// `1-7, 9` from sorted seqs.
fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        while i + 1 < seqs.len() && seqs[i + 1] == seqs[i] + 1 {
            i += 1;
        }
        out.push(if seqs[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", seqs[i])
        });
        i += 1;
    }
    out.join(", ")
}

/// The fire command centre, as an MQTT client.
struct Upstream {
    client: rumqttc::AsyncClient,
    seqs: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

impl Upstream {
    async fn connect(url: &str) -> anyhow::Result<Upstream> {
        let addr = url.trim_start_matches("mqtt://");
        let (host, port) = addr.rsplit_once(':').context("broker url has no port")?;
        let mut opts = rumqttc::MqttOptions::new(
            "demo-command-centre",
            host,
            port.parse().context("bad port")?,
        );
        opts.set_keep_alive(Duration::from_secs(10));
        // Batches are up to 64 KiB; rumqttc's default limit is 10 KiB.
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        for filter in ["village/demo/event/#", "village/demo/events"] {
            client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await?;
        }
        let seqs = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let s = seqs.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        // One CloudEvent, or a batch (a JSON array) on `village/demo/events`.
                        let events = match serde_json::from_slice(&p.payload) {
                            Ok(serde_json::Value::Array(batch)) => batch,
                            Ok(one) => vec![one],
                            Err(_) => Vec::new(),
                        };
                        for v in events {
                            if let (Some(seq), Ok(mut set)) = (v["seq"].as_u64(), s.lock()) {
                                set.insert(seq);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
        Ok(Upstream { client, seqs })
    }

    async fn command(&self, name: &str, id: &str) -> anyhow::Result<()> {
        self.command_with(name, id, &[]).await
    }

    /// Publishes command `name` with `id` and the string arguments `args`.
    async fn command_with(
        &self,
        name: &str,
        id: &str,
        args: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut payload = serde_json::json!({ "id": id });
        for (k, v) in args {
            payload[*k] = serde_json::json!(v);
        }
        let payload = payload.to_string();
        self.client
            .publish(
                format!("village/demo/cmd/{name}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await?;
        Ok(())
    }

    fn received(&self) -> Vec<u64> {
        self.seqs
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}
