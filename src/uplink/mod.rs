//! The uplink: forwards the outbox upstream over MQTT 3.1.1 (rumqttc), takes commands in,
//! publishes the gateway's status with a last will.
//!
//! Owns the MQTT connection and nothing else; the store stays the only source of truth.
//!
//! - **Events**: `<prefix>/<gw>/event/<type>`, QoS 1, not retained, payload
//!   [`crate::event::Event::to_cloudevent`]. An event leaves the store only after its PUBACK.
//! - **Batches**: whenever two or more events of lane 1 (access and door) or of lane 2
//!   (routine) wait at the head of the queue together (a backlog after an outage, or a burst
//!   such as the door releases of a fire), up to `batch_events` of them
//!   (`uplink.batch_events`, default [`DEFAULT_BATCH_EVENTS`]; at most [`BATCH_MAX_BYTES`] of
//!   payload, unless one event alone is larger: it then goes on its type's topic) go as one
//!   CloudEvents batch (`application/cloudevents-batch+json`: a JSON array of the same
//!   envelopes, of one lane, in seq order) on `<prefix>/<gw>/events`, QoS 1. MQTT 3.1.1 has
//!   no content type, so the topic says it; `<prefix>/<gw>/event/#` does not match it,
//!   subscribe to both. Fire
//!   and fault events (lane 0) always go one per publish on their type's topic, so the command
//!   centre's rules on `event/fire.alarm` see every fire, live or from a backlog. A batch is
//!   acknowledged by one PUBACK, and all its events leave the store after it.
//! - **Ack correlation**: rumqttc never returns a publish's packet id. One task hands publishes to
//!   the client (`try_publish`), so `Outgoing::Publish(pkid)` events arrive in that order; each
//!   takes the oldest queued seq, and `Incoming::PubAck(pkid)` then names the seq to remove. The
//!   pure state machine is in `window.rs` (checked against a model of rumqttc's packet-id cycle
//!   with out-of-order acks).
//! - **Throughput: batches, and many events in flight.** A backlog drains with up to
//!   [`EVENT_WINDOW`] (1000) events in flight (in batches or one per publish), so the rate is
//!   bounded by 1000 per round trip (10 000/s at 100 ms RTT), not 1 per round trip. Batches
//!   cut the per-publish cost (the client's, the broker's, the window's) by their length: one
//!   per publish, the uplink drained at about half the rate of a plain rumqttc publisher of the
//!   same events against the in-process rumqttd on a 2-core VM; with batches of 100 (and the
//!   store's segments, which make an acknowledgement cheap) at 0.77-1.10 times its rate, and
//!   1.10-2.07 times against mosquitto (`examples/drain_rate.rs`, two runs of 3 rounds,
//!   figures in the README). A broker must accept that many unacknowledged QoS 1 publishes
//!   from one client (mosquitto and rumqttd do; a broker that caps in-flight messages lower
//!   would need a smaller window).
//! - **Refill without rescans**: the next events are read [`READ_AHEAD`] at a time into a
//!   read-ahead queue and published from there as PUBACKs free slots. Each read continues after
//!   the last event read (a cursor, [`Store::pending_stored_after`]), so events in flight are not
//!   decoded again; it starts from the head instead (skipping events in flight or being
//!   removed) on a new connection, after the read-ahead was dropped, after a failed removal, or
//!   while a lane before the cursor's holds events (in-memory counters, no disk access). After the daemon's wake (or a
//!   tick) a cheap probe of the store's head drops the read-ahead if an event of an earlier lane
//!   arrived: a fire raised during a drain goes out ahead of the rest of the backlog, behind at
//!   most the events already in flight. (An event evicted from the store while in the
//!   read-ahead may still be published once: a duplicate-like extra, never a loss.)
//! - **Removal off the connection task**: after its PUBACK, a seq and its lane go to the
//!   `outbox-remover` thread, which removes them in batches with [`Store::remove_acked`]
//!   (it blocks on sled: a `get` per event, a `drop_tree` per finished segment); until it is
//!   gone it is never published again. The [`UplinkTap::Acked`] tap fires after the removal.
//! - **Reconnects**: rumqttc drops queued and in-flight QoS 1 publishes when a connection ends
//!   (CRATES.md). So every connection gets a fresh `AsyncClient` + `EventLoop`, a clean session and
//!   an empty window, and sends everything pending from the store again, in order. Duplicates are
//!   fine upstream (`id` is the de-duplication key); gaps would not be. After a failure: backoff
//!   200 ms doubling to 30 s, with jitter. A publish unacknowledged for 3 × keep-alive drops the
//!   connection (rumqttc's collision stash can livelock).
//! - **No await on the client where the event loop is polled**: the event loop runs in its own
//!   task, on a thread of its own (`mqtt-io`, see `IoThread`), and forwards its events over a
//!   channel; the main task only uses `try_*` calls.
//! - **Status**: `<prefix>/<gw>/status`, retained, QoS 1: the daemon's [`Status`] with the outbox
//!   figures filled in from [`Store::stats`]; on connect, on every change of the watch (at most
//!   once a second), when the backlog drains and on a `status` command. The last will is
//!   `{"online":false}`, retained; a clean shutdown publishes the status with `online: false`.
//! - **Commands**: `<prefix>/<gw>/cmd/+`, QoS 1, parsed with [`Command::parse`], handed to the
//!   daemon as a [`CommandRequest`]; the reply (or a parse error, or a 30 s timeout) goes to
//!   `<prefix>/<gw>/cmd-result` as `{"id", "ok", "error"?}`, QoS 1. Waiting for the daemon
//!   happens in a spawned task, never in the event loop. A result not yet published when the
//!   connection drops is published on the next one; one already handed to a dropped client is
//!   lost (the caller's retry is the remedy).
//! - **Wake-ups**: the daemon calls `wake.notify_one()` after appending; a missed wake costs at
//!   most one tick (500 ms), because every tick also refills.
//!
//! Not done here: MQTT 5, persistence of command results.

mod options;
mod window;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, ConnectionError, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use self::options::{Backoff, Topics};
use self::window::{AckWindow, Tag};
use crate::event::{Command, CommandKind, EventKind, Lane, Seq, Status};
use crate::store::{Store, StoredEvent};

/// The lanes, in drain order.
const LANES_IN_ORDER: [Lane; 3] = [Lane::Urgent, Lane::Access, Lane::Routine];
/// Events in flight at most (handed to the client, PUBACK pending). The drain rate of a backlog
/// is at most this many events per round trip: 1000 over a 100 ms RTT bounds it at 10 000
/// events/s (the target is 5 000/s, issue 5); on a Pi it costs about 0.5 MB of payloads.
pub const EVENT_WINDOW: usize = 1000;
/// Refill after a PUBACK only once this many slots are free (or the window is empty): fewer
/// wake-ups of the refill during a backlog, while the pipe stays almost full.
const REFILL_BATCH: usize = 50;
/// Events read from the store per read-ahead (from the head: beyond those in flight, which the
/// scan returns again and the read-ahead skips). Four windows: about 2 MB of decoded events.
const READ_AHEAD: usize = 4 * EVENT_WINDOW;
/// The event loop's events handled per wake-up of the connection loop.
const EVENT_BATCH: usize = 64;
/// Events the event-loop task may run ahead of the connection loop: two per publish of a full
/// window (its `Outgoing::Publish` and its PUBACK). With 64 the event loop stalled whenever a
/// refill (a read-ahead of 4000 events: about 6 ms of sled reads) held the connection loop,
/// and publishes waited in rumqttc's request channel: the loopback drain ratio went from
/// 0.45-0.48 to 0.68-0.76 against mosquitto with this (`examples/drain_rate.rs`, 3 rounds,
/// 2-core VM). Almost all are packet ids; a command publish (rare) holds its payload, at most
/// the 4 MiB incoming packet limit.
const EVENT_CHANNEL_CAPACITY: usize = 2 * EVENT_WINDOW + 48;
/// Default of [`UplinkSettings::batch_events`] (`uplink.batch_events`): 100 events of about
/// 300 bytes, a 30 KB publish.
pub const DEFAULT_BATCH_EVENTS: usize = 100;
/// Largest batch payload: 64 KiB, about 200 events of the usual 300 bytes (a batch is also
/// capped by `batch_events` and by the free slots of the window).
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// rumqttc request channel capacity: the window plus status and command results.
const REQUEST_CHANNEL_CAPACITY: usize = EVENT_WINDOW + 64;
/// First reconnect delay and its cap.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Housekeeping period: overdue acks, rate-limited status, retries after a full channel.
const TICK: Duration = Duration::from_millis(500);
/// Status publishes at most this often.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Largest command payload handled: 1 MiB, several times a `cards.sync` for 1000 rooms
/// (~150 KB). A larger one gets an error result (logged and counted), not a reconnect.
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;
/// How long the daemon has to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP + TLS + CONNACK must complete within this (rumqttc's network timeout, seconds).
const CONNECT_TIMEOUT_S: u64 = 10;
/// How long a clean shutdown waits for the offline status and DISCONNECT to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Validated-at-start settings of the uplink (`[uplink]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkSettings {
    /// `mqtt://host:port` or `mqtts://host[:port]` (default ports 1883, 8883).
    pub url: String,
    /// MQTT client id, 1..=256 bytes (brokers must accept 1..=23).
    pub client_id: String,
    /// The gateway id: the second topic level and the prefix of event ids.
    pub gateway_id: String,
    /// The first topic level.
    pub topic_prefix: String,
    /// MQTT keep-alive, 1 s ..= 65535 s. A dead link is noticed after about 2 × this.
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM roots for `mqtts://` (required there).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// Most access and routine events per publish when more than one is waiting: a CloudEvents
    /// batch on `<prefix>/<gw>/events`. 1 = one event per publish, always;
    /// 1 ..= [`EVENT_WINDOW`]. Fire and fault events always go one per publish.
    pub batch_events: usize,
}

/// Errors of the uplink settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker URL cannot be used.
    #[error("uplink url {url:?}: {why}")]
    Url { url: String, why: String },
    /// A setting is out of range.
    #[error("uplink {key}: {why}")]
    Invalid { key: &'static str, why: String },
    /// The TLS files cannot be read or used.
    #[error("uplink TLS: {0}")]
    Tls(String),
}

/// Checks settings before anything is built from them, including reading the TLS files.
/// Usable by `check-config`; [`run`] calls it too.
///
/// # Errors
/// The first problem found, naming the setting.
pub fn validate(settings: &UplinkSettings) -> Result<(), Error> {
    let endpoint = options::check(settings)?;
    if endpoint.tls {
        options::tls_config(settings)?;
    }
    Ok(())
}

/// A command for the daemon. Answer on `reply`: `Ok(())` or the reason it was refused.
#[derive(Debug)]
pub struct CommandRequest {
    pub command: Command,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the uplink did, for the demo's printout and the tests. Sent only if someone listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkTap {
    /// Connected and subscribed to commands (the SUBACK arrived).
    Connected,
    /// A connection ended (or an attempt failed after a connection had worked).
    Disconnected { reason: String },
    /// The broker acknowledged event `seq`; it is gone from the store.
    Acked { seq: Seq, kind: EventKind },
    /// A command arrived; `error` is set when it could not be parsed.
    CommandReceived {
        name: String,
        id: Option<String>,
        error: Option<String>,
    },
}

/// A command's outcome, waiting to be published on `cmd-result`.
#[derive(Debug)]
struct CommandResult {
    id: Option<String>,
    outcome: Result<(), String>,
    /// A `status` command: publish the status after the result.
    refresh_status: bool,
}

impl CommandResult {
    fn payload(&self) -> Vec<u8> {
        let value = match &self.outcome {
            Ok(()) => serde_json::json!({ "id": self.id, "ok": true }),
            Err(e) => serde_json::json!({ "id": self.id, "ok": false, "error": e }),
        };
        value.to_string().into_bytes()
    }
}

/// Forwards the outbox until `shutdown`; see the module doc. Never returns early on network
/// trouble; returns at once (with an ERROR log) if `settings` do not [`validate`].
pub async fn run(
    settings: UplinkSettings,
    store: Store,
    wake: Arc<Notify>,
    commands: mpsc::Sender<CommandRequest>,
    status: watch::Receiver<Status>,
    tap: Option<broadcast::Sender<UplinkTap>>,
    shutdown: CancellationToken,
) {
    if let Err(e) = validate(&settings) {
        tracing::error!(error = %e, "Uplink settings are invalid; nothing will be sent upstream.");
        return;
    }
    let (results_tx, results_rx) = mpsc::channel(16);
    let (remover, removed) = Remover::spawn(store.clone());
    let io = match IoThread::spawn() {
        Ok(io) => Some(io),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot start the MQTT I/O thread; the event loop shares the daemon's runtime.");
            None
        }
    };
    let mut uplink = Uplink {
        topics: Topics::new(&settings.topic_prefix, &settings.gateway_id),
        settings,
        store,
        wake,
        commands,
        status,
        status_open: true,
        tap,
        results_tx,
        results_rx,
        unsent_results: VecDeque::new(),
        remover,
        removed,
        removing: HashMap::new(),
        oversize_commands: 0,
        io,
    };
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut failures = 0u32;
    loop {
        match uplink.connection(&shutdown).await {
            Ended::Shutdown => {
                uplink.remover.finish().await;
                return;
            }
            Ended::Lost {
                reason,
                was_connected,
            } => {
                if was_connected {
                    backoff.reset();
                    failures = 0;
                    tracing::warn!(reason = %reason, "Uplink connection lost; events wait in the outbox.");
                    uplink.tap(UplinkTap::Disconnected { reason });
                } else {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(reason = %reason, attempts = failures, "Cannot connect upstream.");
                    } else {
                        tracing::debug!(reason = %reason, attempts = failures, "Cannot connect upstream.");
                    }
                }
            }
        }
        let delay = backoff.next_delay(options::entropy());
        tokio::select! {
            () = shutdown.cancelled() => {
                uplink.remover.finish().await;
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How a connection ended.
enum Ended {
    Shutdown,
    Lost { reason: String, was_connected: bool },
}

/// What woke the connection loop.
enum Step {
    Shutdown,
    /// A batch of the event loop's events, in order; empty when the event loop ended.
    Mqtt,
    /// Seqs the remover took out of the store.
    Removed(Option<Vec<Seq>>),
    Wake,
    Result(Option<CommandResult>),
    StatusChanged(bool),
    Tick,
}

/// State that outlives connections.
struct Uplink {
    settings: UplinkSettings,
    topics: Topics,
    store: Store,
    wake: Arc<Notify>,
    commands: mpsc::Sender<CommandRequest>,
    status: watch::Receiver<Status>,
    /// False once the status sender is gone (`changed()` would then return at once, forever).
    status_open: bool,
    tap: Option<broadcast::Sender<UplinkTap>>,
    results_tx: mpsc::Sender<CommandResult>,
    results_rx: mpsc::Receiver<CommandResult>,
    unsent_results: VecDeque<CommandResult>,
    /// Removes acknowledged events from the store, off this task.
    remover: Remover,
    removed: mpsc::UnboundedReceiver<Vec<Seq>>,
    /// Acknowledged events the remover has not yet taken out of the store: never published
    /// again, on any connection.
    removing: HashMap<Seq, EventKind>,
    /// Commands refused for their size since start (logged with each refusal).
    oversize_commands: u64,
    /// Where rumqttc's event loop runs (`None`: on the caller's runtime).
    io: Option<IoThread>,
}

/// State of one connection.
struct Link {
    client: AsyncClient,
    window: AckWindow,
    /// The next events to publish, in store order, none of them in the window: read from the
    /// store [`READ_AHEAD`] at a time so a refill does not rescan what is in flight.
    ahead: VecDeque<StoredEvent>,
    /// The store key of the last event the read-ahead read: the next read continues after it
    /// ([`Store::pending_stored_after`]) instead of decoding the window again. `None`: read
    /// from the head. Reset whenever an event before it may be waiting unread (the read-ahead
    /// was dropped, or an earlier lane holds events).
    cursor: Option<(Lane, Seq)>,
    /// The last read-ahead found nothing new: do not scan again before a wake or a tick (else
    /// the tail of a drain rescans everything in flight after every PUBACK).
    exhausted: bool,
    connected: bool,
    status_dirty: bool,
    last_status: Option<Instant>,
}

/// Aborts the event-loop task when the connection ends, whichever way.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Uplink {
    fn tap(&self, t: UplinkTap) {
        if let Some(tap) = &self.tap {
            // No receiver is fine: the tap is optional.
            let _ = tap.send(t);
        }
    }

    /// One connection, from the first attempt to its end.
    async fn connection(&mut self, shutdown: &CancellationToken) -> Ended {
        let options = match options::mqtt_options(&self.settings, &self.topics) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "Cannot build the MQTT connection.");
                return Ended::Lost {
                    reason: e.to_string(),
                    was_connected: false,
                };
            }
        };
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_S);
        eventloop.set_network_options(network);
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        // The event loop in its own task, on its own thread: nothing else runs there, so it
        // never waits on us (see `IoThread`).
        let poll = async move {
            loop {
                let polled = eventloop.poll().await;
                let failed = polled.is_err();
                if events_tx.send(polled).await.is_err() || failed {
                    break;
                }
            }
        };
        let poller = match &self.io {
            Some(io) => io.handle.spawn(poll),
            None => tokio::spawn(poll),
        };
        let _abort = AbortOnDrop(poller.abort_handle());
        let mut link = Link {
            client,
            window: AckWindow::new(EVENT_WINDOW),
            ahead: VecDeque::new(),
            cursor: None,
            exhausted: false,
            connected: false,
            status_dirty: true,
            last_status: None,
        };
        let ack_limit = self.settings.keep_alive * 3;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut batch = Vec::with_capacity(EVENT_BATCH);
        loop {
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => Step::Shutdown,
                // Before the MQTT events: during a drain they never run dry, and a fire
                // appended meanwhile must not wait behind them (one wake = one cheap check).
                () = self.wake.notified(), if link.connected => Step::Wake,
                _ = events_rx.recv_many(&mut batch, EVENT_BATCH) => Step::Mqtt,
                done = self.removed.recv() => Step::Removed(done),
                r = self.results_rx.recv() => Step::Result(r),
                changed = self.status.changed(), if self.status_open => Step::StatusChanged(changed.is_ok()),
                _ = tick.tick() => Step::Tick,
            };
            let lost = |reason: String, link: &Link| Ended::Lost {
                reason,
                was_connected: link.connected,
            };
            match step {
                Step::Shutdown => {
                    self.close(&mut link, &mut events_rx).await;
                    return Ended::Shutdown;
                }
                Step::Mqtt => {
                    if batch.is_empty() {
                        return lost("the event loop ended".to_owned(), &link);
                    }
                    for polled in batch.drain(..) {
                        let outcome = polled
                            .map_err(|e| e.to_string())
                            .and_then(|event| self.on_mqtt(&mut link, event));
                        if let Err(reason) = outcome {
                            return lost(reason, &link);
                        }
                    }
                }
                Step::Removed(Some(seqs)) => {
                    if self.remover.failed.swap(false, Ordering::SeqCst) {
                        // Send what is still in the store again (read from the head).
                        link.cursor = None;
                    }
                    for seq in seqs {
                        if let Some(kind) = self.removing.remove(&seq) {
                            self.tap(UplinkTap::Acked { seq, kind });
                        }
                    }
                    self.refill_if_worth_it(&mut link);
                    if self.removing.is_empty() && link.window.events_in_flight() == 0 {
                        // The backlog drained: let upstream see depth 0.
                        link.status_dirty = true;
                        self.maybe_publish_status(&mut link);
                    }
                }
                // Unreachable while `self` holds the remover's sender.
                Step::Removed(None) => {}
                Step::Wake => {
                    link.exhausted = false;
                    self.drop_stale_read_ahead(&mut link);
                    self.refill(&mut link);
                }
                Step::Result(Some(result)) => {
                    self.unsent_results.push_back(result);
                    self.publish_results(&mut link);
                }
                // Unreachable while `self` holds `results_tx`; nothing to do.
                Step::Result(None) => {}
                Step::StatusChanged(open) => {
                    self.status_open = open;
                    link.status_dirty |= open;
                    self.maybe_publish_status(&mut link);
                }
                Step::Tick => {
                    if let Some(waited) = link.window.oldest_wait(Instant::now()) {
                        if waited > ack_limit {
                            return lost(format!("no PUBACK for {waited:?}"), &link);
                        }
                    }
                    self.publish_results(&mut link);
                    self.maybe_publish_status(&mut link);
                    link.exhausted = false;
                    self.drop_stale_read_ahead(&mut link);
                    self.refill(&mut link);
                }
            }
        }
    }

    /// One event of the event loop. `Err` ends the connection.
    fn on_mqtt(&mut self, link: &mut Link, event: rumqttc::Event) -> Result<(), String> {
        match event {
            rumqttc::Event::Incoming(Packet::ConnAck(_)) => {
                link.connected = true;
                tracing::info!(url = %self.settings.url, "Connected upstream.");
                link.client
                    .try_subscribe(self.topics.commands_filter(), QoS::AtLeastOnce)
                    .map_err(|e| format!("cannot subscribe to commands: {e}"))?;
                link.status_dirty = true;
                self.maybe_publish_status(link);
                self.publish_results(link);
                self.refill(link);
            }
            rumqttc::Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::warn!(
                        "The broker refused the command subscription; commands will not arrive."
                    );
                }
                self.tap(UplinkTap::Connected);
            }
            rumqttc::Event::Incoming(Packet::PubAck(ack)) => {
                let Some(tag) = link.window.on_puback(ack.pkid) else {
                    return Ok(());
                };
                if tag == Tag::Other {
                    return Ok(());
                }
                for (seq, kind) in tag.events() {
                    self.removing.insert(seq, kind);
                    if !self.remover.remove(kind.lane(), seq) {
                        // What the dead thread held will never be reported: forget it, or its
                        // slots stay taken. Those events are still in the store (or gone), so
                        // at worst they are sent again: duplicates, never a loss.
                        self.removing.clear();
                    }
                }
                self.refill_if_worth_it(link);
            }
            rumqttc::Event::Incoming(Packet::Publish(publish)) => {
                self.on_command(link, &publish.topic, &publish.payload);
            }
            rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => {
                link.window
                    .on_publish_sent(pkid)
                    .map_err(|e| e.to_string())?;
            }
            rumqttc::Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                tracing::debug!(pkid, "Packet id collision; rumqttc holds the publish.");
                link.window.on_collision(pkid).map_err(|e| e.to_string())?;
            }
            rumqttc::Event::Incoming(_) | rumqttc::Event::Outgoing(_) => {}
        }
        Ok(())
    }

    /// Slots for new events: the window minus the acknowledged events still being removed (so
    /// the remover's queue is bounded by the window, and the store holds every event published
    /// but not yet removed).
    fn free_slots(&self, link: &Link) -> usize {
        link.window.free_slots().saturating_sub(self.removing.len())
    }

    /// Refills once [`REFILL_BATCH`] slots are free, or when nothing is in flight.
    fn refill_if_worth_it(&mut self, link: &mut Link) {
        if self.free_slots(link) >= REFILL_BATCH
            || link.window.events_in_flight() + self.removing.len() == 0
        {
            self.refill(link);
        }
    }

    /// Tops the window up, in store order, from the read-ahead (reading the next events from the
    /// store when it is empty).
    fn refill(&mut self, link: &mut Link) {
        if !link.connected {
            return;
        }
        loop {
            let free = self.free_slots(link);
            if free == 0 || (link.ahead.is_empty() && !self.read_ahead(link)) {
                break;
            }
            // Access or routine events of one lane at the head of the read-ahead: one batch,
            // in seq order.
            let head_lane = link.ahead.front().map(|e| e.kind.lane());
            let batchable = link
                .ahead
                .iter()
                .take(self.settings.batch_events.min(free))
                .take_while(|e| Some(e.kind.lane()) == head_lane && head_lane != Some(Lane::Urgent))
                .count();
            let published = if batchable > 1 {
                self.publish_batch(link, batchable)
            } else {
                self.publish_event(link)
            };
            if !published {
                // The request channel is full: the next ack or tick tries again.
                break;
            }
        }
    }

    /// Fills the empty read-ahead with the next [`READ_AHEAD`] events not in flight, in store
    /// order. False if there are none (or the store cannot be read).
    fn read_ahead(&self, link: &mut Link) -> bool {
        if link.exhausted {
            return false;
        }
        // The cursor skips only events of its lane and later ones: if an earlier lane holds
        // anything (a fire during an access drain, or its own events still in flight), read
        // from the head. The counters are in memory: no disk access.
        if let Some((lane, _)) = link.cursor {
            if LANES_IN_ORDER
                .iter()
                .any(|l| *l < lane && self.store.lane_depth(*l) > 0)
            {
                link.cursor = None;
            }
        }
        // From the head, at most `in flight + removing` of the first `in flight + removing +
        // READ_AHEAD` events are in the window or on their way out. After the cursor, all events
        // up to it were read already (in the window, removing, or gone).
        let limit = match link.cursor {
            Some(_) => READ_AHEAD,
            None => link.window.events_in_flight() + self.removing.len() + READ_AHEAD,
        };
        match self.store.pending_stored_after(link.cursor, limit) {
            Ok(pending) => {
                if let Some(event) = pending.last() {
                    link.cursor = Some((event.kind.lane(), event.seq));
                }
                link.ahead.extend(pending.into_iter().filter(|e| {
                    !link.window.contains(e.seq) && !self.removing.contains_key(&e.seq)
                }));
            }
            Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
        }
        link.exhausted = link.ahead.is_empty();
        !link.exhausted
    }

    /// Empties the read-ahead if the store now holds an event of a lane that drains before the
    /// read-ahead's next one (a fire raised during the drain of an access backlog), so the
    /// next refill publishes that event before the rest of the backlog.
    ///
    /// Cheap while the backlog and the window are of one lane: the store scan stops after the
    /// higher lanes' in-flight events plus one.
    fn drop_stale_read_ahead(&self, link: &mut Link) {
        let Some(next_lane) = link.ahead.front().map(|e| e.kind.lane()) else {
            return;
        };
        // The usual case during a drain: nothing waits in an earlier lane (in-memory counters).
        if LANES_IN_ORDER
            .iter()
            .all(|l| *l >= next_lane || self.store.lane_depth(*l) == 0)
        {
            return;
        }
        // Acknowledged events not yet removed may be of any lane: count them all.
        let before = link.window.events_in_lanes_before(next_lane) + self.removing.len();
        match self.store.pending_stored_after(None, before + 1) {
            Ok(head) => {
                let jumps_the_queue = head.iter().any(|e| {
                    e.kind.lane() < next_lane
                        && !link.window.contains(e.seq)
                        && !self.removing.contains_key(&e.seq)
                });
                if jumps_the_queue {
                    link.ahead.clear();
                    link.cursor = None;
                }
            }
            Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
        }
    }

    /// Publishes the head of the read-ahead on its type's topic. False if it stays there (the
    /// request channel is full).
    fn publish_event(&self, link: &mut Link) -> bool {
        let Some(event) = link.ahead.front() else {
            return false;
        };
        let (seq, kind) = (event.seq, event.kind);
        let mut payload = Vec::with_capacity(512);
        if let Err(e) = write_envelope(&mut payload, event, &self.settings) {
            // Not expected (plain data); the event stays in the store.
            tracing::error!(seq = seq.0, error = %e, "Cannot encode an event.");
            return false;
        }
        match link
            .client
            .try_publish(self.topics.event(kind), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                link.ahead.pop_front();
                link.window.queued(Tag::Event { seq, kind }, Instant::now());
                true
            }
            Err(e) => {
                tracing::debug!(seq = seq.0, error = %e, "Publish deferred.");
                false
            }
        }
    }

    /// Publishes up to `n` events from the head of the read-ahead as one CloudEvents batch (a
    /// JSON array of the envelopes, `application/cloudevents-batch+json`) on
    /// `<prefix>/<gw>/events`, at most [`BATCH_MAX_BYTES`] of payload. False if they stay in
    /// the read-ahead (the request channel is full).
    fn publish_batch(&self, link: &mut Link, n: usize) -> bool {
        let mut payload = Vec::with_capacity(n * 512);
        let mut taken = 0;
        payload.push(b'[');
        for event in link.ahead.iter().take(n) {
            let mark = payload.len();
            if taken > 0 {
                payload.push(b',');
            }
            if let Err(e) = write_envelope(&mut payload, event, &self.settings) {
                tracing::error!(seq = event.seq.0, error = %e, "Cannot encode an event.");
                payload.truncate(mark);
                break;
            }
            if taken > 0 && payload.len() + 1 > BATCH_MAX_BYTES {
                payload.truncate(mark);
                break;
            }
            taken += 1;
        }
        if taken <= 1 {
            // The first event alone fills the batch: it goes on its type's topic.
            return self.publish_event(link);
        }
        payload.push(b']');
        match link
            .client
            .try_publish(self.topics.events(), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                let events: Arc<[(Seq, EventKind)]> =
                    link.ahead.drain(..taken).map(|e| (e.seq, e.kind)).collect();
                link.window.queued(Tag::Batch(events), Instant::now());
                true
            }
            Err(e) => {
                tracing::debug!(events = taken, error = %e, "Publish deferred.");
                false
            }
        }
    }

    /// Publishes the status if it changed and the last one is at least a second old.
    fn maybe_publish_status(&mut self, link: &mut Link) {
        let due = link
            .last_status
            .is_none_or(|t| t.elapsed() >= STATUS_MIN_INTERVAL);
        if link.connected && link.status_dirty && due && self.publish_status(link, true) {
            link.status_dirty = false;
        }
    }

    fn publish_status(&self, link: &mut Link, online: bool) -> bool {
        let mut status = self.status.borrow().clone();
        status.online = online;
        if status.version.is_empty() {
            env!("CARGO_PKG_VERSION").clone_into(&mut status.version);
        }
        match self.store.stats() {
            Ok(stats) => {
                status.outbox_depth = stats.depth;
                status.oldest_pending_age_s = stats.oldest.map(|t| {
                    SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default()
                        .as_secs()
                });
            }
            Err(e) => tracing::warn!(error = %e, "Cannot read the outbox figures for the status."),
        }
        let payload = match serde_json::to_vec(&status) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "Cannot encode the status.");
                return false;
            }
        };
        let sent = link
            .client
            .try_publish(self.topics.status(), QoS::AtLeastOnce, true, payload)
            .is_ok();
        if sent {
            link.window.queued(Tag::Other, Instant::now());
            link.last_status = Some(Instant::now());
        }
        sent
    }

    /// A message on `<prefix>/<gw>/cmd/<name>`.
    fn on_command(&mut self, link: &mut Link, topic: &str, payload: &[u8]) {
        let Some(name) = self.topics.command_name(topic) else {
            tracing::debug!(topic, "Ignored a message outside the command topics.");
            return;
        };
        if payload.len() > MAX_COMMAND_BYTES {
            self.oversize_commands += 1;
            // Only the id, if it is there: the rest is skipped without being built.
            #[derive(serde::Deserialize)]
            struct IdOnly {
                id: String,
            }
            let id = serde_json::from_slice::<IdOnly>(payload).ok().map(|c| c.id);
            let error = format!(
                "the command payload is {} bytes, over the limit of {MAX_COMMAND_BYTES} bytes",
                payload.len()
            );
            tracing::warn!(command = name, id = ?id, bytes = payload.len(), oversize_commands = self.oversize_commands, "Refused an oversize command.");
            self.tap(UplinkTap::CommandReceived {
                name: name.to_owned(),
                id: id.clone(),
                error: Some(error.clone()),
            });
            self.unsent_results.push_back(CommandResult {
                id,
                outcome: Err(error),
                refresh_status: false,
            });
            self.publish_results(link);
            return;
        }
        match Command::parse(name, payload) {
            Ok(command) => {
                tracing::info!(command = name, id = %command.id, "Command received.");
                self.tap(UplinkTap::CommandReceived {
                    name: name.to_owned(),
                    id: Some(command.id.clone()),
                    error: None,
                });
                let commands = self.commands.clone();
                let results = self.results_tx.clone();
                // Waiting for the daemon must not hold up the connection loop.
                tokio::spawn(async move {
                    let id = command.id.clone();
                    let refresh_status = command.kind == CommandKind::Status;
                    let outcome = ask_daemon(&commands, command).await;
                    let _ = results
                        .send(CommandResult {
                            id: Some(id),
                            outcome,
                            refresh_status,
                        })
                        .await;
                });
            }
            Err((id, e)) => {
                tracing::warn!(command = name, id = ?id, error = %e, "Refused a command.");
                self.tap(UplinkTap::CommandReceived {
                    name: name.to_owned(),
                    id: id.clone(),
                    error: Some(e.to_string()),
                });
                self.unsent_results.push_back(CommandResult {
                    id,
                    outcome: Err(e.to_string()),
                    refresh_status: false,
                });
                self.publish_results(link);
            }
        }
    }

    /// Publishes waiting command results, oldest first, while the client takes them.
    fn publish_results(&mut self, link: &mut Link) {
        while link.connected {
            let Some(result) = self.unsent_results.front() else {
                break;
            };
            let topic = self.topics.command_result();
            if link
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, result.payload())
                .is_err()
            {
                break;
            }
            link.window.queued(Tag::Other, Instant::now());
            if result.refresh_status {
                link.status_dirty = true;
            }
            self.unsent_results.pop_front();
        }
        self.maybe_publish_status(link);
    }

    /// Clean end: offline status (retained), DISCONNECT, and a short wait for both to leave.
    async fn close(
        &self,
        link: &mut Link,
        events: &mut mpsc::Receiver<Result<rumqttc::Event, ConnectionError>>,
    ) {
        if !link.connected {
            return;
        }
        self.publish_status(link, false);
        if link.client.try_disconnect().is_err() {
            return;
        }
        let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(ev) = events.recv().await {
                if matches!(
                    ev,
                    Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) | Err(_)
                ) {
                    break;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("The DISCONNECT did not leave in time; closing anyway.");
        }
        tracing::info!("Uplink closed.");
    }
}

/// The CloudEvents envelope of [`crate::event::Event::to_cloudevent`] (the contract, DESIGN
/// §3), serialized straight to bytes around the stored `data` object, which is copied
/// verbatim: building the `serde_json::Value` first cost about a quarter of the uplink's CPU
/// per event during a drain, and decoding `data` only to encode it again about as much.
/// Equal as JSON to `to_cloudevent` of the stored event (tested); the key order may differ,
/// which JSON does not care about.
fn write_envelope(
    out: &mut Vec<u8>,
    event: &StoredEvent,
    settings: &UplinkSettings,
) -> serde_json::Result<()> {
    let seq = event.seq;
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        specversion: &'static str,
        id: String,
        source: String,
        #[serde(rename = "type")]
        kind: &'static str,
        time: String,
        datacontenttype: &'static str,
        seq: u64,
        data: &'a serde_json::value::RawValue,
    }
    serde_json::to_writer(
        out,
        &Envelope {
            specversion: "1.0",
            id: format!("{}-{}", settings.gateway_id, seq.0),
            source: format!("/{}/{}", settings.topic_prefix, settings.gateway_id),
            kind: event.kind.as_str(),
            time: humantime::format_rfc3339_millis(event.time).to_string(),
            datacontenttype: "application/json",
            seq: seq.0,
            data: &event.data,
        },
    )
}

/// A thread with a current-thread runtime of its own (`mqtt-io`), where rumqttc's event loop
/// runs, as a plain publisher's event loop runs on a thread of its own. On the daemon's
/// multi-thread runtime, the event-loop task and the connection loop wake each other on every
/// publish and every PUBACK, and tokio puts a woken task in the waker's LIFO slot, which the
/// other worker cannot steal, so the two tend to run by turns on one worker (a `perf` profile
/// of a drain showed both workers together at 0.57 of 2 cores, nothing saturated). Measured
/// with `examples/drain_rate.rs` against mosquitto, 2 × 5 rounds each, alternating: 60-81k
/// events/s and median ratios 0.65 and 0.71, against 55-68k and 0.56 and 0.62 without it.
/// Dropping it ends the runtime, on its thread, and with it any event loop still there.
#[derive(Debug)]
struct IoThread {
    handle: tokio::runtime::Handle,
    /// Dropped with `self`: the thread's `block_on` returns and the runtime shuts down.
    _stop: oneshot::Sender<()>,
}

impl IoThread {
    fn spawn() -> std::io::Result<IoThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("mqtt-io".to_owned())
            .spawn(move || {
                // Ends when the sender is dropped; the runtime is then dropped here, outside
                // any async context.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(IoThread {
            handle,
            _stop: stop,
        })
    }
}

/// A thread that removes acknowledged events from the store, so the connection loop never
/// blocks on sled (a remove costs 4-9 µs of CPU on x86, measured with `examples/drain_rate.rs`,
/// more on an SD card, and a drain does one per event). Seqs go in one by one; the removed ones
/// come back in batches, in order.
#[derive(Debug)]
struct Remover {
    /// `None` if the thread could not be started: then removal happens inline.
    tx: Option<std::sync::mpsc::Sender<(Lane, Seq)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    store: Store,
    /// For the inline fallback: where removed seqs are reported.
    done: mpsc::UnboundedSender<Vec<Seq>>,
    /// Set when a removal failed: those events are still in the store, behind the read-ahead's
    /// cursor, so the next read-ahead must start from the head to send them again.
    failed: Arc<AtomicBool>,
}

impl Remover {
    fn spawn(store: Store) -> (Remover, mpsc::UnboundedReceiver<Vec<Seq>>) {
        let (tx, rx) = std::sync::mpsc::channel::<(Lane, Seq)>();
        let (done, removed) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        let worker = {
            let store = store.clone();
            let done = done.clone();
            let failed = Arc::clone(&failed);
            move || {
                while let Ok(first) = rx.recv() {
                    let batch: Vec<(Lane, Seq)> = std::iter::once(first)
                        .chain(rx.try_iter().take(255))
                        .collect();
                    if !remove_acknowledged(&store, &batch) {
                        failed.store(true, Ordering::SeqCst);
                    }
                    // The uplink may be gone (shutting down): keep removing what is queued.
                    let _ = done.send(batch.into_iter().map(|(_, seq)| seq).collect());
                }
            }
        };
        let (tx, thread) = match std::thread::Builder::new()
            .name("outbox-remover".to_owned())
            .spawn(worker)
        {
            Ok(thread) => (Some(tx), Some(thread)),
            Err(e) => {
                tracing::error!(error = %e, "Cannot start the outbox remover thread; removing inline.");
                (None, None)
            }
        };
        let remover = Remover {
            tx,
            thread,
            store,
            done,
            failed,
        };
        (remover, removed)
    }

    /// Removes `seq` from the store (soon, on the remover thread). False if the thread turned
    /// out to be gone: `seq` was removed inline, but what it had queued may never be reported.
    fn remove(&mut self, lane: Lane, seq: Seq) -> bool {
        let mut thread_alive = true;
        if let Some(tx) = &self.tx {
            if tx.send((lane, seq)).is_ok() {
                return true;
            }
            tracing::error!("The outbox remover thread stopped; removing inline.");
            self.tx = None;
            thread_alive = false;
        }
        if !remove_acknowledged(&self.store, &[(lane, seq)]) {
            self.failed.store(true, Ordering::SeqCst);
        }
        let _ = self.done.send(vec![seq]);
        thread_alive
    }

    /// Waits until everything queued is removed, then stops the thread.
    async fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!(
                    "The outbox remover thread failed; acknowledged events may be sent again."
                );
            }
        }
    }
}

/// Removes acknowledged events, their lanes known (no lookups in the other lanes). False if
/// the store failed (then some may still be there).
fn remove_acknowledged(store: &Store, acked: &[(Lane, Seq)]) -> bool {
    match store.remove_acked(acked) {
        Ok(()) => true,
        Err(e) => {
            // They stay in the store and are sent again later: duplicates, not a loss.
            tracing::error!(events = acked.len(), error = %e, "Cannot remove acknowledged events from the outbox.");
            false
        }
    }
}

/// Hands `command` to the daemon and waits (bounded) for its answer.
async fn ask_daemon(
    commands: &mpsc::Sender<CommandRequest>,
    command: Command,
) -> Result<(), String> {
    let (reply, answer) = oneshot::channel();
    if commands
        .send(CommandRequest { command, reply })
        .await
        .is_err()
    {
        return Err("the gateway is not taking commands (shutting down)".to_owned());
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err("the gateway dropped the command".to_owned()),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

#[cfg(all(test, feature = "embedded-broker"))]
mod tests;
