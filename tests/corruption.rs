//! A damaged outbox on disk: the sled files of a real store are truncated or scribbled on.
//! The store (and the daemon) must open, keep the damaged files for inspection, say so, and
//! carry on with new events whose seqs are above every seq upstream may have seen.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use village_gateway::event::{Event, EventData, EventKind, Seq, UnitId};
use village_gateway::sim::SmokeState;
use village_gateway::store::Store;

mod common;
use common::{village, wait_subscribed, write_config, Daemon, Subscriber};

/// A store with `n` fire events (each durable when appended); returns the last seq.
fn filled_store(path: &Path, n: u64) -> Seq {
    let store = Store::open(path).unwrap();
    let mut last = Seq(0);
    for i in 0..n {
        let data = EventData {
            reason: Some(format!("event {i} {}", "x".repeat(100))),
            ..EventData::default()
        };
        last = store
            .append(&Event::new(EventKind::DeviceFault, SystemTime::now(), data))
            .unwrap();
    }
    last
}

/// Opens `path` once sled has released the lock of a store dropped a moment ago.
fn open_after_drop(path: &Path) -> Store {
    for _ in 0..400 {
        match Store::open(path) {
            Err(village_gateway::store::Error::Locked { .. }) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the store stayed locked for 2 s after it was dropped");
}

fn db_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("db")).unwrap().len()
}

/// Checks what every recovery must give: the damaged store kept aside, a fresh store whose
/// seqs start above the old ones, and events flowing again.
///
/// The kept `db` is compared with the damaged one up to the damage point (`intact` bytes):
/// sled's own open attempt already rewrote the log from the first bad record on (it takes it
/// for a torn tail) before the damage could be noticed, so only the part before it is
/// guaranteed to be kept as it was.
fn assert_recovered(store: &Store, damaged: &[u8], intact: usize, old_last: Seq) {
    let recovery = store.recovery().cloned().expect("the damage was detected");
    assert!(
        recovery.moved_to.join("db").exists(),
        "the damaged store is kept at {}",
        recovery.moved_to.display()
    );
    let kept = std::fs::read(recovery.moved_to.join("db")).unwrap();
    assert!(kept.len() >= intact);
    assert!(
        kept[..intact] == damaged[..intact],
        "the kept store differs before the damage point"
    );
    assert!(recovery.first_seq > old_last);
    let seq = store
        .append(&Event::new(
            EventKind::FireAlarm,
            SystemTime::now(),
            EventData::default(),
        ))
        .unwrap();
    assert_eq!(seq, recovery.first_seq);
    let pending = store.pending(10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0, seq);
}

#[test]
fn a_truncated_outbox_is_moved_aside_and_a_fresh_one_takes_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let last = filled_store(&path, 500);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("db"))
        .unwrap();
    f.set_len(db_len(&path) / 2).unwrap();
    let damaged = std::fs::read(path.join("db")).unwrap();
    let intact = damaged.len();

    // sled alone would open this and return a prefix of the events (and reuse their seqs).
    let store = open_after_drop(&path);
    assert!(
        store.recovery().unwrap().reason.contains("truncated"),
        "{:?}",
        store.recovery()
    );
    assert_recovered(&store, &damaged, intact, last);
}

#[test]
fn a_scribbled_outbox_is_moved_aside_and_a_fresh_one_takes_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let last = filled_store(&path, 500);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("db"))
        .unwrap();
    let at = db_len(&path) / 2;
    f.write_all_at(&[0xA5; 4096], at).unwrap();
    let damaged = std::fs::read(path.join("db")).unwrap();
    let intact = usize::try_from(at).unwrap();

    let store = open_after_drop(&path);
    assert_recovered(&store, &damaged, intact, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_moves_a_truncated_outbox_aside_says_so_upstream_and_forwards_new_events() {
    let broker = village_gateway::broker::start(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut sub = Subscriber::connect(broker.port(), "it-corruption").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    // First life: an alarm, forwarded (so it was durable), then a kill -9.
    let sim = village(2);
    let pty = sim.serve_pty().unwrap();
    let config = write_config(dir.path(), pty.path(), 2, broker.port(), &state);
    let mut first = Daemon::spawn(&config);
    sim.set_smoke(UnitId(1), SmokeState::Alarm);
    let alarm = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
    let old_seq = alarm["seq"].as_u64().unwrap();
    first.kill();

    // The file system loses the tail of sled's log.
    let outbox = state.join("outbox");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(outbox.join("db"))
        .unwrap();
    f.set_len(db_len(&outbox) / 4).unwrap();

    // Second life: it starts, says what happened, and new events flow with higher seqs.
    let _second = Daemon::spawn(&config);
    // (The first life's gateway.started may arrive after its fire alarm: lane 0 goes first.)
    let started = loop {
        let s = sub
            .next_of("gateway.started", Duration::from_secs(10))
            .await;
        if s["seq"].as_u64() > Some(old_seq) {
            break s;
        }
    };
    let recovered = &started["data"]["extra"]["outbox_recovered"];
    assert!(recovered.is_object(), "{started}");
    let moved_to = Path::new(recovered["moved_to"].as_str().unwrap());
    assert!(moved_to.join("db").exists(), "the damaged outbox is kept");
    let first_seq = recovered["first_seq"].as_u64().unwrap();
    assert!(first_seq > old_seq);
    assert_eq!(started["seq"].as_u64(), Some(first_seq));

    sim.set_smoke(UnitId(2), SmokeState::Alarm);
    let alarm = loop {
        let a = sub.next_of("fire.alarm", Duration::from_secs(10)).await;
        if a["data"]["device"] == "A-102" {
            break a;
        }
    };
    assert!(alarm["seq"].as_u64().unwrap() > first_seq, "{alarm}");
}
