//! The uplink: forwards the outbox upstream over MQTT 3.1.1 (rumqttc), takes commands in,
//! publishes the gateway's status with a last will.
//!
//! Owns the MQTT connection and nothing else; the store stays the only source of truth.
//!
//! - **Events**: `<prefix>/<gw>/event/<type>`, QoS 1, not retained, payload
//!   [`Event::to_cloudevent`]. An event leaves the store only after its PUBACK.
//! - **Ack correlation**: rumqttc never returns a publish's packet id. One task hands publishes to
//!   the client (`try_publish`), so `Outgoing::Publish(pkid)` events arrive in that order; each
//!   takes the oldest queued seq, and `Incoming::PubAck(pkid)` then names the seq to remove. The
//!   pure state machine is in `window.rs`; at most [`EVENT_WINDOW`] events are in flight, so
//!   publishes pipeline while the refill (from [`Store::pending`], skipping seqs in flight) stays
//!   cheap.
//! - **Reconnects**: rumqttc drops queued and in-flight QoS 1 publishes when a connection ends
//!   (CRATES.md). So every connection gets a fresh `AsyncClient` + `EventLoop`, a clean session and
//!   an empty window, and sends everything pending from the store again, in order. Duplicates are
//!   fine upstream (`id` is the de-duplication key); gaps would not be. After a failure: backoff
//!   200 ms doubling to 30 s, with jitter. A publish unacknowledged for 3 × keep-alive drops the
//!   connection (rumqttc's collision stash can livelock).
//! - **No await on the client where the event loop is polled**: the event loop runs in its own
//!   task and forwards its events over a channel; the main task only uses `try_*` calls.
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
//! Not done here: batching events (`application/cloudevents-batch+json`), MQTT 5, persistence of
//! command results.

mod options;
mod window;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, ConnectionError, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use self::options::{Backoff, Topics};
use self::window::{AckWindow, Tag};
use crate::event::{Command, CommandKind, Event, EventKind, Seq, Status};
use crate::store::Store;

/// Events in flight at most (handed to the client, PUBACK pending). The drain rate of a backlog
/// is at most this many events per round trip: 1000 over a 100 ms RTT bounds it at 10 000
/// events/s (the target is 5 000/s, issue 5); on a Pi it costs about 0.5 MB of payloads.
pub const EVENT_WINDOW: usize = 1000;
/// Refill after a PUBACK only once this many slots are free (or the window is empty): fewer
/// wake-ups of the refill during a backlog, while the pipe stays almost full.
const REFILL_BATCH: usize = 50;
/// Events read from the store per read-ahead (beyond those in flight, which the store scan
/// returns again and the read-ahead skips): each event is decoded about twice per drain.
const READ_AHEAD: usize = EVENT_WINDOW;
/// rumqttc request channel capacity: the window plus status and command results.
const REQUEST_CHANNEL_CAPACITY: usize = EVENT_WINDOW + 64;
/// First reconnect delay and its cap.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Housekeeping period: overdue acks, rate-limited status, retries after a full channel.
const TICK: Duration = Duration::from_millis(500);
/// Status publishes at most this often.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
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
    };
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut failures = 0u32;
    loop {
        match uplink.connection(&shutdown).await {
            Ended::Shutdown => return,
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
            () = shutdown.cancelled() => return,
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
    Mqtt(Option<Result<rumqttc::Event, ConnectionError>>),
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
}

/// State of one connection.
struct Link {
    client: AsyncClient,
    window: AckWindow,
    /// The next events to publish, in store order, none of them in the window: read from the
    /// store [`READ_AHEAD`] at a time so a refill does not rescan what is in flight.
    ahead: VecDeque<(Seq, Event)>,
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
        let (events_tx, mut events_rx) = mpsc::channel(64);
        // The event loop in its own task: nothing else runs there, so it never waits on us.
        let poller = tokio::spawn(async move {
            loop {
                let polled = eventloop.poll().await;
                let failed = polled.is_err();
                if events_tx.send(polled).await.is_err() || failed {
                    break;
                }
            }
        });
        let _abort = AbortOnDrop(poller.abort_handle());
        let mut link = Link {
            client,
            window: AckWindow::new(EVENT_WINDOW),
            ahead: VecDeque::new(),
            connected: false,
            status_dirty: true,
            last_status: None,
        };
        let ack_limit = self.settings.keep_alive * 3;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => Step::Shutdown,
                // Before the MQTT events: during a drain they never run dry, and a fire
                // appended meanwhile must not wait behind them (one wake = one cheap check).
                () = self.wake.notified(), if link.connected => Step::Wake,
                ev = events_rx.recv() => Step::Mqtt(ev),
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
                Step::Mqtt(None) => return lost("the event loop ended".to_owned(), &link),
                Step::Mqtt(Some(Err(e))) => return lost(e.to_string(), &link),
                Step::Mqtt(Some(Ok(event))) => {
                    if let Err(reason) = self.on_mqtt(&mut link, event) {
                        return lost(reason, &link);
                    }
                }
                Step::Wake => {
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
                if let Some(Tag::Event { seq, kind }) = link.window.on_puback(ack.pkid) {
                    if let Err(e) = self.store.remove(seq) {
                        // It stays in the store and is sent again later: a duplicate, not a loss.
                        tracing::error!(seq = seq.0, error = %e, "Cannot remove an acknowledged event from the outbox.");
                    }
                    self.tap(UplinkTap::Acked { seq, kind });
                    if link.window.free_slots() >= REFILL_BATCH
                        || link.window.events_in_flight() == 0
                    {
                        self.refill(link);
                        if link.window.events_in_flight() == 0 {
                            // The backlog drained: let upstream see depth 0.
                            link.status_dirty = true;
                            self.maybe_publish_status(link);
                        }
                    }
                }
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

    /// Tops the window up, in store order, from the read-ahead (reading the next events from the
    /// store when it is empty).
    fn refill(&mut self, link: &mut Link) {
        if !link.connected {
            return;
        }
        while link.window.free_slots() > 0 {
            let Some((seq, event)) = link.ahead.pop_front() else {
                if self.read_ahead(link) {
                    continue;
                }
                break;
            };
            if !self.publish_event(link, seq, &event) {
                // The request channel is full: the next ack or tick tries again.
                link.ahead.push_front((seq, event));
                break;
            }
        }
    }

    /// Fills the empty read-ahead with the next [`READ_AHEAD`] events not in flight, in store
    /// order. False if there are none (or the store cannot be read).
    fn read_ahead(&self, link: &mut Link) -> bool {
        // At most `in flight` of the first `in flight + READ_AHEAD` events are in the window.
        let limit = link.window.events_in_flight() + READ_AHEAD;
        match self.store.pending(limit) {
            Ok(pending) => link.ahead.extend(
                pending
                    .into_iter()
                    .filter(|(seq, _)| !link.window.contains(*seq)),
            ),
            Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
        }
        !link.ahead.is_empty()
    }

    /// Empties the read-ahead if the store now holds an event of a lane that drains before the
    /// read-ahead's next one (a fire raised during the drain of an access backlog), so the
    /// next refill publishes that event before the rest of the backlog.
    ///
    /// Cheap while the backlog and the window are of one lane: the store scan stops after the
    /// higher lanes' in-flight events plus one.
    fn drop_stale_read_ahead(&self, link: &mut Link) {
        let Some(next_lane) = link.ahead.front().map(|(_, e)| e.kind.lane()) else {
            return;
        };
        let before = link.window.events_in_lanes_before(next_lane);
        match self.store.pending(before + 1) {
            Ok(head) => {
                let jumps_the_queue = head
                    .iter()
                    .any(|(seq, e)| e.kind.lane() < next_lane && !link.window.contains(*seq));
                if jumps_the_queue {
                    link.ahead.clear();
                }
            }
            Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
        }
    }

    fn publish_event(&self, link: &mut Link, seq: Seq, event: &Event) -> bool {
        let envelope =
            event.to_cloudevent(seq, &self.settings.gateway_id, &self.settings.topic_prefix);
        let payload = envelope.to_string().into_bytes();
        match link.client.try_publish(
            self.topics.event(event.kind),
            QoS::AtLeastOnce,
            false,
            payload,
        ) {
            Ok(()) => {
                link.window.queued(
                    Tag::Event {
                        seq,
                        kind: event.kind,
                    },
                    Instant::now(),
                );
                true
            }
            Err(e) => {
                tracing::debug!(seq = seq.0, error = %e, "Publish deferred.");
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
