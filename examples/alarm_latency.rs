//! Benchmark: detector alarm → sounder coil latency on one 9600 baud bus with 32 detectors,
//! and the gateway's RSS and CPU while polling.
//!
//! The gateway runs as its own process (the release binary, `run --config`), so its RSS and
//! CPU are its own; the simulator (a pseudo-terminal with wire time emulated) and the MQTT
//! broker run in this process. Latency is measured on the simulator's clock: from the instant
//! the detector's status turns to alarm to the instant the relay module has received the
//! sounder's coil write (FC05), for `ROUNDS` alarms on detectors spread over the scan.
//!
//! ```sh
//! cargo build --release && cargo run --release --example alarm_latency
//! ```
//!
//! The alarms start at pseudo-random phases of the scan (fixed seed), so the latencies spread
//! over one scan cycle: a detector polled just before its smoke arrives is seen one cycle later.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::{
    clk_tck, coil_write_wire_time, cpu_ticks, gateway_bin, ms, poll_wire_time, rss_kib,
    spawn_gateway, Lcg,
};
use village_gateway::event::UnitId;
use village_gateway::sim::{SimChange, SimProfile, Simulator, SmokeState};

const DETECTORS: u8 = 32;
const ROUNDS: usize = 40;
const BAUD: u32 = 9600;
const RELAY: UnitId = UnitId(100);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = gateway_bin()?;

    let sim = Simulator::new(
        BAUD,
        (1..=DETECTORS)
            .map(|u| (UnitId(u), SimProfile::Smoke))
            .chain([(RELAY, SimProfile::Relay)]),
    );
    let pty = sim.serve_pty()?;
    let broker = village_gateway::broker::start(0)?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("gateway.toml");
    let mut f = std::fs::File::create(&config_path)?;
    write!(
        f,
        r#"[gateway]
id = "bench"
state_dir = "{state}"
[uplink]
url = "mqtt://127.0.0.1:{port}"
[[bus]]
name = "a"
rtu = {{ port = "{pty}", baud = {BAUD} }}
[[sounder]]
id = "A-sounder"
zones = ["A"]
output = {{ bus = "a", unit = 100, coil = 0 }}
"#,
        state = dir.path().join("state").display(),
        port = broker.port(),
        pty = pty.path(),
    )?;
    for u in 1..=DETECTORS {
        writeln!(
            f,
            "[[detector]]\nid = \"A-{u}\"\nbus = \"a\"\nunit = {u}\nzone = \"A\""
        )?;
    }
    drop(f);

    let mut child = spawn_gateway(&bin, &config_path)?;
    let pid = child.id();

    // Reset commands go through MQTT like an officer's.
    let mut opts = rumqttc::MqttOptions::new("bench-officer", "127.0.0.1", broker.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let mut events = sim.subscribe();
    // Wait until the gateway has scanned the bus once (every unit polled).
    let warm = Instant::now();
    while sim.requests_served() < u64::from(DETECTORS) * 2 {
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(30),
            "the gateway does not poll"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle polling: RSS and CPU of the gateway process over 10 s.
    let (cpu0, t0, served0) = (cpu_ticks(pid)?, Instant::now(), sim.requests_served());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = t0.elapsed();
    let cpu_pct = (cpu_ticks(pid)? - cpu0) as f64 / clk_tck() / idle.as_secs_f64() * 100.0;
    let rss_kib = rss_kib(pid)?;
    // While idle the gateway only polls: one request per detector per scan.
    let polls = sim.requests_served() - served0;
    let measured_cycle = idle.mul_f64(f64::from(DETECTORS) / polls as f64);

    let mut latencies = Vec::new();
    let mut rng = Lcg(0x5eed);
    for round in 0..ROUNDS {
        // Spread the alarms over the scan: unit 1, 9, 17, 25, 2, ...
        let unit = UnitId(u8::try_from(
            1 + (round * 8 + round / 4) % usize::from(DETECTORS),
        )?);
        // Start the fire at a pseudo-random phase of the scan (a fixed-seed LCG: repeatable).
        let phase = Duration::from_millis(rng.below(1000));
        tokio::time::sleep(phase).await;
        while events.try_recv().is_ok() {}
        sim.set_smoke(unit, SmokeState::Alarm);
        let mut smoke_at = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        let on_at = loop {
            let e = tokio::time::timeout_at(deadline.into(), events.recv()).await??;
            match e.what {
                SimChange::SmokeChanged {
                    state: SmokeState::Alarm,
                } if e.unit == unit => smoke_at = Some(e.at),
                SimChange::CoilWritten {
                    address: 0,
                    on: true,
                } if e.unit == RELAY => break e.at,
                _ => {}
            }
        };
        let smoke_at = smoke_at.ok_or_else(|| anyhow::anyhow!("no SmokeChanged event"))?;
        latencies.push(on_at.duration_since(smoke_at));
        sim.set_smoke(unit, SmokeState::Normal);
        let payload = format!(r#"{{"id":"bench-reset-{round}"}}"#);
        client
            .publish(
                "village/bench/cmd/reset",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await?;
        loop {
            let e = tokio::time::timeout_at(deadline.into(), events.recv()).await??;
            if e.unit == RELAY
                && e.what
                    == (SimChange::CoilWritten {
                        address: 0,
                        on: false,
                    })
            {
                break;
            }
        }
    }
    child.kill()?;
    child.wait()?;

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    let per_unit = poll_wire_time(BAUD);
    let cycle_bound = per_unit * u32::from(DETECTORS);
    println!("alarm_latency: {DETECTORS} detectors, one bus at {BAUD} baud 8N1, {ROUNDS} alarms");
    println!(
        "  alarm -> sounder coil write received: median {:.1} ms, max {:.1} ms",
        ms(median),
        ms(max)
    );
    println!(
        "  wire-time bound of one scan cycle:     {:.1} ms ({:.2} ms per detector)",
        ms(cycle_bound),
        ms(per_unit)
    );
    println!(
        "  measured scan cycle (idle polling):    {:.1} ms (bound / measured = {:.2})",
        ms(measured_cycle),
        cycle_bound.as_secs_f64() / measured_cycle.as_secs_f64()
    );
    println!(
        "  worst case expected:                   one measured scan cycle + one coil write ({:.1} ms)",
        ms(measured_cycle + coil_write_wire_time(BAUD))
    );
    println!(
        "  gateway process while polling:         RSS {:.1} MiB, CPU {cpu_pct:.1} % of one core",
        rss_kib as f64 / 1024.0
    );
    Ok(())
}
