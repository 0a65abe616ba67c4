//! Benchmark: how the scan cycle and the alarm-to-sounder latency scale with the number of
//! units on one bus and with dead units, at 9600 and 19200 baud.
//!
//! For each configuration (baud × units × dead share) the release gateway runs as its own
//! process against the simulator on a pseudo-terminal (wire time emulated). The bus holds
//! `units` unit ids: `units - 1` smoke detectors and a relay module (unit 247) with eight
//! sounders, one per zone (detector `d` is in zone `d % 8`, its sounder on coil `d % 8`), so
//! eight alarms can be measured one after the other without resets. With 25 % dead, one in four detectors
//! of each zone (spread over the scan) never answers.
//!
//! Printed per configuration:
//! - **cycle**: the measured scan cycle (simulator clock: polls served over a window of about
//!   three cycles, scaled to one cycle of the live detectors);
//! - **bound**: the wire-time bound of one cycle of the live detectors (an 8-byte FC04
//!   request and a 13-byte reply plus two t3.5 each, 8N1) and **ratio** = bound / cycle;
//! - **alarm max / median**: detector alarm (its status register turning to 1 in the
//!   simulator) → the relay module has received the sounder's FC05 write, for `ALARMS`
//!   alarms started at pseudo-random phases of the scan (fixed seed).
//!
//! Targets (issue 4): ratio ≥ 0.9 with 0 % dead; worst alarm latency with 25 % dead ≤ 1.2 ×
//! the 0 %-dead cycle of the same baud and size.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bus_scale            # all 12, ~8 min
//! cargo run --release --example bus_scale -- 19200 64                         # a subset
//! ```

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::{gateway_bin, ms, poll_wire_time, spawn_gateway, Lcg};
use village_gateway::event::UnitId;
use village_gateway::sim::{SimChange, SimProfile, Simulator, SmokeState};

const RELAY: UnitId = UnitId(247);
/// Alarms measured per configuration (one per zone, one after the other).
const ALARMS: u16 = 8;

struct Row {
    baud: u32,
    units: u8,
    dead_pct: u32,
    cycle: Duration,
    bound: Duration,
    max: Duration,
    median: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = gateway_bin()?;
    let filters: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let wanted = |v: u32| filters.is_empty() || filters.contains(&v);
    let mut rows = Vec::new();
    for baud in [9600u32, 19_200] {
        for units in [32u8, 64, 247] {
            if !wanted(baud) || !wanted(u32::from(units)) {
                continue;
            }
            for dead_pct in [0u32, 25] {
                let row = run(&bin, baud, units, dead_pct).await?;
                print_row(&row, None);
                rows.push(row);
            }
        }
    }
    println!();
    println!("bus_scale: one RS-485 bus, 8N1, detectors + relay module (unit 247), {ALARMS} alarms per row");
    println!(
        "{:>6} {:>5} {:>5} {:>10} {:>10} {:>6} {:>11} {:>11} {:>16}",
        "baud",
        "units",
        "dead",
        "cycle ms",
        "bound ms",
        "ratio",
        "alarm max",
        "alarm med",
        "max / 0%-cycle"
    );
    for row in &rows {
        let clean = rows
            .iter()
            .find(|r| r.baud == row.baud && r.units == row.units && r.dead_pct == 0)
            .map(|r| r.cycle);
        print_row(row, clean);
    }
    Ok(())
}

fn print_row(r: &Row, clean_cycle: Option<Duration>) {
    let vs_clean = clean_cycle.map_or_else(String::new, |c| {
        format!("{:.2}", r.max.as_secs_f64() / c.as_secs_f64())
    });
    println!(
        "{:>6} {:>5} {:>4}% {:>10.0} {:>10.0} {:>6.2} {:>11.0} {:>11.0} {:>16}",
        r.baud,
        r.units,
        r.dead_pct,
        ms(r.cycle),
        ms(r.bound),
        r.bound.as_secs_f64() / r.cycle.as_secs_f64(),
        ms(r.max),
        ms(r.median),
        vs_clean
    );
}

async fn run(bin: &str, baud: u32, units: u8, dead_pct: u32) -> anyhow::Result<Row> {
    let detectors: Vec<u8> = (1..units).collect();
    // One in four of each zone's detectors, spread over the scan.
    let is_dead = |d: u8| dead_pct > 0 && (d + d / 8).is_multiple_of(4);
    let live: Vec<u8> = detectors.iter().copied().filter(|&d| !is_dead(d)).collect();
    let sim = Simulator::new(
        baud,
        detectors
            .iter()
            .map(|&d| (UnitId(d), SimProfile::Smoke))
            .chain([(RELAY, SimProfile::Relay)]),
    );
    for &d in &detectors {
        if is_dead(d) {
            sim.set_offline(UnitId(d), true);
        }
    }
    let pty = sim.serve_pty()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("gateway.toml");
    let mut f = std::fs::File::create(&config_path)?;
    // No broker: the uplink keeps retrying a closed port, which never holds up alarming.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    write!(
        f,
        r#"[gateway]
id = "bench"
state_dir = "{state}"
[uplink]
url = "mqtt://127.0.0.1:{closed}"
[[bus]]
name = "a"
rtu = {{ port = "{pty}", baud = {baud} }}
"#,
        state = dir.path().join("state").display(),
        pty = pty.path(),
    )?;
    for zone in 0..8 {
        writeln!(
            f,
            "[[sounder]]\nid = \"S-{zone}\"\nzones = [\"Z{zone}\"]\noutput = {{ bus = \"a\", unit = {}, coil = {zone} }}",
            RELAY.0
        )?;
    }
    for &d in &detectors {
        writeln!(
            f,
            "[[detector]]\nid = \"D-{d}\"\nbus = \"a\"\nunit = {d}\nzone = \"Z{}\"",
            d % 8
        )?;
    }
    drop(f);
    let mut child = spawn_gateway(bin, &config_path)?;
    let result = measure(&sim, baud, &live).await;
    child.kill()?;
    child.wait()?;
    let (cycle, latencies) = result?;
    let mut sorted = latencies;
    sorted.sort();
    let bound = poll_wire_time(baud) * u32::try_from(live.len())?;
    Ok(Row {
        baud,
        units,
        dead_pct,
        cycle,
        bound,
        max: *sorted.last().unwrap_or(&Duration::ZERO),
        median: sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
    })
}

/// Warm-up, the measured cycle, then `ALARMS` alarms at random phases.
async fn measure(
    sim: &Simulator,
    baud: u32,
    live: &[u8],
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let n = u64::try_from(live.len())?;
    let expected = poll_wire_time(baud) * u32::try_from(live.len())?;
    // Warm-up: four cycles of the live units (the dead ones miss three polls in a row and
    // leave the scan).
    let warm = Instant::now();
    while sim.requests_served() < 4 * n + 2 {
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(120),
            "the gateway does not poll"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cycle: live polls served over about three cycles (read-backs and probes are a
    // handful of extra transactions; probes of dead units are not served, their time is in).
    let window = (expected * 3).max(Duration::from_secs(3));
    let (t0, served0) = (Instant::now(), sim.requests_served());
    tokio::time::sleep(window).await;
    let served = sim.requests_served() - served0;
    let cycle = t0.elapsed().mul_f64(n as f64 / served.max(1) as f64);

    let mut rng = Lcg(0x5eed ^ u64::from(baud) ^ n);
    let mut events = sim.subscribe();
    let mut latencies = Vec::new();
    // One alarm at a time (several at once would each add a confirming re-read and a coil
    // write to the others' cycle), each in another zone so that no reset is needed, started at
    // a pseudo-random phase of the scan.
    for zone in 0..ALARMS {
        let in_zone: Vec<u8> = live
            .iter()
            .copied()
            .filter(|d| u16::from(*d) % 8 == zone)
            .collect();
        let d = UnitId(in_zone[usize::try_from(rng.below(in_zone.len() as u64))?]);
        tokio::time::sleep(cycle.mul_f64(rng.below(1000) as f64 / 1000.0)).await;
        while events.try_recv().is_ok() {}
        sim.set_smoke(d, SmokeState::Alarm);
        let deadline = Instant::now() + cycle * 3 + Duration::from_secs(5);
        let mut smoke_at = None;
        let on_at = loop {
            let e = tokio::time::timeout_at(deadline.into(), events.recv()).await??;
            match e.what {
                SimChange::SmokeChanged {
                    state: SmokeState::Alarm,
                } if e.unit == d => smoke_at = Some(e.at),
                SimChange::CoilWritten { address, on: true }
                    if e.unit == RELAY && address == zone =>
                {
                    break e.at;
                }
                _ => {}
            }
        };
        let smoke_at = smoke_at.ok_or_else(|| anyhow::anyhow!("no SmokeChanged event"))?;
        latencies.push(on_at.duration_since(smoke_at));
    }
    Ok((cycle, latencies))
}
