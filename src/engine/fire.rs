//! The fire rules: what a detector reading, a missed poll or an officer's command means, and
//! which outputs must be on. Pure: no I/O, no clock of its own (`now` is an argument), no tokio.
//!
//! Design constraints:
//! - **Outputs are levels**, recomputed from the state after every input: sounder *i* is on
//!   exactly when an unsilenced latched alarm exists in one of its zones; the panel's fire LED
//!   while any alarm is latched (silence never clears it); the buzzer follows the sounders; the
//!   fault LED while any detector is in fault or offline. A [`Action::DriveOutput`] is emitted
//!   only when a level changes, and [`FireEngine::start`] emits every level once.
//! - **Alarms latch** until reset, even when the detector returns to normal (`fire.restored`
//!   is reported; the alarm stays). EN 54-2 §7.1 / GB 4717 §4.3: the fire alarm condition is
//!   held until reset.
//! - **Silence** stops the sounders and the buzzer, never the fire LED. A new alarm anywhere
//!   after a silence re-sounds (EN 54-2 §7.8: silenced alarm devices re-sound on a new alarm).
//! - **Reset** clears every latched alarm and asks each latched detector for its remote reset;
//!   a detector that still reports alarm on its next poll latches again at once.
//! - **Supervision**: `offline_after` missed polls in a row make a detector offline; a fault
//!   status or fault bit makes it in fault; each change is one event, each recovery one event.
//!   A fire is never masked by a fault: a reading of alarm latches whatever the fault bits say.
//! - Every state change emits exactly one event; an input that changes nothing emits nothing.

use std::time::SystemTime;

use crate::config::Zones;
use crate::event::{DetectorReading, DetectorStatus, DeviceId, Event, EventData, EventKind};

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
}

/// A sounder as the engine needs to know it.
#[derive(Debug, Clone)]
pub struct SounderSpec {
    pub id: DeviceId,
    pub zones: Zones,
}

/// Which panel outputs exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct PanelSpec {
    pub fire_led: bool,
    pub fault_led: bool,
    pub buzzer: bool,
}

/// An output the engine drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutputId {
    /// Index into the sounders given to [`FireEngine::new`].
    Sounder(usize),
    PanelFireLed,
    PanelFaultLed,
    PanelBuzzer,
}

/// Who asked for a silence or a reset.
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
    /// Silence the sounding alarms.
    Silence(Origin),
    /// Reset the latched alarms.
    Reset(Origin),
    /// A write to `output` was not confirmed by its unit (no echo, exception, timeout).
    OutputFailed { output: OutputId, reason: String },
    /// A write to `output` was confirmed.
    OutputConfirmed { output: OutputId },
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
    /// Fault status or fault bits in the last reading.
    in_fault: bool,
    offline: bool,
    missed: u32,
}

/// What must survive a restart or a power cut: the latched fire alarms and whether they are
/// silenced (EN 54-2 §7.1: the fire alarm condition is held until a manual reset; a restart is
/// not a reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latched {
    pub alarms: Vec<DeviceId>,
    pub silenced: bool,
}

/// The fire alarm engine of one site.
#[derive(Debug, Clone)]
pub struct FireEngine {
    detectors: Vec<DetectorSpec>,
    sounders: Vec<SounderSpec>,
    panel: PanelSpec,
    state: Vec<DetectorState>,
    silenced: bool,
    /// Levels last emitted, by output; `None` before [`FireEngine::start`].
    driven: std::collections::BTreeMap<OutputId, bool>,
    /// Outputs whose last write was not confirmed.
    output_faults: std::collections::BTreeSet<OutputId>,
}

impl FireEngine {
    /// An engine with every detector normal and online and nothing latched.
    pub fn new(detectors: Vec<DetectorSpec>, sounders: Vec<SounderSpec>, panel: PanelSpec) -> Self {
        let state = vec![DetectorState::default(); detectors.len()];
        FireEngine {
            detectors,
            sounders,
            panel,
            state,
            silenced: false,
            driven: Default::default(),
            output_faults: Default::default(),
        }
    }

    /// Takes back the alarms latched before a restart, before [`FireEngine::start`]. Detectors
    /// no longer in the config are ignored. Returns the ids restored.
    pub fn restore(&mut self, latched: &Latched) -> Vec<DeviceId> {
        let mut restored = Vec::new();
        for id in &latched.alarms {
            if let Some(i) = self.detectors.iter().position(|d| &d.id == id) {
                self.state[i].latched = true;
                restored.push(id.clone());
            }
        }
        self.silenced = latched.silenced && !restored.is_empty();
        restored
    }

    /// The state to keep across a restart.
    pub fn latched_state(&self) -> Latched {
        Latched {
            alarms: self.latched(),
            silenced: self.silenced,
        }
    }

    /// The first levels of every output (all off for a fresh engine; as the latched alarms
    /// demand after [`FireEngine::restore`]).
    pub fn start(&mut self) -> Step {
        let mut step = Step::default();
        self.drive_outputs(&mut step, true);
        step
    }

    /// Applies `input` that happened at `now`.
    pub fn step(&mut self, input: Input, now: SystemTime) -> Step {
        let mut step = Step::default();
        match input {
            Input::Reading { detector, reading } => self.reading(detector, reading, now, &mut step),
            Input::PollMissed { detector, reason } => {
                self.missed(detector, &reason, now, &mut step);
            }
            Input::Silence(origin) => self.silence(&origin, now, &mut step),
            Input::Reset(origin) => self.reset(&origin, now, &mut step),
            Input::OutputFailed { output, reason } => {
                if self.output_faults.insert(output) {
                    let mut e = Event::new(EventKind::SounderFault, now, self.output_data(output));
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
        }
        self.drive_outputs(&mut step, false);
        // Outputs go first: the caller applies actions in order, and sounders must not wait
        // behind a remote reset write.
        step.actions
            .sort_by_key(|a| !matches!(a, Action::DriveOutput { .. }));
        step
    }

    /// The detectors whose fire alarm is latched.
    pub fn latched(&self) -> Vec<DeviceId> {
        self.iter_where(|s| s.latched)
    }

    /// The detectors in fault or offline, then the outputs whose writes fail.
    pub fn faults(&self) -> Vec<DeviceId> {
        let mut v = self.iter_where(|s| s.in_fault || s.offline);
        v.extend(self.output_faults.iter().map(|&o| self.output_id(o)));
        v
    }

    /// The id of an output in events: the sounder's id, or `panel.fire_led` and the like.
    pub fn output_id(&self, output: OutputId) -> DeviceId {
        match output {
            OutputId::Sounder(i) => self
                .sounders
                .get(i)
                .map_or_else(|| DeviceId(format!("sounder[{i}]")), |s| s.id.clone()),
            OutputId::PanelFireLed => "panel.fire_led".into(),
            OutputId::PanelFaultLed => "panel.fault_led".into(),
            OutputId::PanelBuzzer => "panel.buzzer".into(),
        }
    }

    fn output_data(&self, output: OutputId) -> EventData {
        EventData {
            device: Some(self.output_id(output)),
            ..EventData::default()
        }
    }

    /// Whether the latched alarms are silenced.
    pub fn silenced(&self) -> bool {
        self.silenced
    }

    /// The level of `output` now.
    pub fn output(&self, output: OutputId) -> bool {
        self.wanted(output)
    }

    /// Every output this engine drives.
    pub fn outputs(&self) -> Vec<OutputId> {
        let mut v: Vec<OutputId> = (0..self.sounders.len()).map(OutputId::Sounder).collect();
        if self.panel.fire_led {
            v.push(OutputId::PanelFireLed);
        }
        if self.panel.fault_led {
            v.push(OutputId::PanelFaultLed);
        }
        if self.panel.buzzer {
            v.push(OutputId::PanelBuzzer);
        }
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
        let Some(state) = self.state.get(detector).cloned() else {
            return;
        };
        let mut next = state.clone();
        next.missed = 0;
        if state.offline {
            next.offline = false;
            step.events
                .push(self.event(EventKind::DeviceOnline, detector, now));
        }
        let alarm = reading.status == DetectorStatus::Alarm;
        let fault = reading.status == DetectorStatus::Fault || reading.fault_bits != 0;
        if alarm && !state.latched {
            next.latched = true;
            // A new alarm re-sounds silenced sounders (EN 54-2 §7.8).
            self.silenced = false;
            let mut e = self.event(EventKind::FireAlarm, detector, now);
            e.data.reading = Some(reading);
            step.events.push(e);
        } else if !alarm && state.in_alarm && state.latched {
            let mut e = self.event(EventKind::FireRestored, detector, now);
            e.data.reading = Some(reading);
            e.data.reason = Some(
                "detector no longer reports alarm; the alarm stays latched until reset".to_owned(),
            );
            step.events.push(e);
        }
        next.in_alarm = alarm;
        if fault != state.in_fault {
            let kind = if fault {
                EventKind::DeviceFault
            } else {
                EventKind::DeviceFaultCleared
            };
            let mut e = self.event(kind, detector, now);
            e.data.reading = Some(reading);
            if fault {
                e.data.reason = Some(describe_fault(reading));
            }
            step.events.push(e);
        }
        next.in_fault = fault;
        self.state[detector] = next;
    }

    fn missed(&mut self, detector: usize, reason: &str, now: SystemTime, step: &mut Step) {
        let Some(limit) = self.detectors.get(detector).map(|d| d.offline_after) else {
            return;
        };
        let s = &mut self.state[detector];
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
        if self.silenced || latched.is_empty() {
            return;
        }
        self.silenced = true;
        step.events
            .push(site_event(EventKind::AlarmSilenced, origin, latched, now));
    }

    fn reset(&mut self, origin: &Origin, now: SystemTime, step: &mut Step) {
        let latched = self.latched();
        if latched.is_empty() {
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
        step.events
            .push(site_event(EventKind::AlarmReset, origin, latched, now));
    }

    fn wanted(&self, output: OutputId) -> bool {
        let sounding = |zones: &Zones| {
            !self.silenced
                && self
                    .detectors
                    .iter()
                    .zip(&self.state)
                    .any(|(d, s)| s.latched && zones.includes(&d.zone))
        };
        match output {
            OutputId::Sounder(i) => self.sounders.get(i).is_some_and(|s| sounding(&s.zones)),
            OutputId::PanelFireLed => self.state.iter().any(|s| s.latched),
            OutputId::PanelBuzzer => sounding(&Zones::All),
            OutputId::PanelFaultLed => {
                self.state.iter().any(|s| s.in_fault || s.offline) || !self.output_faults.is_empty()
            }
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
        parts.push("detector reports fault".to_owned());
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
        };
        let mut e = FireEngine::new(
            vec![det("A-101", "A"), det("A-102", "A"), det("B-101", "B")],
            vec![
                SounderSpec {
                    id: "A-s".into(),
                    zones: Zones::Some(vec!["A".into()]),
                },
                SounderSpec {
                    id: "B-s".into(),
                    zones: Zones::Some(vec!["B".into()]),
                },
                SounderSpec {
                    id: "all".into(),
                    zones: Zones::All,
                },
            ],
            PanelSpec {
                fire_led: true,
                fault_led: true,
                buzzer: true,
            },
        );
        e.start();
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
        let step = e.start();
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
                silenced: false
            }
        );

        let mut after = engine();
        assert_eq!(after.restore(&saved), vec![DeviceId::from("B-101")]);
        let step = after.start();
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
        });
        assert_eq!(restored, vec![DeviceId::from("A-101")]);
        e.start();
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
            [Action::DriveOutput {
                output: OutputId::PanelFaultLed,
                on: true
            }]
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
            [Action::DriveOutput {
                output: OutputId::PanelFaultLed,
                on: true
            }]
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
    fn pre_alarm_and_test_never_sound() {
        let mut e = engine();
        for s in [DetectorStatus::PreAlarm, DetectorStatus::Test] {
            let step = e.step(
                Input::Reading {
                    detector: 0,
                    reading: reading(s),
                },
                t(1),
            );
            assert!(step.actions.is_empty());
        }
        assert!(e.latched().is_empty());
    }

    fn any_input() -> impl Strategy<Value = Input> {
        let status = prop_oneof![
            Just(DetectorStatus::Normal),
            Just(DetectorStatus::Alarm),
            Just(DetectorStatus::PreAlarm),
            Just(DetectorStatus::Fault),
            Just(DetectorStatus::Test),
        ];
        prop_oneof![
            4 => (0..3usize, status, 0..4u16).prop_map(|(d, s, bits)| Input::Reading {
                detector: d,
                reading: DetectorReading { status: s, smoke_db_per_m: None, fault_bits: bits & 0b11, heartbeat: None }
            }),
            2 => (0..3usize).prop_map(|d| Input::PollMissed { detector: d, reason: "timeout".into() }),
            1 => Just(Input::Silence(Origin::PanelKey)),
            1 => Just(Input::Reset(Origin::PanelKey)),
        ]
    }

    proptest! {
        #[test]
        fn sounders_are_on_exactly_when_an_unsilenced_alarm_is_latched_in_their_zone(
            inputs in proptest::collection::vec(any_input(), 0..60)
        ) {
            let mut e = engine();
            let mut levels: std::collections::BTreeMap<OutputId, bool> = e.outputs().into_iter().map(|o| (o, false)).collect();
            for (i, input) in inputs.into_iter().enumerate() {
                let before = e.latched();
                let is_reset = matches!(input, Input::Reset(_));
                let step = e.step(input, t(i as u64));
                for a in &step.actions {
                    if let Action::DriveOutput { output, on } = a {
                        prop_assert_ne!(levels.insert(*output, *on), Some(*on), "a drive action always changes a level");
                    }
                }
                let latched = e.latched();
                if !is_reset {
                    for d in &before {
                        prop_assert!(latched.contains(d), "nothing unlatches without a reset");
                    }
                }
                let zone_a = latched.iter().any(|d| d.0.starts_with('A'));
                prop_assert_eq!(levels[&OutputId::Sounder(0)], zone_a && !e.silenced());
                prop_assert_eq!(levels[&OutputId::Sounder(2)], !latched.is_empty() && !e.silenced());
                prop_assert_eq!(levels[&OutputId::PanelFireLed], !latched.is_empty());
                prop_assert_eq!(levels[&OutputId::PanelFaultLed], !e.faults().is_empty());
                let new_alarms = latched.iter().filter(|d| !before.contains(d)).count();
                let alarm_events = step.events.iter().filter(|e| e.kind == EventKind::FireAlarm).count();
                prop_assert_eq!(new_alarms, alarm_events, "one fire.alarm per newly latched detector");
            }
        }
    }
}
