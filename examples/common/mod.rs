//! Helpers shared by the benchmarks (`alarm_latency`, `bus_scale`): the gateway as a child
//! process, the wire-time bound of a poll, and /proc readings of the child.

// Each example uses part of this module.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use village_gateway::field::frame::char_time;

/// The release binary (or `VGW_BIN`), which must have been built.
pub(crate) fn gateway_bin() -> anyhow::Result<String> {
    let bin =
        std::env::var("VGW_BIN").unwrap_or_else(|_| "target/release/village-gateway".to_owned());
    anyhow::ensure!(
        std::path::Path::new(&bin).exists(),
        "build the release binary first: cargo build --release"
    );
    Ok(bin)
}

/// Starts `village-gateway run --config <config>` with errors-only logging.
pub(crate) fn spawn_gateway(bin: &str, config: &std::path::Path) -> anyhow::Result<Child> {
    Ok(Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()?)
}

/// Wire-time bound of one detector poll at `baud`, 8N1 (10 bits per character): an 8-byte
/// FC04 request and a 13-byte reply (4 registers), each followed by the 3.5-character silent
/// interval (Serial Line V1.02 §2.5.1.1).
pub(crate) fn poll_wire_time(baud: u32) -> Duration {
    let ch = char_time(baud, 10);
    ch * (8 + 13) + ch * 7
}

/// Wire time of one FC05 coil write and its echo reply at `baud`, 8N1, with one t3.5.
pub(crate) fn coil_write_wire_time(baud: u32) -> Duration {
    let ch = char_time(baud, 10);
    ch * (8 + 8) + ch * 7 / 2
}

/// A fixed-seed LCG (Knuth's MMIX constants): repeatable pseudo-random phases.
#[derive(Debug)]
pub(crate) struct Lcg(pub(crate) u64);

impl Lcg {
    /// The next value in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// USER_HZ: the unit of utime/stime in /proc/PID/stat; 100 on Linux for x86 and ARM.
pub(crate) fn clk_tck() -> f64 {
    100.0
}

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}
