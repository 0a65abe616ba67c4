//! One Modbus transaction at a time over a serial port (RTU) or a TCP connection, with the
//! safeguards tokio-modbus lacks (CRATES.md): a deadline on every transaction, the t3.5 silent
//! interval, input flushed before every request, a guard delay after a failure, RS-485 echo
//! removal, strict reply validation, MBAP reconnection.
//!
//! Invariants:
//! - A reply is returned only if [`frame`](super::frame) validated it against the request just
//!   sent: unit, function, count, write echo, CRC (RTU) or transaction id (TCP). A late or foreign
//!   frame is an error, never a value for the wrong unit.
//! - RTU resynchronisation inside a transaction: bytes in front of the reply that cannot start
//!   it (noise as the transceivers turn around, a late reply of another unit, an unexpected
//!   echo) are skipped one at a time and the reply is hunted for behind them, each candidate
//!   validated in full as above. A frame still arriving is never cut short for one inside it:
//!   the bytes behind an incomplete frame are tried only once the deadline has passed. A skipped whole frame (valid CRC) is counted in its class
//!   (foreign, frame error), noise as [`LinkStats::skipped_bytes`]. If no valid reply arrives by
//!   the deadline, the error at the reply's position is returned (CRC, foreign, function...),
//!   or a timeout ([`LinkStats::truncated`] if part of a frame came).
//! - Every call ends by its deadline: `timeout` + the request's own wire time (a tty write
//!   returns once the bytes are in the kernel buffer, before they leave the wire).
//! - Before each request the link waits until the bus has been quiet for t3.5 plus the bus's
//!   `turnaround` after the last reply (or until the guard delay after a failure is over), then discards every byte waiting in the OS input
//!   buffer, so a late reply to an earlier request is never taken as the next answer.
//! - TCP: after a timeout or a bad frame the connection is dropped; the next call reconnects, so
//!   transaction ids never drift.
//! - Nothing here panics; errors are [`Error`] values and are counted in [`LinkStats`].
//!
//! Not here: retries, scheduling, which unit to ask, reopening a port after an I/O error (the
//! owner drops the `Link` and calls [`Link::open`] again with backoff), RS-485 direction control
//! (adapters switch in hardware).
//!
//! A `Link` is `Send`, not shared: one owning task per bus, on the bus's own thread (the
//! silent interval, under 5 ms, is slept with a blocking sleep for precision). It never calls `tcdrain` (that is a
//! blocking syscall in tokio-serial's `flush`); the wire time is added to the deadline instead.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialStream};
use tracing::debug;

use super::frame::{
    check_crc, decode_rtu_response, decode_tcp_response, encode_rtu_request, encode_tcp_request,
    expected_rtu_reply_len, silent_interval, wire_time, Decoded, FrameError, Reply, Request,
    RequestError, Response, MAX_RTU_FRAME, MAX_TCP_FRAME,
};
use crate::event::UnitId;

/// Parity of a serial line (`parity = "none" | "even" | "odd"` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Where a bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus RTU on a serial port, always 8 data bits, no flow control.
    Rtu {
        /// Device path, e.g. `/dev/serial/by-id/usb-FTDI_...` or a pty `/dev/pts/3`.
        port: String,
        /// Line speed in baud (bits/s).
        baud: u32,
        parity: Parity,
        /// 1 or 2.
        stop_bits: u8,
        /// The RS-485 adapter reads back its own transmission: read and check it before the reply.
        echo: bool,
    },
    /// Modbus TCP to `host:port`.
    Tcp { addr: String },
}

impl Transport {
    /// Bits per character on the wire: 1 start + 8 data + parity + stop bits (10 for 8N1,
    /// 11 for 8E1 or 8N2). 0 for TCP.
    pub fn bits_per_char(&self) -> u32 {
        match self {
            Transport::Rtu {
                parity, stop_bits, ..
            } => 9 + u32::from(*parity != Parity::None) + u32::from((*stop_bits).clamp(1, 2)),
            Transport::Tcp { .. } => 0,
        }
    }
}

/// How to reach a bus and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSettings {
    pub transport: Transport,
    /// Longest wait for a reply, counted from the moment the request has left the wire (RTU) or
    /// was written (TCP). Also bounds a TCP connect (at least 1 s).
    pub timeout: Duration,
    /// RTU: extra quiet time after every reply, on top of the silent interval t3.5, for slow
    /// units that are not ready to listen again at once (`[[bus]] turnaround`, default 0 ms);
    /// also the quiet time after a broadcast (unit 0) write, so units can act before the next
    /// request (Serial Line V1.02 §2.4.1 "turnaround delay", typically 100–200 ms), and the
    /// minimum guard delay after a failed transaction.
    pub turnaround: Duration,
}

/// Why a transaction failed. The device's own refusal is not here: it is the inner
/// `Err(ExceptionCode)` of [`Link::call`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No complete reply by the deadline (silent unit, truncated frame, wrong baud rate).
    #[error("no complete reply within the timeout")]
    Timeout,
    /// A reply arrived but is not acceptable (CRC, foreign unit, wrong function or count, ...).
    #[error("bad reply: {0}")]
    Frame(#[from] FrameError),
    /// The port or connection failed (adapter unplugged, connection refused). Serial: drop the
    /// `Link` and [`Link::open`] it again with backoff. TCP: the next call reconnects.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The request breaks the spec's limits; nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// `echo = true` but our own transmission did not read back intact: a bus collision, or the
    /// adapter does not echo (then `echo` is misconfigured).
    #[error("local echo of the request missing or corrupted")]
    Echo,
}

/// Counters of a link: for the whole bus ([`Link::stats`]) or for one unit id
/// ([`Link::unit_stats`], where a failure counts against the unit that was asked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStats {
    /// Requests written to the bus (broadcasts included).
    pub transactions: u64,
    /// Calls that ended without a complete reply by the deadline.
    pub timeouts: u64,
    /// Replies with a bad CRC.
    pub crc_errors: u64,
    /// Valid frames from another unit (late replies) or with another transaction id.
    pub foreign_frames: u64,
    /// Other unacceptable replies: wrong function, count or echo, malformed, local echo lost.
    pub frame_errors: u64,
    /// Exception replies from devices.
    pub exceptions: u64,
    /// I/O failures of the port or connection.
    pub io_errors: u64,
    /// Stale bytes discarded from the input before requests (late replies, noise).
    pub stale_bytes: u64,
    /// Timeouts with part of a reply received (a truncated frame); also counted in `timeouts`.
    pub truncated: u64,
    /// Stray bytes skipped in front of a valid reply (line noise as the transceivers turn
    /// around); the reply after them was accepted.
    pub skipped_bytes: u64,
    /// The code of the last exception reply (Application Protocol V1.1b3 §7), if any.
    pub last_exception: Option<u8>,
}

impl LinkStats {
    /// Adds `other`'s counters to these (the last exception code of `other` wins if it has one).
    pub fn add(&mut self, other: &LinkStats) {
        self.transactions += other.transactions;
        self.timeouts += other.timeouts;
        self.crc_errors += other.crc_errors;
        self.foreign_frames += other.foreign_frames;
        self.frame_errors += other.frame_errors;
        self.exceptions += other.exceptions;
        self.io_errors += other.io_errors;
        self.stale_bytes += other.stale_bytes;
        self.truncated += other.truncated;
        self.skipped_bytes += other.skipped_bytes;
        if other.last_exception.is_some() {
            self.last_exception = other.last_exception;
        }
    }

    /// Whether anything went wrong at all: a failure, an exception, or skipped stray bytes.
    pub fn had_trouble(&self) -> bool {
        self.failures() > 0 || self.exceptions > 0 || self.skipped_bytes > 0
    }

    /// Failed transactions of any kind (timeouts, bad frames, I/O), exceptions not included.
    pub fn failures(&self) -> u64 {
        self.timeouts + self.crc_errors + self.foreign_frames + self.frame_errors + self.io_errors
    }
}

/// Every counter of a link: the bus's and each unit's. Survives a reopen when handed from the
/// old link to the new one ([`Link::take_counters`], [`Link::restore_counters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub bus: LinkStats,
    pub units: BTreeMap<u8, LinkStats>,
}

/// One bus: a serial port speaking RTU or a Modbus TCP connection. See the module doc.
#[derive(Debug)]
pub struct Link {
    io: Io,
    timeout: Duration,
    turnaround: Duration,
    stats: LinkStats,
    units: BTreeMap<u8, LinkStats>,
}

#[derive(Debug)]
enum Io {
    Serial(Serial),
    Tcp(Tcp),
}

#[derive(Debug)]
struct Serial {
    port: SerialStream,
    baud: u32,
    bits_per_char: u32,
    echo: bool,
    /// The next request may not start before this instant: end of the last bus activity plus
    /// t3.5, or the end of the guard delay after a failure.
    quiet_until: Instant,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Tcp {
    addr: String,
    stream: Option<TcpStream>,
    transaction: u16,
    buf: Vec<u8>,
}

impl Link {
    /// Opens the serial port (8 data bits, no flow control, exclusive) and discards any stale
    /// input, or connects to the Modbus TCP server.
    ///
    /// # Errors
    /// [`Error::Io`] when the port cannot be opened or configured (missing, busy, permission
    /// denied), the settings are impossible (baud 0, stop bits not 1 or 2), or the TCP connect
    /// fails; [`Error::Timeout`] when the TCP connect takes longer than max(timeout, 1 s).
    pub async fn open(settings: LinkSettings) -> Result<Link, Error> {
        let bits_per_char = settings.transport.bits_per_char();
        let io = match settings.transport {
            Transport::Rtu {
                port,
                baud,
                parity,
                stop_bits,
                echo,
            } => {
                let stop = match stop_bits {
                    1 => tokio_serial::StopBits::One,
                    2 => tokio_serial::StopBits::Two,
                    n => return Err(invalid_input(format!("stop bits must be 1 or 2, not {n}"))),
                };
                if baud == 0 {
                    return Err(invalid_input("baud rate 0".to_owned()));
                }
                let parity = match parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                };
                let stream = tokio_serial::new(&port, baud)
                    .data_bits(tokio_serial::DataBits::Eight)
                    .parity(parity)
                    .stop_bits(stop)
                    .flow_control(tokio_serial::FlowControl::None)
                    .open_native_async()
                    .map_err(|e| Error::Io(io::Error::other(format!("{port}: {e}"))))?;
                let mut serial = Serial {
                    port: stream,
                    baud,
                    bits_per_char,
                    echo,
                    quiet_until: Instant::now(),
                    buf: Vec::with_capacity(2 * MAX_RTU_FRAME),
                };
                let mut discarded = LinkStats::default();
                serial.discard_input(&mut discarded)?;
                Io::Serial(serial)
            }
            Transport::Tcp { addr } => {
                let mut tcp = Tcp {
                    addr,
                    stream: None,
                    transaction: 0,
                    buf: Vec::with_capacity(MAX_TCP_FRAME),
                };
                tcp.connect(settings.timeout).await?;
                Io::Tcp(tcp)
            }
        };
        Ok(Link {
            io,
            timeout: settings.timeout,
            turnaround: settings.turnaround,
            stats: LinkStats::default(),
            units: BTreeMap::new(),
        })
    }

    /// Sends `req` to `unit` and returns its reply: `Ok(Ok(response))`, or `Ok(Err(exception))`
    /// when the device refused it.
    ///
    /// RTU broadcast (unit 0, writes only): the request is sent, the link stays quiet for
    /// `turnaround`, and the expected confirmation is returned without reading anything.
    /// Over TCP, unit 0 is an ordinary unit id (many TCP devices answer to it).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] (nothing sent), [`Error::Timeout`], [`Error::Frame`],
    /// [`Error::Echo`], [`Error::Io`]. After any of them the link is still usable; after
    /// `Io` on a serial port the caller should reopen it.
    pub async fn call(&mut self, unit: UnitId, req: &Request) -> Result<Reply, Error> {
        let mut delta = LinkStats::default();
        let result = match &mut self.io {
            Io::Serial(s) => {
                s.call(&mut delta, self.timeout, self.turnaround, unit, req)
                    .await
            }
            Io::Tcp(t) => t.call(&mut delta, self.timeout, unit, req).await,
        };
        match &result {
            Ok(Err(code)) => {
                delta.exceptions += 1;
                delta.last_exception = Some(code.0);
            }
            Ok(Ok(_)) | Err(Error::InvalidRequest(_)) => {}
            Err(Error::Timeout) => delta.timeouts += 1,
            Err(Error::Io(_)) => delta.io_errors += 1,
            Err(Error::Frame(e)) => count_frame_error(&mut delta, e),
            Err(Error::Echo) => delta.frame_errors += 1,
        }
        if let Err(e) = &result {
            debug!(unit = unit.0, function = req.function_code(), error = %e, "Modbus transaction failed.");
        }
        self.stats.add(&delta);
        // Input discarded before the request is the bus's, not this unit's.
        delta.stale_bytes = 0;
        self.units.entry(unit.0).or_default().add(&delta);
        result
    }

    /// The bus's counters since [`Link::open`] (plus those restored into it).
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The counters of transactions addressed to `unit`: a timeout, a bad or foreign frame in
    /// answer to a request to `unit` counts against `unit`.
    pub fn unit_stats(&self, unit: UnitId) -> LinkStats {
        self.units.get(&unit.0).copied().unwrap_or_default()
    }

    /// Every counter (bus and units), as of now.
    pub fn counters(&self) -> LinkCounters {
        LinkCounters {
            bus: self.stats,
            units: self.units.clone(),
        }
    }

    /// Every counter, leaving zeros behind (before the link is dropped for a reopen).
    pub fn take_counters(&mut self) -> LinkCounters {
        LinkCounters {
            bus: std::mem::take(&mut self.stats),
            units: std::mem::take(&mut self.units),
        }
    }

    /// Adds `counters` (taken from the link this one replaces) to this link's.
    pub fn restore_counters(&mut self, counters: &LinkCounters) {
        self.stats.add(&counters.bus);
        for (unit, s) in &counters.units {
            self.units.entry(*unit).or_default().add(s);
        }
    }
}

impl Serial {
    async fn call(
        &mut self,
        stats: &mut LinkStats,
        timeout: Duration,
        turnaround: Duration,
        unit: UnitId,
        req: &Request,
    ) -> Result<Reply, Error> {
        let frame = encode_rtu_request(unit, req)?;
        self.wait_quiet().await;
        self.discard_input(stats)?;

        stats.transactions += 1;
        let request_wire = wire_time(frame.len(), self.baud, self.bits_per_char);
        let write_deadline = Instant::now() + request_wire + timeout;
        match timeout_at(write_deadline, self.port.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Io(e)),
            Err(_) => {
                self.guard(turnaround, req);
                return Err(Error::Timeout);
            }
        }
        let sent = Instant::now();
        let deadline = sent + request_wire + timeout;

        if self.echo {
            if let Err(e) = self.read_echo(&frame, deadline).await {
                self.guard(turnaround, req);
                return Err(e);
            }
        }
        if unit.0 == 0 {
            self.quiet_until = sent + request_wire + turnaround;
            return broadcast_confirmation(req)
                .map(Ok)
                .ok_or(Error::InvalidRequest(RequestError::BroadcastRead));
        }

        self.buf.clear();
        // Bytes before `skip` cannot start the reply (stray bytes, a late or foreign frame):
        // the reply is hunted for after them, each candidate validated in full.
        let mut skip = 0usize;
        let mut first_error: Option<FrameError> = None;
        loop {
            if let Some((reply, offset)) =
                hunt(&self.buf, &mut skip, &mut first_error, unit, req, false)
            {
                return Ok(self.accept(stats, turnaround, unit, reply, offset, &first_error));
            }
            if self.buf.len() > 2 * MAX_RTU_FRAME {
                // A babbling line: no reply fits in what is left of it.
                self.guard(turnaround, req);
                return Err(Error::Frame(first_error.unwrap_or(FrameError::Malformed)));
            }
            let mut chunk = [0u8; MAX_RTU_FRAME];
            match timeout_at(deadline, self.port.read(&mut chunk)).await {
                Ok(Ok(0)) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(Error::Io(e)),
                Err(_) => {
                    // Nothing more is coming: a frame still waiting for bytes at the reply's
                    // position was not the reply; a valid one may sit behind it.
                    if let Some((reply, offset)) =
                        hunt(&self.buf, &mut skip, &mut first_error, unit, req, true)
                    {
                        return Ok(self.accept(
                            stats,
                            turnaround,
                            unit,
                            reply,
                            offset,
                            &first_error,
                        ));
                    }
                    self.guard(turnaround, req);
                    if let Some(e) = first_error {
                        return Err(Error::Frame(e));
                    }
                    if !self.buf.is_empty() {
                        stats.truncated += 1;
                        debug!(
                            unit = unit.0,
                            bytes = self.buf.len(),
                            "Incomplete reply at the deadline."
                        );
                    }
                    return Err(Error::Timeout);
                }
            }
        }
    }

    /// Waits until `quiet_until`. tokio's timer has a 1 ms granularity and rounds up, which
    /// adds about 1 ms to a 4 ms silent interval at 9600 baud (a quarter of the gap, and about
    /// 3 % of a whole poll); a wait this short is slept on the thread instead, which is the
    /// bus's own (see the module doc), so it stalls nothing else.
    async fn wait_quiet(&self) {
        const PRECISE_BELOW: Duration = Duration::from_millis(5);
        let now = Instant::now();
        if self.quiet_until <= now {
            return;
        }
        let wait = self.quiet_until - now;
        if wait < PRECISE_BELOW {
            std::thread::sleep(wait);
        } else {
            sleep_until(self.quiet_until).await;
        }
    }

    /// A valid reply found after `offset` skipped bytes: counts them, starts the quiet time.
    fn accept(
        &mut self,
        stats: &mut LinkStats,
        turnaround: Duration,
        unit: UnitId,
        reply: Reply,
        offset: usize,
        first_error: &Option<FrameError>,
    ) -> Reply {
        if let Some(e) = first_error {
            // A whole frame in front (a late reply, our own echo) is counted in its class;
            // noise only as skipped bytes.
            if check_crc(&self.buf[..offset]) {
                count_frame_error(stats, e);
            }
            debug!(unit = unit.0, skipped = offset, error = %e, "Reply found after stray bytes.");
        }
        stats.skipped_bytes += offset as u64;
        self.quiet_until = Instant::now() + silent_interval(self.baud) + turnaround;
        reply
    }

    /// Reads back our own transmission (RS-485 adapters with echo) and checks it.
    async fn read_echo(&mut self, frame: &[u8], deadline: Instant) -> Result<(), Error> {
        let mut echo = vec![0u8; frame.len()];
        match timeout_at(deadline, self.port.read_exact(&mut echo)).await {
            Ok(Ok(_)) if echo == frame => Ok(()),
            Ok(Ok(_)) | Err(_) => Err(Error::Echo),
            Ok(Err(e)) => Err(Error::Io(e)),
        }
    }

    /// After a failed transaction: keep the bus quiet long enough for a late reply to `req` to
    /// finish arriving (turnaround or t3.5, whichever is longer, plus the reply's wire time);
    /// the next call then discards it with the rest of the input.
    fn guard(&mut self, turnaround: Duration, req: &Request) {
        let reply_wire = wire_time(expected_rtu_reply_len(req), self.baud, self.bits_per_char);
        self.quiet_until = Instant::now() + turnaround.max(silent_interval(self.baud)) + reply_wire;
    }

    /// Discards every byte waiting in the input: reads until `WouldBlock` (bytes already in the
    /// tty layer), then `tcflush(TCIFLUSH)` for the driver's buffer.
    fn discard_input(&mut self, stats: &mut LinkStats) -> Result<(), Error> {
        let mut chunk = [0u8; 256];
        // Bounded: a babbling bus must not keep us here; what is left fails the CRC later.
        for _ in 0..256 {
            match self.port.try_read(&mut chunk) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => stats.stale_bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        if let Err(e) = self.port.clear(ClearBuffer::Input) {
            // Not fatal: the reads above emptied what the kernel had; a dead port shows on write.
            debug!(error = %e, "Cannot flush the serial input buffer.");
        }
        Ok(())
    }
}

impl Tcp {
    async fn connect(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout.max(Duration::from_secs(1));
        let stream = match timeout_at(deadline, TcpStream::connect(&self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Error::Io(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", self.addr),
                )))
            }
            Err(_) => return Err(Error::Timeout),
        };
        // Requests are small and latency matters more than packet count.
        stream.set_nodelay(true)?;
        self.stream = Some(stream);
        Ok(())
    }

    async fn call(
        &mut self,
        stats: &mut LinkStats,
        timeout: Duration,
        unit: UnitId,
        req: &Request,
    ) -> Result<Reply, Error> {
        self.transaction = self.transaction.wrapping_add(1);
        let tid = self.transaction;
        let frame = encode_tcp_request(tid, unit, req)?;
        if self.stream.is_some() && !self.drain(stats) {
            self.stream = None;
        }
        if self.stream.is_none() {
            self.connect(timeout).await?;
        }
        let result = self.exchange(stats, timeout, tid, unit, req, &frame).await;
        if result.is_err() {
            // A timed-out or confused connection may still deliver the old reply: start afresh.
            self.stream = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        stats: &mut LinkStats,
        timeout: Duration,
        tid: u16,
        unit: UnitId,
        req: &Request,
        frame: &[u8],
    ) -> Result<Reply, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Io(io::ErrorKind::NotConnected.into()));
        };
        stats.transactions += 1;
        let deadline = Instant::now() + timeout;
        match timeout_at(deadline, stream.write_all(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Io(e)),
            Err(_) => return Err(Error::Timeout),
        }
        self.buf.clear();
        loop {
            match decode_tcp_response(&self.buf, tid, unit, req)? {
                Decoded::NeedMore(_) => {}
                Decoded::Complete(reply, _) => return Ok(reply),
            }
            let mut chunk = [0u8; MAX_TCP_FRAME];
            match timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(Error::Io(e)),
                Err(_) => return Err(Error::Timeout),
            }
        }
    }

    /// Discards unread bytes on an idle connection. False if the connection is closed or broken.
    fn drain(&mut self, stats: &mut LinkStats) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let mut chunk = [0u8; 256];
        for _ in 0..64 {
            match stream.try_read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => stats.stale_bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        // Still babbling after 16 KiB: not a sane Modbus server connection.
        false
    }
}

/// Looks for the reply to `req` from `unit` in `buf`, from `*skip` on. An offset where no
/// frame can start is skipped for good (`*skip` advances, the first such error is kept). At a
/// frame still waiting for bytes it stops and waits, so that a frame is never taken out of the
/// middle of a longer one that is still arriving; with `final_try` (the deadline has passed:
/// that frame will never complete) the offsets behind it are tried too.
fn hunt(
    buf: &[u8],
    skip: &mut usize,
    first_error: &mut Option<FrameError>,
    unit: UnitId,
    req: &Request,
    final_try: bool,
) -> Option<(Reply, usize)> {
    let mut offset = *skip;
    while offset < buf.len() {
        match decode_rtu_response(&buf[offset..], unit, req) {
            Ok(Decoded::Complete(reply, _)) => return Some((reply, offset)),
            Ok(Decoded::NeedMore(_)) if !final_try => return None,
            Ok(Decoded::NeedMore(_)) => offset += 1,
            Err(e) => {
                if offset == *skip {
                    *skip += 1;
                    first_error.get_or_insert(e);
                }
                offset += 1;
            }
        }
    }
    None
}

/// Counts a bad frame in its class.
fn count_frame_error(stats: &mut LinkStats, e: &FrameError) {
    match e {
        FrameError::Crc => stats.crc_errors += 1,
        FrameError::ForeignUnit { .. } | FrameError::WrongTransaction { .. } => {
            stats.foreign_frames += 1;
        }
        _ => stats.frame_errors += 1,
    }
}

/// The confirmation a broadcast write would have had; `None` for reads (never broadcast).
fn broadcast_confirmation(req: &Request) -> Option<Response> {
    let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    match req {
        Request::WriteSingleCoil { address, on } => Some(Response::WriteSingleCoil {
            address: *address,
            on: *on,
        }),
        Request::WriteSingleRegister { address, value } => Some(Response::WriteSingleRegister {
            address: *address,
            value: *value,
        }),
        Request::WriteMultipleCoils { address, values } => Some(Response::WriteMultiple {
            address: *address,
            count: count(values.len()),
        }),
        Request::WriteMultipleRegisters { address, values } => Some(Response::WriteMultiple {
            address: *address,
            count: count(values.len()),
        }),
        _ => None,
    }
}

fn invalid_input(what: String) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::InvalidInput, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_char_counts_start_data_parity_and_stop() {
        let rtu = |parity, stop_bits| Transport::Rtu {
            port: String::new(),
            baud: 9600,
            parity,
            stop_bits,
            echo: false,
        };
        assert_eq!(rtu(Parity::None, 1).bits_per_char(), 10);
        assert_eq!(rtu(Parity::Even, 1).bits_per_char(), 11);
        assert_eq!(rtu(Parity::None, 2).bits_per_char(), 11);
        assert_eq!(rtu(Parity::Odd, 2).bits_per_char(), 12);
    }

    #[test]
    fn broadcast_confirmation_mirrors_the_write_and_refuses_reads() {
        let req = Request::WriteMultipleCoils {
            address: 3,
            values: vec![true; 5],
        };
        assert_eq!(
            broadcast_confirmation(&req),
            Some(Response::WriteMultiple {
                address: 3,
                count: 5
            })
        );
        assert_eq!(
            broadcast_confirmation(&Request::ReadCoils {
                address: 0,
                count: 1
            }),
            None
        );
    }

    #[tokio::test]
    async fn opening_a_missing_port_is_an_io_error_not_a_panic() {
        let settings = LinkSettings {
            transport: Transport::Rtu {
                port: "/dev/does-not-exist-vgw".into(),
                baud: 9600,
                parity: Parity::None,
                stop_bits: 1,
                echo: false,
            },
            timeout: Duration::from_millis(100),
            turnaround: Duration::from_millis(10),
        };
        assert!(matches!(Link::open(settings).await, Err(Error::Io(_))));
    }
}
