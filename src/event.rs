//! The shared vocabulary: identifiers, readings, events and commands.
//!
//! Every other module speaks in these types. Nothing here does I/O.
//!
//! - An [`Event`] is a fact in the past tense (`fire.alarm` was raised); it gets its
//!   gap-free [`Seq`] only when the store accepts it.
//! - The wire form of an event is a CloudEvents 1.0 JSON envelope
//!   ([`Event::to_cloudevent`]); `id` = `"<gateway>-<seq>"` is the upstream de-duplication key.
//! - A [`Command`] comes from upstream (`<prefix>/<gw>/cmd/<name>`); a malformed one is an
//!   error value, never a panic.
//!
//! Additions to DESIGN.md §3 (issue 3), all in the urgent lane:
//! - event types `fire.pre_alarm` / `fire.pre_alarm_cleared` (a warning, never sounds),
//!   `device.test` / `device.test_ended` (the detector's own test button),
//!   `device.disabled` / `device.enabled` (`data.command` = the command id that asked, or
//!   `data.reason` = "panel key"), `alarm.resounded` (`[panel] auto_resound` elapsed);
//! - `door.released` carries the alarms that released the door in `data.devices`;
//!   `alarm.reset` lists the doors it locked again in `data.extra.doors_locked`;
//!   `alarm.silenced` lists the faults whose buzzer it silenced in `data.extra.faults`;
//!   `gateway.started` lists `data.extra.disabled_detectors` kept over the restart;
//! - commands `disable` / `enable` `{"id", "device": "<detector id>"}`: an unknown or missing
//!   device is an error result; the status gains `disabled` (detector ids).

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A device's id from the config (`[[detector]] id`, `[[sounder]] id`, ...), unique in a site.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub String);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for DeviceId {
    fn from(s: &str) -> Self {
        DeviceId(s.to_owned())
    }
}

/// A Modbus unit id (slave address). 1..=247 address one unit; 0 is broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnitId(pub u8);

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The outbox sequence number: assigned by the store, gap-free per gateway, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a smoke detector's status register says (generic profile: input register 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorStatus {
    /// No smoke.
    Normal,
    /// Smoke above the alarm threshold: a fire input.
    Alarm,
    /// Smoke rising, below the alarm threshold: a warning only, never sounds.
    PreAlarm,
    /// The detector reports a fault (status value or any fault bit).
    Fault,
    /// The detector's own test button: reported, never a fire.
    Test,
}

/// One decoded poll of a smoke detector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetectorReading {
    /// The status after decoding the profile (a set fault bit makes it [`DetectorStatus::Fault`]
    /// unless the status says alarm: a fire is never masked by a fault).
    pub status: DetectorStatus,
    /// Smoke density in dB/m (generic profile: input register 1 × 0.01), if the profile has it.
    pub smoke_db_per_m: Option<f32>,
    /// Raw fault bits (generic profile: input register 2; bit 0 chamber, 1 head removed,
    /// 2 contamination, 3 supply low).
    pub fault_bits: u16,
    /// Heartbeat counter (generic profile: input register 3), if the profile has it.
    pub heartbeat: Option<u16>,
}

/// The priority lane of an event in the outbox. Lower drains first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Lane {
    /// Fire and fault events: flushed to disk before they count as stored, sent first.
    Urgent = 0,
    /// Access and door events.
    Access = 1,
    /// Everything else.
    Routine = 2,
}

/// The CloudEvents `type` of an event (DESIGN.md §3). The names are the upstream contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "fire.alarm")]
    FireAlarm,
    #[serde(rename = "fire.restored")]
    FireRestored,
    #[serde(rename = "alarm.silenced")]
    AlarmSilenced,
    #[serde(rename = "alarm.reset")]
    AlarmReset,
    #[serde(rename = "device.fault")]
    DeviceFault,
    #[serde(rename = "device.fault_cleared")]
    DeviceFaultCleared,
    #[serde(rename = "device.offline")]
    DeviceOffline,
    #[serde(rename = "device.online")]
    DeviceOnline,
    #[serde(rename = "sounder.fault")]
    SounderFault,
    /// Contract addition (issue 3): a detector reports pre-alarm (smoke rising, below the
    /// alarm threshold). A warning only: it never sounds.
    #[serde(rename = "fire.pre_alarm")]
    FirePreAlarm,
    /// Contract addition (issue 3): the detector left pre-alarm.
    #[serde(rename = "fire.pre_alarm_cleared")]
    FirePreAlarmCleared,
    /// Contract addition (issue 3): silenced sounders sounded again because the
    /// `[panel] auto_resound` time passed with alarms still latched.
    #[serde(rename = "alarm.resounded")]
    AlarmResounded,
    /// Contract addition (issue 3): a detector was disabled (`data.command` = who asked);
    /// its conditions (fault, offline, pre-alarm, test) end with it.
    #[serde(rename = "device.disabled")]
    DeviceDisabled,
    /// Contract addition (issue 3): a disabled detector was enabled again.
    #[serde(rename = "device.enabled")]
    DeviceEnabled,
    /// Contract addition (issue 3): a detector reports its test status (its own test
    /// button); never a fire.
    #[serde(rename = "device.test")]
    DeviceTest,
    /// Contract addition (issue 3): the detector left its test status.
    #[serde(rename = "device.test_ended")]
    DeviceTestEnded,
    #[serde(rename = "access.granted")]
    AccessGranted,
    #[serde(rename = "access.denied")]
    AccessDenied,
    #[serde(rename = "access.flagged")]
    AccessFlagged,
    #[serde(rename = "door.forced")]
    DoorForced,
    #[serde(rename = "door.held")]
    DoorHeld,
    #[serde(rename = "door.released")]
    DoorReleased,
    #[serde(rename = "gateway.started")]
    GatewayStarted,
    #[serde(rename = "outbox.evicted")]
    OutboxEvicted,
}

impl EventKind {
    /// The CloudEvents `type` string, also the last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::FireAlarm => "fire.alarm",
            EventKind::FireRestored => "fire.restored",
            EventKind::AlarmSilenced => "alarm.silenced",
            EventKind::AlarmReset => "alarm.reset",
            EventKind::DeviceFault => "device.fault",
            EventKind::DeviceFaultCleared => "device.fault_cleared",
            EventKind::DeviceOffline => "device.offline",
            EventKind::DeviceOnline => "device.online",
            EventKind::SounderFault => "sounder.fault",
            EventKind::FirePreAlarm => "fire.pre_alarm",
            EventKind::FirePreAlarmCleared => "fire.pre_alarm_cleared",
            EventKind::AlarmResounded => "alarm.resounded",
            EventKind::DeviceDisabled => "device.disabled",
            EventKind::DeviceEnabled => "device.enabled",
            EventKind::DeviceTest => "device.test",
            EventKind::DeviceTestEnded => "device.test_ended",
            EventKind::AccessGranted => "access.granted",
            EventKind::AccessDenied => "access.denied",
            EventKind::AccessFlagged => "access.flagged",
            EventKind::DoorForced => "door.forced",
            EventKind::DoorHeld => "door.held",
            EventKind::DoorReleased => "door.released",
            EventKind::GatewayStarted => "gateway.started",
            EventKind::OutboxEvicted => "outbox.evicted",
        }
    }

    /// The outbox lane: fire and fault first, then access and doors, then the rest.
    pub fn lane(self) -> Lane {
        match self {
            EventKind::FireAlarm
            | EventKind::FireRestored
            | EventKind::AlarmSilenced
            | EventKind::AlarmReset
            | EventKind::DeviceFault
            | EventKind::DeviceFaultCleared
            | EventKind::DeviceOffline
            | EventKind::DeviceOnline
            | EventKind::SounderFault
            | EventKind::FirePreAlarm
            | EventKind::FirePreAlarmCleared
            | EventKind::AlarmResounded
            | EventKind::DeviceDisabled
            | EventKind::DeviceEnabled
            | EventKind::DeviceTest
            | EventKind::DeviceTestEnded
            // Reports lost data; lane 0 is never evicted (store.rs, "Disk budget").
            | EventKind::OutboxEvicted => Lane::Urgent,
            EventKind::AccessGranted
            | EventKind::AccessDenied
            | EventKind::AccessFlagged
            | EventKind::DoorForced
            | EventKind::DoorHeld
            | EventKind::DoorReleased => Lane::Access,
            EventKind::GatewayStarted => Lane::Routine,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `data` of an event: what a receiver needs without looking anything up.
/// Absent fields are left out of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<DeviceId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub location: Option<String>,
    /// The reading that caused the event, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reading: Option<DetectorReading>,
    /// Why: a fault description, the command id that asked, ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The command id that caused the event (silence, reset), if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command: Option<String>,
    /// Devices concerned by a site-wide event (the alarms a reset cleared, ...).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub devices: Vec<DeviceId>,
    /// Free-form extra fields (version, counts, seq ranges, ...).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty", default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A fact that happened at the gateway, before the store numbers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// When it happened (wall clock), stored in ms since the Unix epoch.
    #[serde(with = "epoch_ms")]
    pub time: SystemTime,
    pub data: EventData,
}

impl Event {
    /// An event of `kind` at `time` with `data`.
    pub fn new(kind: EventKind, time: SystemTime, data: EventData) -> Self {
        Event { kind, time, data }
    }

    /// The CloudEvents 1.0 JSON envelope (DESIGN.md §3) of this event numbered `seq`.
    pub fn to_cloudevent(
        &self,
        seq: Seq,
        gateway_id: &str,
        topic_prefix: &str,
    ) -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": format!("{gateway_id}-{}", seq.0),
            "source": format!("/{topic_prefix}/{gateway_id}"),
            "type": self.kind.as_str(),
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "datacontenttype": "application/json",
            "seq": seq.0,
            "data": self.data,
        })
    }
}

mod epoch_ms {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        s.serialize_u64(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let ms = u64::deserialize(d)?;
        Ok(UNIX_EPOCH + Duration::from_millis(ms))
    }
}

/// A command from upstream, after parsing (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The caller's id, echoed in the result on `<prefix>/<gw>/cmd-result`.
    pub id: String,
    pub kind: CommandKind,
}

/// The commands this gateway understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    /// Silence the sounding alarms (the panel's fire indication stays).
    Silence,
    /// Clear latched alarms; a detector still in alarm re-alarms at once.
    Reset,
    /// Publish the retained status now.
    Status,
    /// Disable a detector (EN 54-2 disablement): `{"id", "device": "A-101"}`.
    Disable { device: DeviceId },
    /// Enable a disabled detector again: `{"id", "device": "A-101"}`.
    Enable { device: DeviceId },
}

/// Why a command could not be parsed. The text goes back in the command's result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("payload is not a JSON object with a string \"id\": {0}")]
    Malformed(String),
    /// The payload lacks an argument the command needs, or has it of the wrong type.
    #[error("{0}")]
    BadArgument(String),
}

impl Command {
    /// Parses the command `name` (the last topic level) with its JSON `payload`.
    ///
    /// # Errors
    /// [`CommandError::Malformed`] when the payload is not `{"id": "...", ...}`;
    /// [`CommandError::Unknown`] for a name this gateway does not know. The id is returned
    /// beside the error when it could be read, so the result can still name it.
    pub fn parse(name: &str, payload: &[u8]) -> Result<Command, (Option<String>, CommandError)> {
        let value: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| (None, CommandError::Malformed(e.to_string())))?;
        let id = match value.get("id") {
            Some(serde_json::Value::String(id)) => id.clone(),
            Some(other) => {
                let e = CommandError::Malformed(format!("\"id\" must be a string, got {other}"));
                return Err((None, e));
            }
            None => return Err((None, CommandError::Malformed("missing \"id\"".to_owned()))),
        };
        let kind = match name {
            "silence" => CommandKind::Silence,
            "reset" => CommandKind::Reset,
            "status" => CommandKind::Status,
            "disable" | "enable" => {
                let device = match value.get("device") {
                    Some(serde_json::Value::String(d)) if !d.is_empty() => DeviceId(d.clone()),
                    _ => {
                        let e = CommandError::BadArgument(format!(
                            "{name} needs \"device\": the id of a detector, as a string"
                        ));
                        return Err((Some(id), e));
                    }
                };
                if name == "disable" {
                    CommandKind::Disable { device }
                } else {
                    CommandKind::Enable { device }
                }
            }
            other => return Err((Some(id), CommandError::Unknown(other.to_owned()))),
        };
        Ok(Command { id, kind })
    }
}

/// The retained status (`<prefix>/<gw>/status`). The will publishes `{"online":false}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    pub version: String,
    /// Detectors whose fire alarm is latched.
    pub active_fire_alarms: Vec<DeviceId>,
    /// Devices in fault or offline.
    pub faults: Vec<DeviceId>,
    /// Whether the sounders are silenced.
    pub silenced: bool,
    /// Disabled detectors.
    #[serde(default)]
    pub disabled: Vec<DeviceId>,
    /// Events waiting in the outbox.
    pub outbox_depth: u64,
    /// Age of the oldest waiting event, in seconds.
    pub oldest_pending_age_s: Option<u64>,
    /// Per bus (by `[[bus]] name`): transactions, timeouts, CRC errors, foreign frames,
    /// exceptions, scan cycle times, offline units (refreshed every scan cycle; published with
    /// the next status change or `status` command, never on their own).
    #[serde(default)]
    pub buses: std::collections::BTreeMap<String, crate::field::BusStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevent_envelope_names_gateway_and_seq() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let e = Event::new(
            EventKind::FireAlarm,
            t,
            EventData {
                device: Some("A-101".into()),
                ..EventData::default()
            },
        );
        let v = e.to_cloudevent(Seq(42), "yian", "village");
        assert_eq!(v["id"], "yian-42");
        assert_eq!(v["source"], "/village/yian");
        assert_eq!(v["type"], "fire.alarm");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["data"]["device"], "A-101");
        assert!(v["data"].get("zone").is_none());
    }

    #[test]
    fn event_survives_a_json_round_trip() {
        let e = Event::new(
            EventKind::DeviceOffline,
            SystemTime::UNIX_EPOCH,
            EventData::default(),
        );
        let bytes = serde_json::to_vec(&e).unwrap();
        assert_eq!(serde_json::from_slice::<Event>(&bytes).unwrap(), e);
    }

    #[test]
    fn malformed_and_unknown_commands_are_errors_with_the_id_when_known() {
        assert!(matches!(
            Command::parse("silence", b"not json"),
            Err((None, CommandError::Malformed(_)))
        ));
        assert!(matches!(
            Command::parse("silence", b"{}"),
            Err((None, CommandError::Malformed(_)))
        ));
        let err = Command::parse("explode", br#"{"id":"c1"}"#).unwrap_err();
        assert_eq!(err.0.as_deref(), Some("c1"));
        assert_eq!(
            Command::parse("reset", br#"{"id":"c2"}"#).unwrap(),
            Command {
                id: "c2".into(),
                kind: CommandKind::Reset
            }
        );
    }

    #[test]
    fn disable_and_enable_name_their_device_or_are_refused() {
        assert_eq!(
            Command::parse("disable", br#"{"id":"d1","device":"A-101"}"#).unwrap(),
            Command {
                id: "d1".into(),
                kind: CommandKind::Disable {
                    device: "A-101".into()
                }
            }
        );
        assert_eq!(
            Command::parse("enable", br#"{"id":"e1","device":"A-101"}"#)
                .unwrap()
                .kind,
            CommandKind::Enable {
                device: "A-101".into()
            }
        );
        for payload in [
            &br#"{"id":"d2"}"#[..],
            br#"{"id":"d2","device":7}"#,
            br#"{"id":"d2","device":""}"#,
        ] {
            let (id, e) = Command::parse("disable", payload).unwrap_err();
            assert_eq!(id.as_deref(), Some("d2"));
            assert!(matches!(e, CommandError::BadArgument(m) if m.contains("device")));
        }
    }

    #[test]
    fn a_numeric_command_id_is_refused_with_a_message_that_says_so() {
        let err = Command::parse("silence", br#"{"id":5}"#).unwrap_err();
        assert_eq!(
            err.1,
            CommandError::Malformed("\"id\" must be a string, got 5".to_owned())
        );
    }
}
