//! The configuration: one TOML file (DESIGN.md §2), read in two layers.
//!
//! - **Raw** structs mirror the file exactly (`serde`, `deny_unknown_fields`, no `flatten`);
//!   every field is documented where it is declared.
//! - [`Config::from_toml`] validates them into a typed [`Config`]: ids are unique, references
//!   (a detector's bus, a sounder's output bus) resolve, units are 1..=247, durations and sizes
//!   carry units (`"250ms"`, `"256MiB"`).
//! - Every problem is reported, not just the first, each with the file, the line and the key
//!   (`gateway.toml:23: detector[2].unit: unit id 300 is outside 1..=247`).
//!
//! This module does no I/O beyond reading the file in [`Config::load`]; it never touches hardware.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::OutputId;
use crate::event::{DeviceId, UnitId};

/// The exit code of a bad config (sysexits `EX_CONFIG`).
pub const EXIT_BAD_CONFIG: i32 = 78;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: Gateway,
    pub uplink: Uplink,
    pub store: Store,
    pub buses: Vec<Bus>,
    pub detectors: Vec<Detector>,
    pub sounders: Vec<Sounder>,
    pub doors: Vec<Door>,
    /// `[[zone]]`: zones with settings of their own (coincidence); other zones need none.
    pub zones: Vec<Zone>,
    pub panel: Panel,
}

/// `[gateway]`.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// `[a-z0-9-]{1,32}`; used in topics and event ids.
    pub id: String,
    pub name: String,
    /// Where the outbox and latched state live.
    pub state_dir: PathBuf,
}

/// `[uplink]`.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub client_id: String,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Most access and routine events per publish when a backlog drains (a CloudEvents batch
    /// on `<prefix>/<gw>/events`); 1 = one event per publish.
    pub batch_events: usize,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct Store {
    /// Outbox budget in logical bytes (see `store.rs`, "Disk budget").
    pub max_bytes: u64,
    /// The longest an access or routine event waits for its flush and sync (the power-cut
    /// loss window of those lanes); fire and fault events never wait.
    pub flush_interval: Duration,
}

/// The serial parity and the transport of a bus are the field layer's own types: the config
/// produces exactly what [`crate::field::link::Link::open`] takes.
pub use crate::field::link::{Parity, Transport as BusTransport};

/// `[[bus]]`.
#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub transport: BusTransport,
    /// Per transaction, from the end of our request to the end of the reply.
    pub timeout: Duration,
    /// Extra delay after a reply before the next request, for slow units.
    pub turnaround: Duration,
    /// Minimum time from the start of one scan cycle to the start of the next; zero = back to back.
    pub scan_interval: Duration,
    /// Consecutive missed polls after which a device is offline.
    pub offline_after: u32,
    /// How often an offline detector is asked again (`probe_interval`, default
    /// [`DEFAULT_PROBE_INTERVAL`]); the poller probes at most one offline unit per scan cycle.
    pub probe_interval: Duration,
    /// How often each relay module's coils are read back (FC01) and compared with the levels
    /// the engine wants; a mismatch is a `sounder.fault` and the coil is written again.
    pub readback_interval: Duration,
}

/// Default [`Bus::readback_interval`]: a relay module that lost its coils (a power glitch
/// resets them to off) is found within 5 s, at the cost of one FC01 transaction per module
/// every 5 s.
pub const DEFAULT_READBACK_INTERVAL: Duration = Duration::from_secs(5);

/// Default [`Bus::probe_interval`]: 5 s. Offline detection does not depend on it (a unit goes
/// offline after `offline_after` ordinary polls, 3 scan cycles, well inside EN 54-2's 100 s).
/// It bounds how late a unit that answers again is seen (5 s + one scan cycle) and what dead
/// units cost: one timeout (~145 ms at 9600 baud) per dead unit every 5 s at most, and never
/// more than one per scan cycle.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

impl Bus {
    /// The baud rate of an RTU bus, `None` for TCP.
    pub fn baud(&self) -> Option<u32> {
        match self.transport {
            BusTransport::Rtu { baud, .. } => Some(baud),
            BusTransport::Tcp { .. } => None,
        }
    }
}

/// Smoke detector profiles are the field layer's own types: the config produces exactly what
/// [`crate::field::profile`] plans and decodes (`[profile.NAME]` tables, or the built-in
/// `generic-smoke`).
pub use crate::field::profile::{
    Point, SmokeProfile, StatusPoints, StatusValues, Table, GENERIC_HEARTBEAT_TIMEOUT,
};

/// `[[detector]]`.
#[derive(Debug, Clone)]
pub struct Detector {
    pub id: DeviceId,
    /// Index into [`Config::buses`].
    pub bus: usize,
    pub unit: UnitId,
    pub profile: SmokeProfile,
    pub zone: String,
    pub location: String,
    /// An alarm reading counts only when one immediate re-read of the unit confirms it, so
    /// one corrupted reply cannot sound a village. Costs one transaction per new alarm.
    pub confirm_alarm: bool,
    /// A heartbeat unchanged for this long is a device fault: the profile's limit (60 s for
    /// `generic-smoke`) unless `heartbeat_timeout` overrides it; `None` without a heartbeat.
    pub heartbeat_timeout: Option<Duration>,
}

/// Which zones a sounder serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zones {
    /// `"*"`: every zone.
    All,
    Some(Vec<String>),
}

impl Zones {
    /// Whether this includes `zone`.
    pub fn includes(&self, zone: &str) -> bool {
        match self {
            Zones::All => true,
            Zones::Some(zones) => zones.iter().any(|z| z == zone),
        }
    }
}

/// Where an output is driven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// A coil on a Modbus unit, written with FC05. `bus` indexes [`Config::buses`].
    Coil { bus: usize, unit: UnitId, coil: u16 },
    /// A Raspberry Pi GPIO pin (BCM numbering).
    Gpio { pin: u8, active_low: bool },
}

/// Where an input (a panel key) is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSpec {
    /// A discrete input on a Modbus unit (FC02).
    DiscreteInput {
        bus: usize,
        unit: UnitId,
        input: u16,
    },
    /// A Raspberry Pi GPIO pin (BCM numbering).
    Gpio { pin: u8, active_low: bool },
}

/// `[[sounder]]`.
#[derive(Debug, Clone)]
pub struct Sounder {
    pub id: DeviceId,
    pub zones: Zones,
    pub output: OutputSpec,
    /// Driven instead while `output` is in `sounder.fault` and the sounder should sound.
    pub fallback: Option<OutputSpec>,
}

/// `[[zone]]`: settings of one zone (a building).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    /// Door release (and other linkage) waits for two detectors of the zone in alarm
    /// (GB 50116-2013 §4.1.6); sounders never wait.
    pub coincidence: bool,
}

/// `[[door]]`. Card access is not driven by this release; a door with `release_on_fire` is
/// released (coil 0, `lock_release` of `generic-door`) when its zone is in fire.
#[derive(Debug, Clone)]
pub struct Door {
    pub id: DeviceId,
    pub bus: usize,
    pub unit: UnitId,
    pub profile: String,
    pub zone: String,
    pub location: String,
    pub release_on_fire: bool,
}

/// `[panel]`: the micro fire-station panel.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub fire_led: Option<OutputSpec>,
    pub fault_led: Option<OutputSpec>,
    pub buzzer: Option<OutputSpec>,
    /// Lit while any detector is disabled (EN 54-2's general disablement indicator).
    pub disablement_led: Option<OutputSpec>,
    pub silence_key: Option<InputSpec>,
    pub reset_key: Option<InputSpec>,
    /// Silenced sounders sound again after this long while alarms are latched; `None` = off.
    pub auto_resound: Option<Duration>,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the key could be found in the file.
    pub line: Option<usize>,
    /// The TOML path of the key (`detector[2].unit`).
    pub key: String,
    pub message: String,
}

/// A config that cannot be used: every problem found, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

// ---------------------------------------------------------------------------------------------
// Raw layer: the file as written.

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[gateway]`: who this gateway is.
    gateway: RawGateway,
    /// `[uplink]`: the MQTT broker upstream.
    uplink: RawUplink,
    /// `[store]`: the outbox.
    #[serde(default)]
    store: RawStore,
    /// `[[bus]]`: RS-485 buses and Modbus TCP converters.
    #[serde(default)]
    bus: Vec<RawBus>,
    /// `[[detector]]`: smoke detectors.
    #[serde(default)]
    detector: Vec<RawDetector>,
    /// `[[sounder]]`: sounders and beacons.
    #[serde(default)]
    sounder: Vec<RawSounder>,
    /// `[[door]]`: door controllers.
    #[serde(default)]
    door: Vec<RawDoor>,
    /// `[[zone]]`: per-zone settings.
    #[serde(default)]
    zone: Vec<RawZone>,
    /// `[panel]`: the micro fire-station panel.
    #[serde(default)]
    panel: RawPanel,
    /// `[profile.NAME]`: smoke detector profiles of the installer's own, named by detectors'
    /// `profile`.
    #[serde(default)]
    profile: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    /// `[a-z0-9-]{1,32}`.
    id: String,
    /// Human name of the village.
    #[serde(default)]
    name: String,
    /// Directory of the outbox and latched state.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/village-gateway")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    url: String,
    /// Default `vgw-<gateway.id>`.
    client_id: Option<String>,
    /// Default `village`.
    #[serde(default = "default_topic_prefix")]
    topic_prefix: String,
    /// Default `30s`; at least 1 s.
    keep_alive: Option<String>,
    username: Option<String>,
    /// A file whose first line is the password.
    password_file: Option<PathBuf>,
    /// CA certificate (PEM) for mqtts.
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    key_file: Option<PathBuf>,
    /// Default 100; 1 ..= 1000.
    batch_events: Option<usize>,
}

fn default_topic_prefix() -> String {
    "village".to_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    /// Outbox budget with a unit, default `256MiB`.
    max_bytes: Option<String>,
    /// Group-commit delay of access and routine events, default `200ms`, 1ms..=10s.
    flush_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    /// Referenced by devices' `bus`.
    name: String,
    /// A serial port with Modbus RTU.
    rtu: Option<RawRtu>,
    /// `host:port` of a Modbus TCP converter.
    tcp: Option<String>,
    /// Per transaction; default derived from the baud rate.
    timeout: Option<String>,
    /// Delay after each reply for slow units; default `0ms`.
    turnaround: Option<String>,
    /// Minimum scan cycle; default `0ms` (back to back).
    scan_interval: Option<String>,
    /// Missed polls in a row before a device is offline; default 3.
    offline_after: Option<u32>,
    /// How often an offline detector is asked again; default `5s`, at least `100ms`.
    probe_interval: Option<String>,
    /// How often each relay module's coils are read back (FC01) to confirm the outputs;
    /// default `5s`.
    readback_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRtu {
    /// `/dev/ttyUSB0`, better `/dev/serial/by-id/...`.
    port: String,
    /// Default 9600.
    #[serde(default = "default_baud")]
    baud: u32,
    /// `none`, `even` or `odd`; default `none`.
    #[serde(default = "default_parity")]
    parity: Parity,
    /// 1 or 2; default 1.
    #[serde(default = "default_stop_bits")]
    stop_bits: u8,
    /// The adapter echoes its own transmission; default false.
    #[serde(default)]
    echo: bool,
}

fn default_baud() -> u32 {
    9600
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    id: String,
    bus: String,
    unit: i64,
    /// Built-in `generic-smoke` (default).
    #[serde(default = "default_smoke_profile")]
    profile: String,
    zone: String,
    #[serde(default)]
    location: String,
    /// Confirm an alarm reading by one immediate re-read before it counts; default true.
    #[serde(default = "default_true")]
    confirm_alarm: bool,
    /// A heartbeat unchanged this long is a fault; default the profile's (60s), 2s..=1h.
    heartbeat_timeout: Option<String>,
}

/// `[profile.NAME]`: a smoke detector's points. Either `status` (a register with a value map)
/// or `alarm` (a bit; with optional `fault` and `mounted` bits).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    /// `{ table = "input" | "holding", address, values = { normal, alarm, fault, pre_alarm,
    /// test } }`: the register whose value is the status; `alarm` is required.
    status: Option<RawStatus>,
    /// `{ table = "discrete_input" | "coil", address }`: set = fire.
    alarm: Option<RawPoint>,
    /// A bit: set = device fault (e.g. Calectro's service alarm).
    fault: Option<RawPoint>,
    /// A bit: clear = detector head removed = device fault.
    mounted: Option<RawPoint>,
    /// `{ table, address, scale, every }`: smoke density register; dB/m = raw × `scale`
    /// (default 1.0).
    smoke_density: Option<RawDensity>,
    /// A register whose bits are faults (any bit set = fault).
    fault_bits: Option<RawPoint>,
    /// A register the detector increments (stuck firmware if it freezes).
    heartbeat: Option<RawPoint>,
    /// `{ address, value }`: holding register written on reset; only value 1 is supported.
    remote_reset: Option<RawReset>,
    /// A heartbeat unchanged this long is a fault; default `60s`, 2s..=1h.
    heartbeat_timeout: Option<String>,
}

/// A point: `{ table, address, every }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    /// `input`, `holding`, `discrete_input` or `coil`.
    table: RawTable,
    /// PDU address (0-based).
    address: i64,
    /// Read every Nth scan cycle; default 1. Alarm and fault points: 1 only.
    every: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    /// `input` or `holding`.
    table: RawTable,
    /// PDU address (0-based).
    address: i64,
    /// The status values; `alarm` required.
    values: RawStatusValues,
    /// Must be 1 (the status is read every cycle).
    every: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatusValues {
    normal: Option<u16>,
    alarm: Option<u16>,
    fault: Option<u16>,
    pre_alarm: Option<u16>,
    test: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDensity {
    /// `input` or `holding`.
    table: RawTable,
    /// PDU address (0-based).
    address: i64,
    /// dB/m per raw count; default 1.0.
    scale: Option<f64>,
    /// Read every Nth scan cycle; default 1.
    every: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReset {
    /// Holding register (PDU address).
    address: i64,
    /// The value written; only 1 is supported (the daemon writes 1).
    value: i64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawTable {
    Input,
    Holding,
    DiscreteInput,
    Coil,
}

impl From<RawTable> for Table {
    fn from(t: RawTable) -> Table {
        match t {
            RawTable::Input => Table::Input,
            RawTable::Holding => Table::Holding,
            RawTable::DiscreteInput => Table::DiscreteInput,
            RawTable::Coil => Table::Coil,
        }
    }
}

/// The longest scan cycle `check-config` accepts on a bus (DESIGN.md §4: 10 s to indicate a
/// fire); a heartbeat read every N cycles must be read at least once within its timeout even
/// at this cycle time, or a live heartbeat could look frozen.
const WORST_SCAN_CYCLE: Duration = Duration::from_secs(10);

fn default_true() -> bool {
    true
}

fn default_smoke_profile() -> String {
    "generic-smoke".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSounder {
    id: String,
    /// Zone names, or `["*"]` for every zone.
    zones: Vec<String>,
    output: RawOutput,
    /// Output driven while `output` is in `sounder.fault` and the sounder should sound.
    fallback: Option<RawOutput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    /// A zone some detector names.
    id: String,
    /// Door release waits for two detectors in alarm; default false.
    #[serde(default)]
    coincidence: bool,
}

/// `{ bus, unit, coil }` or `{ gpio, active_low }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    bus: Option<String>,
    unit: Option<i64>,
    coil: Option<i64>,
    gpio: Option<i64>,
    #[serde(default)]
    active_low: bool,
}

/// `{ bus, unit, discrete_input }` or `{ gpio, active_low }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    bus: Option<String>,
    unit: Option<i64>,
    discrete_input: Option<i64>,
    gpio: Option<i64>,
    #[serde(default)]
    active_low: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoor {
    id: String,
    bus: String,
    unit: i64,
    #[serde(default = "default_door_profile")]
    profile: String,
    zone: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    release_on_fire: bool,
}

fn default_door_profile() -> String {
    "generic-door".to_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPanel {
    fire_led: Option<RawOutput>,
    fault_led: Option<RawOutput>,
    buzzer: Option<RawOutput>,
    /// Lit while any detector is disabled; default none.
    disablement_led: Option<RawOutput>,
    silence_key: Option<RawInput>,
    reset_key: Option<RawInput>,
    /// Re-sound silenced sounders after this long if alarms are still latched; default off.
    auto_resound: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Loading and validation

impl Config {
    /// Every output of the config with the engine's id and its name (in logs, reports, the demo):
    /// sounders, their fallbacks (`<id> fallback`), the panel, and the `lock_release` coil
    /// (coil 0 of `generic-door`) of each door released on fire (named by the door's id).
    pub fn outputs(&self) -> Vec<(OutputId, String, OutputSpec)> {
        let mut v: Vec<(OutputId, String, OutputSpec)> = self
            .sounders
            .iter()
            .enumerate()
            .map(|(i, s)| (OutputId::Sounder(i), s.id.0.clone(), s.output.clone()))
            .collect();
        for (i, s) in self.sounders.iter().enumerate() {
            if let Some(fallback) = &s.fallback {
                v.push((
                    OutputId::SounderFallback(i),
                    format!("{} fallback", s.id),
                    fallback.clone(),
                ));
            }
        }
        let panel = [
            (
                OutputId::PanelFireLed,
                "panel fire LED",
                &self.panel.fire_led,
            ),
            (
                OutputId::PanelFaultLed,
                "panel fault LED",
                &self.panel.fault_led,
            ),
            (OutputId::PanelBuzzer, "panel buzzer", &self.panel.buzzer),
            (
                OutputId::PanelDisablementLed,
                "panel disablement LED",
                &self.panel.disablement_led,
            ),
        ];
        for (id, name, spec) in panel {
            if let Some(spec) = spec {
                v.push((id, name.to_owned(), spec.clone()));
            }
        }
        for (i, d) in self.released_doors().enumerate() {
            let lock_release = OutputSpec::Coil {
                bus: d.bus,
                unit: d.unit,
                coil: 0,
            };
            v.push((OutputId::Door(i), d.id.0.clone(), lock_release));
        }
        v
    }

    /// The doors the engine releases on fire, in the order of their
    /// [`OutputId::Door`] index.
    pub fn released_doors(&self) -> impl Iterator<Item = &Door> {
        self.doors.iter().filter(|d| d.release_on_fire)
    }

    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`Error`] with every problem found (an unreadable file is one problem without a line).
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: path.to_owned(),
            problems: vec![Problem {
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::from_toml(&text, path)
    }

    /// Validates the TOML `text`; `file` only names it in errors.
    ///
    /// # Errors
    /// [`Error`] with every problem found, each with its line and key.
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, Error> {
        let deserializer = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // A syntax error says so; a shape error (unknown key, wrong type, missing table)
            // is serde's message as it is, with the key it is about (the table, for an
            // unknown or missing key).
            let syntax = toml_edit::ImDocument::parse(text).is_err();
            let key = match e.path().to_string() {
                root if root == "." || syntax => String::new(),
                path => path,
            };
            let e = e.into_inner();
            let message = e.message().trim();
            Error {
                file: file.to_owned(),
                problems: vec![Problem {
                    line: e.span().map(|s| line_of(text, s.start)),
                    key,
                    message: if syntax {
                        format!("not valid TOML: {message}")
                    } else {
                        message.to_owned()
                    },
                }],
            }
        })?;
        let mut v = Validator {
            problems: Vec::new(),
        };
        let config = v.config(raw);
        if v.problems.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        let doc = toml_edit::ImDocument::parse(text).ok();
        let problems = v
            .problems
            .into_iter()
            .map(|(key, message)| Problem {
                line: doc
                    .as_ref()
                    .and_then(|d| span_of(d, &key))
                    .map(|at| line_of(text, at)),
                key,
                message,
            })
            .collect();
        Err(Error {
            file: file.to_owned(),
            problems,
        })
    }

    /// The built-in simulated village of `village-gateway demo`: `buses` pseudo-terminal
    /// buses named `a`, `b`, ... with `per_bus` detectors each (units 1..), a relay module at
    /// unit 100 on every bus (coil 0 = the bus's sounder; on bus `a` coil 4 = panel
    /// disablement LED, 5 = fire LED, 6 = fault LED, 7 = buzzer, discrete inputs 0/1 =
    /// silence/reset keys).
    ///
    /// `ports[i]` is the serial port of bus i, `url` the broker.
    pub fn simulated_village(ports: &[String], per_bus: u8, url: &str, state_dir: &Path) -> Config {
        let mut buses = Vec::new();
        let mut detectors = Vec::new();
        let mut sounders = Vec::new();
        for (b, port) in ports.iter().enumerate() {
            let name = char::from(b'a' + u8::try_from(b % 26).unwrap_or(0)).to_string();
            let zone = name.to_uppercase();
            buses.push(Bus {
                name: name.clone(),
                transport: BusTransport::Rtu {
                    port: port.clone(),
                    baud: 9600,
                    parity: Parity::None,
                    stop_bits: 1,
                    echo: false,
                },
                timeout: default_timeout(9600),
                turnaround: Duration::ZERO,
                scan_interval: Duration::ZERO,
                offline_after: 3,
                probe_interval: DEFAULT_PROBE_INTERVAL,
                readback_interval: DEFAULT_READBACK_INTERVAL,
            });
            for u in 1..=per_bus {
                detectors.push(Detector {
                    id: DeviceId(format!("{zone}-{}", 100 + u16::from(u))),
                    bus: b,
                    unit: UnitId(u),
                    profile: SmokeProfile::generic_smoke(),
                    zone: zone.clone(),
                    location: format!("{zone}栋{}室", 100 + u16::from(u)),
                    confirm_alarm: true,
                    heartbeat_timeout: Some(GENERIC_HEARTBEAT_TIMEOUT),
                });
            }
            sounders.push(Sounder {
                id: DeviceId(format!("{zone}-sounder")),
                zones: Zones::Some(vec![zone.clone()]),
                output: OutputSpec::Coil {
                    bus: b,
                    unit: UnitId(100),
                    coil: 0,
                },
                fallback: None,
            });
        }
        let panel_coil = |coil| {
            Some(OutputSpec::Coil {
                bus: 0,
                unit: UnitId(100),
                coil,
            })
        };
        Config {
            gateway: Gateway {
                id: "demo".to_owned(),
                name: "演示小区 (simulated village)".to_owned(),
                state_dir: state_dir.to_owned(),
            },
            uplink: Uplink {
                url: url.to_owned(),
                client_id: "vgw-demo".to_owned(),
                topic_prefix: "village".to_owned(),
                keep_alive: Duration::from_secs(30),
                username: None,
                password_file: None,
                ca_file: None,
                cert_file: None,
                key_file: None,
                batch_events: crate::uplink::DEFAULT_BATCH_EVENTS,
            },
            store: Store {
                max_bytes: crate::store::DEFAULT_MAX_BYTES,
                flush_interval: crate::store::DEFAULT_FLUSH_INTERVAL,
            },
            buses,
            detectors,
            sounders,
            doors: Vec::new(),
            zones: Vec::new(),
            panel: Panel {
                fire_led: panel_coil(5),
                fault_led: panel_coil(6),
                buzzer: panel_coil(7),
                disablement_led: panel_coil(4),
                silence_key: Some(InputSpec::DiscreteInput {
                    bus: 0,
                    unit: UnitId(100),
                    input: 0,
                }),
                reset_key: Some(InputSpec::DiscreteInput {
                    bus: 0,
                    unit: UnitId(100),
                    input: 1,
                }),
                auto_resound: None,
            },
        }
    }
}

/// A few lines for an installer: what the config describes, per bus.
pub fn summary(c: &Config) -> String {
    let n = |count: usize, one: &str, many: &str| {
        format!("{count} {}", if count == 1 { one } else { many })
    };
    let mut out = format!(
        "gateway {} ({}): {}, {}, {}, {}; uplink {}",
        c.gateway.id,
        c.gateway.name,
        n(c.buses.len(), "bus", "buses"),
        n(c.detectors.len(), "detector", "detectors"),
        n(c.sounders.len(), "sounder", "sounders"),
        n(c.doors.len(), "door", "doors"),
        c.uplink.url
    );
    for (i, b) in c.buses.iter().enumerate() {
        let detectors = c.detectors.iter().filter(|d| d.bus == i).count();
        let how = match &b.transport {
            BusTransport::Rtu { port, baud, .. } => format!("{port} at {baud} baud"),
            BusTransport::Tcp { addr } => format!("Modbus TCP {addr}"),
        };
        out.push_str(&format!(
            "\n  bus {}: {how}, {}, timeout {} ms, offline after {} missed polls",
            b.name,
            n(detectors, "detector", "detectors"),
            b.timeout.as_millis(),
            b.offline_after
        ));
    }
    out
}

/// The default transaction timeout of an RTU bus: 100 ms for the unit to answer plus the
/// wire time of a 40-byte reply at `baud` (11 bits per character, the worst case framing).
pub fn default_timeout(baud: u32) -> Duration {
    let reply = Duration::from_micros(40 * 11 * 1_000_000 / u64::from(baud.max(1)));
    Duration::from_millis(100) + reply
}

struct Validator {
    /// (TOML path, message).
    problems: Vec<(String, String)>,
}

impl Validator {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push((key.into(), message.into()));
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => {
                match humantime::parse_duration(s) {
                    Ok(d) => d,
                    Err(e) => {
                        self.problem(key, format!("{s:?} is not a duration with a unit such as \"250ms\" or \"30s\": {e}"));
                        default
                    }
                }
            }
        }
    }

    fn unit(&mut self, key: &str, unit: i64) -> UnitId {
        match u8::try_from(unit) {
            Ok(u @ 1..=247) => UnitId(u),
            _ => {
                self.problem(key, format!("unit id {unit} is outside 1..=247"));
                UnitId(1)
            }
        }
    }

    fn bus_ref(&mut self, key: &str, name: &str, buses: &HashMap<String, usize>) -> usize {
        if let Some(&i) = buses.get(name) {
            i
        } else {
            self.problem(key, format!("no [[bus]] is named {name:?}"));
            0
        }
    }

    fn unique_id(&mut self, key: &str, id: &str, seen: &mut HashSet<String>) -> DeviceId {
        if id.is_empty() {
            self.problem(key, "an id may not be empty");
        } else if !seen.insert(id.to_owned()) {
            self.problem(
                key,
                format!("id {id:?} is used twice; ids are unique across the site"),
            );
        }
        DeviceId(id.to_owned())
    }

    /// A `[profile.NAME]` table; problems are reported under `profile.NAME.<key>`.
    fn smoke_profile(&mut self, name: &str, raw: RawProfile) -> SmokeProfile {
        let key = format!("profile.{name}");
        if name == "generic-smoke" {
            self.problem(
                &key,
                "\"generic-smoke\" is built in; give your profile another name",
            );
        }
        let status = match (raw.status, raw.alarm) {
            (Some(st), None) => {
                let k = format!("{key}.status");
                if raw.fault.is_some() || raw.mounted.is_some() {
                    self.problem(
                        &k,
                        "fault and mounted bits go with an alarm bit, not with a status register",
                    );
                }
                let point = self.point(&k, st.table, st.address, st.every, false, true);
                let v = st.values;
                if v.alarm.is_none() {
                    self.problem(
                        format!("{k}.values"),
                        "the status values need `alarm` (the value that means fire)",
                    );
                }
                let all: Vec<u16> = [v.normal, v.alarm, v.fault, v.pre_alarm, v.test]
                    .into_iter()
                    .flatten()
                    .collect();
                if all.iter().collect::<HashSet<_>>().len() != all.len() {
                    self.problem(
                        format!("{k}.values"),
                        "two states share a value; each value means one state",
                    );
                }
                StatusPoints::Register {
                    point,
                    values: StatusValues {
                        normal: v.normal.into_iter().collect(),
                        alarm: v.alarm.into_iter().collect(),
                        pre_alarm: v.pre_alarm.into_iter().collect(),
                        fault: v.fault.into_iter().collect(),
                        test: v.test.into_iter().collect(),
                    },
                }
            }
            (None, Some(alarm)) => {
                let bit = |v: &mut Self, k: &str, p: RawPoint| {
                    v.point(
                        &format!("{key}.{k}"),
                        p.table,
                        p.address,
                        p.every,
                        true,
                        true,
                    )
                };
                StatusPoints::Bits {
                    alarm: bit(self, "alarm", alarm),
                    fault: raw.fault.map(|p| bit(self, "fault", p)),
                    mounted: raw.mounted.map(|p| bit(self, "mounted", p)),
                }
            }
            (Some(_), Some(_)) => {
                self.problem(
                    &key,
                    "a profile has either a `status` register or an `alarm` bit, not both",
                );
                SmokeProfile::generic_smoke().status
            }
            (None, None) => {
                self.problem(
                    &key,
                    "a profile needs a `status` register or an `alarm` bit",
                );
                SmokeProfile::generic_smoke().status
            }
        };
        let density = raw.smoke_density.map(|d| {
            let k = format!("{key}.smoke_density");
            let point = self.point(&k, d.table, d.address, d.every, false, false);
            let scale = d.scale.unwrap_or(1.0);
            if !(scale.is_finite() && scale > 0.0) {
                self.problem(
                    format!("{k}.scale"),
                    "must be a positive number (dB/m per count)",
                );
            }
            #[allow(clippy::cast_possible_truncation)] // A scale is a small factor.
            (point, scale as f32)
        });
        let fault_bits = raw.fault_bits.map(|p| {
            self.point(
                &format!("{key}.fault_bits"),
                p.table,
                p.address,
                p.every,
                false,
                true,
            )
        });
        let heartbeat = raw.heartbeat.map(|p| {
            self.point(
                &format!("{key}.heartbeat"),
                p.table,
                p.address,
                p.every,
                false,
                false,
            )
        });
        let remote_reset_register = raw.remote_reset.map(|r| {
            let k = format!("{key}.remote_reset");
            if r.value != 1 {
                self.problem(
                    format!("{k}.value"),
                    format!(
                        "only 1 is supported (the gateway writes 1 on reset), not {}",
                        r.value
                    ),
                );
            }
            self.address(&format!("{k}.address"), r.address)
        });
        let heartbeat_timeout = match (&heartbeat, raw.heartbeat_timeout.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => {
                self.problem(
                    format!("{key}.heartbeat_timeout"),
                    "the profile has no heartbeat register",
                );
                None
            }
            (Some(h), s) => {
                let k = format!("{key}.heartbeat_timeout");
                let t = self.duration(&k, s, GENERIC_HEARTBEAT_TIMEOUT);
                if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&t) {
                    self.problem(&k, "must be between 2s and 1h");
                }
                self.heartbeat_often_enough(&format!("{key}.heartbeat.every"), h.every, t);
                Some(t)
            }
        };
        let profile = SmokeProfile {
            name: name.to_owned(),
            status,
            density,
            fault_bits,
            heartbeat,
            remote_reset_register,
            heartbeat_timeout,
            register_count: 0,
        }
        .with_register_count();
        // The worst-case budget counts one request per detector per cycle.
        if crate::field::profile::alarm_plan(&profile).len() > 1 {
            self.problem(
                &key,
                format!(
                    "the alarm and fault points need more than one request per cycle; put them in one table within {} registers (or bits) of each other",
                    crate::field::profile::MERGE_GAP
                ),
            );
        }
        profile
    }

    /// A point; `bits` = the point must be in a bit table (else a register table);
    /// `every_cycle` = alarm or fault: `every` must be 1.
    fn point(
        &mut self,
        key: &str,
        table: RawTable,
        address: i64,
        every: Option<i64>,
        bits: bool,
        every_cycle: bool,
    ) -> Point {
        let table = Table::from(table);
        if table.is_bits() != bits {
            self.problem(
                format!("{key}.table"),
                if bits {
                    format!(
                        "a bit point is in \"discrete_input\" or \"coil\", not {:?}",
                        table.name()
                    )
                } else {
                    format!(
                        "a register point is in \"input\" or \"holding\", not {:?}",
                        table.name()
                    )
                },
            );
        }
        let address = self.address(&format!("{key}.address"), address);
        let every = match every {
            None => 1,
            Some(n @ 1..=1000) => u16::try_from(n).unwrap_or(1),
            Some(n) => {
                self.problem(
                    format!("{key}.every"),
                    format!("{n} is outside 1..=1000 scan cycles"),
                );
                1
            }
        };
        if every_cycle && every != 1 {
            self.problem(
                format!("{key}.every"),
                "alarm and fault points are read every scan cycle (every = 1)",
            );
        }
        Point {
            table,
            address,
            every,
        }
    }

    fn address(&mut self, key: &str, address: i64) -> u16 {
        u16::try_from(address).unwrap_or_else(|_| {
            self.problem(key, format!("address {address} is outside 0..=65535"));
            0
        })
    }

    /// A heartbeat read every `every` cycles must be read at least once within `timeout` even
    /// at the longest scan cycle allowed, or a live heartbeat could look frozen.
    fn heartbeat_often_enough(&mut self, key: &str, every: u16, timeout: Duration) {
        if every > 1 && WORST_SCAN_CYCLE * u32::from(every) >= timeout {
            self.problem(
                key,
                format!(
                    "a heartbeat read every {every} scan cycles (up to {} s each) may not be read within its timeout of {} s; read it more often",
                    WORST_SCAN_CYCLE.as_secs(),
                    timeout.as_secs()
                ),
            );
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let gateway = self.gateway(raw.gateway);
        let uplink = self.uplink(raw.uplink, &gateway.id);
        let max_bytes = match raw.store.max_bytes.as_deref() {
            None => 256 << 20,
            Some(s) => match s.parse::<bytesize::ByteSize>() {
                Ok(b) if b.as_u64() >= 1 << 20 => b.as_u64(),
                Ok(_) => {
                    self.problem(
                        "store.max_bytes",
                        format!("{s:?} is below the 1MiB minimum"),
                    );
                    0
                }
                Err(e) => {
                    self.problem(
                        "store.max_bytes",
                        format!("{s:?} is not a size such as \"256MiB\": {e}"),
                    );
                    0
                }
            },
        };

        let mut bus_index = HashMap::new();
        let mut buses = Vec::new();
        for (i, b) in raw.bus.into_iter().enumerate() {
            let key = format!("bus[{i}]");
            if bus_index.insert(b.name.clone(), i).is_some() {
                self.problem(
                    format!("{key}.name"),
                    format!("bus name {:?} is used twice", b.name),
                );
            }
            buses.push(self.bus(&key, b));
        }
        // Two buses on one serial port or one converter would fight over it at runtime (the
        // second cannot lock the port, and its detectors go offline).
        let mut endpoints: HashMap<String, usize> = HashMap::new();
        for (i, bus) in buses.iter().enumerate() {
            let (endpoint, what) = match &bus.transport {
                BusTransport::Rtu { port, .. } => (port.clone(), "rtu.port"),
                BusTransport::Tcp { addr } => (addr.clone(), "tcp"),
            };
            if endpoint.is_empty() {
                continue;
            }
            if let Some(first) = endpoints.insert(endpoint.clone(), i) {
                self.problem(
                    format!("bus[{i}].{what}"),
                    format!(
                        "{endpoint:?} is already bus {:?}: put both buses' devices on one bus",
                        buses[first].name
                    ),
                );
            }
        }

        let mut ids = HashSet::new();
        let mut addresses: BTreeMap<(usize, u8), String> = BTreeMap::new();
        let mut claim = |v: &mut Self, key: &str, bus: usize, unit: UnitId, id: &str| {
            // A device whose bus or unit is already wrong claims nothing: its placeholder
            // address would clash with a real device and report a problem that is not there.
            let device = key.rsplit_once('.').map_or(key, |(d, _)| d);
            if v.problems.iter().any(|(k, _)| k.starts_with(device)) {
                return;
            }
            if let Some(other) = addresses.insert((bus, unit.0), id.to_owned()) {
                if other != id {
                    v.problem(
                        key,
                        format!("unit {unit} on this bus is already device {other:?}"),
                    );
                }
            }
        };

        let profiles: HashMap<String, SmokeProfile> = raw
            .profile
            .into_iter()
            .map(|(name, p)| {
                let profile = self.smoke_profile(&name, p);
                (name, profile)
            })
            .collect();

        let mut detectors = Vec::new();
        for (i, d) in raw.detector.into_iter().enumerate() {
            let key = format!("detector[{i}]");
            let id = self.unique_id(&format!("{key}.id"), &d.id, &mut ids);
            let bus = self.bus_ref(&format!("{key}.bus"), &d.bus, &bus_index);
            let unit = self.unit(&format!("{key}.unit"), d.unit);
            claim(self, &format!("{key}.unit"), bus, unit, &d.id);
            let profile = if d.profile == "generic-smoke" {
                SmokeProfile::generic_smoke()
            } else if let Some(p) = profiles.get(&d.profile) {
                p.clone()
            } else {
                self.problem(
                    format!("{key}.profile"),
                    format!(
                        "unknown smoke detector profile {:?}; built in: \"generic-smoke\", or a [profile.NAME] table",
                        d.profile
                    ),
                );
                SmokeProfile::generic_smoke()
            };
            if d.zone.is_empty() {
                self.problem(format!("{key}.zone"), "a detector needs a zone");
            }
            let heartbeat_timeout = match d.heartbeat_timeout.as_deref() {
                None => profile.heartbeat_timeout,
                Some(s) => {
                    let k = format!("{key}.heartbeat_timeout");
                    let t = self.duration(&k, Some(s), GENERIC_HEARTBEAT_TIMEOUT);
                    if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&t) {
                        self.problem(&k, "must be between 2s and 1h");
                    }
                    match profile.heartbeat {
                        None => self.problem(&k, "the profile has no heartbeat register"),
                        Some(h) => self.heartbeat_often_enough(&k, h.every, t),
                    }
                    Some(t)
                }
            };
            detectors.push(Detector {
                id,
                bus,
                unit,
                profile,
                zone: d.zone,
                location: d.location,
                confirm_alarm: d.confirm_alarm,
                heartbeat_timeout,
            });
        }
        let zones: HashSet<String> = detectors.iter().map(|d| d.zone.clone()).collect();

        let mut sounders = Vec::new();
        for (i, s) in raw.sounder.into_iter().enumerate() {
            let key = format!("sounder[{i}]");
            let id = self.unique_id(&format!("{key}.id"), &s.id, &mut ids);
            let zones_spec = if s.zones.iter().any(|z| z == "*") {
                Zones::All
            } else {
                for (j, z) in s.zones.iter().enumerate() {
                    if !zones.contains(z) {
                        self.problem(
                            format!("{key}.zones[{j}]"),
                            format!("no detector is in zone {z:?}"),
                        );
                    }
                }
                if s.zones.is_empty() {
                    self.problem(
                        format!("{key}.zones"),
                        "a sounder serves at least one zone (or \"*\")",
                    );
                }
                Zones::Some(s.zones)
            };
            let output = self.output(&format!("{key}.output"), s.output, &bus_index);
            if let OutputSpec::Coil { bus, unit, .. } = output {
                claim(
                    self,
                    &format!("{key}.output.unit"),
                    bus,
                    unit,
                    "output module",
                );
            }
            let fallback = s.fallback.map(|f| {
                let spec = self.output(&format!("{key}.fallback"), f, &bus_index);
                if let OutputSpec::Coil { bus, unit, .. } = spec {
                    claim(
                        self,
                        &format!("{key}.fallback.unit"),
                        bus,
                        unit,
                        "output module",
                    );
                }
                spec
            });
            sounders.push(Sounder {
                id,
                zones: zones_spec,
                output,
                fallback,
            });
        }

        // A zone no sounder serves would latch a fire and sound nothing by the door.
        let mut seen = HashSet::new();
        for (i, d) in detectors.iter().enumerate() {
            if seen.insert(d.zone.as_str())
                && !d.zone.is_empty()
                && !sounders.iter().any(|s| s.zones.includes(&d.zone))
            {
                self.problem(
                    format!("detector[{i}].zone"),
                    format!(
                        "no [[sounder]] serves zone {:?}: a fire here would sound nothing; add it to a sounder's zones (or \"*\")",
                        d.zone
                    ),
                );
            }
        }

        let mut doors = Vec::new();
        for (i, d) in raw.door.into_iter().enumerate() {
            let key = format!("door[{i}]");
            let id = self.unique_id(&format!("{key}.id"), &d.id, &mut ids);
            let bus = self.bus_ref(&format!("{key}.bus"), &d.bus, &bus_index);
            let unit = self.unit(&format!("{key}.unit"), d.unit);
            claim(self, &format!("{key}.unit"), bus, unit, &d.id);
            if d.profile != "generic-door" {
                self.problem(
                    format!("{key}.profile"),
                    format!(
                        "unknown door profile {:?}; built in: \"generic-door\"",
                        d.profile
                    ),
                );
            }
            doors.push(Door {
                id,
                bus,
                unit,
                profile: d.profile,
                zone: d.zone,
                location: d.location,
                release_on_fire: d.release_on_fire,
            });
        }

        let mut zone_settings: Vec<Zone> = Vec::new();
        for (i, z) in raw.zone.into_iter().enumerate() {
            let key = format!("zone[{i}].id");
            if !zones.contains(&z.id) {
                self.problem(&key, format!("no detector is in zone {:?}", z.id));
            } else if zone_settings.iter().any(|o| o.id == z.id) {
                self.problem(&key, format!("zone {:?} is configured twice", z.id));
            } else if z.coincidence && detectors.iter().filter(|d| d.zone == z.id).count() < 2 {
                self.problem(
                    format!("zone[{i}].coincidence"),
                    format!(
                        "zone {:?} has fewer than two detectors, so its linkage could never act",
                        z.id
                    ),
                );
            }
            zone_settings.push(Zone {
                id: z.id,
                coincidence: z.coincidence,
            });
        }
        for (i, d) in doors.iter().enumerate() {
            if d.release_on_fire && !zones.contains(&d.zone) {
                self.problem(
                    format!("door[{i}].zone"),
                    format!(
                        "no detector is in zone {:?}, so release_on_fire can never act",
                        d.zone
                    ),
                );
            }
        }

        let p = raw.panel;
        let mut out = |v: &mut Self, name: &str, o: Option<RawOutput>| {
            o.map(|o| {
                let spec = v.output(&format!("panel.{name}"), o, &bus_index);
                if let OutputSpec::Coil { bus, unit, .. } = spec {
                    claim(v, &format!("panel.{name}.unit"), bus, unit, "output module");
                }
                spec
            })
        };
        let fire_led = out(self, "fire_led", p.fire_led);
        let fault_led = out(self, "fault_led", p.fault_led);
        let buzzer = out(self, "buzzer", p.buzzer);
        let disablement_led = out(self, "disablement_led", p.disablement_led);
        let panel = Panel {
            fire_led,
            fault_led,
            buzzer,
            disablement_led,
            silence_key: p
                .silence_key
                .map(|i| self.input("panel.silence_key", i, &bus_index)),
            reset_key: p
                .reset_key
                .map(|i| self.input("panel.reset_key", i, &bus_index)),
            auto_resound: p.auto_resound.as_deref().map(|s| {
                let t = self.duration("panel.auto_resound", Some(s), Duration::ZERO);
                if t < Duration::from_secs(10) {
                    self.problem("panel.auto_resound", "must be at least 10s");
                }
                t
            }),
        };
        self.gpio_conflicts(&sounders, &panel);

        let flush_interval = self.duration(
            "store.flush_interval",
            raw.store.flush_interval.as_deref(),
            crate::store::DEFAULT_FLUSH_INTERVAL,
        );
        if flush_interval < Duration::from_millis(1) || flush_interval > Duration::from_secs(10) {
            self.problem("store.flush_interval", "must be between 1ms and 10s");
        }
        let store = Store {
            max_bytes,
            flush_interval,
        };
        let config = Config {
            gateway,
            uplink,
            store,
            buses,
            detectors,
            sounders,
            doors,
            zones: zone_settings,
            panel,
        };
        // Only a config without other problems: placeholders (a bad baud rate) would make a
        // meaningless figure.
        if self.problems.is_empty() {
            self.worst_case_detection(&config);
        }
        Some(config)
    }

    /// A bus whose worst-case detection time exceeds [`crate::field::budget::LIMIT`] (10 s)
    /// is refused with its figure (DESIGN.md §4).
    fn worst_case_detection(&mut self, config: &Config) {
        use crate::field::budget;
        for (i, (bus, w)) in config
            .buses
            .iter()
            .zip(budget::for_config(config))
            .enumerate()
        {
            if let Some(w) = w.filter(|w| w.total > budget::LIMIT) {
                self.problem(
                    format!("bus[{i}]"),
                    format!(
                        "bus {:?}: worst-case detection time {w} exceeds the {} s that EN 54-2 and GB 4717 allow to indicate a fire; put fewer detectors on this bus, raise its baud rate or shorten its timeout",
                        bus.name,
                        budget::LIMIT.as_secs()
                    ),
                );
            }
        }
    }

    fn gateway(&mut self, g: RawGateway) -> Gateway {
        let valid = !g.id.is_empty()
            && g.id.len() <= 32
            && g.id
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        if !valid {
            self.problem(
                "gateway.id",
                format!("{:?} must match [a-z0-9-]{{1,32}}", g.id),
            );
        }
        Gateway {
            id: g.id,
            name: g.name,
            state_dir: g.state_dir,
        }
    }

    fn uplink(&mut self, u: RawUplink, gateway_id: &str) -> Uplink {
        let scheme_ok = u.url.starts_with("mqtt://") || u.url.starts_with("mqtts://");
        let host = u.url.split("://").nth(1).unwrap_or("");
        if !scheme_ok || host.is_empty() {
            self.problem(
                "uplink.url",
                format!(
                    "{:?} is not mqtt://host[:port] or mqtts://host[:port]",
                    u.url
                ),
            );
        }
        let keep_alive = self.duration(
            "uplink.keep_alive",
            u.keep_alive.as_deref(),
            Duration::from_secs(30),
        );
        if keep_alive < Duration::from_secs(1) {
            self.problem("uplink.keep_alive", "must be at least 1s");
        }
        if u.topic_prefix.is_empty() || u.topic_prefix.contains(['#', '+', '/']) {
            self.problem(
                "uplink.topic_prefix",
                format!(
                    "{:?} must be one non-empty topic level without + # /",
                    u.topic_prefix
                ),
            );
        }
        if u.cert_file.is_some() != u.key_file.is_some() {
            self.problem(
                "uplink.cert_file",
                "cert_file and key_file go together (mutual TLS)",
            );
        }
        if (u.ca_file.is_some() || u.cert_file.is_some()) && !u.url.starts_with("mqtts://") {
            self.problem(
                "uplink.url",
                "TLS files are set but the url is not mqtts://",
            );
        }
        let batch_events = u
            .batch_events
            .unwrap_or(crate::uplink::DEFAULT_BATCH_EVENTS);
        if !(1..=crate::uplink::EVENT_WINDOW).contains(&batch_events) {
            self.problem(
                "uplink.batch_events",
                format!(
                    "{batch_events} is outside 1 ..= {} (the events in flight)",
                    crate::uplink::EVENT_WINDOW
                ),
            );
        }
        let client_id = u.client_id.unwrap_or_else(|| format!("vgw-{gateway_id}"));
        if client_id.is_empty() || client_id.len() > 128 {
            self.problem("uplink.client_id", "must be 1 to 128 characters");
        }
        Uplink {
            url: u.url,
            client_id,
            topic_prefix: u.topic_prefix,
            keep_alive,
            username: u.username,
            password_file: u.password_file,
            ca_file: u.ca_file,
            cert_file: u.cert_file,
            key_file: u.key_file,
            batch_events,
        }
    }

    fn bus(&mut self, key: &str, b: RawBus) -> Bus {
        let transport = match (b.rtu, b.tcp) {
            (Some(r), None) => {
                if r.port.is_empty() {
                    self.problem(format!("{key}.rtu.port"), "a serial port path is needed");
                }
                if !(1200..=921_600).contains(&r.baud) {
                    self.problem(
                        format!("{key}.rtu.baud"),
                        format!("{} baud is outside 1200..=921600", r.baud),
                    );
                }
                if !(1..=2).contains(&r.stop_bits) {
                    self.problem(format!("{key}.rtu.stop_bits"), "must be 1 or 2");
                }
                BusTransport::Rtu {
                    port: r.port,
                    baud: r.baud,
                    parity: r.parity,
                    stop_bits: r.stop_bits,
                    echo: r.echo,
                }
            }
            (None, Some(addr)) => {
                let ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    self.problem(format!("{key}.tcp"), format!("{addr:?} is not host:port"));
                }
                BusTransport::Tcp { addr }
            }
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{key}.tcp"),
                    "a bus has either rtu or tcp, not both",
                );
                BusTransport::Tcp {
                    addr: String::new(),
                }
            }
            (None, None) => {
                self.problem(
                    format!("{key}.name"),
                    "a bus needs rtu = { port = ... } or tcp = \"host:port\"",
                );
                BusTransport::Tcp {
                    addr: String::new(),
                }
            }
        };
        let default = match transport {
            BusTransport::Rtu { baud, .. } => default_timeout(baud),
            BusTransport::Tcp { .. } => Duration::from_millis(500),
        };
        let timeout = self.duration(&format!("{key}.timeout"), b.timeout.as_deref(), default);
        if b.timeout.is_some()
            && (timeout < Duration::from_millis(10) || timeout > Duration::from_secs(5))
        {
            self.problem(format!("{key}.timeout"), "must be between 10ms and 5s");
        }
        let turnaround = self.duration(
            &format!("{key}.turnaround"),
            b.turnaround.as_deref(),
            Duration::ZERO,
        );
        let scan_interval = self.duration(
            &format!("{key}.scan_interval"),
            b.scan_interval.as_deref(),
            Duration::ZERO,
        );
        let offline_after = b.offline_after.unwrap_or(3);
        if offline_after == 0 {
            self.problem(format!("{key}.offline_after"), "must be at least 1");
        }
        let probe_interval = self.duration(
            &format!("{key}.probe_interval"),
            b.probe_interval.as_deref(),
            DEFAULT_PROBE_INTERVAL,
        );
        if probe_interval < Duration::from_millis(100) {
            self.problem(format!("{key}.probe_interval"), "must be at least 100ms");
        }
        let readback_interval = self.duration(
            &format!("{key}.readback_interval"),
            b.readback_interval.as_deref(),
            DEFAULT_READBACK_INTERVAL,
        );
        if readback_interval < Duration::from_millis(100) {
            self.problem(format!("{key}.readback_interval"), "must be at least 100ms");
        }
        Bus {
            name: b.name,
            transport,
            timeout,
            turnaround,
            scan_interval,
            offline_after,
            probe_interval,
            readback_interval,
        }
    }

    fn gpio(&mut self, key: &str, pin: i64) -> u8 {
        match u8::try_from(pin) {
            Ok(p @ 0..=27) => p,
            _ => {
                self.problem(key, format!("GPIO {pin} is not a BCM pin 0..=27"));
                0
            }
        }
    }

    fn register(&mut self, key: &str, address: i64) -> u16 {
        u16::try_from(address).unwrap_or_else(|_| {
            self.problem(key, format!("address {address} is outside 0..=65535"));
            0
        })
    }

    fn output(&mut self, key: &str, o: RawOutput, buses: &HashMap<String, usize>) -> OutputSpec {
        match (o.gpio, o.bus, o.unit, o.coil) {
            (Some(pin), None, None, None) => OutputSpec::Gpio {
                pin: self.gpio(&format!("{key}.gpio"), pin),
                active_low: o.active_low,
            },
            (None, Some(bus), Some(unit), Some(coil)) => OutputSpec::Coil {
                bus: self.bus_ref(&format!("{key}.bus"), &bus, buses),
                unit: self.unit(&format!("{key}.unit"), unit),
                coil: self.register(&format!("{key}.coil"), coil),
            },
            _ => {
                self.problem(
                    key,
                    "an output is { bus, unit, coil } or { gpio, active_low }",
                );
                OutputSpec::Gpio {
                    pin: 0,
                    active_low: false,
                }
            }
        }
    }

    fn input(&mut self, key: &str, i: RawInput, buses: &HashMap<String, usize>) -> InputSpec {
        match (i.gpio, i.bus, i.unit, i.discrete_input) {
            (Some(pin), None, None, None) => InputSpec::Gpio {
                pin: self.gpio(&format!("{key}.gpio"), pin),
                active_low: i.active_low,
            },
            (None, Some(bus), Some(unit), Some(input)) => InputSpec::DiscreteInput {
                bus: self.bus_ref(&format!("{key}.bus"), &bus, buses),
                unit: self.unit(&format!("{key}.unit"), unit),
                input: self.register(&format!("{key}.discrete_input"), input),
            },
            _ => {
                self.problem(
                    key,
                    "an input is { bus, unit, discrete_input } or { gpio, active_low }",
                );
                InputSpec::Gpio {
                    pin: 0,
                    active_low: false,
                }
            }
        }
    }

    /// Two outputs on one GPIO pin or one relay coil would silence each other.
    fn gpio_conflicts(&mut self, sounders: &[Sounder], panel: &Panel) {
        let mut used: HashMap<u8, String> = HashMap::new();
        let mut coils: HashMap<(usize, u8, u16), String> = HashMap::new();
        let outputs: Vec<(String, Option<&OutputSpec>)> = sounders
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                [
                    (format!("sounder[{i}].output"), Some(&s.output)),
                    (format!("sounder[{i}].fallback"), s.fallback.as_ref()),
                ]
            })
            .chain([
                ("panel.fire_led".to_owned(), panel.fire_led.as_ref()),
                ("panel.fault_led".to_owned(), panel.fault_led.as_ref()),
                ("panel.buzzer".to_owned(), panel.buzzer.as_ref()),
                (
                    "panel.disablement_led".to_owned(),
                    panel.disablement_led.as_ref(),
                ),
            ])
            .collect();
        for (key, o) in &outputs {
            if let Some(OutputSpec::Coil { bus, unit, coil }) = o {
                if let Some(other) = coils.insert((*bus, unit.0, *coil), key.clone()) {
                    self.problem(
                        format!("{key}.coil"),
                        format!("coil {coil} of unit {unit} is already driven by {other}"),
                    );
                }
            }
        }
        let mut pins: Vec<(String, u8)> = outputs
            .into_iter()
            .filter_map(|(k, o)| match o {
                Some(OutputSpec::Gpio { pin, .. }) => Some((k, *pin)),
                _ => None,
            })
            .collect();
        for (k, i) in [
            ("panel.silence_key", &panel.silence_key),
            ("panel.reset_key", &panel.reset_key),
        ] {
            if let Some(InputSpec::Gpio { pin, .. }) = i {
                pins.push((k.to_owned(), *pin));
            }
        }
        for (key, pin) in pins {
            if let Some(other) = used.insert(pin, key.clone()) {
                self.problem(key, format!("GPIO {pin} is already used by {other}"));
            }
        }
    }
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(at)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The byte offset of the deepest part of the TOML `path` (`detector[2].unit`) found in `doc`.
fn span_of(doc: &toml_edit::ImDocument<&str>, path: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut best = None;
    for part in path.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((key, item)) = table.get_key_value(name) else {
            break;
        };
        best = key.span().map(|s| s.start).or(best);
        let next: Option<&dyn toml_edit::TableLike> = match index {
            None => item.as_table_like(),
            Some(i) => {
                if let Some(t) = item.as_array_of_tables().and_then(|a| a.get(i)) {
                    best = t.span().map(|s| s.start).or(best);
                    Some(t)
                } else if let Some(v) = item.as_array().and_then(|a| a.get(i)) {
                    best = v.span().map(|s| s.start).or(best);
                    v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike)
                } else {
                    None
                }
            }
        };
        match next {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
id = "yian"
name = "遗安小区"
state_dir = "/tmp/vgw"

[uplink]
url = "mqtt://127.0.0.1:1883"

[[bus]]
name = "a"
rtu = { port = "/dev/ttyUSB0", baud = 9600 }

[[detector]]
id = "A-101"
bus = "a"
unit = 1
zone = "A"
location = "A栋101室"

[[sounder]]
id = "A-sounder"
zones = ["A"]
output = { bus = "a", unit = 100, coil = 0 }

[panel]
fire_led = { gpio = 5 }
buzzer = { bus = "a", unit = 100, coil = 7 }
silence_key = { bus = "a", unit = 100, discrete_input = 0 }
"#;

    fn check(text: &str) -> Result<Config, Error> {
        Config::from_toml(text, Path::new("gw.toml"))
    }

    #[test]
    fn a_good_config_validates_with_defaults_filled_in() {
        let c = check(GOOD).unwrap();
        assert_eq!(c.uplink.client_id, "vgw-yian");
        assert_eq!(c.uplink.topic_prefix, "village");
        assert_eq!(c.buses[0].offline_after, 3);
        assert_eq!(c.buses[0].timeout, default_timeout(9600));
        assert_eq!(c.detectors[0].unit, UnitId(1));
        assert_eq!(
            c.sounders[0].output,
            OutputSpec::Coil {
                bus: 0,
                unit: UnitId(100),
                coil: 0
            }
        );
        assert_eq!(
            c.panel.fire_led,
            Some(OutputSpec::Gpio {
                pin: 5,
                active_low: false
            })
        );
    }

    #[test]
    fn a_unit_out_of_range_is_reported_with_its_line_and_key() {
        let text = GOOD.replace("unit = 1\n", "unit = 300\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "detector[0].unit");
        assert_eq!(e.problems[0].line, Some(17));
        assert!(
            e.to_string()
                .starts_with("gw.toml:17: detector[0].unit: unit id 300"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line() {
        let text = GOOD.replace("zone = \"A\"\n", "zone = \"A\"\nzoen = \"B\"\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems[0].line, Some(19), "{e}");
        assert!(e.problems[0].message.contains("zoen"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = GOOD
            .replace("bus = \"a\"\nunit = 1", "bus = \"b\"\nunit = 0")
            .replace("baud = 9600", "baud = 5");
        let e = check(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["bus[0].rtu.baud", "detector[0].bus", "detector[0].unit"],
            "{e}"
        );
        assert_eq!(e.problems[0].line, Some(12));
    }

    #[test]
    fn inline_table_keys_point_at_their_own_line() {
        let text = GOOD.replace(
            "output = { bus = \"a\", unit = 100, coil = 0 }",
            "output = { bus = \"z\", unit = 100, coil = 0 }",
        );
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "sounder[0].output.bus");
        assert_eq!(e.problems[0].line, Some(24), "{e}");
    }

    #[test]
    fn two_outputs_on_one_relay_coil_are_refused() {
        let text = GOOD.replace("coil = 7", "coil = 0");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "panel.buzzer.coil");
        assert!(
            e.problems[0]
                .message
                .contains("already driven by sounder[0].output"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_bus_or_unit_reports_no_phantom_address_clash() {
        let text = format!("{GOOD}\n[[detector]]\nid = \"A-102\"\nbus = \"zz\"\nunit = 1\nzone = \"A\"\n[[detector]]\nid = \"A-103\"\nbus = \"a\"\nunit = 248\nzone = \"A\"\n");
        let e = check(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["detector[1].bus", "detector[2].unit"], "{e}");
    }

    #[test]
    fn a_file_that_is_not_toml_says_so_with_its_line() {
        let e = check("[gateway]\nid = yian\n").unwrap_err();
        assert_eq!(e.problems[0].line, Some(2), "{e}");
        assert!(e.problems[0].message.starts_with("not valid TOML: "), "{e}");
    }

    /// `GOOD` with `line` added to its `[uplink]` table, on line 9.
    fn with_uplink_line(line: &str) -> String {
        GOOD.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("url = \"mqtt://127.0.0.1:1883\"\n{line}"),
        )
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key_and_line() {
        for bad in [
            "batch_events = -1",
            "batch_events = \"100\"",
            "keep_alive = 30",
        ] {
            let e = check(&with_uplink_line(bad)).unwrap_err();
            let key = format!("uplink.{}", bad.split(' ').next().unwrap());
            assert_eq!(e.problems[0].key, key, "{bad}: {e}");
            assert_eq!(e.problems[0].line, Some(9), "{bad}: {e}");
        }
        let text = GOOD.replace("unit = 1\n", "unit = \"one\"\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "detector[0].unit", "{e}");
    }

    #[test]
    fn durations_need_units() {
        let text = GOOD.replace("baud = 9600 }", "baud = 9600 }\ntimeout = \"200\"");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "bus[0].timeout");
        assert_eq!(e.problems[0].line, Some(13));
    }

    #[test]
    fn two_devices_on_one_address_are_refused() {
        let text =
            format!("{GOOD}\n[[detector]]\nid = \"A-102\"\nbus = \"a\"\nunit = 1\nzone = \"A\"\n");
        let e = check(&text).unwrap_err();
        assert!(
            e.problems[0].message.contains("already device \"A-101\""),
            "{e}"
        );
    }

    #[test]
    fn a_zone_that_no_sounder_serves_is_refused() {
        let text =
            format!("{GOOD}\n[[detector]]\nid = \"B-101\"\nbus = \"a\"\nunit = 2\nzone = \"B\"\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "detector[1].zone", "{e}");
        assert!(
            e.problems[0]
                .message
                .contains("no [[sounder]] serves zone \"B\""),
            "{e}"
        );
        // A sounder for every zone makes it good.
        assert!(check(&text.replace("zones = [\"A\"]", "zones = [\"*\"]")).is_ok());
    }

    #[test]
    fn two_buses_on_one_port_are_refused() {
        let text = GOOD.replace(
            "[[detector]]",
            "[[bus]]\nname = \"b\"\nrtu = { port = \"/dev/ttyUSB0\" }\n\n[[detector]]",
        );
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "bus[1].rtu.port", "{e}");
        assert!(e.problems[0].message.contains("already bus \"a\""), "{e}");
    }

    #[test]
    fn duplicate_ids_and_gpio_pins_are_refused() {
        let text = GOOD
            .replace("id = \"A-sounder\"", "id = \"A-101\"")
            .replace(
                "buzzer = { bus = \"a\", unit = 100, coil = 7 }",
                "buzzer = { gpio = 5 }",
            );
        let e = check(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["sounder[0].id", "panel.buzzer"], "{e}");
    }

    #[test]
    fn fire_keys_validate_with_their_defaults() {
        let c = check(GOOD).unwrap();
        assert_eq!(
            c.detectors[0].heartbeat_timeout,
            Some(Duration::from_secs(60)),
            "generic-smoke's 60 s"
        );
        assert_eq!(c.sounders[0].fallback, None);
        assert!(c.zones.is_empty());
        assert_eq!(c.panel.auto_resound, None);

        let text = GOOD
            .replace(
                "location = \"A栋101室\"\n",
                "location = \"A栋101室\"\nheartbeat_timeout = \"5s\"\n",
            )
            .replace(
                "output = { bus = \"a\", unit = 100, coil = 0 }\n",
                "output = { bus = \"a\", unit = 100, coil = 0 }\nfallback = { gpio = 18 }\n",
            )
            .replace(
                "[panel]\n",
                "[[detector]]\nid = \"A-102\"\nbus = \"a\"\nunit = 2\nzone = \"A\"\n\
                 [[zone]]\nid = \"A\"\ncoincidence = true\n[panel]\nauto_resound = \"10min\"\n",
            );
        let c = check(&text).unwrap();
        assert_eq!(
            c.detectors[0].heartbeat_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            c.sounders[0].fallback,
            Some(OutputSpec::Gpio {
                pin: 18,
                active_low: false
            })
        );
        assert_eq!(
            c.zones,
            [Zone {
                id: "A".into(),
                coincidence: true
            }]
        );
        assert_eq!(c.panel.auto_resound, Some(Duration::from_secs(600)));
    }

    #[test]
    fn bad_fire_keys_are_refused_with_their_keys() {
        let text = GOOD
            .replace(
                "location = \"A栋101室\"\n",
                "location = \"A栋101室\"\nheartbeat_timeout = \"1s\"\n",
            )
            .replace(
                "output = { bus = \"a\", unit = 100, coil = 0 }\n",
                "output = { bus = \"a\", unit = 100, coil = 0 }\nfallback = { gpio = 5 }\n",
            )
            .replace(
                "[panel]\n",
                "[[zone]]\nid = \"Z\"\ncoincidence = true\n\
                 [[door]]\nid = \"Z-gate\"\nbus = \"a\"\nunit = 50\nzone = \"Z\"\nrelease_on_fire = true\n\
                 [panel]\nauto_resound = \"5s\"\n",
            );
        let e = check(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "detector[0].heartbeat_timeout",
                "zone[0].id",
                "door[0].zone",
                "panel.auto_resound",
                "panel.fire_led",
            ],
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("GPIO 5 is already used by sounder[0].fallback"),
            "{e}"
        );
        assert!(e.problems.iter().all(|p| p.line.is_some()), "{e}");

        let text = GOOD.replace(
            "[panel]\n",
            "[[zone]]\nid = \"A\"\ncoincidence = true\n[panel]\n",
        );
        let e = check(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "zone[0].coincidence", "{e}");
        assert!(
            e.problems[0].message.contains("fewer than two detectors"),
            "{e}"
        );
    }

    #[test]
    fn the_example_config_validates() {
        let text = include_str!("../config/gateway.example.toml");
        let c = check(text).unwrap();
        assert!(!c.detectors.is_empty());
        let calectro = &c
            .detectors
            .iter()
            .find(|d| d.id.0 == "B-101")
            .unwrap()
            .profile;
        assert_eq!(calectro.name, "calectro-ug3");
        assert_eq!(
            crate::field::profile::alarm_plan(calectro),
            vec![crate::field::profile::Block {
                table: Table::DiscreteInput,
                address: 0,
                count: 3
            }]
        );
    }

    const SLOW: &str = r#"
[profile.slow]
status = { table = "input", address = 0, values = { normal = 0, alarm = 1, fault = 2, pre_alarm = 3, test = 4 } }
smoke_density = { table = "input", address = 1, scale = 0.01, every = 4 }
fault_bits = { table = "input", address = 2 }
heartbeat = { table = "input", address = 3, every = 4 }
remote_reset = { address = 16, value = 1 }
"#;

    #[test]
    fn a_profile_table_equivalent_to_generic_smoke_decodes_the_same_points() {
        let text = GOOD.replace("zone = \"A\"\n", "zone = \"A\"\nprofile = \"slow\"\n");
        let c = check(&format!("{text}{SLOW}")).unwrap();
        let p = &c.detectors[0].profile;
        let g = SmokeProfile::generic_smoke();
        assert_eq!(p.status, g.status);
        assert_eq!(p.fault_bits, g.fault_bits);
        assert_eq!(p.heartbeat.map(|h| (h.address, h.every)), Some((3, 4)));
        assert_eq!(
            p.density.map(|(d, s)| (d.address, d.every, s)),
            Some((1, 4, 0.01))
        );
        assert_eq!(p.remote_reset_register, Some(16));
        assert_eq!(
            c.detectors[0].heartbeat_timeout,
            Some(GENERIC_HEARTBEAT_TIMEOUT)
        );
        assert_eq!(p.register_count, 4);
    }

    #[test]
    fn bad_profile_tables_are_refused_with_their_keys_and_lines() {
        let bad = r#"
[profile.bad]
status = { table = "input", address = 0, every = 2, values = { normal = 0, fault = 0 } }
fault_bits = { table = "discrete_input", address = 70000 }
heartbeat = { table = "input", address = 3, every = 6 }
remote_reset = { address = 0, value = 234 }

[profile.far]
alarm = { table = "discrete_input", address = 2 }
fault = { table = "input", address = 2 }
"#;
        let e = check(&format!("{GOOD}{bad}")).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "profile.bad.status.every",
            "profile.bad.status.values",
            "profile.bad.fault_bits.table",
            "profile.bad.fault_bits.address",
            "profile.bad.heartbeat.every",
            "profile.bad.remote_reset.value",
            "profile.far.fault.table",
            "profile.far",
        ] {
            assert!(keys.contains(&want), "{want} missing: {e}");
        }
        assert!(e.problems.iter().all(|p| p.line.is_some()), "{e}");
        assert!(e.to_string().contains("every scan cycle"), "{e}");

        let unknown = "[profile.x]\nalarm = { table = \"coil\", address = 0, evry = 2 }\n";
        let e = check(&format!("{GOOD}{unknown}")).unwrap_err();
        assert!(e.problems[0].message.contains("evry"), "{e}");

        let missing = GOOD.replace("zone = \"A\"\n", "zone = \"A\"\nprofile = \"nope\"\n");
        let e = check(&missing).unwrap_err();
        assert_eq!(e.problems[0].key, "detector[0].profile", "{e}");
    }

    #[test]
    fn store_flush_interval_defaults_to_200ms_and_is_refused_outside_1ms_to_10s() {
        assert_eq!(
            check(GOOD).unwrap().store.flush_interval,
            Duration::from_millis(200)
        );
        let ok = check(&format!("{GOOD}\n[store]\nflush_interval = \"50ms\"\n")).unwrap();
        assert_eq!(ok.store.flush_interval, Duration::from_millis(50));
        for bad in ["\"20s\"", "\"0ms\"", "\"200\""] {
            let e = check(&format!("{GOOD}\n[store]\nflush_interval = {bad}\n")).unwrap_err();
            assert_eq!(e.problems[0].key, "store.flush_interval", "{bad}: {e}");
        }
    }

    #[test]
    fn uplink_batch_events_defaults_to_100_and_is_refused_outside_1_to_the_window() {
        assert_eq!(check(GOOD).unwrap().uplink.batch_events, 100);
        let with = |n: &str| with_uplink_line(&format!("batch_events = {n}"));
        assert_eq!(check(&with("1")).unwrap().uplink.batch_events, 1);
        for bad in ["0", "1001"] {
            let e = check(&with(bad)).unwrap_err();
            assert_eq!(e.problems[0].key, "uplink.batch_events", "{bad}: {e}");
        }
    }
}
