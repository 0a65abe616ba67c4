//! `village-gateway outbox --config FILE`: the figures of a real store on disk, and a clear
//! refusal (no panic, non-zero exit) when the daemon holds the store or there is none.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use village_gateway::event::{Event, EventData, EventKind, Seq};
use village_gateway::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_village-gateway");

mod common;

fn config(dir: &Path) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!(
        "[gateway]\nid = \"t\"\nstate_dir = \"{}\"\n[uplink]\nurl = \"mqtt://127.0.0.1:1\"\n[store]\nmax_bytes = \"1MiB\"\n",
        dir.join("state").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn outbox(config: &Path) -> Output {
    Command::new(BIN)
        .args(["outbox", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

fn event(kind: EventKind) -> Event {
    Event::new(kind, SystemTime::now(), EventData::default())
}

/// The value after `label` on the report's line that starts with it.
fn line<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no line {label:?} in:\n{stdout}"))
        .trim()
}

#[test]
fn outbox_prints_depth_and_bytes_per_lane_the_oldest_event_and_the_last_acknowledged_seq() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let oldest = SystemTime::now() - Duration::from_secs(120);
    let bytes;
    {
        let store = Store::open(&dir.path().join("state/outbox")).unwrap();
        let mut first = event(EventKind::FireAlarm);
        first.time = oldest;
        store.append(&first).unwrap(); // 1
        store.append(&event(EventKind::FireRestored)).unwrap(); // 2
        for _ in 0..3 {
            store.append(&event(EventKind::DoorHeld)).unwrap(); // 3, 4, 5
        }
        store.append(&event(EventKind::GatewayStarted)).unwrap(); // 6
        store.remove(Seq(2)).unwrap(); // acknowledged
        bytes = store.stats().unwrap().bytes;
    }

    // sled releases its lock a moment after the last handle is dropped.
    let mut out = outbox(&config);
    for _ in 0..100 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        out = outbox(&config);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(line(&stdout, "lane 0 (fire, fault)").starts_with("depth 1 "));
    assert!(line(&stdout, "lane 1 (access, door)").starts_with("depth 3 "));
    assert!(line(&stdout, "lane 2 (routine)").starts_with("depth 1 "));
    let total = line(&stdout, "total");
    assert!(
        total.contains(&format!("bytes {bytes} of 1048576")),
        "{total}"
    );
    let oldest_line = line(&stdout, "oldest pending");
    let age: u64 = oldest_line
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{oldest_line}"));
    assert!((120..180).contains(&age), "{oldest_line}");
    assert_eq!(line(&stdout, "last seq assigned"), "6");
    assert!(line(&stdout, "last acknowledged seq").starts_with("2 (at "));
    assert_eq!(line(&stdout, "quarantined records"), "0");
}

#[test]
fn outbox_refuses_clearly_while_the_daemon_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    // This test process stands in for the daemon: it holds sled's lock.
    let held = Store::open(&dir.path().join("state/outbox")).unwrap();
    held.append(&event(EventKind::FireAlarm)).unwrap();

    let out = outbox(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another process"), "{stderr}");
    assert!(
        stderr.contains("systemctl stop village-gateway"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // And the store is untouched.
    assert_eq!(held.stats().unwrap().depth, 1);
}

#[test]
fn outbox_says_when_there_is_no_store_and_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let out = outbox(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("there is no outbox at"), "{stderr}");
    assert!(!dir.path().join("state/outbox").exists());
}

#[test]
fn outbox_refuses_clearly_while_the_real_daemon_runs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _enter = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let sim = common::village(1);
    let pty = sim.serve_pty().unwrap();
    // No broker: the daemon keeps retrying upstream and holds its outbox.
    let config = common::write_config(dir.path(), pty.path(), 1, 1, &dir.path().join("state"));
    let _daemon = common::Daemon::spawn(&config);
    let log = config.with_extension("log");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Gateway started.")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = outbox(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another process"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
