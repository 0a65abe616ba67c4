//! From [`UplinkSettings`] to rumqttc options: URL parsing, validation, TLS, topics, backoff.
//!
//! - Everything rumqttc's setters would `assert!` on is checked here first and returned as an
//!   [`Error`] (keep-alive under 1 s, an empty client id, ...).
//! - TLS uses rustls with the ring provider only; roots come from `ca_file` (no system store:
//!   rumqttc's default loader panics without one, CRATES.md). Files are read on every connection
//!   attempt, so renewed certificates are picked up without a restart.
//! - No I/O other than reading the TLS files.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::{Error, UplinkSettings};
use crate::event::EventKind;

/// Largest MQTT packet we send: 256 KiB (an event or a status is about 0.5 KiB).
const MAX_OUTGOING_PACKET_BYTES: usize = 256 * 1024;
/// Largest MQTT packet we accept: 4 MiB. rumqttc's default (10 KiB) is below a `cards.sync`
/// for 1000 rooms (~150 KB), and rumqttc ends the connection on a larger packet instead of
/// skipping it; commands above [`super::MAX_COMMAND_BYTES`] (1 MiB) are refused with an error
/// result, so only a packet over 4 MiB on our command topics still costs a reconnect.
pub(crate) const MAX_INCOMING_PACKET_BYTES: usize = 4 * 1024 * 1024;
/// rumqttc's own in-flight limit: our event window plus room for status and command results.
/// rumqttc numbers publishes 1..=this in turn, so a larger cycle than what we keep in flight
/// means a packet id comes round again only after its PUBACK (no collision while the broker
/// acknowledges in order).
#[allow(clippy::cast_possible_truncation)] // checked by the assertion below
const CLIENT_INFLIGHT: u16 = (super::EVENT_WINDOW + 64) as u16;
const _: () = assert!(super::EVENT_WINDOW + 64 <= u16::MAX as usize);
/// The will's payload (DESIGN.md §3).
pub(crate) const OFFLINE_PAYLOAD: &str = r#"{"online":false}"#;

/// The broker endpoint parsed from `mqtt://host:port` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
}

/// Parses the `[uplink] url`. Default ports: 1883 (mqtt), 8883 (mqtts).
pub(crate) fn parse_url(url: &str) -> Result<Endpoint, Error> {
    let bad = |why: &str| Error::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(bad("the scheme must be mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "only host and port are allowed (no path, query or user)",
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in an IPv6 host"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be 1..=65535")),
            Ok(p) => p,
        },
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The static checks of [`super::validate`], without reading any file.
pub(crate) fn check(settings: &UplinkSettings) -> Result<Endpoint, Error> {
    let endpoint = parse_url(&settings.url)?;
    let invalid = |key: &'static str, why: String| Error::Invalid { key, why };
    if settings.client_id.is_empty() || settings.client_id.len() > 256 {
        return Err(invalid("client_id", "must be 1..=256 bytes".to_owned()));
    }
    for (key, value) in [
        ("gateway.id", &settings.gateway_id),
        ("topic_prefix", &settings.topic_prefix),
    ] {
        if value.is_empty()
            || value.contains(['+', '#', '\0'])
            || value.starts_with('/')
            || value.ends_with('/')
        {
            return Err(invalid(
                key,
                format!("{value:?} is not a usable topic level"),
            ));
        }
    }
    if settings.gateway_id.contains('/') {
        return Err(invalid("gateway.id", "must not contain '/'".to_owned()));
    }
    // MQTT keep-alive is a u16 of seconds; rumqttc asserts >= 1 s (or 0 = off, which would
    // disable our half-open link detection).
    if settings.keep_alive < Duration::from_secs(1)
        || settings.keep_alive > Duration::from_secs(65_535)
    {
        return Err(invalid(
            "keep_alive",
            format!("{:?} is outside 1 s ..= 65535 s", settings.keep_alive),
        ));
    }
    if !(1..=super::EVENT_WINDOW).contains(&settings.batch_events) {
        return Err(invalid(
            "batch_events",
            format!(
                "{} is outside 1 ..= {} (the events in flight)",
                settings.batch_events,
                super::EVENT_WINDOW
            ),
        ));
    }
    if settings.password.is_some() && settings.username.is_none() {
        return Err(invalid(
            "password",
            "MQTT 3.1.1 allows a password only with a username".to_owned(),
        ));
    }
    if settings.cert_file.is_some() != settings.key_file.is_some() {
        return Err(invalid(
            "cert_file",
            "cert_file and key_file go together".to_owned(),
        ));
    }
    if endpoint.tls && settings.ca_file.is_none() {
        return Err(invalid(
            "ca_file",
            "mqtts:// needs ca_file (e.g. /etc/ssl/certs/ca-certificates.crt for a public CA)"
                .to_owned(),
        ));
    }
    if !endpoint.tls && (settings.ca_file.is_some() || settings.cert_file.is_some()) {
        return Err(invalid(
            "url",
            "ca_file/cert_file are set but the url is mqtt://, not mqtts://".to_owned(),
        ));
    }
    Ok(endpoint)
}

/// The complete rumqttc options for one connection attempt (reads the TLS files).
pub(crate) fn mqtt_options(
    settings: &UplinkSettings,
    topics: &Topics,
) -> Result<MqttOptions, Error> {
    let endpoint = check(settings)?;
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        endpoint.host.clone(),
        endpoint.port,
    );
    // All setters below get values checked by `check`: none of their asserts can fire.
    options
        .set_keep_alive(settings.keep_alive)
        // Clean session: rumqttc drops in-flight publishes on reconnect anyway; the store resends.
        .set_clean_session(true)
        .set_inflight(CLIENT_INFLIGHT)
        .set_max_packet_size(MAX_INCOMING_PACKET_BYTES, MAX_OUTGOING_PACKET_BYTES)
        .set_last_will(LastWill::new(
            topics.status(),
            OFFLINE_PAYLOAD,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &settings.username {
        options.set_credentials(user.clone(), settings.password.clone().unwrap_or_default());
    }
    if endpoint.tls {
        let config = tls_config(settings)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}

/// A rustls client config with the ring provider, roots from `ca_file`, optional client cert.
pub(crate) fn tls_config(settings: &UplinkSettings) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &settings.ca_file {
        for cert in rustls_pemfile::certs(&mut open(ca)?) {
            let cert = cert.map_err(|e| tls_err(ca, &e))?;
            roots.add(cert).map_err(|e| tls_err(ca, &e))?;
        }
        if roots.is_empty() {
            return Err(tls_err(ca, &"no certificate in the file"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&settings.cert_file, &settings.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = rustls_pemfile::certs(&mut open(cert_file)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err(cert_file, &e))?;
            if certs.is_empty() {
                return Err(tls_err(cert_file, &"no certificate in the file"));
            }
            let key = rustls_pemfile::private_key(&mut open(key_file)?)
                .map_err(|e| tls_err(key_file, &e))?
                .ok_or_else(|| tls_err(key_file, &"no private key in the file"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(cert_file, &e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn open(path: &Path) -> Result<BufReader<File>, Error> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))
}

fn tls_err(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Tls(format!("{}: {e}", path.display()))
}

/// The topics of one gateway (DESIGN.md §3).
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    base: String,
}

impl Topics {
    pub(crate) fn new(prefix: &str, gateway_id: &str) -> Self {
        Topics {
            base: format!("{prefix}/{gateway_id}"),
        }
    }

    /// `<prefix>/<gw>/event/<type>`.
    pub(crate) fn event(&self, kind: EventKind) -> String {
        format!("{}/event/{}", self.base, kind.as_str())
    }

    /// `<prefix>/<gw>/events`: CloudEvents batches (a JSON array of envelopes).
    pub(crate) fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// `<prefix>/<gw>/status`, retained.
    pub(crate) fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `<prefix>/<gw>/cmd/+`, the command subscription.
    pub(crate) fn commands_filter(&self) -> String {
        format!("{}/cmd/+", self.base)
    }

    /// The command name of a topic under `<prefix>/<gw>/cmd/`, if it is one.
    pub(crate) fn command_name<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let name = topic
            .strip_prefix(self.base.as_str())?
            .strip_prefix("/cmd/")?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }

    /// `<prefix>/<gw>/cmd-result`.
    pub(crate) fn command_result(&self) -> String {
        format!("{}/cmd-result", self.base)
    }
}

/// Exponential backoff with jitter between connection attempts: 200 ms doubling to 30 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// After a connection that worked: start from the initial delay again.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The next delay: half the current step plus `entropy`-driven jitter over the other half
    /// (so gateways that lost the same broker do not come back in lockstep); then double.
    pub(crate) fn next_delay(&mut self, entropy: u32) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = step / 2;
        let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_millis(u64::from(entropy) % half_ms)
    }
}

/// A cheap jitter source: the sub-second nanos of the wall clock. Good enough to spread
/// reconnects; no new dependency.
pub(crate) fn entropy() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn settings(url: &str) -> UplinkSettings {
        UplinkSettings {
            url: url.to_owned(),
            client_id: "vgw-yian".to_owned(),
            gateway_id: "yian".to_owned(),
            topic_prefix: "village".to_owned(),
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            batch_events: super::super::DEFAULT_BATCH_EVENTS,
        }
    }

    #[test]
    fn urls_give_host_port_and_tls_with_default_ports() {
        assert_eq!(
            parse_url("mqtt://broker.example:1884").unwrap(),
            Endpoint {
                host: "broker.example".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://b.example").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://b.example/").unwrap().port, 1883);
        assert_eq!(
            parse_url("mqtt://[::1]:1999").unwrap(),
            Endpoint {
                host: "::1".into(),
                port: 1999,
                tls: false
            }
        );
    }

    #[test]
    fn bad_urls_are_errors_not_panics() {
        for url in [
            "http://x",
            "mqtt://",
            "mqtt://x:0",
            "mqtt://x:99999",
            "mqtt://x/path",
            "mqtt://[::1",
            "mqtt://u@x",
        ] {
            assert!(parse_url(url).is_err(), "{url} should be rejected");
        }
    }

    #[test]
    fn settings_rumqttc_would_panic_on_are_rejected() {
        let mut s = settings("mqtt://x");
        s.keep_alive = Duration::from_millis(500);
        assert!(matches!(
            check(&s),
            Err(Error::Invalid {
                key: "keep_alive",
                ..
            })
        ));
        let mut s = settings("mqtt://x");
        s.client_id = String::new();
        assert!(matches!(
            check(&s),
            Err(Error::Invalid {
                key: "client_id",
                ..
            })
        ));
        let mut s = settings("mqtt://x");
        s.topic_prefix = "a/#".into();
        assert!(check(&s).is_err());
        let mut s = settings("mqtt://x");
        s.password = Some("p".into());
        assert!(check(&s).is_err());
        for batch_events in [0, super::super::EVENT_WINDOW + 1] {
            let mut s = settings("mqtt://x");
            s.batch_events = batch_events;
            assert!(
                matches!(
                    check(&s),
                    Err(Error::Invalid {
                        key: "batch_events",
                        ..
                    })
                ),
                "batch_events {batch_events}"
            );
        }
        assert!(
            check(&settings("mqtts://x")).is_err(),
            "mqtts without ca_file"
        );
        assert!(check(&settings("mqtt://x")).is_ok());
    }

    #[test]
    fn a_missing_ca_file_is_an_error_at_validation() {
        let mut s = settings("mqtts://x");
        s.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        assert!(check(&s).is_ok());
        assert!(matches!(tls_config(&s), Err(Error::Tls(_))));
    }

    #[test]
    fn topics_follow_the_uplink_contract() {
        let t = Topics::new("village", "yian");
        assert_eq!(
            t.event(EventKind::FireAlarm),
            "village/yian/event/fire.alarm"
        );
        assert_eq!(t.events(), "village/yian/events");
        assert_eq!(t.status(), "village/yian/status");
        assert_eq!(t.commands_filter(), "village/yian/cmd/+");
        assert_eq!(t.command_result(), "village/yian/cmd-result");
        assert_eq!(t.command_name("village/yian/cmd/silence"), Some("silence"));
        assert_eq!(t.command_name("village/yian/cmd/"), None);
        assert_eq!(t.command_name("village/other/cmd/silence"), None);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let d = b.next_delay(0);
        assert_eq!(d, Duration::from_millis(100));
        let d = b.next_delay(u32::MAX);
        assert!(d >= Duration::from_millis(200) && d < Duration::from_millis(400));
        for _ in 0..20 {
            assert!(b.next_delay(12345) <= Duration::from_secs(30));
        }
        assert!(b.next_delay(0) >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay(7) < Duration::from_millis(200));
    }
}
