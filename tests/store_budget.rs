//! The outbox's disk budget through the real daemon: a backlog over `[store] max_bytes` is cut
//! down by evicting the oldest routine, then access events, never fire; upstream gets one
//! `outbox.evicted` report and can account for every seq: delivered or reported evicted.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use village_gateway::event::{Event, EventData, EventKind, Lane};
use village_gateway::store::{Settings, Store};

mod common;
use common::{village, wait_subscribed, write_config, Daemon, Subscriber};

/// A ~1 KiB event of `kind`.
fn padded(kind: EventKind, i: u32) -> Event {
    let data = EventData {
        reason: Some(format!("backlog {i} {}", "x".repeat(900))),
        ..EventData::default()
    };
    Event::new(kind, SystemTime::now(), data)
}

/// The seqs an `outbox.evicted` report names for `lane` (its ranges, expanded).
fn evicted_seqs(report: &serde_json::Value, lane: u8) -> BTreeSet<u64> {
    let mut seqs = BTreeSet::new();
    for l in report["data"]["extra"]["lanes"].as_array().unwrap() {
        if l["lane"] == lane {
            assert_eq!(l["ranges_truncated"], false);
            for r in l["ranges"].as_array().unwrap() {
                seqs.extend(r[0].as_u64().unwrap()..=r[1].as_u64().unwrap());
            }
            assert_eq!(seqs.len() as u64, l["count"].as_u64().unwrap());
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_max_bytes_loses_routine_then_access_events_never_fire_and_says_which() {
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // A backlog of about 2 MiB left by an earlier life with a larger budget: 3 fire alarms,
    // then 600 routine and 1400 access events, interleaved.
    let mut lane_of = Vec::new();
    {
        let big = Settings {
            max_bytes: 64 << 20,
            ..Settings::default()
        };
        let store = Store::open_with(&state.join("outbox"), big).unwrap();
        for i in 0..2003u32 {
            let kind = match i {
                0..=2 => EventKind::FireAlarm,
                _ if i % 10 < 3 => EventKind::GatewayStarted,
                _ => EventKind::DoorHeld,
            };
            let seq = store.append(&padded(kind, i)).unwrap();
            assert_eq!(seq.0, u64::from(i) + 1);
            lane_of.push(kind.lane());
        }
        store.flush().unwrap();
        assert!(store.stats().unwrap().bytes > 3 << 19, "over 1.5 MiB");
    }
    let backlog = lane_of.len() as u64;

    let mut sub = Subscriber::connect(broker.port(), "it-budget").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    // This life has a budget of 1 MiB.
    let sim = village(1);
    let pty = sim.serve_pty().unwrap();
    let config = write_config(dir.path(), pty.path(), 1, broker.port(), &state);
    writeln!(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&config)
            .unwrap(),
        "[store]\nmax_bytes = \"1MiB\""
    )
    .unwrap();
    let _daemon = Daemon::spawn(&config);

    // Every seq up to the first life's last and this life's gateway.started is accounted for.
    let mut received: BTreeSet<u64> = BTreeSet::new();
    let mut report: Option<serde_json::Value> = None;
    let mut started: Option<u64> = None;
    let mut fire_before_report = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let v = sub.events.recv().await.expect("subscriber ended");
            let seq = v["seq"].as_u64().unwrap();
            match v["type"].as_str().unwrap() {
                "outbox.evicted" => report = Some(v.clone()),
                "gateway.started" if seq > backlog => started = Some(seq),
                "fire.alarm" if report.is_none() => fire_before_report += 1,
                _ => {}
            }
            received.insert(seq);
            if let (Some(r), Some(last)) = (&report, started) {
                let evicted: BTreeSet<u64> = evicted_seqs(r, 2)
                    .union(&evicted_seqs(r, 1))
                    .copied()
                    .collect();
                if (1..=last).all(|s| received.contains(&s) || evicted.contains(&s)) {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not every seq arrived or was reported evicted: {} received, report {report:?}, started {started:?}",
            received.len()
        )
    });

    let report = report.unwrap();
    let routine = evicted_seqs(&report, 2);
    let access = evicted_seqs(&report, 1);
    assert_eq!(
        fire_before_report, 3,
        "lane 0 first: the fire alarms, then the report"
    );
    assert!(report["data"]["extra"]["bytes_before"].as_u64().unwrap() > 1 << 20);
    // Lane 2 went first and entirely, then the oldest of lane 1; lane 0 not at all.
    let lane = |s: &u64| lane_of[usize::try_from(*s).unwrap() - 1];
    assert_eq!(routine.len(), 600);
    assert!(routine.iter().all(|s| lane(s) == Lane::Routine));
    assert!(!access.is_empty());
    assert!(access.iter().all(|s| lane(s) == Lane::Access));
    let kept_access: Vec<u64> = (1..=backlog)
        .filter(|s| lane(s) == Lane::Access && !access.contains(s))
        .collect();
    assert!(
        access.last().unwrap() < kept_access.first().unwrap(),
        "the oldest access events went"
    );
    // What was evicted never went upstream (evicted at open, before any connection), and
    // every fire alarm did.
    assert!(routine.iter().chain(&access).all(|s| !received.contains(s)));
    assert!((1..=3).all(|s| received.contains(&s)));
}
