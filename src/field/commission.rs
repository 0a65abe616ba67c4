//! Commissioning on the ladder: `village-gateway scan` (which unit ids answer on a bus, and
//! which generic profile of `shared/devices/generic.toml` their registers fit) and
//! `village-gateway read` (registers, coils or discrete inputs of one unit). Both go through
//! the same [`Link`] as the daemon (deadlines, t3.5, flushing, validation), and end with the
//! link's counters so that a noisy bus shows itself.
//!
//! Not here: argument parsing (`main.rs`), anything the daemon does.

use std::fmt::Write as _;
use std::time::Duration;

use super::frame::{ExceptionCode, Request, Response, MAX_RTU_UNIT};
use super::link::{self, Link, LinkSettings, LinkStats, Parity, Transport};
use super::profile::Block;
pub use super::profile::Table;
use crate::event::UnitId;

/// Why a commissioning command could not run or got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument (a unit range, a parity name, a count).
    #[error("{0}")]
    Usage(String),
    /// The port or connection could not be opened or failed, or the unit did not answer
    /// validly.
    #[error("{0}")]
    Link(#[from] link::Error),
    /// The unit answered with an exception (Application Protocol V1.1b3 §7).
    #[error("unit {unit} refused: {code}")]
    Refused { unit: UnitId, code: ExceptionCode },
}

/// How to reach the bus: a serial port (`port`, `baud`, `parity`, `stop_bits`, `echo`) or a
/// Modbus TCP address (`tcp`, `host:port`); `timeout` per transaction.
#[derive(Debug, Clone)]
pub struct Target {
    pub port: Option<String>,
    pub tcp: Option<String>,
    /// Bits/s.
    pub baud: u32,
    /// `none`, `even` or `odd`.
    pub parity: String,
    /// 1 or 2.
    pub stop_bits: u8,
    /// The adapter echoes our own transmission.
    pub echo: bool,
    /// Per transaction; `None` = the daemon's default for the baud rate (500 ms for TCP).
    pub timeout: Option<Duration>,
}

impl Target {
    /// The link settings, or why they are impossible.
    ///
    /// # Errors
    /// [`Error::Usage`] when neither or both of `port` and `tcp` are given, or the parity is
    /// unknown.
    pub fn settings(&self) -> Result<LinkSettings, Error> {
        let transport = match (&self.port, &self.tcp) {
            (Some(port), None) => Transport::Rtu {
                port: port.clone(),
                baud: self.baud,
                parity: parse_parity(&self.parity)?,
                stop_bits: self.stop_bits,
                echo: self.echo,
            },
            (None, Some(addr)) => Transport::Tcp { addr: addr.clone() },
            _ => {
                return Err(Error::Usage(
                    "give either --port DEV or --tcp HOST:PORT".into(),
                ))
            }
        };
        let timeout = self.timeout.unwrap_or(match transport {
            Transport::Rtu { baud, .. } => crate::config::default_timeout(baud),
            Transport::Tcp { .. } => Duration::from_millis(500),
        });
        Ok(LinkSettings {
            transport,
            timeout,
            turnaround: Duration::ZERO,
        })
    }
}

/// `none`, `even` or `odd`.
///
/// # Errors
/// [`Error::Usage`] for anything else.
pub fn parse_parity(s: &str) -> Result<Parity, Error> {
    match s {
        "none" | "n" | "N" => Ok(Parity::None),
        "even" | "e" | "E" => Ok(Parity::Even),
        "odd" | "o" | "O" => Ok(Parity::Odd),
        other => Err(Error::Usage(format!(
            "parity `{other}`: use none, even or odd"
        ))),
    }
}

/// Unit ids from `1-247`, `5`, or a list `1-4,50,100`, in order, each once.
///
/// # Errors
/// [`Error::Usage`] for ids outside 1..=247 or unreadable text.
pub fn parse_units(s: &str) -> Result<Vec<UnitId>, Error> {
    let bad = || {
        Error::Usage(format!(
            "units `{s}`: use e.g. 1-247 or 1-4,50,100 (1..=247)"
        ))
    };
    let id = |t: &str| -> Result<u8, Error> {
        match t.trim().parse::<u8>() {
            Ok(u @ 1..=MAX_RTU_UNIT) => Ok(u),
            _ => Err(bad()),
        }
    };
    let mut units = Vec::new();
    for part in s.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (id(a)?, id(b)?),
            None => (id(part)?, id(part)?),
        };
        if first > last {
            return Err(bad());
        }
        units.extend((first..=last).map(UnitId));
    }
    units.sort_unstable_by_key(|u| u.0);
    units.dedup();
    Ok(units)
}

/// A unit that answered a scan, and what it looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub unit: UnitId,
    /// The generic profile its registers fit (`generic-smoke`, `generic-door`,
    /// `generic-relay`), if any.
    pub profile: Option<&'static str>,
    /// What answered, e.g. `input registers 0..=3 = [0, 0, 0, 17]`.
    pub details: Vec<String>,
}

/// The result of a scan: the units that answered, and the bus's counters.
#[derive(Debug, Clone)]
pub struct ScanReport {
    pub found: Vec<Found>,
    pub stats: LinkStats,
}

/// Asks each of `units` in turn and describes those that answer (a normal or an exception
/// reply both count as present). `progress` is called after each unit (for a progress line).
///
/// A silent unit costs one timeout: 247 units at 9600 baud with the default 145 ms take about
/// 40 s; give a shorter `timeout` on a short bus.
///
/// # Errors
/// [`Error::Link`] when the port cannot be opened or fails (an I/O error).
pub async fn scan(
    target: &Target,
    units: &[UnitId],
    mut progress: impl FnMut(UnitId, Option<&Found>),
) -> Result<ScanReport, Error> {
    let mut link = Link::open(target.settings()?).await?;
    let mut found = Vec::new();
    for &unit in units {
        let f = identify(&mut link, unit).await?;
        progress(unit, f.as_ref());
        found.extend(f);
    }
    Ok(ScanReport {
        found,
        stats: link.stats(),
    })
}

/// Tries the generic profiles' reads on `unit`. `None` when it does not answer at all.
async fn identify(link: &mut Link, unit: UnitId) -> Result<Option<Found>, Error> {
    // generic-door: input registers 0..=6; generic-smoke: 0..=3; generic-relay: coils and
    // discrete inputs 0..=7 (and no input registers).
    let door = ask(
        link,
        unit,
        Request::ReadInputRegisters {
            address: 0,
            count: 7,
        },
    )
    .await?;
    if door.is_none() {
        // Silent: absent (or another baud rate / parity). One retry would double the scan.
        return Ok(None);
    }
    let mut details = Vec::new();
    let mut profile = None;
    match door {
        Some(Ok(Response::Registers(r))) => {
            details.push(format!("input registers 0..=6 = {r:?}"));
            profile = Some("generic-door");
        }
        Some(other) => {
            details.push(format!("input registers 0..=6: {}", describe(&other)));
            match ask(
                link,
                unit,
                Request::ReadInputRegisters {
                    address: 0,
                    count: 4,
                },
            )
            .await?
            {
                Some(Ok(Response::Registers(r))) => {
                    details.push(format!(
                        "input registers 0..=3 = {r:?} (status {}, {:.2} dB/m, fault bits {:#06b}, heartbeat {})",
                        smoke_status(r[0]),
                        f32::from(r[1]) * 0.01,
                        r[2],
                        r[3]
                    ));
                    profile = Some("generic-smoke");
                }
                Some(other) => details.push(format!("input registers 0..=3: {}", describe(&other))),
                None => details.push("input registers 0..=3: no reply".into()),
            }
        }
        None => {}
    }
    if profile.is_none() {
        let coils = ask(
            link,
            unit,
            Request::ReadCoils {
                address: 0,
                count: 8,
            },
        )
        .await?;
        let keys = ask(
            link,
            unit,
            Request::ReadDiscreteInputs {
                address: 0,
                count: 8,
            },
        )
        .await?;
        if let (Some(Ok(Response::Bits(c))), Some(Ok(Response::Bits(k)))) = (&coils, &keys) {
            details.push(format!("coils 0..=7 = {}", bits(c)));
            details.push(format!("discrete inputs 0..=7 = {}", bits(k)));
            profile = Some("generic-relay");
        } else {
            for (what, r) in [("coils 0..=7", coils), ("discrete inputs 0..=7", keys)] {
                let text = r.map_or_else(|| "no reply".to_owned(), |r| describe(&r));
                details.push(format!("{what}: {text}"));
            }
        }
    }
    Ok(Some(Found {
        unit,
        profile,
        details,
    }))
}

/// One transaction: `Some(reply)` (normal or exception), `None` when nothing valid came.
/// A port failure is an error.
async fn ask(
    link: &mut Link,
    unit: UnitId,
    req: Request,
) -> Result<Option<Result<Response, ExceptionCode>>, Error> {
    match link.call(unit, &req).await {
        Ok(reply) => Ok(Some(reply)),
        Err(e @ link::Error::Io(_)) => Err(Error::Link(e)),
        Err(_) => Ok(None),
    }
}

fn describe(reply: &Result<Response, ExceptionCode>) -> String {
    match reply {
        Ok(r) => format!("{r:?}"),
        Err(code) => code.to_string(),
    }
}

fn smoke_status(v: u16) -> &'static str {
    match v {
        0 => "normal",
        1 => "ALARM",
        2 => "fault",
        3 => "pre-alarm",
        4 => "test",
        _ => "unknown",
    }
}

fn bits(b: &[bool]) -> String {
    b.iter().map(|&on| if on { '1' } else { '0' }).collect()
}

/// How `read` names an entry of `table` in its output (`input register 0 = ...`).
fn entry_name(table: Table) -> &'static str {
    match table {
        Table::Coil => "coil",
        Table::DiscreteInput => "discrete input",
        Table::Holding => "holding register",
        Table::Input => "input register",
    }
}

/// Reads `count` entries of `table` from `address` of `unit` and returns one line per entry
/// (`input register 0 = 1 (0x0001)`, `coil 3 = 1`), then the link's counters.
///
/// # Errors
/// [`Error::Usage`] for a count of 0 or above the Modbus limit (the request is never sent),
/// [`Error::Link`] when the port fails or the unit does not answer validly;
/// [`Error::Refused`] with the exception code when it refuses.
pub async fn read(
    target: &Target,
    unit: UnitId,
    table: Table,
    address: u16,
    count: u16,
) -> Result<(String, LinkStats), Error> {
    let req = Block {
        table,
        address,
        count,
    }
    .request();
    req.validate().map_err(|e| Error::Usage(e.to_string()))?;
    let mut link = Link::open(target.settings()?).await?;
    let reply = link.call(unit, &req).await;
    let stats = link.stats();
    let mut out = String::new();
    match reply? {
        Ok(Response::Registers(regs)) => {
            for (a, v) in (address..).zip(regs) {
                let _ = writeln!(out, "{} {a} = {v} ({v:#06x})", entry_name(table));
            }
        }
        Ok(Response::Bits(bits)) => {
            for (a, on) in (address..).zip(bits) {
                let _ = writeln!(out, "{} {a} = {}", entry_name(table), u8::from(on));
            }
        }
        Ok(other) => {
            let _ = writeln!(out, "unexpected reply {other:?}");
        }
        Err(code) => return Err(Error::Refused { unit, code }),
    }
    Ok((out, stats))
}

/// One line of a link's counters, as `scan` and `read` end.
pub fn stats_line(s: &LinkStats) -> String {
    format!(
        "bus: {} transactions, {} timeouts, {} CRC errors, {} foreign frames, {} other bad frames, {} exceptions{}, {} stray bytes",
        s.transactions,
        s.timeouts,
        s.crc_errors,
        s.foreign_frames,
        s.frame_errors,
        s.exceptions,
        s.last_exception
            .map(|c| format!(" (last {})", ExceptionCode(c)))
            .unwrap_or_default(),
        s.stale_bytes + s.skipped_bytes
    )
}

/// The scan's result as printed: one line per unit found, then the counters.
pub fn format_scan(report: &ScanReport) -> String {
    let mut out = String::new();
    for f in &report.found {
        let _ = writeln!(
            out,
            "unit {}: {}",
            f.unit,
            f.profile.unwrap_or("answers, no generic profile fits")
        );
        for d in &f.details {
            let _ = writeln!(out, "    {d}");
        }
    }
    let _ = writeln!(out, "{} unit(s) answered", report.found.len());
    let _ = writeln!(out, "{}", stats_line(&report.stats));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ranges_and_lists_parse_in_order_without_duplicates() {
        let ids = |s| {
            parse_units(s)
                .unwrap()
                .into_iter()
                .map(|u| u.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("1-4,100,3"), [1, 2, 3, 4, 100]);
        assert_eq!(ids("247"), [247]);
        assert_eq!(parse_units("1-247").unwrap().len(), 247);
        for bad in ["0-3", "1-248", "5-2", "x", ""] {
            assert!(parse_units(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_target_needs_exactly_one_of_port_and_tcp() {
        let t = Target {
            port: None,
            tcp: None,
            baud: 9600,
            parity: "none".into(),
            stop_bits: 1,
            echo: false,
            timeout: None,
        };
        assert!(t.settings().is_err());
        let t = Target {
            tcp: Some("127.0.0.1:502".into()),
            ..t
        };
        assert!(matches!(
            t.settings().unwrap().transport,
            Transport::Tcp { .. }
        ));
        assert!(parse_parity("mark").is_err());
    }
}
