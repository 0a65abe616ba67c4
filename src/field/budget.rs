//! The worst-case detection time of each bus (DESIGN.md §4, issue 3): the longest time from a
//! detector entering alarm to its sounder being driven, computed from the config alone, pure.
//! `check-config` prints it per bus and refuses a config whose worst case exceeds [`LIMIT`].
//!
//! The figure of a bus is the sum of:
//! 1. one full **scan cycle** of the bus (the detector may enter alarm just after its poll):
//!    - every detector's poll (FC04) as a live transaction;
//!    - every panel key read (FC02);
//!    - one coil read-back (FC01) per relay module: it runs every `readback_interval`, and the
//!      worst cycle is one that has it;
//!    - one write (FC05) of every coil on the bus: an output may change in that cycle (the
//!      fault LED, a pulsing buzzer);
//!    - one **dead unit**: a timeout and the guard delay after it. The poller probes at most
//!      one offline unit per cycle (see [`super::poller`]), so this share holds however many
//!      units are dead (units that have just died still cost a timeout each for the
//!      `offline_after` cycles before they leave the scan: a transient the figure leaves out);
//!    - the cycle is at least the bus's `scan_interval`;
//! 2. the **confirming re-read** (one more poll) when a detector of the bus confirms alarms;
//! 3. the poller's wait for the engine's answer (`ENGINE_GRACE` in [`super::poller`], 10 ms);
//! 4. the **sounder write** (the FC05 request and its echo) on the sounder's bus. A sounder on
//!    another bus first waits for the transaction in flight there (at most that bus's
//!    dead-unit share); a GPIO sounder costs nothing here. With several sounders for the
//!    bus's zones, the slowest counts.
//!
//! **Modbus RTU**: a live transaction costs the request's and the reply's wire time at the
//! bus's framing (10 bits per character for 8N1, 11 for 8E1, 8O1 and 8N2), two silent
//! intervals t3.5 (before the request and before the reply; the master's conservative 11-bit
//! value, 4.01 ms at 9600, fixed 1.75 ms above 19200 baud: Serial Line V1.02 §2.5.1.1), and
//! the bus's `turnaround`. A unit's own processing time is assumed to fit in the t3.5 before
//! its reply; a slow unit needs `turnaround`. A dead unit costs the request, the `timeout`,
//! and the link's guard delay (the longer of t3.5 and `turnaround`, plus the reply's wire time).
//!
//! **Modbus TCP**: the wire time of a converter's serial side is not in the config, so every
//! transaction is bounded by the bus's `timeout` (the link gives up then): the TCP figure is an
//! upper bound, not an estimate, and an installer lowers it by setting `timeout` to what the
//! site needs. A dead unit also costs a reconnect, bounded by the longer of `timeout` and 1 s
//! (the link's connect deadline).
//!
//! Not counted: doors (not polled by this release), one-off writes (remote resets, sent only
//! after a reset), a USB adapter's receive latency (FTDI's latency timer) and OS scheduling.
//! The benchmark `examples/alarm_latency.rs` measured a 32-detector scan at 991 ms against its
//! 933 ms wire-time estimate (10-bit t3.5); this module's figure for the same bus is 957 ms of
//! polls, plus the shares above.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::frame::{encode_rtu_request, expected_rtu_reply_len, silent_interval, wire_time};
use super::frame::{Request, MAX_RTU_FRAME};
use super::link::Transport;
use crate::config::{Config, InputSpec, OutputSpec};
use crate::event::UnitId;

/// The longest allowed worst-case detection time: EN 54-2 and GB 4717 allow a control unit
/// 10 s to indicate a fire (DESIGN.md §4).
pub const LIMIT: Duration = Duration::from_secs(10);

/// The poller's wait for the engine's answer after an alarm (`poller::ENGINE_GRACE`).
const ENGINE: Duration = super::poller::ENGINE_GRACE;

/// How long a TCP reconnect may take at least (the link's connect deadline is the longer of
/// `timeout` and this).
const TCP_CONNECT_MIN: Duration = Duration::from_secs(1);

/// How a bus's transactions are timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Baud rate (bits/s) and bits per character of an RTU bus; `None` for Modbus TCP.
    pub rtu: Option<(u32, u32)>,
    /// Per transaction, after the request (the bus's `timeout`).
    pub timeout: Duration,
    /// Extra pause per transaction (the bus's `turnaround`).
    pub turnaround: Duration,
}

impl Timing {
    /// The timing of a bus with `transport`, `timeout` and `turnaround`.
    pub fn new(transport: &Transport, timeout: Duration, turnaround: Duration) -> Timing {
        let rtu = match transport {
            Transport::Rtu { baud, .. } => Some((*baud, transport.bits_per_char())),
            Transport::Tcp { .. } => None,
        };
        Timing {
            rtu,
            timeout,
            turnaround,
        }
    }

    /// The longest a live transaction `req` takes (see the module doc).
    pub fn transaction(&self, req: &Request) -> Duration {
        match self.rtu {
            Some((baud, bits)) => {
                let bytes = request_len(req) + expected_rtu_reply_len(req);
                wire_time(bytes, baud, bits) + silent_interval(baud) * 2 + self.turnaround
            }
            None => self.timeout,
        }
    }

    /// The longest a transaction `req` to a unit that does not answer takes, with the delay
    /// after it before the next request (see the module doc).
    pub fn dead_unit(&self, req: &Request) -> Duration {
        match self.rtu {
            Some((baud, bits)) => {
                wire_time(request_len(req), baud, bits)
                    + self.timeout
                    + self.turnaround.max(silent_interval(baud))
                    + wire_time(expected_rtu_reply_len(req), baud, bits)
            }
            None => self.timeout + self.timeout.max(TCP_CONNECT_MIN),
        }
    }
}

/// Bytes of the RTU request frame of `req` (the longest frame if `req` is invalid, which the
/// config never produces).
fn request_len(req: &Request) -> usize {
    encode_rtu_request(UnitId(1), req).map_or(MAX_RTU_FRAME, |f| f.len())
}

/// The FC04 poll of a detector reading `registers` input registers.
fn poll(registers: u16) -> Request {
    Request::ReadInputRegisters {
        address: 0,
        count: registers,
    }
}

/// The FC05 write of one coil.
const COIL_WRITE: Request = Request::WriteSingleCoil {
    address: 0,
    on: true,
};

/// The FC02 read of one panel key.
const KEY_READ: Request = Request::ReadDiscreteInputs {
    address: 0,
    count: 1,
};

/// What one bus does in one scan cycle, as far as timing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusLoad {
    /// How the bus's transactions are timed.
    pub timing: Timing,
    /// The bus's minimum scan cycle (`scan_interval`).
    pub scan_interval: Duration,
    /// Input registers read per poll, one entry per detector on the bus.
    pub detectors: Vec<u16>,
    /// Registers of the largest poll among detectors that confirm alarms by a re-read; `None`
    /// when none does.
    pub confirm: Option<u16>,
    /// Panel keys read on this bus (one FC02 of one input each).
    pub inputs: usize,
    /// Coils read back per relay module (one FC01 per module, spanning its coils).
    pub relay_modules: Vec<u16>,
    /// Coil outputs on this bus (each written at most once per cycle).
    pub coils: usize,
}

/// Where a sounder for a bus's zones is driven, as far as timing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SounderPath {
    /// A coil on the detectors' own bus: written ahead of the next poll.
    SameBus,
    /// A coil on another bus doing this load: written once that bus's transaction in flight
    /// has ended (at most a dead unit's share there).
    OtherBus(Box<BusLoad>),
    /// A GPIO pin: driven by the engine loop at once.
    Gpio,
}

/// The worst-case figures of one bus. Every field is a duration; `total` is what
/// [`LIMIT`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    /// Every detector's poll as a live transaction.
    pub polls: Duration,
    /// The panel key reads.
    pub inputs: Duration,
    /// The coil read-back of every relay module.
    pub readback: Duration,
    /// One write of every coil on the bus.
    pub writes: Duration,
    /// One dead unit's timeout and guard delay (none on a bus without units).
    pub dead_unit: Duration,
    /// The scan cycle: the sum of the above, at least `scan_interval`.
    pub cycle: Duration,
    /// The confirming re-read.
    pub confirm: Duration,
    /// The wait for the engine's answer.
    pub engine: Duration,
    /// Driving the slowest sounder of the bus's zones; `None` when no sounder serves them.
    pub sounder: Option<Duration>,
    /// Entering alarm → sounder driven: cycle + confirm + engine + sounder.
    pub total: Duration,
}

/// The worst case of a bus doing `load`, whose zones' sounders are driven through `sounders`.
pub fn worst_case(load: &BusLoad, sounders: &[SounderPath]) -> WorstCase {
    let t = &load.timing;
    let polls: Duration = load
        .detectors
        .iter()
        .map(|&r| t.transaction(&poll(r)))
        .sum();
    let inputs = t.transaction(&KEY_READ) * count(load.inputs);
    let readback: Duration = load
        .relay_modules
        .iter()
        .map(|&n| {
            t.transaction(&Request::ReadCoils {
                address: 0,
                count: n.max(1),
            })
        })
        .sum();
    let writes = t.transaction(&COIL_WRITE) * count(load.coils);
    let units = !load.detectors.is_empty() || load.inputs > 0 || load.coils > 0;
    let dead_unit = if units { longest(load) } else { Duration::ZERO };
    let cycle = (polls + inputs + readback + writes + dead_unit).max(load.scan_interval);
    let confirm = load
        .confirm
        .map_or(Duration::ZERO, |r| t.transaction(&poll(r)));
    let engine = if load.detectors.is_empty() {
        Duration::ZERO
    } else {
        ENGINE
    };
    let sounder = sounders
        .iter()
        .map(|path| match path {
            SounderPath::SameBus => t.transaction(&COIL_WRITE),
            SounderPath::OtherBus(other) => longest(other) + other.timing.transaction(&COIL_WRITE),
            SounderPath::Gpio => Duration::ZERO,
        })
        .max();
    WorstCase {
        polls,
        inputs,
        readback,
        writes,
        dead_unit,
        cycle,
        confirm,
        engine,
        sounder,
        total: cycle + confirm + engine + sounder.unwrap_or(Duration::ZERO),
    }
}

/// The longest transaction of a bus doing `load`: the request with the longest frames (a
/// poll, a key read, a read-back or a coil write) to a unit that does not answer.
fn longest(load: &BusLoad) -> Duration {
    let t = &load.timing;
    let polls = load.detectors.iter().map(|&r| t.dead_unit(&poll(r)));
    let readbacks = load.relay_modules.iter().map(|&n| {
        t.dead_unit(&Request::ReadCoils {
            address: 0,
            count: n.max(1),
        })
    });
    polls
        .chain(readbacks)
        .chain([t.dead_unit(&COIL_WRITE), t.dead_unit(&KEY_READ)])
        .max()
        .unwrap_or_default()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The worst case of every bus of `config`, in the order of [`Config::buses`]; `None` for a
/// bus without detectors (it only carries outputs or keys: nothing is detected there).
pub fn for_config(config: &Config) -> Vec<Option<WorstCase>> {
    let loads: Vec<BusLoad> = (0..config.buses.len())
        .map(|i| load_of(config, i))
        .collect();
    loads
        .iter()
        .enumerate()
        .map(|(i, load)| {
            let zones: Vec<&str> = config
                .detectors
                .iter()
                .filter(|d| d.bus == i)
                .map(|d| d.zone.as_str())
                .collect();
            let sounders: Vec<SounderPath> = config
                .sounders
                .iter()
                .filter(|s| zones.iter().any(|z| s.zones.includes(z)))
                .map(|s| match s.output {
                    OutputSpec::Coil { bus, .. } if bus == i => SounderPath::SameBus,
                    // A validated config's bus index is in range; count this bus if not.
                    OutputSpec::Coil { bus, .. } => {
                        SounderPath::OtherBus(Box::new(loads.get(bus).unwrap_or(load).clone()))
                    }
                    OutputSpec::Gpio { .. } => SounderPath::Gpio,
                })
                .collect();
            (!load.detectors.is_empty()).then(|| worst_case(load, &sounders))
        })
        .collect()
}

/// What bus `i` of `config` does per scan cycle.
fn load_of(config: &Config, i: usize) -> BusLoad {
    let bus = &config.buses[i];
    let mine: Vec<_> = config.detectors.iter().filter(|d| d.bus == i).collect();
    let inputs = [&config.panel.silence_key, &config.panel.reset_key]
        .into_iter()
        .flatten()
        .filter(|k| matches!(k, InputSpec::DiscreteInput { bus, .. } if *bus == i))
        .count();
    // Every coil the daemon drives (`Config::outputs`: sounders and their fallbacks, the
    // panel, the lock-release coil of each door released on fire).
    let outputs = config.outputs();
    // Per relay module, the span of coils one FC01 read-back covers.
    let mut modules: BTreeMap<u8, (u16, u16)> = BTreeMap::new();
    let mut coils = 0;
    for (_, _, spec) in outputs {
        if let OutputSpec::Coil { bus, unit, coil } = spec {
            if bus == i {
                coils += 1;
                let span = modules.entry(unit.0).or_insert((coil, coil));
                *span = (span.0.min(coil), span.1.max(coil));
            }
        }
    }
    BusLoad {
        timing: Timing::new(&bus.transport, bus.timeout, bus.turnaround),
        scan_interval: bus.scan_interval,
        detectors: mine.iter().map(|d| d.profile.register_count).collect(),
        confirm: mine
            .iter()
            .filter(|d| d.confirm_alarm)
            .map(|d| d.profile.register_count)
            .max(),
        inputs,
        relay_modules: modules.values().map(|(lo, hi)| hi - lo + 1).collect(),
        coils,
    }
}

/// Milliseconds with one decimal below 1 s, seconds with two above.
struct Human(Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs_f64();
        if s < 1.0 {
            write!(f, "{:.1} ms", s * 1000.0)
        } else {
            write!(f, "{s:.2} s")
        }
    }
}

impl fmt::Display for WorstCase {
    /// `1.19 s (scan cycle 1.13 s: polls 956.7 ms, ...; re-read 29.9 ms; engine 10.0 ms;
    /// sounder write 24.7 ms)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (scan cycle {}: polls {}, key reads {}, coil read-back {}, coil writes {}, one dead unit {}; confirming re-read {}; engine {}; ",
            Human(self.total),
            Human(self.cycle),
            Human(self.polls),
            Human(self.inputs),
            Human(self.readback),
            Human(self.writes),
            Human(self.dead_unit),
            Human(self.confirm),
            Human(self.engine),
        )?;
        match self.sounder {
            Some(d) => write!(f, "sounder write {})", Human(d)),
            None => write!(f, "no sounder serves this bus's zones)"),
        }
    }
}

/// The lines `check-config` prints: one per bus, with its transport.
pub fn report(config: &Config) -> String {
    let mut out = format!(
        "worst-case detection, detector alarm -> sounder driven (limit {} s, EN 54-2 / GB 4717):",
        LIMIT.as_secs()
    );
    for (bus, w) in config.buses.iter().zip(for_config(config)) {
        let how = match bus.transport {
            Transport::Rtu { baud, .. } => format!("{baud} baud"),
            Transport::Tcp { .. } => "Modbus TCP, each transaction bounded by the timeout".into(),
        };
        match w {
            Some(w) => out.push_str(&format!("\n  bus {} ({how}): {w}", bus.name)),
            None => out.push_str(&format!("\n  bus {} ({how}): no detectors", bus.name)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::link::Parity;

    fn rtu(baud: u32, parity: Parity) -> Timing {
        Timing::new(
            &Transport::Rtu {
                port: "/dev/null".into(),
                baud,
                parity,
                stop_bits: 1,
                echo: false,
            },
            crate::config::default_timeout(baud),
            Duration::ZERO,
        )
    }

    fn detectors(n: usize, timing: Timing) -> BusLoad {
        BusLoad {
            timing,
            scan_interval: Duration::ZERO,
            detectors: vec![4; n],
            confirm: Some(4),
            inputs: 0,
            relay_modules: Vec::new(),
            coils: 0,
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn a_generic_smoke_poll_at_9600_8n1_is_its_21_bytes_and_two_silent_intervals() {
        // 8-byte FC04 request + 13-byte reply at 10 bits: 21.875 ms; 2 × t3.5 (11-bit, the
        // link's own): 8.021 ms. The benchmark's 10-bit t3.5 gives 29.17 ms per detector.
        let t = rtu(9600, Parity::None).transaction(&poll(4));
        assert!((ms(t) - 29.896).abs() < 0.01, "{t:?}");
        assert!(t >= Duration::from_micros(29_170));
    }

    #[test]
    fn thirty_two_generic_detectors_at_9600_8n1_scan_in_under_a_second() {
        let w = worst_case(
            &detectors(32, rtu(9600, Parity::None)),
            &[SounderPath::SameBus],
        );
        // The benchmark's wire-time estimate is 933 ms, its measured cycle 991 ms.
        assert!((ms(w.polls) - 956.7).abs() < 0.1, "{w}");
        assert!(w.polls < Duration::from_secs(1), "{w}");
        // + one dead unit (8.3 ms request, 145.8 ms timeout, 4.0 ms guard, 13.5 ms reply).
        assert!((ms(w.dead_unit) - 171.7).abs() < 0.1, "{w}");
        assert_eq!(w.cycle, w.polls + w.dead_unit);
        assert_eq!(
            w.total,
            w.cycle + w.confirm + ENGINE + w.sounder.unwrap(),
            "{w}"
        );
        assert!(w.total < LIMIT, "{w}");
    }

    #[test]
    fn two_hundred_and_forty_seven_units_at_1200_baud_exceed_ten_seconds() {
        let w = worst_case(&detectors(247, rtu(1200, Parity::None)), &[]);
        assert!(w.total > LIMIT, "{w}");
        assert!(w.polls > Duration::from_secs(50), "{w}");
    }

    #[test]
    fn parity_makes_every_character_eleven_bits() {
        let n = rtu(9600, Parity::None).transaction(&poll(4));
        let e = rtu(9600, Parity::Even).transaction(&poll(4));
        // 21 characters, one more bit each.
        assert_eq!(e - n, wire_time(21, 9600, 1));
    }

    #[test]
    fn keys_read_back_coil_writes_and_scan_interval_lengthen_the_cycle() {
        let base = worst_case(&detectors(4, rtu(9600, Parity::None)), &[]);
        let mut load = detectors(4, rtu(9600, Parity::None));
        load.inputs = 2;
        load.relay_modules = vec![8];
        load.coils = 4;
        let more = worst_case(&load, &[]);
        let t = &load.timing;
        let key = t.transaction(&Request::ReadDiscreteInputs {
            address: 0,
            count: 1,
        });
        let fc01 = t.transaction(&Request::ReadCoils {
            address: 0,
            count: 8,
        });
        assert_eq!(
            more.cycle - base.cycle,
            key * 2 + fc01 + t.transaction(&COIL_WRITE) * 4
        );
        load.scan_interval = Duration::from_secs(3);
        assert_eq!(worst_case(&load, &[]).cycle, Duration::from_secs(3));
    }

    #[test]
    fn no_confirmation_saves_one_poll() {
        let mut load = detectors(4, rtu(9600, Parity::None));
        let with = worst_case(&load, &[]);
        load.confirm = None;
        let without = worst_case(&load, &[]);
        assert_eq!(
            with.total - without.total,
            load.timing.transaction(&poll(4))
        );
    }

    #[test]
    fn the_slowest_sounder_counts_and_another_bus_waits_for_its_transaction_in_flight() {
        let load = detectors(4, rtu(9600, Parity::None));
        let other = detectors(2, rtu(1200, Parity::None));
        let gpio = worst_case(&load, &[SounderPath::Gpio]);
        assert_eq!(gpio.sounder, Some(Duration::ZERO));
        let same = worst_case(&load, &[SounderPath::Gpio, SounderPath::SameBus]);
        assert_eq!(same.sounder, Some(load.timing.transaction(&COIL_WRITE)));
        let far = worst_case(
            &load,
            &[
                SounderPath::SameBus,
                SounderPath::OtherBus(Box::new(other.clone())),
            ],
        );
        assert_eq!(
            far.sounder,
            Some(longest(&other) + other.timing.transaction(&COIL_WRITE))
        );
        assert!(far.sounder.unwrap() > other.timing.timeout, "{far}");
        assert_eq!(worst_case(&load, &[]).sounder, None);
    }

    #[test]
    fn a_tcp_transaction_is_bounded_by_the_timeout_and_a_dead_unit_adds_a_reconnect() {
        let t = Timing::new(
            &Transport::Tcp {
                addr: "10.0.0.2:502".into(),
            },
            Duration::from_millis(200),
            Duration::ZERO,
        );
        let w = worst_case(&detectors(10, t), &[SounderPath::SameBus]);
        assert_eq!(w.polls, Duration::from_secs(2));
        assert_eq!(w.dead_unit, Duration::from_millis(1200));
        assert_eq!(w.total, Duration::from_millis(2000 + 1200 + 200 + 10 + 200));
    }

    #[test]
    fn the_figure_reads_as_seconds_or_milliseconds() {
        let w = worst_case(
            &detectors(32, rtu(9600, Parity::None)),
            &[SounderPath::SameBus],
        );
        let s = w.to_string();
        assert!(
            s.starts_with("1.19 s (scan cycle 1.13 s: polls 956.7 ms,"),
            "{s}"
        );
        assert!(s.ends_with("sounder write 24.7 ms)"), "{s}");
    }
}

#[cfg(test)]
mod config_tests {
    use std::fmt::Write as _;
    use std::path::Path;

    use crate::config::Config;

    /// A config with `n` generic-smoke detectors on one bus at `baud` and a sounder on it.
    fn one_bus(n: u8, baud: u32) -> String {
        let mut text = format!(
            "[gateway]\nid = \"t\"\n[uplink]\nurl = \"mqtt://127.0.0.1:1883\"\n\
             [[bus]]\nname = \"a\"\nrtu = {{ port = \"/dev/ttyUSB0\", baud = {baud} }}\n\
             [[sounder]]\nid = \"S\"\nzones = [\"A\"]\noutput = {{ bus = \"a\", unit = 247, coil = 0 }}\n"
        );
        for u in 1..=n {
            write!(
                text,
                "[[detector]]\nid = \"D{u}\"\nbus = \"a\"\nunit = {u}\nzone = \"A\"\n"
            )
            .unwrap();
        }
        text
    }

    #[test]
    fn a_bus_too_slow_to_indicate_a_fire_within_ten_seconds_is_refused_with_its_line_and_key() {
        let e = Config::from_toml(&one_bus(200, 1200), Path::new("gw.toml")).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "bus[0]");
        assert_eq!(e.problems[0].line, Some(5), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("gw.toml:5: bus[0]: bus \"a\": worst-case detection time "),
            "{text}"
        );
        assert!(text.contains("exceeds the 10 s"), "{text}");
    }

    #[test]
    fn a_sounder_on_an_outputs_only_bus_counts_that_bus_and_the_bus_has_no_figure_of_its_own() {
        let text = one_bus(4, 9600).replace(
            "[[sounder]]",
            "[[bus]]\nname = \"b\"\nrtu = { port = \"/dev/ttyUSB1\", baud = 1200 }\n[[sounder]]",
        );
        let text = text.replace("output = { bus = \"a\"", "output = { bus = \"b\"");
        let c = Config::from_toml(&text, Path::new("gw.toml")).unwrap();
        let w = super::for_config(&c);
        assert!(w[1].is_none(), "{w:?}");
        let a = w[0].unwrap();
        // Waiting for bus b's transaction in flight (a dead unit at 1200 baud) and its write.
        assert!(a.sounder.unwrap() > c.buses[1].timeout, "{a}");
        let report = super::report(&c);
        assert!(
            report.ends_with("\n  bus b (1200 baud): no detectors"),
            "{report}"
        );
    }

    #[test]
    fn the_same_bus_at_19200_baud_with_fewer_detectors_passes_and_prints_its_figure() {
        let c = Config::from_toml(&one_bus(32, 19_200), Path::new("gw.toml")).unwrap();
        let report = super::report(&c);
        assert!(report.contains("\n  bus a (19200 baud): "), "{report}");
    }
}
