//! The uplink against the embedded broker: events, acks, commands, status, late broker.

use std::time::UNIX_EPOCH;

use rumqttc::{MqttOptions, Publish};
use tokio::task::JoinHandle;

use super::*;
use crate::broker;
use crate::event::{Event, EventData};

/// Every test ends well within this; a hang fails instead of blocking the suite.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn settings(port: u16) -> UplinkSettings {
    UplinkSettings {
        url: format!("mqtt://127.0.0.1:{port}"),
        client_id: "vgw-yian".to_owned(),
        gateway_id: "yian".to_owned(),
        topic_prefix: "village".to_owned(),
        keep_alive: Duration::from_secs(5),
        username: None,
        password: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        batch_events: DEFAULT_BATCH_EVENTS,
    }
}

fn event(kind: EventKind, ms: u64) -> Event {
    Event::new(
        kind,
        UNIX_EPOCH + Duration::from_millis(ms),
        EventData::default(),
    )
}

/// A running uplink and the ends of its channels.
struct Running {
    tap: broadcast::Receiver<UplinkTap>,
    commands: mpsc::Receiver<CommandRequest>,
    _status: watch::Sender<Status>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn spawn_uplink(settings: UplinkSettings, store: Store) -> Running {
    let (tap_tx, tap) = broadcast::channel(1024);
    let (commands_tx, commands) = mpsc::channel(8);
    let (status_tx, status_rx) = watch::channel(Status::default());
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        settings,
        store,
        wake.clone(),
        commands_tx,
        status_rx,
        Some(tap_tx),
        shutdown.clone(),
    ));
    Running {
        tap,
        commands,
        _status: status_tx,
        wake,
        shutdown,
        task,
    }
}

/// A test client subscribed (SUBACK received) to `filters`; publishes arrive on the receiver.
async fn subscriber(
    port: u16,
    id: &str,
    filters: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<Publish>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    // Batches are up to 64 KiB; rumqttc's default limit is 10 KiB.
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let mut subacks = 0;
    while subacks < filters.len() {
        if let rumqttc::Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            subacks += 1;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(Packet::Publish(p)) = ev {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    (client, rx)
}

async fn next_on(rx: &mut mpsc::UnboundedReceiver<Publish>, topic: &str) -> serde_json::Value {
    loop {
        let p = rx.recv().await.unwrap();
        if p.topic == topic {
            return serde_json::from_slice(&p.payload).unwrap();
        }
    }
}

/// A test client subscribed to both event topics: `event/#` (one event per publish) and
/// `events` (batches).
async fn events_subscriber(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<Publish>) {
    subscriber(
        port,
        "upstream",
        &["village/yian/event/#", "village/yian/events"],
    )
    .await
}

/// The CloudEvents of one publish, checked against the topic contract: one event on
/// `event/<its type>`, or a batch (a JSON array of at least two, of one lane but never fire
/// or fault, in seq order) on `events`.
fn cloudevents(p: &Publish) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    if p.topic == "village/yian/events" {
        let batch = v.as_array().expect("a batch is a JSON array").clone();
        assert!(batch.len() >= 2, "a batch of {}", batch.len());
        let lane = |e: &serde_json::Value| {
            serde_json::from_value::<EventKind>(e["type"].clone())
                .unwrap()
                .lane()
        };
        for pair in batch.windows(2) {
            assert_eq!(lane(&pair[0]), lane(&pair[1]), "one lane per batch");
            assert!(
                pair[0]["seq"].as_u64() < pair[1]["seq"].as_u64(),
                "seq order"
            );
        }
        assert_ne!(
            lane(&batch[0]),
            Lane::Urgent,
            "fire or fault events in a batch"
        );
        batch
    } else {
        assert_eq!(
            p.topic,
            format!("village/yian/event/{}", v["type"].as_str().unwrap())
        );
        vec![v]
    }
}

/// Waits for `n` acknowledged events, checks the store is empty, then stops the uplink.
async fn drain_and_stop(mut up: Running, store: &Store, n: usize) {
    let mut acked = 0;
    while acked < n {
        if let UplinkTap::Acked { .. } = up.tap.recv().await.unwrap() {
            acked += 1;
        }
    }
    assert_eq!(store.stats().unwrap().depth, 0);
    up.shutdown.cancel();
    up.task.await.unwrap();
}

async fn wait_for_tap(tap: &mut broadcast::Receiver<UplinkTap>, want: impl Fn(&UplinkTap) -> bool) {
    loop {
        if want(&tap.recv().await.unwrap()) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batches_off_fifty_events_arrive_one_per_publish_in_seq_order_and_leave_after_their_pubacks(
) {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..50 {
            store.append(&event(EventKind::AccessGranted, i)).unwrap();
        }
        let (_client, mut events) =
            subscriber(broker.port(), "upstream", &["village/yian/event/#"]).await;
        let one_per_publish = UplinkSettings {
            batch_events: 1,
            ..settings(broker.port())
        };
        let mut up = spawn_uplink(one_per_publish, store.clone());

        let mut ids = Vec::new();
        while ids.len() < 50 {
            let p = events.recv().await.unwrap();
            assert_eq!(p.topic, "village/yian/event/access.granted");
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        let want: Vec<String> = (1..=50).map(|s| format!("yian-{s}")).collect();
        assert_eq!(ids, want);

        let mut acked = Vec::new();
        while acked.len() < 50 {
            if let UplinkTap::Acked { seq, .. } = up.tap.recv().await.unwrap() {
                acked.push(seq.0);
            }
        }
        assert_eq!(store.stats().unwrap().depth, 0);

        // A new event after a wake goes out too.
        let seq = store.append(&event(EventKind::FireAlarm, 99)).unwrap();
        up.wake.notify_one();
        wait_for_tap(
            &mut up.tap,
            |t| matches!(t, UplinkTap::Acked { seq: s, .. } if *s == seq),
        )
        .await;
        assert_eq!(store.stats().unwrap().depth, 0);

        up.shutdown.cancel();
        up.task.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_goes_up_in_batches_in_seq_order_with_fire_and_fault_events_one_per_publish() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut lanes: [Vec<u64>; 3] = Default::default();
        for i in 0..500 {
            let kind = match i % 50 {
                7 => EventKind::FireAlarm,
                8 => EventKind::DeviceFault,
                9 => EventKind::GatewayStarted,
                _ => EventKind::AccessGranted,
            };
            let seq = store.append(&event(kind, i)).unwrap();
            lanes[kind.lane() as usize].push(seq.0);
        }
        store.flush().unwrap();
        let (_client, mut upstream) = events_subscriber(broker.port()).await;
        let up = spawn_uplink(
            UplinkSettings {
                batch_events: 64,
                ..settings(broker.port())
            },
            store.clone(),
        );

        let mut received = Vec::new();
        let mut batches = Vec::new();
        while received.len() < 500 {
            let p = upstream.recv().await.unwrap();
            let events = cloudevents(&p);
            if p.topic.ends_with("/events") {
                batches.push(events.len());
            }
            for v in events {
                // Each element is a whole envelope of the contract.
                assert_eq!(v["id"], format!("yian-{}", v["seq"]));
                assert_eq!(v["specversion"], "1.0");
                received.push(v["seq"].as_u64().unwrap());
            }
        }
        // Lane 0 one per publish first, then lanes 1 and 2 in batches, each in seq order.
        assert_eq!(received, lanes.concat());
        assert!(batches.iter().all(|n| *n <= 64), "batches {batches:?}");
        let batched: usize = batches.iter().sum();
        assert_eq!(
            batched,
            lanes[1].len() + lanes[2].len(),
            "batches {batches:?}"
        );
        // 480 events in batches of at most 64: 8, or a few more if a refill split one.
        assert!(
            batches.len() <= 10,
            "{} batches for {batched} events",
            batches.len()
        );

        // Each event of a batch leaves the store after the batch's PUBACK.
        drain_and_stop(up, &store, 500).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_big_for_a_batch_goes_alone_on_its_type_topic() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut big = event(EventKind::AccessGranted, 1);
        big.data.extra.insert(
            "note".into(),
            serde_json::json!("x".repeat(BATCH_MAX_BYTES + 1000)),
        );
        for e in [&big, &event(EventKind::AccessGranted, 2)] {
            store.append(e).unwrap();
        }
        store.flush().unwrap();
        let (_client, mut upstream) = events_subscriber(broker.port()).await;
        let up = spawn_uplink(settings(broker.port()), store.clone());
        for want_seq in [1, 2] {
            let p = upstream.recv().await.unwrap();
            assert_eq!(p.topic, "village/yian/event/access.granted");
            let events = cloudevents(&p);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0]["seq"], want_seq);
        }
        drain_and_stop(up, &store, 2).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_daemon_and_every_command_gets_a_result() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (client, mut upstream) = subscriber(
            broker.port(),
            "upstream",
            &["village/yian/cmd-result", "village/yian/status"],
        )
        .await;
        let mut up = spawn_uplink(settings(broker.port()), store);
        wait_for_tap(&mut up.tap, |t| *t == UplinkTap::Connected).await;

        let status = next_on(&mut upstream, "village/yian/status").await;
        assert_eq!(status["online"], true);
        assert_eq!(status["outbox_depth"], 0);

        // A valid command goes to the daemon; its answer comes back as the result.
        client
            .publish(
                "village/yian/cmd/silence",
                QoS::AtLeastOnce,
                false,
                r#"{"id":"c1"}"#,
            )
            .await
            .unwrap();
        let request = up.commands.recv().await.unwrap();
        assert_eq!(
            request.command,
            Command {
                id: "c1".into(),
                kind: CommandKind::Silence
            }
        );
        request.reply.send(Ok(())).unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result, serde_json::json!({ "id": "c1", "ok": true }));

        // The daemon may refuse.
        client
            .publish(
                "village/yian/cmd/reset",
                QoS::AtLeastOnce,
                false,
                r#"{"id":"c2"}"#,
            )
            .await
            .unwrap();
        let request = up.commands.recv().await.unwrap();
        request.reply.send(Err("nothing to reset".into())).unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(
            result,
            serde_json::json!({ "id": "c2", "ok": false, "error": "nothing to reset" })
        );

        // Malformed: no id to echo.
        client
            .publish(
                "village/yian/cmd/silence",
                QoS::AtLeastOnce,
                false,
                "not json",
            )
            .await
            .unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result["id"], serde_json::Value::Null);
        assert_eq!(result["ok"], false);
        assert!(result["error"].as_str().unwrap().contains("JSON"));

        // Unknown: the id is echoed.
        client
            .publish(
                "village/yian/cmd/explode",
                QoS::AtLeastOnce,
                false,
                r#"{"id":"c3"}"#,
            )
            .await
            .unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result["id"], "c3");
        assert_eq!(result["ok"], false);

        // A clean shutdown leaves `online: false` retained.
        up.shutdown.cancel();
        up.task.await.unwrap();
        let status = next_on(&mut upstream, "village/yian/status").await;
        assert_eq!(status["online"], false);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_keeps_trying_until_the_broker_appears_then_drains_the_outbox() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let port = broker::free_port().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            store.append(&event(EventKind::DeviceOffline, i)).unwrap();
        }
        let up = spawn_uplink(settings(port), store.clone());
        // Connection attempts fail meanwhile; start the broker on the port it keeps trying.
        let _broker = broker::start(port).unwrap();
        drain_and_stop(up, &store, 3).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn invalid_settings_end_the_uplink_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut s = settings(1);
    s.keep_alive = Duration::from_millis(10);
    let up = spawn_uplink(s, store);
    tokio::time::timeout(TEST_DEADLINE, up.task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn command_results_follow_the_contract_shape() {
    let ok = CommandResult {
        id: Some("a".into()),
        outcome: Ok(()),
        refresh_status: false,
    };
    let v: serde_json::Value = serde_json::from_slice(&ok.payload()).unwrap();
    assert_eq!(v, serde_json::json!({ "id": "a", "ok": true }));
    let err = CommandResult {
        id: None,
        outcome: Err("bad".into()),
        refresh_status: false,
    };
    let v: serde_json::Value = serde_json::from_slice(&err.payload()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "id": null, "ok": false, "error": "bad" })
    );
}

/// A TCP gate in front of the broker: while closed it accepts and at once closes every
/// connection (the broker looks down); while open it forwards both ways, except while frozen:
/// then it forwards nothing but keeps the connections open (a half-open link). Counts attempts.
struct Gate {
    port: u16,
    open: watch::Sender<bool>,
    frozen: watch::Sender<bool>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
}

/// Copies `from` to `to` while `frozen` is false; ends at EOF or an error.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // Not even the close crosses a frozen link (dropping `to` sends a FIN).
                let _ = frozen.wait_for(|f| !*f).await;
                return;
            }
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held until it ends, like the rest.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Gate {
    async fn closed_in_front_of(broker_port: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, open_rx) = watch::channel(false);
        let (frozen, frozen_rx) = watch::channel(false);
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = attempts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if !*open_rx.borrow() {
                    drop(client);
                    continue;
                }
                let frozen = frozen_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, frozen.clone()), pump(sr, cw, frozen));
                });
            }
        });
        Gate {
            port,
            open,
            frozen,
            attempts,
        }
    }

    fn attempts(&self) -> usize {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Polls `cond` every millisecond until it holds; the test deadline bounds the wait.
async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_backlog_drains_lane_by_lane_in_seq_order_and_a_new_fire_jumps_the_queue(
) {
    // The outage is compressed: thousands of events are appended in a second, the broker stays
    // unreachable through several failed connection attempts with backoff, then comes back.
    const URGENT: u64 = 300;
    const ACCESS: u64 = 5_000;
    const ROUTINE: u64 = 200;
    tokio::time::timeout(Duration::from_secs(120), async {
        let broker = broker::start(0).unwrap();
        let (_client, mut upstream) = events_subscriber(broker.port()).await;
        let gate = Gate::closed_in_front_of(broker.port()).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let up = spawn_uplink(settings(gate.port), store.clone());

        // The backlog, interleaved as a village produces it: lanes 1, 2 and 0 mixed.
        let mut lanes: [Vec<u64>; 3] = Default::default();
        let total = URGENT + ACCESS + ROUTINE;
        for i in 0..total {
            let kind = if i % (total / URGENT) == 0 && lanes[0].len() < URGENT as usize {
                EventKind::DeviceOffline
            } else if i % (total / ROUTINE) == 1 && lanes[2].len() < ROUTINE as usize {
                EventKind::GatewayStarted
            } else {
                EventKind::AccessGranted
            };
            let seq = store.append(&event(kind, i)).unwrap();
            lanes[kind.lane() as usize].push(seq.0);
            up.wake.notify_one();
        }
        let total = lanes.iter().map(Vec::len).sum::<usize>();
        assert!(lanes[0].len() > 100 && lanes[2].len() > 100);
        until(|| gate.attempts() >= 4).await;
        assert_eq!(store.stats().unwrap().depth, total as u64, "nothing left during the outage");

        // The broker is back.
        gate.open.send(true).unwrap();
        // Once the urgent backlog and some access events are acknowledged, a fire is raised.
        until(|| store.stats().unwrap().depth <= (total - lanes[0].len() - 500) as u64).await;
        let fire = store.append(&event(EventKind::FireAlarm, 999_999)).unwrap();
        up.wake.notify_one();
        let acked_at_fire = total + 1 - usize::try_from(store.stats().unwrap().depth).unwrap();

        let mut received: Vec<u64> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < total + 1 {
            let p = upstream.recv().await.unwrap();
            for v in cloudevents(&p) {
                let seq = v["seq"].as_u64().unwrap();
                // Duplicates are allowed upstream (after a reconnect); the first copy counts.
                if seen.insert(seq) {
                    received.push(seq);
                }
            }
        }

        // The fire went out ahead of every backlog event not yet handed to the client when it
        // was stored. Handed over by then: those removed from the store plus at most one window
        // (in flight or being removed), plus what the loop iteration running when the wake
        // came may publish (one batch of removals frees at most 256 slots).
        let fire_at = received.iter().position(|s| *s == fire.0).unwrap();
        assert!(
            fire_at <= acked_at_fire + EVENT_WINDOW + 256,
            "the fire came after {fire_at} events; {acked_at_fire} were acknowledged when it was stored"
        );
        assert!(
            received.len() - fire_at > 1000,
            "the backlog was still draining when the fire went out"
        );
        // Without the fire: lane 0, then 1, then 2, each in seq order.
        let backlog: Vec<u64> = received.into_iter().filter(|s| *s != fire.0).collect();
        let want: Vec<u64> = lanes.concat();
        assert_eq!(backlog.len(), want.len());
        assert!(backlog == want, "backlog order differs from lane-then-seq order");
        until(|| store.stats().unwrap().depth == 0).await;

        up.shutdown.cancel();
        up.task.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_and_oversize_commands_get_results_without_dropping_the_connection() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_observer, mut upstream) =
            subscriber(broker.port(), "upstream", &["village/yian/cmd-result"]).await;
        // A client allowed to send big packets (rumqttc's default limit is 10 KiB).
        let mut opts = MqttOptions::new("commander", "127.0.0.1", broker.port());
        opts.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20);
        let (commander, mut commander_loop) = AsyncClient::new(opts, 16);
        tokio::spawn(async move { while commander_loop.poll().await.is_ok() {} });
        let mut up = spawn_uplink(settings(broker.port()), store);
        wait_for_tap(&mut up.tap, |t| *t == UplinkTap::Connected).await;

        // A card list for 1000 rooms: about 150 KB.
        let cards: Vec<serde_json::Value> = (0..1000)
            .map(|i| {
                serde_json::json!({"card": format!("{}", 100_000 + i), "person": format!("p-{i:05x}"),
                    "doors": [format!("A-{i}"), "A-gate"], "valid_until": "2027-06-30T00:00:00Z",
                    "flags": ["flagged"], "note": "x".repeat(40)})
            })
            .collect();
        let sync = serde_json::json!({"id": "big", "version": 7, "cards": cards}).to_string();
        assert!(sync.len() > 150_000, "{} bytes", sync.len());
        commander
            .publish("village/yian/cmd/cards.sync", QoS::AtLeastOnce, false, sync)
            .await
            .unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result["id"], "big");
        // (The daemon does not handle cards yet: the command is refused as unknown, not lost.)
        assert_eq!(result["ok"], false);

        // Over the command limit: refused with the id echoed, the connection stays.
        let huge = serde_json::json!({"id": "huge", "cards": "y".repeat(MAX_COMMAND_BYTES)});
        commander
            .publish("village/yian/cmd/cards.sync", QoS::AtLeastOnce, false, huge.to_string())
            .await
            .unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result["id"], "huge");
        assert_eq!(result["ok"], false);
        assert!(result["error"].as_str().unwrap().contains("over the limit"));

        // Still the same connection: a command after them is answered, and no Disconnected
        // (nor a second Connected) was tapped meanwhile.
        commander
            .publish("village/yian/cmd/status", QoS::AtLeastOnce, false, r#"{"id":"after"}"#)
            .await
            .unwrap();
        let request = up.commands.recv().await.unwrap();
        assert_eq!(request.command.id, "after");
        request.reply.send(Ok(())).unwrap();
        let result = next_on(&mut upstream, "village/yian/cmd-result").await;
        assert_eq!(result, serde_json::json!({ "id": "after", "ok": true }));
        while let Ok(t) = up.tap.try_recv() {
            assert!(
                !matches!(t, UplinkTap::Disconnected { .. } | UplinkTap::Connected),
                "the connection was dropped: {t:?}"
            );
        }

        up.shutdown.cancel();
        up.task.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_gone_silent_is_dropped_by_keep_alive_and_the_uplink_reconnects() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = broker::start(0).unwrap();
        let gate = Gate::closed_in_front_of(broker.port()).await;
        gate.open.send(true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut s = settings(gate.port);
        s.keep_alive = Duration::from_secs(1);
        let mut up = spawn_uplink(s, store.clone());
        wait_for_tap(&mut up.tap, |t| *t == UplinkTap::Connected).await;

        // The link goes silent without closing (a 4G router that lost its carrier): no FIN, no
        // RST, nothing. Only the missing PINGRESP can tell.
        gate.frozen.send(true).unwrap();
        let reason = loop {
            if let UplinkTap::Disconnected { reason } = up.tap.recv().await.unwrap() {
                break reason;
            }
        };
        // rumqttc: "Mqtt state: Last pingreq isn't acked" (StateError::AwaitPingResp).
        assert!(
            reason.contains("pingreq"),
            "dropped for another reason: {reason}"
        );

        // The link comes back: a new connection, and events flow again.
        gate.frozen.send(false).unwrap();
        wait_for_tap(&mut up.tap, |t| *t == UplinkTap::Connected).await;
        let seq = store.append(&event(EventKind::FireAlarm, 1)).unwrap();
        up.wake.notify_one();
        wait_for_tap(
            &mut up.tap,
            |t| matches!(t, UplinkTap::Acked { seq: s, .. } if *s == seq),
        )
        .await;

        up.shutdown.cancel();
        up.task.await.unwrap();
    })
    .await
    .unwrap();
}

#[test]
fn the_envelope_published_is_the_cloudevent_of_the_contract() {
    let mut data = EventData {
        device: Some(crate::event::DeviceId("A-101".into())),
        zone: Some("A".into()),
        location: Some("A栋101室 \"east\"".into()),
        reason: Some("smoke".into()),
        ..EventData::default()
    };
    data.extra.insert("card".into(), serde_json::json!("1001"));
    data.extra
        .insert("counts".into(), serde_json::json!({"lane2": 3}));
    for (kind, data) in [
        (EventKind::FireAlarm, data),
        (EventKind::GatewayStarted, EventData::default()),
    ] {
        let e = Event::new(
            kind,
            UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            data,
        );
        let s = settings(1883);
        // Through the store, as the uplink reads it: `data` stays the stored JSON.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seq = store.append(&e).unwrap();
        store.flush().unwrap();
        let stored = store.pending_stored_after(None, 1).unwrap();
        assert_eq!(stored.len(), 1);
        let mut bytes = Vec::new();
        write_envelope(&mut bytes, &stored[0], &s).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(got, e.to_cloudevent(seq, &s.gateway_id, &s.topic_prefix));
    }
}
