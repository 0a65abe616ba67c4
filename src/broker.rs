//! The embedded MQTT broker (rumqttd) of `village-gateway demo`, the hidden
//! `village-gateway broker --port N` subcommand and the tests.
//!
//! - It listens on `127.0.0.1` only, MQTT 3.1.1 (one rumqttd v4 server), no TLS, no auth.
//! - It supports what the uplink relies on: QoS 1 with PUBACK, retained messages, last wills.
//! - [`start`] returns once the broker answers an MQTT CONNECT with a CONNACK, so a client may
//!   connect at once.
//!
//! Not done here: stopping. rumqttd 0.20 has no way to stop a broker in-process (its
//! `Broker::start` joins its server threads forever), so a started broker lives until the process
//! ends. Tests that must stop or restart a broker run it as a child process
//! (`village-gateway broker --port N`, wired by `main.rs` to [`run_forever`]) and kill it; they pick
//! the port first with [`free_port`]. Quieting rumqttd's logging (its `tracing` target is
//! `rumqttd`) is the caller's business.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest accepted packet: 4 MiB, like the uplink's incoming limit, so a `cards.sync` (~150 KB
/// for 1000 rooms) passes and the uplink's own refusal of oversize commands can be exercised.
const MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
/// How long a broker may take to answer its first CONNECT before [`start`] gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No free port could be found, or the port could not be probed.
    #[error("cannot find a free port on 127.0.0.1: {0}")]
    NoFreePort(#[source] std::io::Error),
    /// Something already listens on the port.
    #[error("127.0.0.1:{0} is already in use")]
    PortInUse(u16),
    /// The broker thread could not be spawned.
    #[error("cannot spawn the broker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// rumqttd stopped (its server failed to bind, or it returned an error).
    #[error("the broker stopped: {0}")]
    Stopped(String),
    /// The broker did not answer a CONNECT in time.
    #[error("the broker on 127.0.0.1:{port} did not answer within {timeout:?}")]
    NotReady { port: u16, timeout: Duration },
}

/// A running embedded broker. Dropping it does not stop the broker (see the module doc).
#[derive(Debug)]
pub struct BrokerHandle {
    port: u16,
    thread: JoinHandle<()>,
}

impl BrokerHandle {
    /// The TCP port the broker listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`, for [`crate::uplink::UplinkSettings::url`].
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to :0, read, released).
///
/// # Errors
/// The probe socket could not be bound.
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(Error::NoFreePort)?;
    Ok(listener.local_addr().map_err(Error::NoFreePort)?.port())
}

/// Starts a broker on `127.0.0.1:port` (`0`: a free port, see [`BrokerHandle::port`]) on its
/// own threads and returns once it answers MQTT.
///
/// # Errors
/// The port is taken, the thread cannot be spawned, or the broker does not come up within 5 s.
pub fn start(port: u16) -> Result<BrokerHandle, Error> {
    // rumqttd binds inside its own thread and only logs a bind failure: pick and check the
    // port here, where the error can be returned.
    let port = if port == 0 { free_port()? } else { port };
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return Err(Error::PortInUse(port));
    }
    let config = config(port);
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let outcome = match broker.start() {
                Ok(()) => "its servers ended".to_owned(),
                Err(e) => e.to_string(),
            };
            let _ = done_tx.send(outcome);
        })
        .map_err(Error::Spawn)?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(why) = done_rx.try_recv() {
            return Err(Error::Stopped(why));
        }
        if answers_connect(port) {
            return Ok(BrokerHandle { port, thread });
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                port,
                timeout: READY_TIMEOUT,
            });
        }
        // Nothing to await: the server binds inside rumqttd's thread. Probe again shortly.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a broker on `127.0.0.1:port` until the process ends (the `broker` subcommand).
///
/// # Errors
/// As [`start`]; or [`Error::Stopped`] if rumqttd's threads end.
pub fn run_forever(port: u16) -> Result<std::convert::Infallible, Error> {
    let handle = start(port)?;
    tracing::info!(port = handle.port, "MQTT broker listening on 127.0.0.1.");
    let _ = handle.thread.join();
    Err(Error::Stopped("the broker thread ended".to_owned()))
}

/// rumqttd's configuration, built in code: one v4 server on 127.0.0.1:`port`.
fn config(port: u16) -> Config {
    let connections = ConnectionSettings {
        // Time allowed between TCP accept and the CONNECT packet.
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        // Generous: a gateway resending a backlog pipelines up to its window (32) plus status
        // and command results; a test subscriber may lag behind.
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4-local".to_owned(),
        listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = RouterConfig {
        max_connections: 1000,
        max_outgoing_packet_count: 200,
        // Commit log segments hold messages in memory: 16 MiB × 10 bounds a demo's footprint.
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: rumqttd::Strategy::default(),
    };
    Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    }
}

/// Whether an MQTT 3.1.1 CONNECT on `127.0.0.1:port` gets an accepting CONNACK. A bare TCP
/// probe would make rumqttd log an error for the half-made connection; this one is clean.
fn answers_connect(port: u16) -> bool {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let client_id = b"vgw-broker-probe";
    let mut connect = vec![0x10, 0];
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0A]);
    connect.extend_from_slice(&[0x00, client_id.len() as u8]);
    connect.extend_from_slice(client_id);
    connect[1] = (connect.len() - 2) as u8;
    if stream.write_all(&connect).is_err() {
        return false;
    }
    let mut connack = [0u8; 4];
    let ok = stream.read_exact(&mut connack).is_ok() && connack == [0x20, 0x02, 0x00, 0x00];
    // DISCONNECT: a clean end, no will, nothing logged.
    let _ = stream.write_all(&[0xE0, 0x00]);
    ok
}

#[cfg(test)]
mod tests {
    use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};

    use super::*;

    fn client(port: u16, id: &str) -> (AsyncClient, EventLoop) {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        AsyncClient::new(opts, 16)
    }

    async fn next_packet(el: &mut EventLoop) -> Packet {
        loop {
            if let Event::Incoming(p) = el.poll().await.unwrap() {
                return p;
            }
        }
    }

    #[test]
    fn start_with_port_zero_picks_a_port_and_answers_mqtt() {
        let broker = start(0).unwrap();
        assert_ne!(broker.port(), 0);
        assert!(answers_connect(broker.port()));
        assert!(matches!(start(broker.port()), Err(Error::PortInUse(_))));
    }

    #[tokio::test]
    async fn broker_acks_qos1_keeps_retained_messages_and_fires_last_wills() {
        let broker = start(0).unwrap();
        let port = broker.port();

        // A publisher with a will, publishing a retained QoS 1 message.
        let mut opts = MqttOptions::new("publisher", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_last_will(LastWill::new("t/will", "gone", QoS::AtLeastOnce, true));
        let (publisher, mut pub_loop) = AsyncClient::new(opts, 16);
        assert!(matches!(
            next_packet(&mut pub_loop).await,
            Packet::ConnAck(_)
        ));
        publisher
            .publish("t/retained", QoS::AtLeastOnce, true, "kept")
            .await
            .unwrap();
        loop {
            if let Packet::PubAck(_) = next_packet(&mut pub_loop).await {
                break;
            }
        }

        // A later subscriber gets the retained message.
        let (subscriber, mut sub_loop) = client(port, "subscriber");
        assert!(matches!(
            next_packet(&mut sub_loop).await,
            Packet::ConnAck(_)
        ));
        subscriber.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
        let retained = loop {
            if let Packet::Publish(p) = next_packet(&mut sub_loop).await {
                break p;
            }
        };
        assert_eq!(retained.topic, "t/retained");
        assert_eq!(&retained.payload[..], b"kept");
        assert!(retained.retain);

        // The publisher vanishes without DISCONNECT: its will is published.
        drop(pub_loop);
        drop(publisher);
        let will = loop {
            if let Packet::Publish(p) = next_packet(&mut sub_loop).await {
                if p.topic == "t/will" {
                    break p;
                }
            }
        };
        assert_eq!(&will.payload[..], b"gone");
    }
}
