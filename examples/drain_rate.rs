//! Benchmark: how fast the uplink drains a backlog, beside a plain rumqttc publisher.
//!
//! For each broker (the embedded rumqttd, and mosquitto if `/usr/sbin/mosquitto` or `mosquitto`
//! on the PATH exists) and each link (loopback, and loopback through a delaying TCP proxy that
//! adds 50 ms per direction, i.e. 100 ms of round trip), `--rounds` rounds (default 3) of:
//!
//! 1. a fresh sled outbox in a temporary directory is filled with `--events` access events
//!    (default 100 000; lane 1, about 280 bytes of CloudEvents JSON each);
//! 2. the gateway's uplink ([`village_gateway::uplink::run`], the daemon's code, with its
//!    default of CloudEvents batches of up to 100 events; `--batch 1` for one per publish) drains it:
//!    timed from its start to the moment the outbox is empty (every event acknowledged by a
//!    PUBACK and removed from the store);
//! 3. a plain rumqttc client publishes the same topics and payloads (pre-rendered) at QoS 1 with
//!    the same in-flight limit, timed from its start to the last PUBACK: one event per publish
//!    (what a simple forwarder does; the issue's baseline), or with `--plain-batches` the same
//!    batches as the uplink's (like for like: then the ratio shows what the store, the window
//!    and the envelopes cost).
//!
//! Each round prints both rates, their ratio, the CPU time of the process per event, and the
//! disk writes of the store per event (from `/proc/self/io`: `write_bytes`, what reached the
//! block layer, page-granular; `wchar` is not used because it also counts the MQTT socket
//! writes of this process). Then the median ratio of the rounds: on a shared 2-core VM one
//! round's rates swing by a factor of 1.5 from one run to the next, so a single ratio says
//! little.
//!
//! ```sh
//! cargo run --release --example drain_rate               # 100 000 events, every broker found
//! cargo run --release --example drain_rate -- --events 20000 --broker embedded
//! cargo run --release --example drain_rate -- --broker mosquitto --loopback-only --rounds 5
//! cargo run --release --example drain_rate -- --only uplink  # to profile one side (perf)
//! cargo run --release --example drain_rate -- --batch 1      # the uplink one event per publish
//! cargo run --release --example drain_rate -- --plain-batches  # the plain client in batches too
//! ```
//!
//! No subscriber is connected: the brokers only acknowledge. Everything runs in this process
//! (uplink, plain client, proxy, embedded broker) except mosquitto, on a multi-thread runtime.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use clap::builder::RangedU64ValueParser;
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use village_gateway::event::{DeviceId, Event, EventData, EventKind, Lane, Seq, Status};
use village_gateway::store::Store;
use village_gateway::uplink::{self, UplinkSettings, EVENT_WINDOW};

const GATEWAY: &str = "bench";
const PREFIX: &str = "village";
/// Added delay per direction of the delaying proxy (100 ms of round trip).
const ONE_WAY_DELAY: Duration = Duration::from_millis(50);
/// The plain client's in-flight limit: the same as the uplink's rumqttc client.
const PLAIN_INFLIGHT: u16 = 1064;
const _: () = assert!(PLAIN_INFLIGHT as usize == EVENT_WINDOW + 64);

fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(1..)
}

/// Drain rate of the uplink beside a plain rumqttc publisher (see the module doc).
#[derive(clap::Parser)]
struct Args {
    /// Events in the backlog.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one())]
    events: usize,
    /// Only this broker (default: the embedded one and mosquitto if installed).
    #[arg(long, value_parser = ["embedded", "mosquitto"])]
    broker: Option<String>,
    /// Run only the uplink or only the plain publisher (to profile one of them).
    #[arg(long, value_parser = ["uplink", "plain"])]
    only: Option<String>,
    /// Skip the 100 ms RTT runs.
    #[arg(long)]
    loopback_only: bool,
    /// Rounds per broker and link (uplink then plain in each); the median ratio is reported.
    #[arg(long, default_value_t = 3, value_parser = at_least_one())]
    rounds: usize,
    /// The uplink's `batch_events` (1 = one event per publish), 1 ..= the window (1000).
    #[arg(long, default_value_t = uplink::DEFAULT_BATCH_EVENTS,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=EVENT_WINDOW as u64))]
    batch: usize,
    /// The plain client publishes the events in batches of `--batch` too (like for like).
    #[arg(long)]
    plain_batches: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = <Args as clap::Parser>::parse();
    let n = args.events;
    println!(
        "drain_rate: {n} events, uplink window {EVENT_WINDOW} events in flight in batches of up \
         to {}, plain client {}, in-flight {PLAIN_INFLIGHT}, {} cores, store in {}",
        args.batch,
        if args.plain_batches {
            format!("in batches of {}", args.batch)
        } else {
            "one event per publish".to_owned()
        },
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::env::temp_dir().display()
    );

    let mut brokers: Vec<(String, u16, Option<Mosquitto>)> = Vec::new();
    if args.broker.as_deref().is_none_or(|b| b == "embedded") {
        let b = village_gateway::broker::start(0)?;
        brokers.push(("embedded rumqttd 0.20".to_owned(), b.port(), None));
    }
    if args.broker.as_deref().is_none_or(|b| b == "mosquitto") {
        match start_mosquitto()? {
            Some((version, port, child)) => brokers.push((version, port, Some(child))),
            None => println!("mosquitto: not installed, skipped"),
        }
    }

    for (name, port, _) in &brokers {
        let direct = SocketAddr::from(([127, 0, 0, 1], *port));
        let proxy = delay_proxy(direct, ONE_WAY_DELAY).await?;
        let links = [("loopback", direct), ("loopback + 100 ms RTT proxy", proxy)];
        for (link, addr) in links
            .into_iter()
            .take(if args.loopback_only { 1 } else { 2 })
        {
            println!();
            println!("== {name}, {link}");
            let mut ratios = Vec::new();
            for round in 1..=args.rounds {
                if let Some(r) = round_of(&args, round, addr).await? {
                    ratios.push(r);
                }
            }
            if !ratios.is_empty() {
                ratios.sort_by(f64::total_cmp);
                println!(
                    "ratio uplink/plain over {} rounds: median {:.2} (min {:.2}, max {:.2})",
                    ratios.len(),
                    ratios[ratios.len() / 2],
                    ratios[0],
                    ratios[ratios.len() - 1]
                );
            }
        }
    }
    // The mosquitto guards stop their brokers when `brokers` drops, also on an early error.
    Ok(())
}

/// One round on a fresh store: fill, drain with the uplink, publish the same with the plain
/// client; the ratio of the two rates (`None` if `--only` skipped one).
async fn round_of(args: &Args, round: usize, addr: SocketAddr) -> anyhow::Result<Option<f64>> {
    let n = args.events;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let (fill, fill_io) = measure(|| fill_store(&store, n))?;
    println!(
        "round {round}: fill {n} appends in {:.2} s ({:.0} events/s), disk {:.0} bytes/event",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        fill_io as f64 / n as f64
    );
    let mut payloads = rendered(&store, n)?;
    if args.plain_batches {
        payloads = batched(&payloads, args.batch);
    }
    let publishes = payloads.len();
    let mut uplink_rate = None;
    if args.only.as_deref() != Some("plain") {
        let io0 = write_bytes();
        let cpu0 = cpu_time();
        let drained = drain_with_uplink(&store, addr, args.batch).await?;
        store.flush()?;
        let drain_io = write_bytes().saturating_sub(io0);
        let drain_cpu = cpu_time().saturating_sub(cpu0);
        let rate = n as f64 / drained.as_secs_f64();
        println!(
            "  uplink: {n} events acknowledged and removed in {:.2} s = {rate:.0} events/s; \
             disk {:.0} bytes/event; CPU {:.1} µs/event (whole process)",
            drained.as_secs_f64(),
            drain_io as f64 / n as f64,
            drain_cpu.as_secs_f64() * 1e6 / n as f64
        );
        uplink_rate = Some(rate);
    }
    if args.only.as_deref() == Some("uplink") {
        return Ok(None);
    }
    let cpu0 = cpu_time();
    let plain = plain_publisher(addr, payloads).await?;
    let plain_cpu = cpu_time().saturating_sub(cpu0);
    let plain_rate = n as f64 / plain.as_secs_f64();
    println!(
        "  plain:  {publishes} publishes ({n} events) acknowledged in {:.2} s = \
         {plain_rate:.0} events/s; CPU {:.1} µs/event (whole process)",
        plain.as_secs_f64(),
        plain_cpu.as_secs_f64() * 1e6 / n as f64
    );
    Ok(uplink_rate.map(|rate| {
        let ratio = rate / plain_rate;
        println!("  ratio uplink/plain: {ratio:.2}");
        ratio
    }))
}

/// Appends `n` access events (lane 1) like a village's card readers produce.
fn fill_store(store: &Store, n: usize) -> anyhow::Result<()> {
    let t0 = SystemTime::now();
    for i in 0..n {
        let mut data = EventData {
            device: Some(DeviceId(format!("D-{}", 100 + i % 40))),
            zone: Some("A".to_owned()),
            location: Some(format!("A栋{}室门", 100 + i % 40)),
            ..EventData::default()
        };
        data.extra.insert(
            "card".to_owned(),
            serde_json::json!(format!("{}", 1000 + i % 997)),
        );
        data.extra.insert(
            "person".to_owned(),
            serde_json::json!(format!("p-{:04x}", i % 997)),
        );
        let time = t0 + Duration::from_millis(i as u64);
        store.append(&Event::new(EventKind::AccessGranted, time, data))?;
    }
    store.flush()?;
    Ok(())
}

/// Topics and payloads of the first `n` pending events, as the uplink publishes them.
fn rendered(store: &Store, n: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let pending = store.pending(n)?;
    anyhow::ensure!(
        pending.len() == n,
        "the store holds {} events",
        pending.len()
    );
    let out: Vec<(String, Vec<u8>)> = pending
        .iter()
        .map(|(seq, e): &(Seq, Event)| {
            (
                format!("{PREFIX}/{GATEWAY}/event/{}", e.kind),
                e.to_cloudevent(*seq, GATEWAY, PREFIX)
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    let bytes: usize = out.iter().map(|(_, p)| p.len()).sum();
    println!("payload: {} bytes/event on average", bytes / n.max(1));
    Ok(out)
}

/// Runs the uplink on `store` against `addr` until the outbox is empty; the elapsed time.
async fn drain_with_uplink(
    store: &Store,
    addr: SocketAddr,
    batch_events: usize,
) -> anyhow::Result<Duration> {
    let settings = UplinkSettings {
        url: format!("mqtt://{addr}"),
        client_id: "vgw-bench".to_owned(),
        gateway_id: GATEWAY.to_owned(),
        topic_prefix: PREFIX.to_owned(),
        keep_alive: Duration::from_secs(30),
        username: None,
        password: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        batch_events,
    };
    let (commands_tx, _commands) = mpsc::channel(8);
    let (_status_tx, status_rx) = watch::channel(Status::default());
    let shutdown = CancellationToken::new();
    let t0 = Instant::now();
    let task = tokio::spawn(uplink::run(
        settings,
        store.clone(),
        Arc::new(Notify::new()),
        commands_tx,
        status_rx,
        None,
        shutdown.clone(),
    ));
    let deadline = t0 + Duration::from_secs(600);
    // Nothing to await for "the outbox is empty": poll its depth (an atomic read) every 2 ms.
    while [Lane::Urgent, Lane::Access, Lane::Routine]
        .iter()
        .map(|l| store.lane_depth(*l))
        .sum::<u64>()
        > 0
    {
        anyhow::ensure!(Instant::now() < deadline, "the drain took over 10 minutes");
        anyhow::ensure!(!task.is_finished(), "the uplink ended");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed();
    shutdown.cancel();
    task.await?;
    Ok(elapsed)
}

/// `payloads` as CloudEvents batches of up to `batch` on the batch topic, as the uplink
/// sends a backlog (JSON arrays of the same envelopes).
fn batched(payloads: &[(String, Vec<u8>)], batch: usize) -> Vec<(String, Vec<u8>)> {
    payloads
        .chunks(batch)
        .map(|chunk| {
            let mut body = vec![b'['];
            for (i, (_, p)) in chunk.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(p);
            }
            body.push(b']');
            (format!("{PREFIX}/{GATEWAY}/events"), body)
        })
        .collect()
}

/// Publishes `payloads` with a plain rumqttc client (QoS 1, same in-flight limit); the time
/// from the start to the last PUBACK.
async fn plain_publisher(
    addr: SocketAddr,
    payloads: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<Duration> {
    let n = payloads.len();
    let mut opts = MqttOptions::new("plain-bench", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(PLAIN_INFLIGHT)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    let t0 = Instant::now();
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(PLAIN_INFLIGHT));
    let publisher = tokio::spawn(async move {
        for (topic, payload) in payloads {
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return client;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => anyhow::bail!("plain client: {e}"),
        }
    }
    let elapsed = t0.elapsed();
    let client = publisher.await?;
    let _ = client.try_disconnect();
    Ok(elapsed)
}

/// A mosquitto this example started: killed, and its config file deleted, on drop.
struct Mosquitto {
    child: Child,
    conf: std::path::PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// Starts mosquitto on a free port; `None` if it is not installed.
fn start_mosquitto() -> anyhow::Result<Option<(String, u16, Mosquitto)>> {
    let bin = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let version = match Command::new(bin).arg("-h").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("mosquitto")
            .trim()
            .to_owned(),
        Err(_) => return Ok(None),
    };
    let port = village_gateway::broker::free_port()?;
    let conf = std::env::temp_dir().join(format!("drain-rate-mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_type error\nlog_type warning\n"
        ),
    )?;
    let spawned = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn();
    let child = match spawned {
        Ok(child) => Mosquitto { child, conf },
        Err(e) => {
            let _ = std::fs::remove_file(&conf);
            return Err(e).with_context(|| format!("cannot start {bin}"));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((version, port, child)))
}

/// A TCP proxy on 127.0.0.1 to `upstream` that delivers every chunk `delay` after it arrived,
/// in each direction, without limiting the bandwidth (a long fat pipe). Returns its address.
async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(delayed_pipe(cr, sw, delay), delayed_pipe(sr, cw, delay));
            });
        }
    });
    Ok(addr)
}

/// Copies `from` to `to`, each chunk `delay` after it was read; ends at EOF or an error.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..k].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut next = None;
        loop {
            let (due, mut chunk) = match next.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => break,
                },
            };
            tokio::time::sleep_until(due).await;
            // Everything else already due goes out in the same write.
            let now = tokio::time::Instant::now();
            while let Ok((d, c)) = rx.try_recv() {
                if d <= now {
                    chunk.extend_from_slice(&c);
                } else {
                    next = Some((d, c));
                    break;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Runs `f`, returning its duration and the bytes this process wrote to the block layer.
fn measure(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<(Duration, u64)> {
    let io0 = write_bytes();
    let t0 = Instant::now();
    f()?;
    Ok((t0.elapsed(), write_bytes().saturating_sub(io0)))
}

/// `write_bytes` of `/proc/self/io` (0 where unavailable).
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process (from `/proc/self/stat`, 100 ticks/s assumed).
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
