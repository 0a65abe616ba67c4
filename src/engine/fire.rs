//! The fire rules: what a detector reading, a missed poll, a tick of the clock or an officer's
//! command means, and which outputs must be on. Pure: no I/O, no clock of its own (`now` is an
//! argument), no tokio.
//!
//! Design constraints:
//! - **Detector states**: normal, pre-alarm (a warning: `fire.pre_alarm`, never sounds), alarm
//!   (latches), fault (fault status, an unknown status value, any fault bit, or a heartbeat
//!   frozen for the profile's limit: 60 s for `generic-smoke`), offline (`offline_after` missed
//!   polls), test (the detector's own test button: `device.test`, never a fire) and disabled
//!   (by a command: `device.disabled`). Each change is one event, each recovery one event.
//! - **Outputs are levels**, recomputed from the state after every input: sounder *i* is on
//!   exactly when a latched alarm of an enabled detector in one of its zones is unsilenced; the
//!   panel's fire LED while any alarm is latched (silence and disablement never clear it); the
//!   fault LED while an enabled detector is in fault or offline or an output fails; the buzzer
//!   steady while a sounder would sound, else pulsing (one tick on, one off) while an
//!   unsilenced fault exists; the disablement LED while any detector is disabled (EN 54-2's
//!   general disablement indicator: a disabled detector is a blind spot the officer must see). A [`Action::DriveOutput`] is emitted only when a level changes,
//!   and [`FireEngine::start`] emits every level once.
//! - **Alarms latch** until reset, even when the detector returns to normal (`fire.restored`
//!   is reported; the alarm stays). EN 54-2 / GB 4717: the fire alarm condition is held until
//!   a manual reset. A test-button reading or a pre-alarm never latches; an alarm latched
//!   before the detector reports test stays latched and sounding (a test never masks a fire).
//! - **Silence** stops the sounders and the buzzer, never the fire LED. A new alarm anywhere
//!   after a silence re-sounds (EN 54-2: silenced alarm devices re-sound on a new alarm); so
//!   does the optional auto-resound timer ([`PanelSpec::auto_resound`], `alarm.resounded`).
//!   A silenced fault buzzer pulses again on the next new fault.
//! - **Reset** clears every latched alarm and every released door, and asks each latched
//!   detector for its remote reset; a detector that still reports alarm on its next poll
//!   latches again at once.
//! - **Disablement** (EN 54-2 disablement condition): a disabled detector's readings and
//!   misses are ignored, so it raises no alarm, pre-alarm, test or fault and drives nothing.
//!   Disabling ends its fault/offline/pre-alarm/test conditions (the `device.disabled` event
//!   stands for their end); after `device.enabled` its next poll reports it afresh. A detector
//!   disabled while its alarm is latched keeps the alarm latched and indicated (fire LED,
//!   status) until reset (nothing unlatches without a reset), but the alarm drives no sounder,
//!   buzzer or door while the detector is disabled.
//! - **Linkage**: a door with `release_on_fire` is released (its `lock_release` coil on,
//!   `door.released`) when its zone has a latched alarm of an enabled detector, or two such
//!   alarms in a zone that asks for coincidence (GB 50116-2013 §4.1.6: linkage from two
//!   independent alarm signals); sounders never wait for coincidence. A released door stays
//!   released until reset.
//! - **Fallback sounders**: a sounder with a fallback output drives it while the sounder
//!   should sound and its primary output is in `sounder.fault`.
//! - **A fire is never masked by a fault**: a reading of alarm latches whatever the fault bits
//!   say; fires are indicated while faults exist.
//! - Every state change emits exactly one event; an input that changes nothing emits nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Zones;
use crate::event::{DetectorReading, DetectorStatus, DeviceId, Event, EventData, EventKind};

/// The most one gap between two reads of a heartbeat counts towards "unchanged for 60 s".
/// Consecutive polls of a detector are less than 10 s apart (`check-config` refuses a bus
/// whose worst-case scan exceeds 10 s), so a longer gap is the wall clock jumping (NTP
/// setting the clock of a Pi that has no RTC, after boot), not a stuck detector.
pub const MAX_HEARTBEAT_STEP: Duration = Duration::from_secs(10);

/// A detector as the engine needs to know it.
#[derive(Debug, Clone)]
pub struct DetectorSpec {
    pub id: DeviceId,
    pub zone: String,
    pub location: String,
    /// Missed polls in a row before the detector is offline (the bus's `offline_after`).
    pub offline_after: u32,
    /// The detector has a remote reset register.
    pub remote_reset: bool,
    /// A heartbeat register unchanged for this long is a fault (stuck firmware); `None` when
    /// the profile has no heartbeat. `generic-smoke`: 60 s (`shared/devices/generic.toml`).
    pub heartbeat_timeout: Option<Duration>,
}

/// A sounder as the engine needs to know it.
#[derive(Debug, Clone)]
pub struct SounderSpec {
    pub id: DeviceId,
    pub zones: Zones,
    /// The sounder has a fallback output ([`OutputId::SounderFallback`]).
    pub fallback: bool,
}

/// A door released on fire (`[[door]] release_on_fire = true`): its `lock_release` coil.
#[derive(Debug, Clone)]
pub struct DoorSpec {
    pub id: DeviceId,
    pub zone: String,
    pub location: String,
}

/// Which panel outputs exist, and the panel's timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PanelSpec {
    pub fire_led: bool,
    pub fault_led: bool,
    pub buzzer: bool,
    pub disablement_led: bool,
    /// Silenced sounders sound again after this long if alarms are still latched
    /// (`[panel] auto_resound`); `None` = only a new alarm re-sounds.
    pub auto_resound: Option<Duration>,
}

/// An output the engine drives. The order is the order of the actions in a step: sounders
/// first, doors last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutputId {
    /// Index into the sounders given to [`FireEngine::new`].
    Sounder(usize),
    /// The fallback output of that sounder.
    SounderFallback(usize),
    PanelFireLed,
    PanelFaultLed,
    PanelBuzzer,
    PanelDisablementLed,
    /// Index into the doors given to [`FireEngine::with_doors`]: on = lock released.
    Door(usize),
}

/// Who asked for a silence, a reset or a disablement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An upstream command, with its id.
    Command(String),
    /// A key on the micro-station panel.
    PanelKey,
}

/// What happened, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A poll of detector `detector` (index) answered with `reading`.
    Reading {
        detector: usize,
        reading: DetectorReading,
    },
    /// A poll of detector `detector` got no valid answer (timeout, bad frame, exception).
    PollMissed { detector: usize, reason: String },
    /// Silence the sounding alarms and the fault buzzer.
    Silence(Origin),
    /// Reset the latched alarms and released doors.
    Reset(Origin),
    /// Disable detector `detector` (EN 54-2 disablement).
    Disable { detector: usize, origin: Origin },
    /// Enable detector `detector` again.
    Enable { detector: usize, origin: Origin },
    /// A write to `output` was not confirmed by its unit (no echo, exception, timeout).
    OutputFailed { output: OutputId, reason: String },
    /// A write to `output` was confirmed.
    OutputConfirmed { output: OutputId },
    /// The clock ticked; the daemon sends one a second. The fault buzzer toggles on each tick
    /// (1 s on, 1 s off) and the auto-resound timer is checked.
    Tick,
    /// A part of the gateway itself failed (`reason`) or recovered (`None`): e.g.
    /// `gateway.outbox` when events cannot be stored. A fault like a detector's: `device.fault`
    /// / `device.fault_cleared`, the fault LED and the pulsing buzzer (EN 54-2 system fault).
    GatewayFault {
        component: DeviceId,
        reason: Option<String>,
    },
}

/// What the engine wants done, in order. Outputs first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Drive `output` to `on`.
    DriveOutput { output: OutputId, on: bool },
    /// Write the detector's remote reset register.
    RemoteReset { detector: usize },
}

/// The result of one [`FireEngine::step`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    pub actions: Vec<Action>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default)]
struct DetectorState {
    /// A fire alarm from this detector is latched.
    latched: bool,
    /// The last reading said alarm (smoke present).
    in_alarm: bool,
    /// The last reading said pre-alarm.
    pre_alarm: bool,
    /// The last reading said test (the detector's test button).
    test: bool,
    /// Fault status or fault bits in the last reading.
    in_fault: bool,
    /// The heartbeat has not moved for the detector's `heartbeat_timeout`.
    frozen: bool,
    /// The last heartbeat value, when it was last read, and for how long it has been read
    /// unchanged (see [`MAX_HEARTBEAT_STEP`]).
    heartbeat: Option<(u16, SystemTime, Duration)>,
    offline: bool,
    missed: u32,
    disabled: bool,
}

impl DetectorState {
    fn faulty(&self) -> bool {
        self.in_fault || self.frozen
    }

    /// Its latched alarm drives sounders and linkage.
    fn sounding(&self) -> bool {
        self.latched && !self.disabled
    }
}

/// What must survive a restart or a power cut: the latched fire alarms, whether they are
/// silenced, the disablements and the released doors (EN 54-2: the fire alarm condition is
/// held until a manual reset; a restart is not a reset). Records written before the
/// disablements existed (`{"alarms":[...],"silenced":false}`) still decode.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latched {
    pub alarms: Vec<DeviceId>,
    pub silenced: bool,
    /// When the sounders were silenced, in ms since the Unix epoch (for auto-resound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silenced_at_ms: Option<u64>,
    /// Disabled detectors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled: Vec<DeviceId>,
    /// Doors released by a fire, until reset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_doors: Vec<DeviceId>,
}

/// The fire alarm engine of one site.
#[derive(Debug, Clone)]
pub struct FireEngine {
    detectors: Vec<DetectorSpec>,
    sounders: Vec<SounderSpec>,
    doors: Vec<DoorSpec>,
    /// Zones whose linkage waits for two detectors in alarm.
    coincidence: BTreeSet<String>,
    panel: PanelSpec,
    state: Vec<DetectorState>,
    silenced: bool,
    silenced_at: Option<SystemTime>,
    /// The fault buzzer was silenced; a new fault clears it.
    fault_silenced: bool,
    /// The phase of the fault buzzer's pulse (toggled by [`Input::Tick`]).
    pulse_on: bool,
    /// Doors released, by index.
    released: BTreeSet<usize>,
    /// Levels last emitted, by output; `None` before [`FireEngine::start`].
    driven: BTreeMap<OutputId, bool>,
    /// Outputs whose last write was not confirmed.
    output_faults: BTreeSet<OutputId>,
    /// Faults of the gateway itself ([`Input::GatewayFault`]), by component.
    gateway_faults: BTreeMap<DeviceId, String>,
}

impl FireEngine {
    /// An engine with every detector normal, online and enabled and nothing latched.
    pub fn new(detectors: Vec<DetectorSpec>, sounders: Vec<SounderSpec>, panel: PanelSpec) -> Self {
        let state = vec![DetectorState::default(); detectors.len()];
        FireEngine {
            detectors,
            sounders,
            doors: Vec::new(),
            coincidence: BTreeSet::new(),
            panel,
            state,
            silenced: false,
            silenced_at: None,
            fault_silenced: false,
            pulse_on: true,
            released: BTreeSet::new(),
            driven: BTreeMap::new(),
            output_faults: BTreeSet::new(),
            gateway_faults: BTreeMap::new(),
        }
    }

    /// Adds the doors released on fire, and the zones whose door release waits for two
    /// detectors in alarm (GB 50116-2013 §4.1.6).
    #[must_use]
    pub fn with_doors(mut self, doors: Vec<DoorSpec>, coincidence: Vec<String>) -> Self {
        self.doors = doors;
        self.coincidence = coincidence.into_iter().collect();
        self
    }

    /// Takes back the state kept before a restart, before [`FireEngine::start`]. Ids no longer
    /// in the config are ignored. Returns the ids of the alarms restored.
    pub fn restore(&mut self, latched: &Latched) -> Vec<DeviceId> {
        let index = |id: &DeviceId| self.detectors.iter().position(|d| &d.id == id);
        let mut restored = Vec::new();
        for id in &latched.alarms {
            if let Some(i) = index(id) {
                self.state[i].latched = true;
                restored.push(id.clone());
            }
        }
        for id in &latched.disabled {
            if let Some(i) = index(id) {
                self.state[i].disabled = true;
            }
        }
        for id in &latched.released_doors {
            if let Some(i) = self.doors.iter().position(|d| &d.id == id) {
                self.released.insert(i);
            }
        }
        self.silenced = latched.silenced && !restored.is_empty();
        self.silenced_at = latched
            .silenced_at_ms
            .filter(|_| self.silenced)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        restored
    }

    /// The state to keep across a restart.
    pub fn latched_state(&self) -> Latched {
        Latched {
            alarms: self.latched(),
            silenced: self.silenced,
            silenced_at_ms: self.silenced_at.map(|t| {
                let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                u64::try_from(ms).unwrap_or(u64::MAX)
            }),
            disabled: self.disabled(),
            released_doors: self
                .released
                .iter()
                .map(|&i| self.doors[i].id.clone())
                .collect(),
        }
    }

    /// The first levels of every output (all off for a fresh engine; as the restored state
    /// demands after [`FireEngine::restore`]), and `door.released` for a door that restored
    /// alarms release and the record did not name.
    pub fn start(&mut self, now: SystemTime) -> Step {
        let mut step = Step::default();
        self.link(now, &mut step);
        self.drive_outputs(&mut step, true);
        step
    }

    /// Applies `input` that happened at `now`.
    pub fn step(&mut self, input: Input, now: SystemTime) -> Step {
        let mut step = Step::default();
        let faults_before = self.faults();
        match input {
            Input::Reading { detector, reading } => self.reading(detector, reading, now, &mut step),
            Input::PollMissed { detector, reason } => {
                self.missed(detector, &reason, now, &mut step);
            }
            Input::Silence(origin) => self.silence(&origin, now, &mut step),
            Input::Reset(origin) => self.reset(&origin, now, &mut step),
            Input::Disable { detector, origin } => {
                self.disablement(detector, true, &origin, now, &mut step);
            }
            Input::Enable { detector, origin } => {
                self.disablement(detector, false, &origin, now, &mut step);
            }
            Input::OutputFailed { output, reason } => {
                if self.output_faults.insert(output) {
                    let mut e = Event::new(
                        self.output_fault_kind(output),
                        now,
                        self.output_data(output),
                    );
                    e.data.reason = Some(reason);
                    step.events.push(e);
                }
            }
            Input::OutputConfirmed { output } => {
                if self.output_faults.remove(&output) {
                    step.events.push(Event::new(
                        EventKind::DeviceFaultCleared,
                        now,
                        self.output_data(output),
                    ));
                }
            }
            Input::Tick => self.tick(now, &mut step),
            Input::GatewayFault { component, reason } => {
                let data = EventData {
                    device: Some(component.clone()),
                    reason: reason.clone(),
                    ..EventData::default()
                };
                match reason {
                    Some(reason) => {
                        if self.gateway_faults.insert(component, reason).is_none() {
                            step.events
                                .push(Event::new(EventKind::DeviceFault, now, data));
                        }
                    }
                    None => {
                        if self.gateway_faults.remove(&component).is_some() {
                            step.events
                                .push(Event::new(EventKind::DeviceFaultCleared, now, data));
                        }
                    }
                }
            }
        }
        // A new fault makes a silenced fault buzzer pulse again; no fault left ends the silence.
        let faults = self.faults();
        if faults.is_empty() || faults.iter().any(|f| !faults_before.contains(f)) {
            self.fault_silenced = false;
        }
        if !self.pulsing() {
            // The next pulse starts with the buzzer on.
            self.pulse_on = true;
        }
        self.link(now, &mut step);
        self.drive_outputs(&mut step, false);
        // Outputs go first: the caller applies actions in order, and sounders must not wait
        // behind a remote reset write.
        step.actions
            .sort_by_key(|a| !matches!(a, Action::DriveOutput { .. }));
        step
    }

    /// The detectors whose fire alarm is latched (enabled or not).
    pub fn latched(&self) -> Vec<DeviceId> {
        self.iter_where(|s| s.latched)
    }

    /// The disabled detectors.
    pub fn disabled(&self) -> Vec<DeviceId> {
        self.iter_where(|s| s.disabled)
    }

    /// The enabled detectors in fault or offline, then the outputs whose writes fail.
    pub fn faults(&self) -> Vec<DeviceId> {
        let mut v = self.iter_where(|s| !s.disabled && (s.faulty() || s.offline));
        v.extend(self.output_faults.iter().map(|&o| self.output_id(o)));
        v.extend(self.gateway_faults.keys().cloned());
        v
    }

    /// The doors released by a fire.
    pub fn released_doors(&self) -> Vec<DeviceId> {
        self.released
            .iter()
            .map(|&i| self.doors[i].id.clone())
            .collect()
    }

    /// The index of the detector `id`, if configured.
    pub fn detector_index(&self, id: &DeviceId) -> Option<usize> {
        self.detectors.iter().position(|d| &d.id == id)
    }

    /// The id of an output in events: the sounder's or door's id, or `panel.fire_led` and the
    /// like.
    pub fn output_id(&self, output: OutputId) -> DeviceId {
        match output {
            OutputId::Sounder(i) => self
                .sounders
                .get(i)
                .map_or_else(|| DeviceId(format!("sounder[{i}]")), |s| s.id.clone()),
            OutputId::SounderFallback(i) => self.sounders.get(i).map_or_else(
                || DeviceId(format!("sounder[{i}].fallback")),
                |s| DeviceId(format!("{}.fallback", s.id)),
            ),
            OutputId::Door(i) => self
                .doors
                .get(i)
                .map_or_else(|| DeviceId(format!("door[{i}]")), |d| d.id.clone()),
            OutputId::PanelFireLed => "panel.fire_led".into(),
            OutputId::PanelFaultLed => "panel.fault_led".into(),
            OutputId::PanelBuzzer => "panel.buzzer".into(),
            OutputId::PanelDisablementLed => "panel.disablement_led".into(),
        }
    }

    /// A failing sounder or panel output is a `sounder.fault`; a failing door release a
    /// `device.fault` of the door.
    fn output_fault_kind(&self, output: OutputId) -> EventKind {
        match output {
            OutputId::Door(_) => EventKind::DeviceFault,
            _ => EventKind::SounderFault,
        }
    }

    fn output_data(&self, output: OutputId) -> EventData {
        let mut data = EventData {
            device: Some(self.output_id(output)),
            ..EventData::default()
        };
        if let OutputId::Door(i) = output {
            if let Some(d) = self.doors.get(i) {
                data.zone = Some(d.zone.clone());
                data.location = Some(d.location.clone());
            }
        }
        data
    }

    /// Whether the latched alarms are silenced.
    pub fn silenced(&self) -> bool {
        self.silenced
    }

    /// The level of `output` now.
    pub fn output(&self, output: OutputId) -> bool {
        self.wanted(output)
    }

    /// Every output this engine drives, in the order of their actions.
    pub fn outputs(&self) -> Vec<OutputId> {
        let mut v: Vec<OutputId> = (0..self.sounders.len()).map(OutputId::Sounder).collect();
        v.extend(
            self.sounders
                .iter()
                .enumerate()
                .filter(|(_, s)| s.fallback)
                .map(|(i, _)| OutputId::SounderFallback(i)),
        );
        if self.panel.fire_led {
            v.push(OutputId::PanelFireLed);
        }
        if self.panel.fault_led {
            v.push(OutputId::PanelFaultLed);
        }
        if self.panel.buzzer {
            v.push(OutputId::PanelBuzzer);
        }
        if self.panel.disablement_led {
            v.push(OutputId::PanelDisablementLed);
        }
        v.extend((0..self.doors.len()).map(OutputId::Door));
        v
    }

    /// The detector specs, by index.
    pub fn detectors(&self) -> &[DetectorSpec] {
        &self.detectors
    }

    fn iter_where(&self, f: impl Fn(&DetectorState) -> bool) -> Vec<DeviceId> {
        self.detectors
            .iter()
            .zip(&self.state)
            .filter(|(_, s)| f(s))
            .map(|(d, _)| d.id.clone())
            .collect()
    }

    fn event(&self, kind: EventKind, detector: usize, now: SystemTime) -> Event {
        let d = &self.detectors[detector];
        let data = EventData {
            device: Some(d.id.clone()),
            zone: Some(d.zone.clone()),
            location: Some(d.location.clone()),
            ..EventData::default()
        };
        Event::new(kind, now, data)
    }

    fn reading(
        &mut self,
        detector: usize,
        reading: DetectorReading,
        now: SystemTime,
        step: &mut Step,
    ) {
        let (Some(state), Some(spec)) = (self.state.get(detector), self.detectors.get(detector))
        else {
            return;
        };
        // EN 54-2 disablement: a disabled point's signals are not acted on.
        if state.disabled {
            return;
        }
        let state = state.clone();
        let heartbeat_timeout = spec.heartbeat_timeout;
        let mut next = state.clone();
        next.missed = 0;
        if state.offline {
            next.offline = false;
            // The heartbeat is timed afresh: it may have been frozen by the outage.
            next.heartbeat = None;
            step.events
                .push(self.event(EventKind::DeviceOnline, detector, now));
        }
        let alarm = reading.status == DetectorStatus::Alarm;
        let pre_alarm = reading.status == DetectorStatus::PreAlarm;
        let test = reading.status == DetectorStatus::Test;
        let fault = reading.status == DetectorStatus::Fault || reading.fault_bits != 0;
        let with_reading = |mut e: Event| {
            e.data.reading = Some(reading);
            e
        };

        if alarm && !state.latched {
            next.latched = true;
            // A new alarm re-sounds silenced sounders (EN 54-2).
            self.silenced = false;
            self.silenced_at = None;
            step.events.push(with_reading(self.event(
                EventKind::FireAlarm,
                detector,
                now,
            )));
        } else if !alarm && state.in_alarm && state.latched {
            let mut e = with_reading(self.event(EventKind::FireRestored, detector, now));
            e.data.reason = Some(
                "detector no longer reports alarm; the alarm stays latched until reset".to_owned(),
            );
            step.events.push(e);
        }
        next.in_alarm = alarm;

        if pre_alarm != state.pre_alarm {
            let kind = if pre_alarm {
                EventKind::FirePreAlarm
            } else {
                EventKind::FirePreAlarmCleared
            };
            step.events
                .push(with_reading(self.event(kind, detector, now)));
        }
        next.pre_alarm = pre_alarm;

        if test != state.test {
            let kind = if test {
                EventKind::DeviceTest
            } else {
                EventKind::DeviceTestEnded
            };
            let mut e = with_reading(self.event(kind, detector, now));
            e.data.reason = Some("the detector's own test button".to_owned());
            step.events.push(e);
        }
        next.test = test;

        // Heartbeat supervision: a value unchanged for the timeout is stuck firmware.
        next.frozen = false;
        // The time unchanged is summed from the gaps between reads, each counted up to
        // MAX_HEARTBEAT_STEP, so that a jump of the wall clock is no frozen heartbeat.
        match (reading.heartbeat, heartbeat_timeout) {
            (Some(beat), Some(limit)) => match next.heartbeat {
                Some((last, read_at, unchanged)) if last == beat => {
                    let gap = now.duration_since(read_at).unwrap_or_default();
                    let unchanged = unchanged + gap.min(MAX_HEARTBEAT_STEP);
                    next.heartbeat = Some((beat, now, unchanged));
                    next.frozen = unchanged >= limit;
                }
                _ => next.heartbeat = Some((beat, now, Duration::ZERO)),
            },
            _ => next.heartbeat = None,
        }
        next.in_fault = fault;
        if next.faulty() != state.faulty() {
            let kind = if next.faulty() {
                EventKind::DeviceFault
            } else {
                EventKind::DeviceFaultCleared
            };
            let mut e = with_reading(self.event(kind, detector, now));
            if next.faulty() {
                let mut reasons = Vec::new();
                if fault {
                    reasons.push(describe_fault(reading));
                }
                if next.frozen {
                    let limit = heartbeat_timeout.unwrap_or_default();
                    reasons.push(format!(
                        "heartbeat frozen for {} s (stuck firmware)",
                        limit.as_secs()
                    ));
                }
                e.data.reason = Some(reasons.join(", "));
            }
            step.events.push(e);
        }
        self.state[detector] = next;
    }

    fn missed(&mut self, detector: usize, reason: &str, now: SystemTime, step: &mut Step) {
        let Some(limit) = self.detectors.get(detector).map(|d| d.offline_after) else {
            return;
        };
        let s = &mut self.state[detector];
        if s.disabled {
            return;
        }
        s.missed = s.missed.saturating_add(1);
        if !s.offline && s.missed >= limit {
            s.offline = true;
            let missed = s.missed;
            let mut e = self.event(EventKind::DeviceOffline, detector, now);
            e.data.reason = Some(format!("{missed} polls missed in a row; last: {reason}"));
            step.events.push(e);
        }
    }

    fn silence(&mut self, origin: &Origin, now: SystemTime, step: &mut Step) {
        let latched = self.latched();
        // Something sounds for a fire: a latched alarm of an enabled detector, unsilenced.
        let fire = !self.silenced && self.state.iter().any(DetectorState::sounding);
        let fault = self.pulsing();
        if !fire && !fault {
            return;
        }
        if fire {
            self.silenced = true;
            self.silenced_at = Some(now);
        }
        let mut e = site_event(EventKind::AlarmSilenced, origin, latched, now);
        if fault {
            self.fault_silenced = true;
            e.data
                .extra
                .insert("faults".into(), serde_json::json!(self.faults()));
        }
        step.events.push(e);
    }

    fn reset(&mut self, origin: &Origin, now: SystemTime, step: &mut Step) {
        let latched = self.latched();
        if latched.is_empty() && self.released.is_empty() {
            return;
        }
        for (i, s) in self.state.iter_mut().enumerate() {
            if s.latched {
                s.latched = false;
                // The next poll decides: still in alarm = a new alarm at once.
                s.in_alarm = false;
                if self.detectors[i].remote_reset {
                    step.actions.push(Action::RemoteReset { detector: i });
                }
            }
        }
        self.silenced = false;
        self.silenced_at = None;
        let mut e = site_event(EventKind::AlarmReset, origin, latched, now);
        if !self.released.is_empty() {
            // The doors lock again: the reset event stands for it.
            e.data.extra.insert(
                "doors_locked".into(),
                serde_json::json!(self.released_doors()),
            );
            self.released.clear();
        }
        step.events.push(e);
    }

    fn disablement(
        &mut self,
        detector: usize,
        disable: bool,
        origin: &Origin,
        now: SystemTime,
        step: &mut Step,
    ) {
        let Some(s) = self.state.get_mut(detector) else {
            return;
        };
        if s.disabled == disable {
            return;
        }
        let latched = s.latched;
        // Disabled or enabled, the detector starts afresh: its conditions end with the
        // disablement, and its next poll after enabling reports what it sees then.
        *s = DetectorState {
            latched,
            disabled: disable,
            ..DetectorState::default()
        };
        let kind = if disable {
            EventKind::DeviceDisabled
        } else {
            EventKind::DeviceEnabled
        };
        let mut e = self.event(kind, detector, now);
        let who = site_event(kind, origin, Vec::new(), now).data;
        e.data.command = who.command;
        e.data.reason = who.reason;
        if latched {
            e.data
                .extra
                .insert("alarm_latched".into(), serde_json::json!(true));
        }
        step.events.push(e);
    }

    fn tick(&mut self, now: SystemTime, step: &mut Step) {
        if self.pulsing() {
            self.pulse_on = !self.pulse_on;
        }
        if let (true, Some(after), Some(at)) =
            (self.silenced, self.panel.auto_resound, self.silenced_at)
        {
            let latched = self.iter_where(DetectorState::sounding);
            if now.duration_since(at).unwrap_or_default() >= after && !latched.is_empty() {
                self.silenced = false;
                self.silenced_at = None;
                let mut e = Event::new(
                    EventKind::AlarmResounded,
                    now,
                    EventData {
                        devices: latched,
                        ..EventData::default()
                    },
                );
                e.data.reason = Some(format!(
                    "auto-resound: still latched {} after the silence",
                    humantime::format_duration(after)
                ));
                step.events.push(e);
            }
        }
    }

    /// Releases the doors of zones in fire (GB 50116-2013 §4.1.6 coincidence where asked).
    fn link(&mut self, now: SystemTime, step: &mut Step) {
        for (i, door) in self.doors.iter().enumerate() {
            if self.released.contains(&i) {
                continue;
            }
            let alarms: Vec<DeviceId> = self
                .detectors
                .iter()
                .zip(&self.state)
                .filter(|(d, s)| s.sounding() && d.zone == door.zone)
                .map(|(d, _)| d.id.clone())
                .collect();
            let need = if self.coincidence.contains(&door.zone) {
                2
            } else {
                1
            };
            if alarms.len() >= need {
                self.released.insert(i);
                let mut e = Event::new(
                    EventKind::DoorReleased,
                    now,
                    EventData {
                        device: Some(door.id.clone()),
                        zone: Some(door.zone.clone()),
                        location: Some(door.location.clone()),
                        devices: alarms,
                        ..EventData::default()
                    },
                );
                e.data.reason = Some(if need == 2 {
                    format!(
                        "fire in zone {} confirmed by two detectors (coincidence)",
                        door.zone
                    )
                } else {
                    format!("fire in zone {}", door.zone)
                });
                step.events.push(e);
            }
        }
    }

    /// The fault buzzer pulses: an unsilenced fault exists.
    fn pulsing(&self) -> bool {
        !self.fault_silenced && !self.faults().is_empty()
    }

    fn sounding(&self, zones: &Zones) -> bool {
        !self.silenced
            && self
                .detectors
                .iter()
                .zip(&self.state)
                .any(|(d, s)| s.sounding() && zones.includes(&d.zone))
    }

    fn wanted(&self, output: OutputId) -> bool {
        match output {
            OutputId::Sounder(i) => self
                .sounders
                .get(i)
                .is_some_and(|s| self.sounding(&s.zones)),
            OutputId::SounderFallback(i) => {
                self.output_faults.contains(&OutputId::Sounder(i))
                    && self.wanted(OutputId::Sounder(i))
            }
            OutputId::PanelFireLed => self.state.iter().any(|s| s.latched),
            // Fire first: steady while a sounder would sound; else the fault pulse.
            OutputId::PanelBuzzer => {
                self.sounding(&Zones::All) || (self.pulse_on && self.pulsing())
            }
            OutputId::PanelFaultLed => !self.faults().is_empty(),
            OutputId::PanelDisablementLed => self.state.iter().any(|s| s.disabled),
            OutputId::Door(i) => self.released.contains(&i),
        }
    }

    fn drive_outputs(&mut self, step: &mut Step, all: bool) {
        for output in self.outputs() {
            let on = self.wanted(output);
            if all || self.driven.get(&output) != Some(&on) {
                self.driven.insert(output, on);
                step.actions.push(Action::DriveOutput { output, on });
            }
        }
    }
}

fn site_event(kind: EventKind, origin: &Origin, devices: Vec<DeviceId>, now: SystemTime) -> Event {
    let data = EventData {
        devices,
        command: match origin {
            Origin::Command(id) => Some(id.clone()),
            Origin::PanelKey => None,
        },
        reason: Some(match origin {
            Origin::Command(_) => "upstream command".to_owned(),
            Origin::PanelKey => "panel key".to_owned(),
        }),
        ..EventData::default()
    };
    Event::new(kind, now, data)
}

/// A readable description of a fault reading (generic profile fault bits).
fn describe_fault(r: DetectorReading) -> String {
    const BITS: [&str; 4] = [
        "chamber fault",
        "head removed",
        "contamination",
        "supply low",
    ];
    let mut parts: Vec<String> = BITS
        .iter()
        .enumerate()
        .filter(|(i, _)| r.fault_bits & (1 << i) != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    let unknown = r.fault_bits & !0b1111;
    if unknown != 0 {
        parts.push(format!("fault bits {unknown:#06x}"));
    }
    if parts.is_empty() {
        parts.push("detector reports fault or an unknown status".to_owned());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn reading(status: DetectorStatus) -> DetectorReading {
        DetectorReading {
            status,
            smoke_db_per_m: Some(0.0),
            fault_bits: 0,
            heartbeat: Some(0),
        }
    }

    /// A poll of detector `detector` that read `status`.
    fn read(detector: usize, status: DetectorStatus) -> Input {
        Input::Reading {
            detector,
            reading: reading(status),
        }
    }

    fn engine() -> FireEngine {
        let det = |id: &str, zone: &str| DetectorSpec {
            id: id.into(),
            zone: zone.to_owned(),
            location: format!("{id} room"),
            offline_after: 3,
            remote_reset: true,
            heartbeat_timeout: Some(Duration::from_secs(60)),
        };
        let mut e = FireEngine::new(
            vec![det("A-101", "A"), det("A-102", "A"), det("B-101", "B")],
            vec![
                SounderSpec {
                    id: "A-s".into(),
                    zones: Zones::Some(vec!["A".into()]),
                    fallback: false,
                },
                SounderSpec {
                    id: "B-s".into(),
                    zones: Zones::Some(vec!["B".into()]),
                    fallback: false,
                },
                SounderSpec {
                    id: "all".into(),
                    zones: Zones::All,
                    fallback: false,
                },
            ],
            PanelSpec {
                fire_led: true,
                fault_led: true,
                buzzer: true,
                disablement_led: false,
                auto_resound: None,
            },
        );
        e.start(t(0));
        e
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn kinds(step: &Step) -> Vec<EventKind> {
        step.events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn start_drives_every_output_off_once() {
        let mut e = engine();
        let step = e.start(t(0));
        assert_eq!(step.actions.len(), 6);
        assert!(step
            .actions
            .iter()
            .all(|a| matches!(a, Action::DriveOutput { on: false, .. })));
    }

    #[test]
    fn latched_alarms_restored_after_a_restart_sound_again_at_start() {
        let mut before = engine();
        before.step(read(2, DetectorStatus::Alarm), t(1));
        before.step(read(2, DetectorStatus::Normal), t(2));
        let saved = before.latched_state();
        assert_eq!(
            saved,
            Latched {
                alarms: vec!["B-101".into()],
                ..Latched::default()
            }
        );

        let mut after = engine();
        assert_eq!(after.restore(&saved), vec![DeviceId::from("B-101")]);
        let step = after.start(t(0));
        assert!(step.actions.contains(&Action::DriveOutput {
            output: OutputId::Sounder(1),
            on: true
        }));
        assert!(step.actions.contains(&Action::DriveOutput {
            output: OutputId::PanelFireLed,
            on: true
        }));
        let normal = after.step(read(2, DetectorStatus::Normal), t(3));
        assert!(
            normal.events.is_empty(),
            "a restored alarm stays latched and raises nothing new"
        );
        assert_eq!(after.latched(), vec![DeviceId::from("B-101")]);
    }

    #[test]
    fn a_restored_silence_keeps_the_sounders_quiet_and_unknown_ids_are_ignored() {
        let mut e = engine();
        let restored = e.restore(&Latched {
            alarms: vec!["A-101".into(), "Z-999".into()],
            silenced: true,
            ..Latched::default()
        });
        assert_eq!(restored, vec![DeviceId::from("A-101")]);
        e.start(t(0));
        assert!(!e.output(OutputId::Sounder(0)));
        assert!(e.output(OutputId::PanelFireLed));
    }

    #[test]
    fn an_alarm_sounds_its_zone_and_the_panel_first() {
        let mut e = engine();
        let step = e.step(read(0, DetectorStatus::Alarm), t(1));
        assert_eq!(kinds(&step), [EventKind::FireAlarm]);
        assert_eq!(
            step.actions,
            [
                Action::DriveOutput {
                    output: OutputId::Sounder(0),
                    on: true
                },
                Action::DriveOutput {
                    output: OutputId::Sounder(2),
                    on: true
                },
                Action::DriveOutput {
                    output: OutputId::PanelFireLed,
                    on: true
                },
                Action::DriveOutput {
                    output: OutputId::PanelBuzzer,
                    on: true
                },
            ]
        );
        assert!(
            !e.output(OutputId::Sounder(1)),
            "zone B's sounder stays off"
        );
        assert_eq!(step.events[0].data.device, Some("A-101".into()));
        assert_eq!(step.events[0].time, t(1));
    }

    #[test]
    fn alarm_stays_latched_until_reset() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        let step = e.step(read(0, DetectorStatus::Normal), t(2));
        assert_eq!(kinds(&step), [EventKind::FireRestored]);
        assert!(step.actions.is_empty());
        assert!(e.output(OutputId::Sounder(0)));
        let again = e.step(read(0, DetectorStatus::Normal), t(3));
        assert!(again.events.is_empty(), "restored is reported once");
    }

    #[test]
    fn a_repeated_alarm_reading_raises_one_event() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        let step = e.step(read(0, DetectorStatus::Alarm), t(2));
        assert_eq!(step, Step::default());
    }

    #[test]
    fn silence_stops_sounders_but_not_the_fire_led() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        let step = e.step(Input::Silence(Origin::Command("c1".into())), t(2));
        assert_eq!(kinds(&step), [EventKind::AlarmSilenced]);
        assert_eq!(step.events[0].data.command.as_deref(), Some("c1"));
        assert!(!e.output(OutputId::Sounder(0)));
        assert!(!e.output(OutputId::PanelBuzzer));
        assert!(e.output(OutputId::PanelFireLed));
    }

    #[test]
    fn a_new_alarm_after_silence_resounds() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        e.step(Input::Silence(Origin::PanelKey), t(2));
        e.step(read(2, DetectorStatus::Alarm), t(3));
        assert!(e.output(OutputId::Sounder(0)));
        assert!(e.output(OutputId::Sounder(1)));
    }

    #[test]
    fn silence_with_nothing_latched_does_nothing() {
        let mut e = engine();
        assert_eq!(
            e.step(Input::Silence(Origin::PanelKey), t(1)),
            Step::default()
        );
        assert_eq!(
            e.step(Input::Reset(Origin::PanelKey), t(1)),
            Step::default()
        );
    }

    #[test]
    fn reset_clears_latches_and_asks_for_remote_reset() {
        let mut e = engine();
        e.step(read(1, DetectorStatus::Alarm), t(1));
        let step = e.step(Input::Reset(Origin::Command("r1".into())), t(2));
        assert_eq!(kinds(&step), [EventKind::AlarmReset]);
        assert_eq!(step.events[0].data.devices, vec![DeviceId::from("A-102")]);
        assert!(step.actions.contains(&Action::RemoteReset { detector: 1 }));
        assert!(
            matches!(step.actions[0], Action::DriveOutput { .. }),
            "outputs before the remote reset"
        );
        assert!(e.latched().is_empty());
        assert!(!e.output(OutputId::PanelFireLed));
    }

    #[test]
    fn a_detector_still_in_alarm_after_reset_re_alarms_on_its_next_poll() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        e.step(Input::Reset(Origin::PanelKey), t(2));
        let step = e.step(read(0, DetectorStatus::Alarm), t(3));
        assert_eq!(kinds(&step), [EventKind::FireAlarm]);
        assert!(e.output(OutputId::Sounder(0)));
    }

    #[test]
    fn a_detector_goes_offline_after_offline_after_misses_and_comes_back() {
        let mut e = engine();
        for i in 0..2 {
            let s = e.step(
                Input::PollMissed {
                    detector: 2,
                    reason: "timeout".into(),
                },
                t(i),
            );
            assert!(s.events.is_empty());
        }
        let step = e.step(
            Input::PollMissed {
                detector: 2,
                reason: "timeout".into(),
            },
            t(3),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceOffline]);
        assert_eq!(
            step.actions,
            [
                Action::DriveOutput {
                    output: OutputId::PanelFaultLed,
                    on: true
                },
                Action::DriveOutput {
                    output: OutputId::PanelBuzzer,
                    on: true
                }
            ],
            "the fault LED lights and the buzzer starts its pulse"
        );
        let more = e.step(
            Input::PollMissed {
                detector: 2,
                reason: "timeout".into(),
            },
            t(4),
        );
        assert!(more.events.is_empty(), "offline is reported once");
        let back = e.step(read(2, DetectorStatus::Normal), t(5));
        assert_eq!(kinds(&back), [EventKind::DeviceOnline]);
        assert!(!e.output(OutputId::PanelFaultLed));
    }

    #[test]
    fn a_fault_bit_is_a_fault_and_never_masks_a_fire() {
        let mut e = engine();
        let mut r = reading(DetectorStatus::Normal);
        r.fault_bits = 0b10;
        let step = e.step(
            Input::Reading {
                detector: 0,
                reading: r,
            },
            t(1),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceFault]);
        assert_eq!(step.events[0].data.reason.as_deref(), Some("head removed"));
        r.status = DetectorStatus::Alarm;
        let step = e.step(
            Input::Reading {
                detector: 0,
                reading: r,
            },
            t(2),
        );
        assert_eq!(kinds(&step), [EventKind::FireAlarm]);
        let step = e.step(read(0, DetectorStatus::Alarm), t(3));
        assert_eq!(kinds(&step), [EventKind::DeviceFaultCleared]);
    }

    #[test]
    fn a_failing_sounder_is_a_fault_once_and_clears_when_it_answers() {
        let mut e = engine();
        let failed = || Input::OutputFailed {
            output: OutputId::Sounder(1),
            reason: "timeout".into(),
        };
        let step = e.step(failed(), t(1));
        assert_eq!(kinds(&step), [EventKind::SounderFault]);
        assert_eq!(step.events[0].data.device, Some("B-s".into()));
        assert_eq!(
            step.actions,
            [
                Action::DriveOutput {
                    output: OutputId::PanelFaultLed,
                    on: true
                },
                Action::DriveOutput {
                    output: OutputId::PanelBuzzer,
                    on: true
                }
            ],
            "the fault LED lights and the buzzer starts its pulse"
        );
        assert!(e.step(failed(), t(2)).events.is_empty(), "reported once");
        assert_eq!(e.faults(), vec![DeviceId::from("B-s")]);
        let step = e.step(
            Input::OutputConfirmed {
                output: OutputId::Sounder(1),
            },
            t(3),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceFaultCleared]);
        assert!(!e.output(OutputId::PanelFaultLed));
        assert!(e
            .step(
                Input::OutputConfirmed {
                    output: OutputId::Sounder(1)
                },
                t(4)
            )
            .events
            .is_empty());
    }

    #[test]
    fn a_pre_alarm_is_reported_once_and_never_sounds() {
        let mut e = engine();
        let step = e.step(read(0, DetectorStatus::PreAlarm), t(1));
        assert_eq!(kinds(&step), [EventKind::FirePreAlarm]);
        assert!(step.actions.is_empty(), "a warning only: {step:?}");
        assert!(e.step(read(0, DetectorStatus::PreAlarm), t(2)) == Step::default());
        let step = e.step(read(0, DetectorStatus::Normal), t(3));
        assert_eq!(kinds(&step), [EventKind::FirePreAlarmCleared]);
        assert!(e.latched().is_empty());
    }

    #[test]
    fn the_test_button_is_reported_with_who_asked_and_never_latches() {
        let mut e = engine();
        let step = e.step(read(1, DetectorStatus::Test), t(1));
        assert_eq!(kinds(&step), [EventKind::DeviceTest]);
        assert_eq!(
            step.events[0].data.reason.as_deref(),
            Some("the detector's own test button")
        );
        assert!(step.actions.is_empty());
        let step = e.step(read(1, DetectorStatus::Normal), t(2));
        assert_eq!(kinds(&step), [EventKind::DeviceTestEnded]);
        assert!(e.latched().is_empty());
        assert!(!e.output(OutputId::Sounder(0)));
    }

    #[test]
    fn a_test_reading_never_masks_an_alarm_latched_before_it() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        let step = e.step(read(0, DetectorStatus::Test), t(2));
        assert_eq!(
            kinds(&step),
            [EventKind::FireRestored, EventKind::DeviceTest]
        );
        assert!(e.output(OutputId::Sounder(0)));
        assert_eq!(e.latched(), vec![DeviceId::from("A-101")]);
    }

    /// A reading of detector `detector` with status normal and heartbeat `beat`.
    fn beat(detector: usize, beat: u16) -> Input {
        let mut r = reading(DetectorStatus::Normal);
        r.heartbeat = Some(beat);
        Input::Reading {
            detector,
            reading: r,
        }
    }

    #[test]
    fn a_heartbeat_frozen_for_60_s_is_a_fault_that_clears_when_it_moves() {
        let mut e = engine();
        for s in 0..60 {
            assert!(
                e.step(beat(0, 7), t(s)).events.is_empty(),
                "{s} s is not yet stuck"
            );
        }
        let step = e.step(beat(0, 7), t(60));
        assert_eq!(kinds(&step), [EventKind::DeviceFault]);
        assert_eq!(
            step.events[0].data.reason.as_deref(),
            Some("heartbeat frozen for 60 s (stuck firmware)")
        );
        assert!(e.output(OutputId::PanelFaultLed));
        assert!(e.step(beat(0, 7), t(61)).events.is_empty(), "reported once");
        let step = e.step(beat(0, 8), t(62));
        assert_eq!(kinds(&step), [EventKind::DeviceFaultCleared]);
        assert!(!e.output(OutputId::PanelFaultLed));
    }

    #[test]
    fn a_jump_of_the_wall_clock_is_no_frozen_heartbeat() {
        let mut e = engine();
        e.step(beat(0, 7), t(0));
        // NTP sets the clock a year ahead between two reads of the same heartbeat value.
        assert!(e.step(beat(0, 7), t(365 * 86_400)).events.is_empty());
        assert!(e.step(beat(0, 8), t(365 * 86_400 + 1)).events.is_empty());
        // Backwards too.
        assert!(e.step(beat(0, 8), t(5)).events.is_empty());
    }

    #[test]
    fn a_moving_heartbeat_is_never_a_fault() {
        let mut e = engine();
        for s in 0..200u16 {
            assert!(e.step(beat(0, s), t(u64::from(s))).events.is_empty());
        }
    }

    #[test]
    fn a_disabled_detector_never_sounds_and_its_disablement_names_who_asked() {
        let mut e = engine();
        let step = e.step(
            Input::Disable {
                detector: 0,
                origin: Origin::Command("d-1".into()),
            },
            t(1),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceDisabled]);
        assert_eq!(step.events[0].data.device, Some("A-101".into()));
        assert_eq!(step.events[0].data.command.as_deref(), Some("d-1"));
        assert_eq!(e.disabled(), vec![DeviceId::from("A-101")]);
        let step = e.step(read(0, DetectorStatus::Alarm), t(2));
        assert_eq!(
            step,
            Step::default(),
            "a disabled detector's alarm is ignored"
        );
        assert!(e.latched().is_empty());
        // Disabling twice changes nothing.
        let again = Input::Disable {
            detector: 0,
            origin: Origin::PanelKey,
        };
        assert_eq!(e.step(again, t(3)), Step::default());

        // Enabled again, its next poll is taken afresh: still in alarm = a fire at once.
        let step = e.step(
            Input::Enable {
                detector: 0,
                origin: Origin::PanelKey,
            },
            t(4),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceEnabled]);
        assert_eq!(step.events[0].data.reason.as_deref(), Some("panel key"));
        let step = e.step(read(0, DetectorStatus::Alarm), t(5));
        assert_eq!(kinds(&step), [EventKind::FireAlarm]);
        assert!(e.output(OutputId::Sounder(0)));
    }

    #[test]
    fn disabling_a_latched_detector_stops_its_sounders_but_keeps_the_alarm_until_reset() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        e.step(read(2, DetectorStatus::Alarm), t(1));
        let step = e.step(
            Input::Disable {
                detector: 0,
                origin: Origin::Command("d-2".into()),
            },
            t(2),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceDisabled]);
        assert_eq!(step.events[0].data.extra["alarm_latched"], true);
        assert!(
            !e.output(OutputId::Sounder(0)),
            "zone A's only alarm is disabled"
        );
        assert!(e.output(OutputId::Sounder(1)), "zone B still sounds");
        assert!(e.output(OutputId::PanelFireLed), "the fire stays indicated");
        assert_eq!(e.latched().len(), 2, "nothing unlatches without a reset");
        let step = e.step(Input::Reset(Origin::PanelKey), t(3));
        assert_eq!(kinds(&step), [EventKind::AlarmReset]);
        assert!(e.latched().is_empty());
        assert!(!e.output(OutputId::PanelFireLed));
    }

    #[test]
    fn silence_with_only_a_disabled_detectors_alarm_latched_silences_nothing() {
        let mut e = engine();
        e.step(read(0, DetectorStatus::Alarm), t(1));
        e.step(
            Input::Disable {
                detector: 0,
                origin: Origin::PanelKey,
            },
            t(2),
        );
        assert_eq!(
            e.step(Input::Silence(Origin::PanelKey), t(3)),
            Step::default(),
            "nothing sounds, so nothing is silenced"
        );
        e.step(
            Input::Enable {
                detector: 0,
                origin: Origin::PanelKey,
            },
            t(4),
        );
        assert!(
            e.output(OutputId::Sounder(0)),
            "its latched alarm sounds again"
        );
    }

    #[test]
    fn disabling_a_detector_in_fault_or_offline_ends_its_fault_indication() {
        let mut e = engine();
        for i in 0..3 {
            e.step(
                Input::PollMissed {
                    detector: 1,
                    reason: "timeout".into(),
                },
                t(i),
            );
        }
        assert!(e.output(OutputId::PanelFaultLed));
        let step = e.step(
            Input::Disable {
                detector: 1,
                origin: Origin::Command("d-3".into()),
            },
            t(4),
        );
        assert_eq!(kinds(&step), [EventKind::DeviceDisabled]);
        assert!(e.faults().is_empty());
        assert!(!e.output(OutputId::PanelFaultLed));
        assert!(!e.output(OutputId::PanelBuzzer));
        let missed = Input::PollMissed {
            detector: 1,
            reason: "timeout".into(),
        };
        for i in 5..10 {
            assert_eq!(e.step(missed.clone(), t(i)), Step::default());
        }
    }

    #[test]
    fn the_fault_buzzer_pulses_on_ticks_and_silence_stops_it_until_a_new_fault() {
        let mut e = engine();
        let offline = |e: &mut FireEngine, d: usize, at: u64| {
            for i in 0..3 {
                e.step(
                    Input::PollMissed {
                        detector: d,
                        reason: "timeout".into(),
                    },
                    t(at + i),
                );
            }
        };
        offline(&mut e, 2, 0);
        let mut pulse = vec![e.output(OutputId::PanelBuzzer)];
        for s in 3..7 {
            e.step(Input::Tick, t(s));
            pulse.push(e.output(OutputId::PanelBuzzer));
        }
        assert_eq!(pulse, [true, false, true, false, true], "1 s on, 1 s off");

        let step = e.step(Input::Silence(Origin::PanelKey), t(7));
        assert_eq!(kinds(&step), [EventKind::AlarmSilenced]);
        assert_eq!(
            step.events[0].data.extra["faults"],
            serde_json::json!(["B-101"])
        );
        assert!(!e.output(OutputId::PanelBuzzer));
        assert!(
            e.output(OutputId::PanelFaultLed),
            "silence never clears the fault LED"
        );
        e.step(Input::Tick, t(8));
        assert!(!e.output(OutputId::PanelBuzzer), "stays silent on ticks");

        offline(&mut e, 0, 9);
        assert!(e.output(OutputId::PanelBuzzer), "a new fault pulses again");
    }

    #[test]
    fn a_fire_holds_the_buzzer_steady_over_the_fault_pulse() {
        let mut e = engine();
        let mut r = reading(DetectorStatus::Fault);
        r.fault_bits = 1;
        e.step(
            Input::Reading {
                detector: 2,
                reading: r,
            },
            t(0),
        );
        e.step(read(0, DetectorStatus::Alarm), t(1));
        for s in 2..6 {
            let step = e.step(Input::Tick, t(s));
            assert!(step.actions.is_empty(), "{step:?}");
            assert!(e.output(OutputId::PanelBuzzer));
        }
        assert!(e.output(OutputId::Sounder(0)), "a fault never masks a fire");
    }

    /// `engine()` plus: a fallback on sounder 0 (A-s), auto-resound after 10 min, door A-gate
    /// in zone A (coincidence) and door B-gate in zone B (none).
    fn linked_engine() -> FireEngine {
        let mut e = engine();
        e.sounders[0].fallback = true;
        e.panel.auto_resound = Some(Duration::from_secs(600));
        e.panel.disablement_led = true;
        let door = |id: &str, zone: &str| DoorSpec {
            id: id.into(),
            zone: zone.to_owned(),
            location: format!("{id} gate"),
        };
        let mut e = e.with_doors(
            vec![door("A-gate", "A"), door("B-gate", "B")],
            vec!["A".to_owned()],
        );
        e.driven.clear();
        e.start(t(0));
        e
    }

    const A_GATE: OutputId = OutputId::Door(0);
    const B_GATE: OutputId = OutputId::Door(1);

    #[test]
    fn a_door_is_released_on_fire_in_its_zone_and_stays_released_until_reset() {
        let mut e = linked_engine();
        let step = e.step(read(2, DetectorStatus::Alarm), t(1));
        assert_eq!(
            kinds(&step),
            [EventKind::FireAlarm, EventKind::DoorReleased]
        );
        let released = &step.events[1].data;
        assert_eq!(released.device, Some("B-gate".into()));
        assert_eq!(released.devices, vec![DeviceId::from("B-101")]);
        assert!(e.output(B_GATE));
        assert_eq!(
            step.actions.last(),
            Some(&Action::DriveOutput {
                output: B_GATE,
                on: true
            }),
            "the sounders go before the door"
        );
        e.step(read(2, DetectorStatus::Normal), t(2));
        e.step(Input::Silence(Origin::PanelKey), t(3));
        assert!(
            e.output(B_GATE),
            "silence and a clear detector keep the door released"
        );
        let step = e.step(Input::Reset(Origin::PanelKey), t(4));
        assert_eq!(
            step.events[0].data.extra["doors_locked"],
            serde_json::json!(["B-gate"])
        );
        assert!(!e.output(B_GATE));
    }

    #[test]
    fn a_coincidence_zone_releases_its_door_on_the_second_detector_but_sounds_on_the_first() {
        let mut e = linked_engine();
        let step = e.step(read(0, DetectorStatus::Alarm), t(1));
        assert_eq!(kinds(&step), [EventKind::FireAlarm]);
        assert!(e.output(OutputId::Sounder(0)), "sounders never wait");
        assert!(!e.output(A_GATE), "one detector is not enough in zone A");
        let step = e.step(read(1, DetectorStatus::Alarm), t(2));
        assert_eq!(
            kinds(&step),
            [EventKind::FireAlarm, EventKind::DoorReleased]
        );
        assert_eq!(
            step.events[1].data.devices,
            vec![DeviceId::from("A-101"), DeviceId::from("A-102")]
        );
        assert!(e.output(A_GATE));
        assert!(!e.output(B_GATE));
    }

    #[test]
    fn a_disabled_detector_does_not_count_towards_coincidence() {
        let mut e = linked_engine();
        e.step(
            Input::Disable {
                detector: 1,
                origin: Origin::Command("d".into()),
            },
            t(0),
        );
        e.step(read(0, DetectorStatus::Alarm), t(1));
        e.step(read(1, DetectorStatus::Alarm), t(2));
        assert!(!e.output(A_GATE));
    }

    #[test]
    fn the_disablement_led_is_lit_while_any_detector_is_disabled() {
        let mut e = linked_engine();
        let disable = |detector| Input::Disable {
            detector,
            origin: Origin::PanelKey,
        };
        let enable = |detector| Input::Enable {
            detector,
            origin: Origin::PanelKey,
        };
        let step = e.step(disable(0), t(1));
        assert_eq!(
            step.actions,
            [Action::DriveOutput {
                output: OutputId::PanelDisablementLed,
                on: true
            }]
        );
        e.step(disable(2), t(2));
        e.step(enable(0), t(3));
        assert!(
            e.output(OutputId::PanelDisablementLed),
            "B-101 is still disabled"
        );
        e.step(enable(2), t(4));
        assert!(!e.output(OutputId::PanelDisablementLed));
    }

    #[test]
    fn the_fallback_sounds_while_its_sounder_is_in_fault() {
        let mut e = linked_engine();
        let fallback = OutputId::SounderFallback(0);
        e.step(
            Input::OutputFailed {
                output: OutputId::Sounder(0),
                reason: "timeout".into(),
            },
            t(1),
        );
        assert!(!e.output(fallback), "no fire, no fallback");
        let step = e.step(read(0, DetectorStatus::Alarm), t(2));
        assert!(step.actions.contains(&Action::DriveOutput {
            output: fallback,
            on: true
        }));
        e.step(
            Input::OutputConfirmed {
                output: OutputId::Sounder(0),
            },
            t(3),
        );
        assert!(!e.output(fallback), "the primary sounds again");
        assert!(e.output(OutputId::Sounder(0)));
    }

    #[test]
    fn silenced_sounders_resound_after_the_auto_resound_time() {
        let mut e = linked_engine();
        e.step(read(2, DetectorStatus::Alarm), t(1));
        e.step(Input::Silence(Origin::PanelKey), t(10));
        assert!(e.step(Input::Tick, t(609)).events.is_empty());
        assert!(!e.output(OutputId::Sounder(1)));
        let step = e.step(Input::Tick, t(610));
        assert_eq!(kinds(&step), [EventKind::AlarmResounded]);
        assert_eq!(step.events[0].data.devices, vec![DeviceId::from("B-101")]);
        assert!(e.output(OutputId::Sounder(1)));
        assert!(e.step(Input::Tick, t(2000)).events.is_empty(), "once");
    }

    #[test]
    fn without_auto_resound_a_silence_lasts_until_a_new_alarm() {
        let mut e = engine();
        e.step(read(2, DetectorStatus::Alarm), t(1));
        e.step(Input::Silence(Origin::PanelKey), t(2));
        assert!(e.step(Input::Tick, t(100_000)).events.is_empty());
        assert!(!e.output(OutputId::Sounder(1)));
    }

    #[test]
    fn silence_disablements_and_released_doors_survive_a_restart() {
        let mut before = linked_engine();
        before.step(read(2, DetectorStatus::Alarm), t(1));
        before.step(Input::Silence(Origin::Command("s".into())), t(5));
        before.step(
            Input::Disable {
                detector: 0,
                origin: Origin::Command("d".into()),
            },
            t(6),
        );
        let saved = before.latched_state();
        let bytes = serde_json::to_vec(&saved).unwrap();
        let saved: Latched = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(saved.released_doors, vec![DeviceId::from("B-gate")]);

        let mut after = linked_engine();
        after.restore(&saved);
        let step = after.start(t(100));
        assert!(step.events.is_empty(), "nothing new happened: {step:?}");
        assert!(after.silenced());
        assert!(!after.output(OutputId::Sounder(1)), "still silenced");
        assert!(after.output(OutputId::PanelFireLed));
        assert!(after.output(B_GATE), "the door stays released");
        assert_eq!(after.disabled(), vec![DeviceId::from("A-101")]);
        assert!(after.output(OutputId::PanelDisablementLed));
        assert_eq!(
            after.step(read(0, DetectorStatus::Alarm), t(101)),
            Step::default()
        );
        // The auto-resound counts from the silence before the restart.
        let step = after.step(Input::Tick, t(605));
        assert_eq!(kinds(&step), [EventKind::AlarmResounded]);
    }

    #[test]
    fn a_latched_record_from_before_disablements_still_decodes() {
        let old: Latched =
            serde_json::from_slice(br#"{"alarms":["A-101"],"silenced":true}"#).unwrap();
        assert_eq!(
            old,
            Latched {
                alarms: vec!["A-101".into()],
                silenced: true,
                ..Latched::default()
            }
        );
    }

    #[test]
    fn restored_alarms_release_their_doors_at_start() {
        let mut e = linked_engine();
        e.restore(&Latched {
            alarms: vec!["B-101".into()],
            ..Latched::default()
        });
        e.driven.clear();
        let step = e.start(t(1));
        assert_eq!(kinds(&step), [EventKind::DoorReleased]);
        assert!(step.actions.contains(&Action::DriveOutput {
            output: B_GATE,
            on: true
        }));
    }

    // ---------------------------------------------------------------------------------------
    // The model: random readings, misses, ticks, keys and commands against a fake clock.

    fn any_status() -> impl Strategy<Value = DetectorStatus> {
        prop_oneof![
            4 => Just(DetectorStatus::Normal),
            3 => Just(DetectorStatus::Alarm),
            1 => Just(DetectorStatus::PreAlarm),
            1 => Just(DetectorStatus::Fault),
            1 => Just(DetectorStatus::Test),
        ]
    }

    fn origin() -> impl Strategy<Value = Origin> {
        prop_oneof![
            Just(Origin::PanelKey),
            "[a-z]{1,3}".prop_map(Origin::Command)
        ]
    }

    fn any_output() -> impl Strategy<Value = OutputId> {
        prop_oneof![
            (0..3usize).prop_map(OutputId::Sounder),
            Just(OutputId::PanelBuzzer),
            (0..2usize).prop_map(OutputId::Door),
        ]
    }

    fn any_input() -> impl Strategy<Value = Input> {
        prop_oneof![
            6 => (0..3usize, any_status(), 0..4u16, proptest::option::of(0..3u16)).prop_map(
                |(d, s, bits, heartbeat)| Input::Reading {
                    detector: d,
                    reading: DetectorReading {
                        status: s,
                        smoke_db_per_m: None,
                        fault_bits: bits & 0b11,
                        heartbeat
                    }
                }
            ),
            2 => (0..3usize).prop_map(|d| Input::PollMissed { detector: d, reason: "timeout".into() }),
            3 => Just(Input::Tick),
            1 => origin().prop_map(Input::Silence),
            1 => origin().prop_map(Input::Reset),
            1 => (0..3usize, origin()).prop_map(|(detector, origin)| Input::Disable { detector, origin }),
            1 => (0..3usize, origin()).prop_map(|(detector, origin)| Input::Enable { detector, origin }),
            1 => any_output().prop_map(|output| Input::OutputFailed { output, reason: "timeout".into() }),
            1 => any_output().prop_map(|output| Input::OutputConfirmed { output }),
        ]
    }

    /// What an input is expected to raise, counted by kind, from the engine's state before
    /// and after it: one event per change of state.
    fn expected_events(
        before: &FireEngine,
        after: &FireEngine,
        input: &Input,
    ) -> BTreeMap<EventKind, usize> {
        let mut want: BTreeMap<EventKind, usize> = BTreeMap::new();
        let mut add = |k: EventKind| *want.entry(k).or_default() += 1;
        let disablement = matches!(input, Input::Disable { .. } | Input::Enable { .. });
        for (b, a) in before.state.iter().zip(&after.state) {
            if !b.latched && a.latched {
                add(EventKind::FireAlarm);
            }
            if b.in_alarm && !a.in_alarm && a.latched && !disablement {
                add(EventKind::FireRestored);
            }
            if b.disabled != a.disabled {
                add(if a.disabled {
                    EventKind::DeviceDisabled
                } else {
                    EventKind::DeviceEnabled
                });
            }
            if disablement {
                // The disablement event stands for the end of the detector's conditions.
                continue;
            }
            let flips = [
                (
                    b.pre_alarm,
                    a.pre_alarm,
                    EventKind::FirePreAlarm,
                    EventKind::FirePreAlarmCleared,
                ),
                (
                    b.test,
                    a.test,
                    EventKind::DeviceTest,
                    EventKind::DeviceTestEnded,
                ),
                (
                    b.faulty(),
                    a.faulty(),
                    EventKind::DeviceFault,
                    EventKind::DeviceFaultCleared,
                ),
                (
                    b.offline,
                    a.offline,
                    EventKind::DeviceOffline,
                    EventKind::DeviceOnline,
                ),
            ];
            for (was, is, on, off) in flips {
                if was != is {
                    add(if is { on } else { off });
                }
            }
        }
        for o in before
            .output_faults
            .symmetric_difference(&after.output_faults)
        {
            add(if !after.output_faults.contains(o) {
                EventKind::DeviceFaultCleared
            } else {
                after.output_fault_kind(*o)
            });
        }
        if (!before.silenced && after.silenced) || (!before.fault_silenced && after.fault_silenced)
        {
            add(EventKind::AlarmSilenced);
        }
        if matches!(input, Input::Tick) && before.silenced && !after.silenced {
            add(EventKind::AlarmResounded);
        }
        if matches!(input, Input::Reset(_))
            && (!before.latched().is_empty() || !before.released.is_empty())
        {
            add(EventKind::AlarmReset);
        }
        for _ in after.released.difference(&before.released) {
            add(EventKind::DoorReleased);
        }
        want
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn the_engine_keeps_the_fire_rules_over_any_sequence(
            inputs in proptest::collection::vec((any_input(), 0..40u64), 0..80)
        ) {
            let mut e = linked_engine();
            let mut levels: BTreeMap<OutputId, bool> = e.outputs().into_iter().map(|o| (o, false)).collect();
            let mut now = 0;
            for (input, dt) in inputs {
                now += dt;
                let before = e.clone();
                let step = e.step(input.clone(), t(now));
                for a in &step.actions {
                    if let Action::DriveOutput { output, on } = a {
                        prop_assert_ne!(levels.insert(*output, *on), Some(*on), "a drive action always changes a level");
                    }
                }
                for (o, on) in &levels {
                    prop_assert_eq!(*on, e.output(*o), "the levels driven are the levels wanted");
                }

                // Nothing unlatches without a reset; nothing latches from a disabled detector
                // or a reading that is not an alarm.
                for (i, (b, a)) in before.state.iter().zip(&e.state).enumerate() {
                    if b.latched && !a.latched {
                        prop_assert!(matches!(input, Input::Reset(_)), "unlatched by {:?}", input);
                    }
                    if !b.latched && a.latched {
                        prop_assert!(!b.disabled, "a disabled detector latched");
                        let alarm = matches!(&input, Input::Reading { detector, reading } if *detector == i && reading.status == DetectorStatus::Alarm);
                        prop_assert!(alarm, "latched by {:?}", input);
                    }
                }

                // Sounders on ⇔ a latched, unsilenced alarm of an enabled detector in their zones.
                let sounding_in = |zone: &str| !e.silenced && e.detectors.iter().zip(&e.state).any(|(d, s)| s.latched && !s.disabled && d.zone == zone);
                let any_sounding = sounding_in("A") || sounding_in("B");
                prop_assert_eq!(levels[&OutputId::Sounder(0)], sounding_in("A"));
                prop_assert_eq!(levels[&OutputId::Sounder(1)], sounding_in("B"));
                prop_assert_eq!(levels[&OutputId::Sounder(2)], any_sounding);
                prop_assert_eq!(
                    levels[&OutputId::SounderFallback(0)],
                    sounding_in("A") && e.output_faults.contains(&OutputId::Sounder(0))
                );
                prop_assert_eq!(levels[&OutputId::PanelFireLed], !e.latched().is_empty());
                prop_assert_eq!(levels[&OutputId::PanelFaultLed], !e.faults().is_empty());
                prop_assert_eq!(levels[&OutputId::PanelDisablementLed], !e.disabled().is_empty());
                // The buzzer: steady for a fire, else only while an unsilenced fault exists.
                if any_sounding {
                    prop_assert!(levels[&OutputId::PanelBuzzer]);
                } else if levels[&OutputId::PanelBuzzer] {
                    prop_assert!(!e.faults().is_empty() && !e.fault_silenced);
                }

                // Doors: released once their zone has enough enabled alarms, until reset.
                for (i, zone, need) in [(0, "A", 2), (1, "B", 1)] {
                    let alarms = e.detectors.iter().zip(&e.state).filter(|(d, s)| s.sounding() && d.zone == zone).count();
                    if alarms >= need {
                        prop_assert!(levels[&OutputId::Door(i)]);
                    }
                    if before.released.contains(&i) && !matches!(input, Input::Reset(_)) {
                        prop_assert!(levels[&OutputId::Door(i)], "a released door stays released until reset");
                    }
                }

                // Every change of state is one event, and nothing else raises one.
                let mut got: BTreeMap<EventKind, usize> = BTreeMap::new();
                for ev in &step.events {
                    *got.entry(ev.kind).or_default() += 1;
                }
                prop_assert_eq!(got, expected_events(&before, &e, &input), "input {:?}", input);

                // Restart: the kept state gives the same outputs.
                let mut restarted = linked_engine();
                restarted.restore(&e.latched_state());
                restarted.start(t(now));
                for o in [OutputId::Sounder(0), OutputId::Sounder(1), OutputId::PanelFireLed, A_GATE, B_GATE] {
                    prop_assert_eq!(restarted.output(o), e.output(o), "{:?} after a restart", o);
                }
            }
        }
    }
}
