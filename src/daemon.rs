//! The daemon's wiring, and nothing else: open the store, build the engine, start one poller
//! per bus, the output drivers, the store writer and the uplink, and stop them in order.
//!
//! The alarm path never waits on disk or network: a field report goes to the engine loop,
//! whose output actions are applied (a `watch` level and a wake of the bus) before its events
//! are handed to the store writer thread, which appends them durably and wakes the uplink.
//!
//! The engine loop also feeds the engine an `Input::Tick` once a second (the fault buzzer's
//! pulse, the auto-resound timer) and turns upstream commands into engine inputs; a command
//! naming an unknown detector gets an error result.
//!
//! Shutdown: the token is cancelled (SIGTERM, SIGINT); pollers and the engine loop stop; the
//! store writer drains what the engine handed it, then flushes; the uplink stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, InputSpec, OutputSpec};
use crate::engine::fire::{DetectorSpec, DoorSpec, Origin, PanelSpec, SounderSpec};
use crate::engine::{Action, FireEngine, Input, Latched, OutputId, Step};
use crate::event::{CommandKind, Event, EventData, EventKind, Seq, Status, UnitId};
use crate::field::frame::Request;
use crate::field::link::LinkSettings;
use crate::field::{
    poller, BusPlan, CoilOutput, FieldReport, PolledDetector, PolledInput, WriteRequest,
};

/// The [`PolledInput::name`] of the panel's silence key.
pub const SILENCE_KEY: &str = "silence_key";
/// The [`PolledInput::name`] of the panel's reset key.
pub const RESET_KEY: &str = "reset_key";
use crate::outputs::{self, GpioOutput};
use crate::store::{self, Store};
use crate::uplink::{self, CommandRequest, UplinkSettings, UplinkTap};

/// What the daemon did, for the demo's printout and the tests. Sent only when asked for.
#[derive(Debug, Clone)]
pub enum Tap {
    /// The engine changed an output's wanted level (before any write).
    OutputWanted {
        output: String,
        on: bool,
        at: Instant,
    },
    /// A field report (readings, misses, writes, cycles).
    Field(FieldReport),
    /// The engine raised an event (before it is stored).
    Raised(Event),
    /// The store numbered an event and it is on disk (the durable point).
    Stored { seq: Seq, kind: EventKind },
    /// The uplink's news (connected, acknowledged, commands).
    Uplink(UplinkTap),
}

/// Runs the gateway described by `config` until `shutdown` is cancelled.
///
/// # Errors
/// Start-up failures only: the outbox is held by another process, neither `state_dir` nor a
/// volatile fallback can hold one (see `open_store`), a thread cannot start.
/// Field and network trouble is logged, reported and retried, never returned.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    tap: Option<broadcast::Sender<Tap>>,
) -> anyhow::Result<()> {
    let started = SystemTime::now();
    let (store, volatile) = open_store(&config)?;

    let mut engine = build_engine(&config);
    let mut started_data = EventData {
        reason: Some(format!(
            "village-gateway {} started",
            env!("CARGO_PKG_VERSION")
        )),
        ..EventData::default()
    };
    if let Some(r) = store.recovery() {
        // Events not yet forwarded before the damage are in the moved-aside directory.
        error!(moved_to = %r.moved_to.display(), reason = %r.reason, "The outbox could not be opened; it was moved aside and a fresh one started.");
        started_data.extra.insert(
            "outbox_recovered".into(),
            serde_json::json!({
                "moved_to": r.moved_to.display().to_string(),
                "reason": r.reason,
                "first_seq": r.first_seq.0,
            }),
        );
    }
    let restored = restore_latched(&store, &mut engine);
    if !restored.is_empty() {
        started_data
            .extra
            .insert("restored_fire_alarms".into(), serde_json::json!(restored));
    }
    let disabled = engine.disabled();
    if !disabled.is_empty() {
        let ids: Vec<&str> = disabled.iter().map(|d| d.0.as_str()).collect();
        warn!(detectors = ?ids, "Detectors disabled before the restart are still disabled.");
        started_data
            .extra
            .insert("disabled_detectors".into(), serde_json::json!(disabled));
    }
    if let Some(v) = &volatile {
        started_data.extra.insert(
            "outbox_volatile".into(),
            serde_json::json!({ "dir": v.dir.display().to_string(), "reason": v.reason }),
        );
    }
    let mut start_events = vec![Event::new(EventKind::GatewayStarted, started, started_data)];

    // One wanted level per output; the bus's poller or a GPIO driver follows it.
    let tracker = TaskTracker::new();
    let mut levels: HashMap<OutputId, Level> = HashMap::new();
    let mut plans: Vec<BusPlan> = Vec::new();
    let mut writers: Vec<mpsc::UnboundedSender<WriteRequest>> = Vec::new();
    let mut wakes: Vec<Arc<watch::Sender<u64>>> = Vec::new();
    for bus in &config.buses {
        let (tx, rx) = mpsc::unbounded_channel();
        let (wake, wake_rx) = watch::channel(0u64);
        let wake = Arc::new(wake);
        writers.push(tx);
        wakes.push(wake.clone());
        plans.push(BusPlan {
            name: bus.name.clone(),
            settings: link_settings(bus),
            scan_interval: bus.scan_interval,
            detectors: Vec::new(),
            coils: Vec::new(),
            inputs: Vec::new(),
            offline_after: bus.offline_after,
            probe_interval: bus.probe_interval,
            readback_interval: bus.readback_interval,
            wake: wake_rx,
            writes: rx,
        });
    }
    for (i, d) in config.detectors.iter().enumerate() {
        plans[d.bus].detectors.push(PolledDetector {
            index: i,
            unit: d.unit,
            profile: d.profile.clone(),
            confirm_alarm: d.confirm_alarm,
        });
    }
    for (name, key) in [
        (SILENCE_KEY, &config.panel.silence_key),
        (RESET_KEY, &config.panel.reset_key),
    ] {
        match key {
            Some(InputSpec::DiscreteInput { bus, unit, input }) => {
                plans[*bus].inputs.push(PolledInput {
                    name: name.to_owned(),
                    unit: *unit,
                    address: *input,
                });
            }
            // Sampled and debounced by `inputs::spawn_gpio_keys` below.
            Some(InputSpec::Gpio { .. }) | None => {}
        }
    }
    for (output, name, spec) in config.outputs() {
        // Start from the level the engine wants (restored alarms sound at once), never from
        // an off that would glitch a sounding relay.
        let (tx, rx) = watch::channel(engine.output(output));
        match spec {
            OutputSpec::Coil { bus, unit, coil } => {
                plans[bus].coils.push(CoilOutput {
                    name: name.clone(),
                    unit,
                    coil,
                    wanted: rx,
                });
                levels.insert(
                    output,
                    Level {
                        name,
                        tx,
                        wake: Some(wakes[bus].clone()),
                    },
                );
            }
            OutputSpec::Gpio { pin, active_low } => {
                match GpioOutput::open(pin, active_low) {
                    Ok(driver) => {
                        tracker.spawn(outputs::follow(
                            name.clone(),
                            Box::new(driver),
                            rx,
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => {
                        error!(output = %name, error = %e, "Output cannot be driven: it will not sound.");
                        let mut data = EventData {
                            device: Some(name.as_str().into()),
                            ..EventData::default()
                        };
                        data.reason = Some(e.to_string());
                        start_events.push(Event::new(EventKind::SounderFault, started, data));
                    }
                }
                levels.insert(
                    output,
                    Level {
                        name,
                        tx,
                        wake: None,
                    },
                );
            }
        }
    }

    let (report_tx, mut reports) = mpsc::channel::<FieldReport>(1024);
    let mut bus_threads = Vec::new();
    for plan in plans {
        let name = plan.name.clone();
        bus_threads.push(
            poller::spawn(plan, report_tx.clone(), shutdown.clone())
                .with_context(|| format!("cannot start the thread of bus {name}"))?,
        );
    }
    // GPIO panel keys report into the same channel as the buses' discrete inputs.
    crate::inputs::spawn_gpio_keys(&config.panel, &report_tx, &tracker, &shutdown);
    drop(report_tx);

    // The store writer: a thread of its own, so an fsync never delays the engine loop.
    let wake_uplink = Arc::new(Notify::new());
    let (event_tx, event_rx) = mpsc::unbounded_channel::<ToStore>();
    let (store_fault_tx, mut store_faults) = mpsc::unbounded_channel::<Option<String>>();
    let not_durable = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let store = store.clone();
        let wake = wake_uplink.clone();
        let tap = tap.clone();
        let not_durable = not_durable.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                store_writer(
                    &store,
                    event_rx,
                    &wake,
                    tap.as_ref(),
                    &not_durable,
                    &store_fault_tx,
                );
            })
            .context("cannot start the store writer thread")?
    };
    // Access and routine events become durable in the store's flusher thread: only then may
    // the uplink send them (it reads only durable events) and the tap report them stored.
    tracker.spawn(announce_durable(
        store.clone(),
        wake_uplink.clone(),
        tap.clone(),
        not_durable,
        shutdown.clone(),
    ));

    let (status_tx, status_rx) = watch::channel(Status {
        online: true,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Status::default()
    });
    let (cmd_tx, mut commands) = mpsc::channel::<CommandRequest>(64);
    let (uplink_tap_tx, mut uplink_tap) = broadcast::channel::<UplinkTap>(1024);
    tracker.spawn(uplink::run(
        uplink_settings(&config)?,
        store.clone(),
        wake_uplink.clone(),
        cmd_tx,
        status_rx,
        Some(uplink_tap_tx),
        shutdown.clone(),
    ));
    if let Some(tap) = tap.clone() {
        tracker.spawn(async move {
            while let Ok(t) = uplink_tap.recv().await {
                let _ = tap.send(Tap::Uplink(t));
            }
        });
    }

    info!(
        gateway = %config.gateway.id,
        buses = config.buses.len(),
        detectors = config.detectors.len(),
        sounders = config.sounders.len(),
        "Gateway started."
    );
    for (bus, w) in config
        .buses
        .iter()
        .zip(crate::field::budget::for_config(&config))
    {
        if let Some(w) = w {
            info!(bus = %bus.name, worst_case_ms = w.total.as_millis() as u64, "Worst-case detection time (alarm to sounder driven): {w}.");
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().is_some();

    let mut actuator = Actuator {
        saved: engine.latched_state(),
        levels,
        writers,
        wakes,
        resets: config
            .detectors
            .iter()
            .map(|d| (d.bus, d.unit, d.profile.remote_reset_register))
            .collect(),
        tap: tap.clone(),
        events: event_tx,
        status: status_tx,
    };

    let first = engine.start(SystemTime::now());
    start_events.extend(first.events);
    actuator.apply(
        Step {
            actions: first.actions,
            events: start_events,
        },
        &engine,
    );
    if let Some(v) = volatile {
        let step = engine.step(
            Input::GatewayFault {
                component: OUTBOX_COMPONENT.into(),
                reason: Some(v.reason),
            },
            SystemTime::now(),
        );
        actuator.apply(step, &engine);
    }

    let output_by_name: HashMap<String, OutputId> = actuator
        .levels
        .iter()
        .map(|(id, level)| (level.name.clone(), *id))
        .collect();
    let detector_bus: Vec<usize> = config.detectors.iter().map(|d| d.bus).collect();
    let bus_index: HashMap<&str, usize> = config
        .buses
        .iter()
        .enumerate()
        .map(|(i, b)| (b.name.as_str(), i))
        .collect();
    // The last level read of each panel key: a press is a change to on after a first read.
    let mut keys: HashMap<String, Option<bool>> = HashMap::new();
    let mut last_progress: Vec<Instant> = vec![Instant::now(); config.buses.len()];
    // The engine's clock (fault buzzer pulse, auto-resound): a late tick is not made up in a
    // burst, which would flutter the buzzer.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            report = reports.recv() => {
                let Some(report) = report else { break };
                if let Some(tap) = &tap {
                    let _ = tap.send(Tap::Field(report.clone()));
                }
                let input = match report {
                    FieldReport::Reading { detector, reading, .. } => {
                        last_progress[detector_bus[detector]] = Instant::now();
                        Input::Reading { detector, reading }
                    }
                    FieldReport::Missed { detector, reason } => {
                        last_progress[detector_bus[detector]] = Instant::now();
                        Input::PollMissed { detector, reason }
                    }
                    FieldReport::Cycle { bus, stats, .. } => {
                        if let Some(&b) = bus_index.get(bus.as_str()) {
                            last_progress[b] = Instant::now();
                        }
                        // Counters ride along with the next status publication; they alone
                        // never cause one (that would be one message per scan cycle).
                        actuator.status.send_if_modified(|s| {
                            s.buses.insert(bus, stats);
                            false
                        });
                        continue;
                    }
                    FieldReport::Input { name, on, .. } => {
                        let before = keys.insert(name.clone(), on);
                        if on.is_none() {
                            warn!(key = %name, "Panel key cannot be read.");
                        }
                        // The first read only sets the level: a key held at start is no press.
                        let pressed = on == Some(true) && matches!(before, Some(Some(false)));
                        match name.as_str() {
                            SILENCE_KEY if pressed => Input::Silence(Origin::PanelKey),
                            RESET_KEY if pressed => Input::Reset(Origin::PanelKey),
                            _ => continue,
                        }
                    }
                    FieldReport::OutputWritten { name, ok, error, .. } => {
                        let Some(&output) = output_by_name.get(name.as_str()) else { continue };
                        if ok {
                            Input::OutputConfirmed { output }
                        } else {
                            Input::OutputFailed { output, reason: error.unwrap_or_default() }
                        }
                    }
                };
                let step = engine.step(input, SystemTime::now());
                actuator.apply(step, &engine);
            }
            Some(reason) = store_faults.recv() => {
                let input = Input::GatewayFault { component: OUTBOX_COMPONENT.into(), reason };
                let step = engine.step(input, SystemTime::now());
                actuator.apply(step, &engine);
            }
            request = commands.recv() => {
                let Some(CommandRequest { command, reply }) = request else { continue };
                let result = match command_input(&engine, command) {
                    Ok(Some(input)) => {
                        let step = engine.step(input, SystemTime::now());
                        actuator.apply(step, &engine);
                        Ok(())
                    }
                    Ok(None) => {
                        actuator.status.send_modify(|_| {});
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            _ = tick.tick() => {
                // Ping the watchdog only while every bus makes progress (a poll, a miss or a
                // cycle within 30 s) and this loop runs.
                if watchdog && last_progress.iter().all(|t| t.elapsed() < Duration::from_secs(30)) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                // The fault buzzer's pulse and the auto-resound timer run on this tick.
                let step = engine.step(Input::Tick, SystemTime::now());
                actuator.apply(step, &engine);
            }
        }
    }

    info!("Gateway stopping.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    // The actuator owns the last sender of the store writer's queue: dropping it lets the
    // writer drain what is queued and stop.
    drop(actuator);
    tracker.close();
    for t in bus_threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("Some tasks did not stop within 5 s.");
    }
    if let Err(e) = store.flush() {
        error!(error = %e, "Outbox flush at shutdown failed.");
    }
    info!("Gateway stopped.");
    Ok(())
}

/// Applies the engine's steps: outputs first, then remote resets, then events to the store.
struct Actuator {
    levels: HashMap<OutputId, Level>,
    writers: Vec<mpsc::UnboundedSender<WriteRequest>>,
    wakes: Vec<Arc<watch::Sender<u64>>>,
    /// Per detector: its bus, unit and remote reset register.
    resets: Vec<(usize, UnitId, Option<u16>)>,
    tap: Option<broadcast::Sender<Tap>>,
    events: mpsc::UnboundedSender<ToStore>,
    /// The latched state last handed to the store.
    saved: Latched,
    status: watch::Sender<Status>,
}

impl Actuator {
    fn apply(&mut self, step: Step, engine: &FireEngine) {
        for action in step.actions {
            match action {
                Action::DriveOutput { output, on } => {
                    if let Some(level) = self.levels.get(&output) {
                        level.tx.send_replace(on);
                        if let Some(w) = &level.wake {
                            bump(w);
                        }
                        self.tap(|| Tap::OutputWanted {
                            output: level.name.clone(),
                            on,
                            at: Instant::now(),
                        });
                    }
                }
                Action::RemoteReset { detector } => {
                    if let Some(&(bus, unit, Some(address))) = self.resets.get(detector) {
                        let request = Request::WriteSingleRegister { address, value: 1 };
                        let _ = self.writers[bus].send(WriteRequest { unit, request });
                        bump(&self.wakes[bus]);
                    }
                }
            }
        }
        // The latched state and the events of the step go to the store together, the state
        // written last: a restart never restores an alarm whose fire.alarm was lost (one whose
        // state record was lost latches again on its detector's first poll).
        let latched = engine.latched_state();
        let latched = (latched != self.saved).then(|| {
            self.saved = latched.clone();
            latched
        });
        for event in &step.events {
            log_event(event);
            self.tap(|| Tap::Raised(event.clone()));
        }
        if latched.is_some() || !step.events.is_empty() {
            // Unbounded on purpose: the engine must never wait for the disk; events are rare
            // (state changes only), so the queue stays small.
            let _ = self.events.send(ToStore::Step {
                latched,
                events: step.events,
            });
        }

        self.status.send_if_modified(|s| {
            let active = engine.latched();
            let faults = engine.faults();
            let silenced = engine.silenced();
            let disabled = engine.disabled();
            let changed = s.active_fire_alarms != active
                || s.faults != faults
                || s.silenced != silenced
                || s.disabled != disabled;
            s.active_fire_alarms = active;
            s.faults = faults;
            s.silenced = silenced;
            s.disabled = disabled;
            changed
        });
    }

    fn tap(&self, f: impl FnOnce() -> Tap) {
        if let Some(tap) = &self.tap {
            let _ = tap.send(f());
        }
    }
}

/// Tells a bus's poller that a wanted level changed or a write is queued.
fn bump(wake: &watch::Sender<u64>) {
    wake.send_modify(|g| *g = g.wrapping_add(1));
}

/// An output's wanted level, its name, and the bus to wake when it changes.
struct Level {
    name: String,
    tx: watch::Sender<bool>,
    wake: Option<Arc<watch::Sender<u64>>>,
}

fn build_engine(config: &Config) -> FireEngine {
    let detectors = config
        .detectors
        .iter()
        .map(|d| DetectorSpec {
            id: d.id.clone(),
            zone: d.zone.clone(),
            location: d.location.clone(),
            offline_after: config.buses[d.bus].offline_after,
            remote_reset: d.profile.remote_reset_register.is_some(),
            heartbeat_timeout: d.heartbeat_timeout,
        })
        .collect();
    let sounders = config
        .sounders
        .iter()
        .map(|s| SounderSpec {
            id: s.id.clone(),
            zones: s.zones.clone(),
            fallback: s.fallback.is_some(),
        })
        .collect();
    let panel = PanelSpec {
        fire_led: config.panel.fire_led.is_some(),
        fault_led: config.panel.fault_led.is_some(),
        buzzer: config.panel.buzzer.is_some(),
        disablement_led: config.panel.disablement_led.is_some(),
        auto_resound: config.panel.auto_resound,
    };
    let doors = config
        .released_doors()
        .map(|d| DoorSpec {
            id: d.id.clone(),
            zone: d.zone.clone(),
            location: d.location.clone(),
        })
        .collect();
    let coincidence = config
        .zones
        .iter()
        .filter(|z| z.coincidence)
        .map(|z| z.id.clone())
        .collect();
    FireEngine::new(detectors, sounders, panel).with_doors(doors, coincidence)
}

/// The engine input of an upstream command; `None` for `status`.
///
/// # Errors
/// The command names a device that is not a configured detector.
fn command_input(
    engine: &FireEngine,
    command: crate::event::Command,
) -> Result<Option<Input>, String> {
    let origin = Origin::Command(command.id);
    let detector = |device: &crate::event::DeviceId| {
        engine.detector_index(device).ok_or_else(|| {
            format!("no detector is named \"{device}\"; disable and enable take a [[detector]] id")
        })
    };
    Ok(match command.kind {
        CommandKind::Silence => Some(Input::Silence(origin)),
        CommandKind::Reset => Some(Input::Reset(origin)),
        CommandKind::Status => None,
        CommandKind::Disable { device } => Some(Input::Disable {
            detector: detector(&device)?,
            origin,
        }),
        CommandKind::Enable { device } => Some(Input::Enable {
            detector: detector(&device)?,
            origin,
        }),
    })
}

/// The link settings of a configured bus.
pub fn link_settings(bus: &crate::config::Bus) -> LinkSettings {
    LinkSettings {
        transport: bus.transport.clone(),
        timeout: bus.timeout,
        turnaround: bus.turnaround,
    }
}

/// The uplink settings of a config; reads the password file.
///
/// # Errors
/// The password file cannot be read.
pub fn uplink_settings(config: &Config) -> anyhow::Result<UplinkSettings> {
    let u = &config.uplink;
    let password = match &u.password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read uplink.password_file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        None => None,
    };
    Ok(UplinkSettings {
        url: u.url.clone(),
        client_id: u.client_id.clone(),
        gateway_id: config.gateway.id.clone(),
        topic_prefix: u.topic_prefix.clone(),
        keep_alive: u.keep_alive,
        username: u.username.clone(),
        password,
        ca_file: u.ca_file.clone(),
        cert_file: u.cert_file.clone(),
        key_file: u.key_file.clone(),
        batch_events: u.batch_events,
    })
}

fn log_event(e: &Event) {
    let device = e.data.device.as_ref().map_or("-", |d| d.0.as_str());
    let location = e.data.location.as_deref().unwrap_or("");
    match e.kind {
        EventKind::FireAlarm => warn!(event = %e.kind, device, location, "FIRE ALARM."),
        EventKind::DeviceOffline | EventKind::DeviceFault | EventKind::SounderFault => {
            warn!(event = %e.kind, device, location, reason = e.data.reason.as_deref().unwrap_or(""), "Device trouble.");
        }
        _ => info!(event = %e.kind, device, location, "Event."),
    }
}

/// What the engine loop hands to the store writer, in order: one engine step's events and,
/// if they changed, the latched alarms to keep for a restart (`Store::append_step`).
#[derive(Debug)]
enum ToStore {
    Step {
        latched: Option<Latched>,
        events: Vec<Event>,
    },
}

/// The key of the latched alarms among the store's state records.
const LATCHED_KEY: &str = "fire.latched";

/// Restores the alarms latched before a restart into `engine`; returns their ids.
/// A record that cannot be read is logged and ignored: the detectors still in alarm latch
/// again on their first poll.
fn restore_latched(store: &Store, engine: &mut FireEngine) -> Vec<crate::event::DeviceId> {
    let record = match store.load_state(LATCHED_KEY) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Vec::new(),
        Err(e) => {
            error!(error = %e, "Latched alarms from before the restart cannot be read.");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<Latched>(&record) {
        Ok(latched) => {
            let restored = engine.restore(&latched);
            if !restored.is_empty() {
                let ids: Vec<&str> = restored.iter().map(|d| d.0.as_str()).collect();
                warn!(alarms = ?ids, silenced = latched.silenced, "Fire alarms latched before the restart are still latched.");
            }
            restored
        }
        Err(e) => {
            error!(error = %e, "Latched alarms from before the restart are unreadable; ignored.");
            Vec::new()
        }
    }
}

/// The store settings of a config (`[store]`).
pub fn store_settings(config: &Config) -> store::Settings {
    store::Settings {
        max_bytes: config.store.max_bytes,
        flush_interval: config.store.flush_interval,
    }
}

/// Events numbered by the store but not yet durable, for [`Tap::Stored`]; filled only when
/// there is a tap. The lock is held only to push or drain (no I/O under it).
type NotDurable = Mutex<Vec<(Seq, EventKind)>>;

/// Appends every event the engine raised, in order, and keeps the latched alarms. A durable
/// (urgent) event wakes the uplink at once; the others are announced by [`announce_durable`].
/// Ends when the engine loop has dropped its sender and the queue is drained.
fn store_writer(
    store: &Store,
    mut queue: mpsc::UnboundedReceiver<ToStore>,
    wake: &Notify,
    tap: Option<&broadcast::Sender<Tap>>,
    not_durable: &NotDurable,
    faults: &mpsc::UnboundedSender<Option<String>>,
) {
    let mut failing = false;
    while let Some(ToStore::Step { latched, events }) = queue.blocking_recv() {
        let state = match latched.as_ref().map(serde_json::to_vec).transpose() {
            Ok(state) => state,
            Err(e) => {
                error!(error = %e, "Latched alarms could not be encoded; a restart would forget them.");
                None
            }
        };
        let step = match store.append_step(&events, state.as_deref().map(|v| (LATCHED_KEY, v))) {
            Ok(step) => step,
            Err(e) => {
                // The events are lost to upstream; the local alarm has already been acted on.
                // The engine makes it a fault of the gateway: fault LED, buzzer, status.
                let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
                error!(events = ?kinds, latched = state.is_some(), error = %e, "Events could not be stored.");
                if !std::mem::replace(&mut failing, true) {
                    let _ = faults.send(Some(format!("events cannot be stored: {e}")));
                }
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            let _ = faults.send(None);
        }
        // The store logged an eviction itself; its report is one more stored event.
        let report = step
            .eviction
            .as_ref()
            .map(|e| (e.report_seq, EventKind::OutboxEvicted));
        let stored = step
            .seqs
            .iter()
            .copied()
            .zip(events.iter().map(|e| e.kind))
            .chain(report);
        if let Some(tap) = tap {
            let mut held = not_durable.lock().unwrap_or_else(PoisonError::into_inner);
            for (seq, kind) in stored {
                if store.is_durable(seq) {
                    let _ = tap.send(Tap::Stored { seq, kind });
                } else {
                    held.push((seq, kind));
                }
            }
        }
        if step.seqs.last().is_some_and(|s| store.is_durable(*s)) {
            wake.notify_one();
        }
    }
}

/// Wakes the uplink whenever the store's durable watermark rises, and reports the events
/// that became durable to the tap.
async fn announce_durable(
    store: Store,
    wake: Arc<Notify>,
    tap: Option<broadcast::Sender<Tap>>,
    not_durable: Arc<NotDurable>,
    shutdown: CancellationToken,
) {
    let mut durable = store.durable();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = durable.changed() => if changed.is_err() { return },
        }
        wake.notify_one();
        if let Some(tap) = &tap {
            let mut held = not_durable.lock().unwrap_or_else(PoisonError::into_inner);
            held.retain(|&(seq, kind)| {
                let stored = store.is_durable(seq);
                if stored {
                    let _ = tap.send(Tap::Stored { seq, kind });
                }
                !stored
            });
        }
    }
}

/// The [`Input::GatewayFault`] component of the outbox.
pub const OUTBOX_COMPONENT: &str = "gateway.outbox";

/// Why the outbox runs in a volatile directory instead of `state_dir`.
#[derive(Debug)]
struct Volatile {
    dir: std::path::PathBuf,
    reason: String,
}

/// Opens the outbox in `state_dir`. When that is impossible (a read-only SD card, a full or
/// missing mount) the gateway must still poll, alarm and forward: the outbox then lives in a
/// fresh directory in RAM (`/dev/shm`, else the temp dir), lost at power-off, and the engine
/// reports a gateway fault. Only another process holding the outbox (sled's lock) is retried
/// for a moment and then returned as an error: systemd restarts the daemon.
fn open_store(config: &Config) -> anyhow::Result<(Store, Option<Volatile>)> {
    let state_dir = &config.gateway.state_dir;
    let mut attempt = 0;
    let error = loop {
        let opened = std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state_dir {}", state_dir.display()))
            .and_then(|()| {
                Store::open_with(&state_dir.join("outbox"), store_settings(config))
                    .map_err(anyhow::Error::from)
            });
        match opened {
            Ok(store) => return Ok((store, None)),
            Err(e) if is_locked(&e) && attempt < 10 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if is_locked(&e) => return Err(e),
            Err(e) => break e,
        }
    };
    let reason = format!("cannot use state_dir {}: {error:#}", state_dir.display());
    let base = std::path::Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("village-gateway-{}-outbox", config.gateway.id));
    error!(%reason, volatile_dir = %dir.display(), "The outbox cannot be kept on disk; it runs in RAM until state_dir is repaired (events still go upstream, a power cut loses the ones not yet sent).");
    // Whatever a previous volatile run left there was from before that run ended: start fresh.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{reason}; nor can {} be created", dir.display()))?;
    let store = Store::open_with(&dir, store_settings(config))
        .with_context(|| format!("{reason}; nor can an outbox be opened in {}", dir.display()))?;
    Ok((store, Some(Volatile { dir, reason })))
}

fn is_locked(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::store::Error>(),
        Some(crate::store::Error::Locked { .. })
    )
}
