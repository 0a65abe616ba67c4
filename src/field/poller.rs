//! One poller per bus: it owns the bus's [`Link`], scans its detectors, and writes its
//! outputs (sounder and panel coils) ahead of the next poll.
//!
//! Invariants:
//! - **Outputs first.** Before every poll transaction, every coil whose wanted level differs
//!   from the level last confirmed by the unit's FC05 echo is written. A failed write stays
//!   pending and is retried before the next transaction; it is never dropped.
//! - **One transaction at a time** on the bus, each bounded by the link's timeout.
//! - **Dead units cost almost nothing.** A detector that missed `offline_after` polls in a row
//!   (the engine's own limit, so both agree when it is offline) leaves the scan: it is probed
//!   at most once per `probe_interval`, and the bus probes **at most one** offline detector per
//!   scan cycle, so any number of dead units stretch a cycle by at most one timeout
//!   (`field::budget` relies on this). Skipped polls are not reported (the engine keeps it
//!   offline: no flapping); a failed probe is reported as a miss; a probe that answers is
//!   reported as a reading and the detector rejoins the scan at once; it also makes every
//!   other offline detector due at once (a cut cable or a rebooted converter brings them all
//!   back), still one probe per cycle.
//! - Misses caused by the port itself (it cannot be opened, or failed with an I/O error) are
//!   reported to the engine but do not count towards leaving the scan: after the adapter is
//!   back, every detector that answered before is polled in the very next cycle.
//! - Each serial bus runs on its own OS thread with a current-thread runtime, so a blocking
//!   serial call never delays another bus or the engine.
//! - A reading is attributed to a detector only when the link validated the reply's unit,
//!   function code, count and CRC. Anything else is a missed poll.
//! - A port that fails with an I/O error (adapter unplugged) is reopened with backoff (200 ms
//!   doubling to 5 s); until it is back, every attempt reports a miss for each detector, so
//!   they go offline as usual. The link's counters survive the reopen.
//! - **Statistics**: every completed cycle is reported ([`FieldReport::Cycle`]) with the bus's
//!   [`BusStats`]: link counters, per-unit counters of units that failed, the cycle time and
//!   the worst one.
//! - **Alarm confirmation.** A reading that turns a detector to alarm is reported only after
//!   one immediate re-read of the same unit agrees (per detector, [`PolledDetector::confirm_alarm`]);
//!   otherwise the re-read is what is reported. One corrupted reply cannot sound a village, and
//!   the confirmation costs one transaction, not one scan cycle.
//! - **Read plan.** Each detector is read with its profile's plan for the cycle
//!   ([`profile::plan_cycle`]): the alarm and fault points every cycle, first; slow points
//!   (`every = N`) in their cycles, their last values reported in between. A probe, or a
//!   detector whose slow points were never read, reads every point. `generic-smoke` is one FC04
//!   of registers 0..3 in every cycle, as before.
//! - **Output read-back.** Every `readback_interval` each relay module's coils are read (FC01)
//!   and compared with the wanted levels. A mismatch or a failed read is reported as a failed
//!   [`FieldReport::OutputWritten`] and the coil is written again at once.
//! - **Inputs** (panel keys on discrete inputs) are read once per scan cycle with FC02 and
//!   reported on every change as [`FieldReport::Input`]; a key must be held for one scan cycle
//!   to be seen.
//!
//! It does not decide anything about fire: readings and misses go to the engine as
//! [`FieldReport`]s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::frame::{Request, Response};
use super::link::{self, Link, LinkCounters, LinkSettings, LinkStats};
use super::profile::{self, Block, BlockData};
use crate::config::SmokeProfile;
use crate::event::{DetectorReading, DetectorStatus, UnitId};

/// How long the poller waits for the engine's outputs after a detector's reading turns to
/// alarm, before it goes on with the scan. [`super::budget`] counts it.
pub(super) const ENGINE_GRACE: Duration = Duration::from_millis(10);

/// A detector this bus polls.
#[derive(Debug, Clone)]
pub struct PolledDetector {
    /// The engine's index of this detector.
    pub index: usize,
    pub unit: UnitId,
    pub profile: SmokeProfile,
    /// Re-read once before a new alarm is reported.
    pub confirm_alarm: bool,
}

/// A discrete input this bus reads once per scan cycle (a panel key on an I/O module).
#[derive(Debug, Clone)]
pub struct PolledInput {
    /// For reports and logs (`silence_key`, `reset_key`).
    pub name: String,
    pub unit: UnitId,
    /// Discrete input address (FC02, 0-based).
    pub address: u16,
}

/// A coil this bus drives (a sounder, a panel LED or buzzer on a relay module).
#[derive(Debug)]
pub struct CoilOutput {
    /// For logs and reports.
    pub name: String,
    pub unit: UnitId,
    pub coil: u16,
    /// The level the engine wants.
    pub wanted: watch::Receiver<bool>,
}

/// A one-off write (a detector's remote reset).
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub unit: UnitId,
    pub request: Request,
}

/// What a bus reports to the engine.
#[derive(Debug, Clone)]
pub enum FieldReport {
    /// Detector `detector` answered with `reading` at `at`.
    Reading {
        detector: usize,
        reading: DetectorReading,
        at: Instant,
    },
    /// Detector `detector` did not answer validly.
    Missed { detector: usize, reason: String },
    /// An output write or read-back finished: `ok` when the unit echoed the write (or its coil
    /// read back at the wanted level), else `error` says why.
    OutputWritten {
        name: String,
        on: bool,
        ok: bool,
        error: Option<String>,
        at: Instant,
    },
    /// A scan cycle of `bus` ended after `cycle`; `stats` are the bus's counters so far.
    Cycle {
        bus: String,
        cycle: Duration,
        stats: BusStats,
    },
    /// Input `name` was read as `on` (reported at the first read and on every change), or
    /// could not be read (`on` = `None`).
    Input {
        name: String,
        on: Option<bool>,
        at: Instant,
    },
}

/// Statistics of one bus since the gateway started (they survive reopening the port), as in
/// the status message (`buses.<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BusStats {
    /// Transactions, timeouts, CRC errors, foreign/stale frames, exceptions (with the last
    /// exception code), I/O errors of the whole bus.
    #[serde(flatten)]
    pub link: LinkStats,
    /// The last completed scan cycle, in ms.
    pub cycle_ms: u64,
    /// The longest completed scan cycle, in ms.
    pub worst_cycle_ms: u64,
    /// Times the port or connection was opened again after a failure.
    pub reopens: u64,
    /// Probes of offline detectors.
    pub probes: u64,
    /// Unit ids of detectors out of the scan (offline, probed every `probe_interval`).
    pub offline_units: Vec<u8>,
    /// Counters of every unit id that had a failed transaction, an exception or stray bytes
    /// before a reply.
    pub units: BTreeMap<u8, LinkStats>,
}

/// Everything one bus needs.
#[derive(Debug)]
pub struct BusPlan {
    pub name: String,
    pub settings: LinkSettings,
    /// Minimum scan cycle; zero = back to back.
    pub scan_interval: Duration,
    pub detectors: Vec<PolledDetector>,
    pub coils: Vec<CoilOutput>,
    pub inputs: Vec<PolledInput>,
    /// Missed polls in a row after which a detector leaves the scan and is only probed (the
    /// bus's `offline_after`, the same limit the engine uses for `device.offline`).
    pub offline_after: u32,
    /// How often an offline detector is probed (at most one probe per scan cycle).
    pub probe_interval: Duration,
    /// How often each relay module's coils are read back; see the module doc.
    pub readback_interval: Duration,
    /// Notified when a wanted level changes or a write is queued.
    /// Bumped by the daemon after it changed a wanted level or queued a write for this bus.
    /// A `watch` rather than a `Notify`: a stale permit must never pass for the engine's
    /// answer to the alarm this bus just reported.
    pub wake: watch::Receiver<u64>,
    pub writes: mpsc::UnboundedReceiver<WriteRequest>,
}

/// Runs `plan` on its own thread until `shutdown` is cancelled.
///
/// # Errors
/// Only if the OS cannot start a thread or its runtime.
pub fn spawn(
    plan: BusPlan,
    reports: mpsc::Sender<FieldReport>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("bus-{}", plan.name))
        .spawn(move || rt.block_on(run(plan, reports, shutdown)))
}

struct Coil {
    out: CoilOutput,
    /// The level the unit last confirmed; `None` until the first write succeeds.
    confirmed: Option<bool>,
    /// A write failed in this scan cycle: retry in the next one, so that a dead relay module
    /// costs one timeout per cycle, not one per poll. A new wanted level is tried at once.
    failed: Option<bool>,
    /// The last write failed or the coil was lost (logged and reported once per streak).
    failing: bool,
}

impl Coil {
    /// The unit no longer holds this coil at `on` (read-back) or cannot be reached: it is
    /// written again at the next chance, and the failure is reported once per failing streak
    /// (the engine raises `sounder.fault`; the successful rewrite clears it).
    async fn lost(&mut self, on: bool, error: String, reports: &mpsc::Sender<FieldReport>) {
        self.confirmed = None;
        if std::mem::replace(&mut self.failing, true) {
            return;
        }
        let _ = reports
            .send(FieldReport::OutputWritten {
                name: self.out.name.clone(),
                on,
                ok: false,
                error: Some(error),
                at: Instant::now(),
            })
            .await;
    }
}

/// Whether a detector answers, as the scheduler sees it.
struct Health {
    /// Missed polls in a row (port failures not counted).
    misses: u32,
    /// When it may be probed next, once it is out of the scan.
    next_probe: Instant,
}

/// The bus loop. See the module doc for its invariants.
#[allow(clippy::too_many_lines)] // One loop, read top to bottom; its parts are functions.
pub async fn run(plan: BusPlan, reports: mpsc::Sender<FieldReport>, shutdown: CancellationToken) {
    let BusPlan {
        name,
        settings,
        scan_interval,
        detectors,
        coils,
        inputs,
        offline_after,
        probe_interval,
        readback_interval,
        mut wake,
        mut writes,
    } = plan;
    let offline_after = offline_after.max(1);
    let mut input_levels: Vec<Option<Option<bool>>> = vec![None; inputs.len()];
    let mut next_readback = Instant::now() + readback_interval;
    let mut coils: Vec<Coil> = coils
        .into_iter()
        .map(|out| Coil {
            out,
            confirmed: None,
            failed: None,
            failing: false,
        })
        .collect();
    let mut health: Vec<Health> = detectors
        .iter()
        .map(|_| Health {
            misses: 0,
            next_probe: Instant::now(),
        })
        .collect();
    let mut link: Option<Link> = None;
    // Counters of the link that failed, handed to the next one.
    let mut carried = LinkCounters::default();
    let mut stats = BusStats::default();
    let mut opened_before = false;
    // The last status of each detector, to see an alarm arrive.
    let mut last_alarm = vec![false; detectors.len()];
    let mut backoff = Duration::from_millis(200);
    let bus = name.as_str();
    // Scan cycles started, for the slow points' schedule (`profile::is_due`).
    let mut cycle: u64 = 0;
    let mut kept = vec![Kept::default(); detectors.len()];

    while !shutdown.is_cancelled() {
        let cycle_start = Instant::now();
        if link.is_none() {
            match Link::open(settings.clone()).await {
                Ok(mut l) => {
                    info!(bus, "Bus opened.");
                    l.restore_counters(&std::mem::take(&mut carried));
                    if std::mem::replace(&mut opened_before, true) {
                        stats.reopens += 1;
                    }
                    link = Some(l);
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    warn!(bus, error = %e, retry_ms = backoff.as_millis() as u64, "Cannot open bus; retrying.");
                    let reason = format!("bus {bus} cannot be opened: {e}");
                    outputs_unreachable(&mut coils, &reports, &reason).await;
                    for d in &detectors {
                        if reports
                            .send(FieldReport::Missed {
                                detector: d.index,
                                reason: reason.clone(),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some(l) = link.as_mut() else { continue };
        cycle = cycle.wrapping_add(1);
        for c in &mut coils {
            c.failed = None;
        }
        let transactions_before = l.stats().transactions;
        // The one offline detector this cycle may probe: the longest due.
        let now = Instant::now();
        let probe = health
            .iter()
            .enumerate()
            .filter(|(_, h)| h.misses >= offline_after && h.next_probe <= now)
            .min_by_key(|(_, h)| h.next_probe)
            .map(|(k, _)| k);

        let mut broken = false;
        for (k, d) in detectors.iter().enumerate() {
            if shutdown.is_cancelled() {
                return;
            }
            let out_of_scan = health[k].misses >= offline_after;
            if out_of_scan && probe != Some(k) {
                continue;
            }
            if let Err(e) = service_outputs(l, &mut coils, &mut writes, &reports, bus).await {
                warn!(bus, error = %e, "Bus failed while writing outputs; reopening.");
                broken = true;
                break;
            }
            if out_of_scan {
                stats.probes += 1;
            }
            // A probe, or a detector whose slow points were never read, reads every point.
            let blocks = if out_of_scan || kept[k].incomplete(&d.profile) {
                profile::plan_points(&d.profile.points())
            } else {
                profile::plan_cycle(&d.profile, cycle, d.unit)
            };
            let (mut report, mut io_failed) = poll(l, d, bus, &blocks, &mut kept[k]).await;
            if d.confirm_alarm && !io_failed && !last_alarm[k] && is_alarm(&report) {
                // One immediate re-read before the alarm counts: of this cycle's blocks, those
                // with alarm or fault points (generic-smoke: the same FC04 of registers 0..3).
                let alarm_points = d.profile.alarm_points();
                let alarm_blocks: Vec<Block> = blocks
                    .iter()
                    .filter(|b| alarm_points.iter().any(|p| b.covers(p)))
                    .copied()
                    .collect();
                let (second, failed) = poll(l, d, bus, &alarm_blocks, &mut kept[k]).await;
                if !is_alarm(&second) {
                    warn!(
                        bus,
                        unit = d.unit.0,
                        "Alarm reading not confirmed by the re-read; ignored."
                    );
                }
                report = second;
                io_failed = failed;
            }
            broken = io_failed;
            match &report {
                FieldReport::Reading { .. } => {
                    if out_of_scan {
                        info!(
                            bus,
                            unit = d.unit.0,
                            "Detector answers again; back in the scan."
                        );
                        // A bus that was cut (cable, converter) comes back whole: every other
                        // offline unit is due at once (still one probe per cycle).
                        let now = Instant::now();
                        for h in &mut health {
                            h.next_probe = h.next_probe.min(now);
                        }
                    }
                    health[k].misses = 0;
                }
                // A port failure is not the unit's: it does not push it out of the scan.
                _ if io_failed => {}
                _ => {
                    let h = &mut health[k];
                    h.misses = h.misses.saturating_add(1);
                    if h.misses >= offline_after {
                        h.next_probe = Instant::now() + probe_interval;
                        if !out_of_scan {
                            info!(
                                bus,
                                unit = d.unit.0,
                                probe_ms = probe_interval.as_millis() as u64,
                                "Detector stopped answering; out of the scan, probed from now on."
                            );
                        }
                    }
                }
            }
            let alarm_arrived = {
                let alarm = is_alarm(&report);
                if matches!(report, FieldReport::Reading { .. }) {
                    std::mem::replace(&mut last_alarm[k], alarm) != alarm && alarm
                } else {
                    false
                }
            };
            if alarm_arrived {
                // Everything the daemon did before this report is not an answer to it.
                wake.borrow_and_update();
            }
            if reports.send(report).await.is_err() {
                return;
            }
            if broken {
                break;
            }
            if alarm_arrived {
                // Give the engine the moment it needs to decide, so the sounder write goes
                // out before the next poll instead of after it (one transaction, ~30 ms at
                // 9600 baud). Bounded: a slow engine never stalls the scan.
                let _ = tokio::time::timeout(ENGINE_GRACE, wake.changed()).await;
            }
        }
        if !broken {
            match read_inputs(l, &inputs, &mut input_levels, &reports).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(bus, error = %e, "Bus I/O failed while reading inputs; reopening.");
                    broken = true;
                }
            }
        }
        if !broken && Instant::now() >= next_readback {
            next_readback = Instant::now() + readback_interval;
            if let Err(e) = read_back(l, &mut coils, &reports, bus).await {
                warn!(bus, error = %e, "Bus I/O failed while reading outputs back; reopening.");
                broken = true;
            }
        }
        if !broken {
            if let Err(e) = service_outputs(l, &mut coils, &mut writes, &reports, bus).await {
                warn!(bus, error = %e, "Bus failed while writing outputs; reopening.");
                broken = true;
            }
        }
        if broken {
            carried = l.take_counters();
            link = None;
            // The relay modules' coils are unknown until the port is back: write them again.
            for c in &mut coils {
                c.confirmed = None;
            }
            continue;
        }
        let cycle = cycle_start.elapsed();
        let idle_cycle = l.stats().transactions == transactions_before;
        update_stats(&mut stats, l, cycle, &detectors, &health, offline_after);
        if reports
            .send(FieldReport::Cycle {
                bus: name.clone(),
                cycle,
                stats: stats.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        // Idle until the next scan is due, but write outputs at once when they change.
        let mut next = cycle_start + scan_interval;
        if idle_cycle {
            // Nothing to ask (every detector out of the scan, no probe due): sleep until the
            // next probe, at most 1 s so that the cycle reports keep coming.
            let next_probe = health
                .iter()
                .filter(|h| h.misses >= offline_after)
                .map(|h| h.next_probe)
                .min();
            let cap = Instant::now() + Duration::from_secs(1);
            next = next.max(next_probe.map_or(cap, |p| p.min(cap)));
        }
        let next = tokio::time::Instant::from_std(next);
        loop {
            if tokio::time::Instant::now() >= next {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                r = wake.changed() => {
                    if r.is_err() {
                        // The daemon is gone: nothing will change any more.
                        return;
                    }
                    if let Err(e) = service_outputs(l, &mut coils, &mut writes, &reports, bus).await {
                        warn!(bus, error = %e, "Bus failed while writing outputs; reopening.");
                        carried = l.take_counters();
                        link = None;
                        break;
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Refreshes `stats` at the end of a completed cycle.
fn update_stats(
    stats: &mut BusStats,
    link: &Link,
    cycle: Duration,
    detectors: &[PolledDetector],
    health: &[Health],
    offline_after: u32,
) {
    let counters = link.counters();
    let ms = u64::try_from(cycle.as_millis()).unwrap_or(u64::MAX);
    stats.link = counters.bus;
    stats.cycle_ms = ms;
    stats.worst_cycle_ms = stats.worst_cycle_ms.max(ms);
    stats.offline_units = detectors
        .iter()
        .zip(health)
        .filter(|(_, h)| h.misses >= offline_after)
        .map(|(d, _)| d.unit.0)
        .collect();
    stats.units = counters
        .units
        .into_iter()
        .filter(|(_, s)| s.had_trouble())
        .collect();
}

/// Writes every coil whose wanted level is not yet confirmed, then the queued one-off writes.
/// Returns the link's I/O error when the port itself failed; device errors are reported.
async fn service_outputs(
    link: &mut Link,
    coils: &mut [Coil],
    writes: &mut mpsc::UnboundedReceiver<WriteRequest>,
    reports: &mpsc::Sender<FieldReport>,
    bus: &str,
) -> Result<(), std::io::Error> {
    for c in coils.iter_mut() {
        let on = *c.out.wanted.borrow_and_update();
        if c.confirmed == Some(on) || c.failed == Some(on) {
            continue;
        }
        let request = Request::WriteSingleCoil {
            address: c.out.coil,
            on,
        };
        let result = link.call(c.out.unit, &request).await;
        let at = Instant::now();
        let error = match &result {
            Ok(Ok(_)) => None,
            Ok(Err(exception)) => Some(exception.to_string()),
            Err(e) => Some(e.to_string()),
        };
        let ok = error.is_none();
        if ok {
            c.confirmed = Some(on);
            c.failed = None;
            if std::mem::take(&mut c.failing) {
                info!(bus, output = %c.out.name, on, "Output answers again.");
            }
            info!(bus, output = %c.out.name, on, "Output driven.");
        } else {
            c.confirmed = None;
            // Logged once when it starts failing, not on every retry.
            if !std::mem::replace(&mut c.failing, true) {
                warn!(bus, output = %c.out.name, on, error = error.as_deref().unwrap_or(""), "Output write failed; retrying every scan cycle.");
            }
            c.failed = Some(on);
        }
        // The engine loop is gone only at shutdown; then nobody needs the report.
        let report = FieldReport::OutputWritten {
            name: c.out.name.clone(),
            on,
            ok,
            error,
            at,
        };
        let _ = reports.send(report).await;
        if let Err(link::Error::Io(e)) = result {
            return Err(e);
        }
    }
    while let Ok(w) = writes.try_recv() {
        match link.call(w.unit, &w.request).await {
            Ok(Ok(_)) => debug!(bus, unit = w.unit.0, "Write done."),
            Ok(Err(ex)) => {
                warn!(bus, unit = w.unit.0, exception = %ex, "Write refused by the unit.");
            }
            Err(link::Error::Io(e)) => return Err(e),
            Err(e) => warn!(bus, unit = w.unit.0, error = %e, "Write failed."),
        }
    }
    Ok(())
}

/// The slow values (density, heartbeat) last read from a detector, reported in the cycles
/// they are not read.
///
/// Keeping the heartbeat's last value (rather than reporting none) keeps the engine's
/// frozen-heartbeat timer running between reads: the engine resets that timer on a reading
/// without a heartbeat, so a frozen heartbeat read every Nth cycle would never be found. A
/// live heartbeat is seen to move at each read, and config validation makes sure it is read
/// well within its timeout (`config::Validator::heartbeat_often_enough`).
#[derive(Debug, Clone, Copy, Default)]
struct Kept {
    density: Option<f32>,
    heartbeat: Option<u16>,
}

impl Kept {
    /// Whether a slow point of `p` has never been read (then the poll reads every point).
    fn incomplete(&self, p: &SmokeProfile) -> bool {
        (p.density.is_some() && self.density.is_none())
            || (p.heartbeat.is_some() && self.heartbeat.is_none())
    }
}

/// One poll of detector `d` reading `blocks` (see [`profile::plan_cycle`]): its report, and
/// whether the port itself failed (I/O error). The blocks with alarm or fault points are read
/// first, and one that fails makes the poll a miss (so a dead unit costs one timeout); a failed
/// block of slow points leaves their last values and ends the poll's slow reads.
async fn poll(
    link: &mut Link,
    d: &PolledDetector,
    bus: &str,
    blocks: &[Block],
    kept: &mut Kept,
) -> (FieldReport, bool) {
    let missed = |reason: String| FieldReport::Missed {
        detector: d.index,
        reason,
    };
    let alarm_points = d.profile.alarm_points();
    let essential = |b: &Block| alarm_points.iter().any(|p| b.covers(p));
    let mut ordered: Vec<&Block> = blocks.iter().collect();
    ordered.sort_by_key(|b| !essential(b));
    let mut read = Vec::with_capacity(blocks.len());
    for block in ordered {
        let data = match link.call(d.unit, &block.request()).await {
            Ok(Ok(Response::Registers(regs))) => Ok(BlockData::Registers(regs)),
            Ok(Ok(Response::Bits(bits))) => Ok(BlockData::Bits(bits)),
            Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
            Ok(Err(exception)) => Err(format!("exception: {exception}")),
            Err(link::Error::Io(e)) => {
                warn!(bus, error = %e, "Bus I/O failed; reopening.");
                return (missed(format!("bus I/O error: {e}")), true);
            }
            Err(e) => {
                debug!(bus, unit = d.unit.0, error = %e, "Poll failed.");
                Err(e.to_string())
            }
        };
        match data {
            Ok(data) => read.push((*block, data)),
            Err(reason) if essential(block) => {
                return (missed(reason), false);
            }
            Err(reason) => {
                debug!(bus, unit = d.unit.0, error = %reason, "Slow points not read; keeping their last values.");
                break;
            }
        }
    }
    match profile::decode(&d.profile, &read) {
        Ok(decoded) => {
            if decoded.smoke_db_per_m.is_some() {
                kept.density = decoded.smoke_db_per_m;
            }
            if decoded.heartbeat.is_some() {
                kept.heartbeat = decoded.heartbeat;
            }
            (
                FieldReport::Reading {
                    detector: d.index,
                    reading: DetectorReading {
                        status: decoded.status,
                        smoke_db_per_m: kept.density,
                        fault_bits: decoded.fault_bits.unwrap_or(0),
                        heartbeat: kept.heartbeat,
                    },
                    at: Instant::now(),
                },
                false,
            )
        }
        Err(e) => (missed(e.to_string()), false),
    }
}

fn is_alarm(report: &FieldReport) -> bool {
    matches!(report, FieldReport::Reading { reading, .. } if reading.status == DetectorStatus::Alarm)
}

/// Reads every input (FC02) and reports those whose level changed since the last report.
/// Returns the link's I/O error when the port itself failed.
async fn read_inputs(
    link: &mut Link,
    inputs: &[PolledInput],
    last: &mut [Option<Option<bool>>],
    reports: &mpsc::Sender<FieldReport>,
) -> Result<(), std::io::Error> {
    for (input, last) in inputs.iter().zip(last.iter_mut()) {
        let request = Request::ReadDiscreteInputs {
            address: input.address,
            count: 1,
        };
        let result = link.call(input.unit, &request).await;
        let on = match &result {
            Ok(Ok(Response::Bits(bits))) => bits.first().copied(),
            _ => None,
        };
        if *last != Some(on) {
            *last = Some(on);
            let _ = reports
                .send(FieldReport::Input {
                    name: input.name.clone(),
                    on,
                    at: Instant::now(),
                })
                .await;
        }
        if let Err(link::Error::Io(e)) = result {
            return Err(e);
        }
    }
    Ok(())
}

/// Reads each relay module's coils back (one FC01 per unit, spanning its coils) and compares
/// them with the levels last confirmed. A mismatch or a failed read is reported as a failed
/// output, and the coil is marked unconfirmed so that the next [`service_outputs`] writes it
/// again. Returns the link's I/O error when the port itself failed.
async fn read_back(
    link: &mut Link,
    coils: &mut [Coil],
    reports: &mpsc::Sender<FieldReport>,
    bus: &str,
) -> Result<(), std::io::Error> {
    let mut units: Vec<UnitId> = coils.iter().map(|c| c.out.unit).collect();
    units.sort_unstable_by_key(|u| u.0);
    units.dedup();
    for unit in units {
        let mine = || coils.iter().filter(|c| c.out.unit == unit);
        // Only coils whose write was confirmed: a pending or failing one is being retried.
        if mine().all(|c| c.confirmed.is_none()) {
            continue;
        }
        let first = mine().map(|c| c.out.coil).min().unwrap_or(0);
        let last = mine().map(|c| c.out.coil).max().unwrap_or(0);
        let request = Request::ReadCoils {
            address: first,
            count: last - first + 1,
        };
        let result = link.call(unit, &request).await;
        let bits = match &result {
            Ok(Ok(Response::Bits(bits))) => Ok(bits.clone()),
            Ok(Ok(other)) => Err(format!("read-back: unexpected reply {other:?}")),
            Ok(Err(exception)) => Err(format!("read-back: exception: {exception}")),
            Err(e) => Err(format!("read-back: {e}")),
        };
        for c in coils.iter_mut().filter(|c| c.out.unit == unit) {
            let Some(wanted) = c.confirmed else { continue };
            let error = match &bits {
                Ok(bits) => match bits.get(usize::from(c.out.coil - first)) {
                    Some(&actual) if actual == wanted => None,
                    Some(&actual) => Some(format!(
                        "read-back: coil is {}, wanted {}",
                        on_off(actual),
                        on_off(wanted)
                    )),
                    None => Some("read-back: short reply".to_owned()),
                },
                Err(e) => Some(e.clone()),
            };
            let Some(error) = error else { continue };
            warn!(bus, output = %c.out.name, error = %error, "Output read-back failed; writing it again.");
            c.lost(wanted, error, reports).await;
        }
        if let Err(link::Error::Io(e)) = result {
            return Err(e);
        }
    }
    Ok(())
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// The port cannot be opened: every coil on it is out of reach. Each is reported once as a
/// failed output (the engine raises `sounder.fault`), and marked unconfirmed so that it is
/// written again, and its recovery reported, as soon as the port is back: a relay module's
/// coils may have changed while the bus was down.
async fn outputs_unreachable(
    coils: &mut [Coil],
    reports: &mpsc::Sender<FieldReport>,
    reason: &str,
) {
    for c in coils.iter_mut() {
        let on = *c.out.wanted.borrow();
        c.lost(on, reason.to_owned(), reports).await;
    }
}
