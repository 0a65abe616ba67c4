//! The crash test: the real daemon binary under a steady event load from the simulator is
//! killed with SIGKILL at random moments and restarted. At the end an upstream subscriber on a
//! real broker has every seq from 1 to the last (duplicates allowed, none missing) and every
//! fire alarm the simulator raised.
//!
//! `cargo test` runs it with the embedded broker and 5 kills. Environment:
//! - `VGW_CRASH_KILLS=N`: the number of kills (the interop stage uses 30);
//! - `VGW_CRASH_MOSQUITTO=/usr/sbin/mosquitto`: run this mosquitto instead of the embedded broker;
//! - `VGW_CRASH_SEED=S`: replay a run (the seed is printed at the start).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use village_gateway::event::UnitId;
use village_gateway::sim::SmokeState;
use village_gateway::store::{Error as StoreError, Settings, Store};

mod common;
use common::{
    free_port, village, wait_for_port, wait_subscribed, write_config, Daemon, Subscriber,
};

/// Detectors 1..=5 are raised one by one during the run and stay in alarm; 6..=10 make the
/// steady load (faults and cleared faults, offline and online).
const FIRE_UNITS: [u8; 5] = [1, 2, 3, 4, 5];
const LOAD_UNITS: [u8; 5] = [6, 7, 8, 9, 10];

/// A small xorshift generator: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration uniformly in `lo..hi` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }

    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[usize::try_from(self.next() % of.len() as u64).unwrap()]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// The broker of the run: mosquitto as a child process, or the embedded one.
enum Broker {
    Mosquitto(Child),
    Embedded(#[allow(dead_code)] village_gateway::broker::BrokerHandle),
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mosquitto(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn start_broker() -> (Broker, u16) {
    match std::env::var("VGW_CRASH_MOSQUITTO") {
        Ok(bin) => {
            let port = free_port();
            let child = Command::new(&bin)
                .args(["-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            wait_for_port(port).await;
            (Broker::Mosquitto(child), port)
        }
        Err(_) => {
            let broker = village_gateway::broker::start(0).unwrap();
            let port = broker.port();
            (Broker::Embedded(broker), port)
        }
    }
}

/// SIGTERM, then waits for the daemon to stop (a clean stop flushes the outbox).
fn terminate(daemon: &mut Daemon) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last seq the store assigned (the daemon must be stopped).
fn last_seq(outbox: &Path) -> u64 {
    for _ in 0..500 {
        match Store::open_existing(outbox, Settings::default()) {
            Ok(store) => return store.stats().unwrap().last_seq.map_or(0, |s| s.0),
            Err(StoreError::Locked { .. }) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot read the outbox: {e}"),
        }
    }
    panic!("the outbox stayed locked after the daemon stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_seq_and_no_fire_alarm() {
    let kills = env_u64("VGW_CRASH_KILLS").unwrap_or(5);
    let seed = env_u64("VGW_CRASH_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("crash test: {kills} kills, VGW_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let (_broker, port) = start_broker().await;
    let mut sub = Subscriber::connect(port, "it-crash").await;
    wait_subscribed(&sub).await;
    sub.next_of("probe", Duration::from_secs(10)).await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sim = village(10);
    let pty = sim.serve_pty().unwrap();
    let config = write_config(dir.path(), pty.path(), 10, port, &state);
    let mut daemon = Daemon::spawn(&config);

    // The steady load: faults, offline/online, and now and then a reset command upstream.
    let stop_load = CancellationToken::new();
    let load = {
        let sim = sim.clone();
        let stop = stop_load.clone();
        let client = sub.client.clone();
        let mut rng = Rng(rng.next() | 1);
        tokio::spawn(async move {
            let mut resets = 0u32;
            while !stop.is_cancelled() {
                let unit = UnitId(rng.pick(&LOAD_UNITS));
                match rng.next() % 10 {
                    0..=4 => {
                        sim.set_smoke(unit, rng.pick(&[SmokeState::Fault, SmokeState::Normal]));
                    }
                    5..=6 => sim.set_offline(unit, rng.next().is_multiple_of(2)),
                    _ => {
                        resets += 1;
                        let _ = client
                            .publish(
                                "village/demo/cmd/reset",
                                rumqttc::QoS::AtLeastOnce,
                                false,
                                format!(r#"{{"id":"crash-reset-{resets}"}}"#),
                            )
                            .await;
                    }
                }
                tokio::time::sleep(rng.ms(20, 120)).await;
            }
        })
    };

    // Kill at random moments; the fire detectors go into alarm spread over the run.
    let mut raised = Vec::new();
    for k in 0..kills {
        let due: Vec<u8> = FIRE_UNITS
            .iter()
            .copied()
            .filter(|u| u64::from(u - 1) * kills / FIRE_UNITS.len() as u64 == k)
            .collect();
        let mut life = rng.ms(200, 1500);
        for u in due {
            let before = rng.ms(0, life.as_millis() as u64 + 1);
            tokio::time::sleep(before).await;
            life -= before;
            sim.set_smoke(UnitId(u), SmokeState::Alarm);
            raised.push(u);
        }
        tokio::time::sleep(life).await;
        daemon.kill();
        daemon = Daemon::spawn(&config);
    }
    assert_eq!(
        raised.len(),
        FIRE_UNITS.len(),
        "every fire detector was raised"
    );

    // The load stops; a clean stop tells the last seq; a last life drains the outbox.
    stop_load.cancel();
    load.await.unwrap();
    terminate(&mut daemon);
    let last = last_seq(&state.join("outbox"));
    let _drain = Daemon::spawn(&config);

    // Upstream must end up with every seq up to `last`, a fire.alarm for every raised
    // detector, and after every reset that cleared a detector still in alarm, a later
    // fire.alarm of it. The last two may come from the draining life, after `last` (a
    // detector raised or reset just before a kill is seen again only by a later life).
    let device = |u: u8| format!("A-{}", 100 + u16::from(u));
    let fire: BTreeSet<String> = raised.iter().map(|u| device(*u)).collect();
    let unmet = |got: &BTreeMap<u64, serde_json::Value>| -> Vec<String> {
        let alarms: Vec<(u64, &str)> = got
            .iter()
            .filter(|(_, v)| v["type"] == "fire.alarm")
            .filter_map(|(s, v)| Some((*s, v["data"]["device"].as_str()?)))
            .collect();
        let mut unmet: Vec<String> = (1..=last)
            .filter(|s| !got.contains_key(s))
            .map(|s| format!("seq {s} missing"))
            .collect();
        for d in &fire {
            if !alarms.iter().any(|(_, a)| a == d) {
                unmet.push(format!("no fire.alarm for {d}"));
            }
        }
        for (r, v) in got.iter().filter(|(_, v)| v["type"] == "alarm.reset") {
            for d in v["data"]["devices"].as_array().into_iter().flatten() {
                let d = d.as_str().unwrap_or_default();
                if fire.contains(d) && !alarms.iter().any(|(s, a)| s > r && *a == d) {
                    unmet.push(format!(
                        "{d} stayed in alarm after the reset at seq {r}, no later fire.alarm"
                    ));
                }
            }
        }
        unmet
    };
    let mut got: BTreeMap<u64, serde_json::Value> = BTreeMap::new();
    let mut copies = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while !unmet(&got).is_empty() {
            let v = sub.events.recv().await.expect("subscriber ended");
            if let Some(seq) = v["seq"].as_u64() {
                copies += 1;
                // A duplicate is the same event sent again, never another event that reused
                // the seq (which upstream would drop as a duplicate of the first).
                if let Some(first) = got.get(&seq) {
                    assert_eq!(first, &v, "seq {seq} was used for two events (seed {seed})");
                }
                got.insert(seq, v);
            }
        }
    })
    .await;
    let unmet = unmet(&got);
    assert!(
        unmet.is_empty(),
        "after {kills} kills (last seq {last}, VGW_CRASH_SEED={seed}): {unmet:?}"
    );
    eprintln!(
        "crash test: {kills} kills, {last} seqs, {} duplicates, {} lives started upstream, {} resets",
        copies - got.len() as u64,
        got.values()
            .filter(|v| v["type"] == "gateway.started")
            .count(),
        got.values().filter(|v| v["type"] == "alarm.reset").count()
    );
}
