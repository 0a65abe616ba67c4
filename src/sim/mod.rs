//! The built-in field simulator: Modbus slaves serving exactly the generic layouts of
//! `shared/devices/generic.toml` (`generic-smoke`, `generic-relay`, `generic-door`), on a
//! pseudo-terminal, a real serial port, or Modbus TCP. It serves the demo, the tests, the
//! benchmarks and installers' training (`village-gateway simulate`, [`Simulator::run_console`]).
//!
//! Invariants:
//! - **Wire time is emulated** on serial transports (a pty has no baud rate): a reply leaves at
//!   (the instant the request arrived) + request wire time + t3.5 + reply wire time, for the
//!   configured baud rate and framing, timed with a blocking sleep on the port's own thread
//!   (typically < 0.1 ms late). A write takes effect, and its [`SimEvent::at`] is stamped, at
//!   the instant the request's last byte would have arrived on a real line.
//! - A unit that is unknown or offline stays silent; a frame with a bad CRC gets no reply (as on
//!   a real bus). An unsupported function gets exception 1, an address outside the layout 2, a
//!   count out of range 3. Broadcast (unit 0) writes reach every online unit and get no reply.
//! - Nothing panics on any input: the codec is [`crate::field::frame`], shared with the gateway.
//! - Each served port runs on its own OS thread with a current-thread runtime, and stops when
//!   its guard (or future) is dropped.
//! - Fault injection for tests: a unit can go offline ([`Simulator::set_offline`]), answer late
//!   ([`Simulator::set_reply_delay`]), send bad CRCs ([`Simulator::set_corrupt_replies`]); the
//!   line can echo the gateway's bytes like some RS-485 adapters ([`Simulator::set_adapter_echo`]);
//!   a unit's next replies can arrive mangled in every way a bad bus mangles them
//!   ([`Simulator::inject`], [`ReplyFault`]).
//!
//! Not here: the gateway side; realistic detector physics (the detector does not latch: its
//! status follows [`Simulator::set_smoke`]; a remote reset is recorded and changes nothing);
//! door card events (the door's FIFO stays empty, its contact closed).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::event::UnitId;
use crate::field::frame::{
    decode_rtu_request, decode_tcp_request, encode_rtu_response, encode_tcp_response,
    silent_interval_for, wire_time, Decoded, ExceptionCode, FrameError, Reply, Request, Response,
};
use crate::field::link::Parity;

mod faults;
#[cfg(test)]
mod tests;

pub use faults::ReplyFault;

/// The generic device layouts the simulator can play (`shared/devices/generic.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimProfile {
    /// `generic-smoke`: input registers 0..=3 (status, density ×0.01 dB/m, fault bits,
    /// heartbeat), holding register 16 (remote reset).
    Smoke,
    /// `generic-relay`: coils 0..=7 (FC01/05/15), discrete inputs 0..=7 (FC02, panel keys).
    Relay,
    /// `generic-door`: input registers 0..=6 (contact, FIFO depth and head), coil 0 (lock
    /// release), holding register 32 (FIFO pop).
    Door,
    /// A smoke detector that reports on discrete inputs like the Calectro UG-3-O-MB-R
    /// (`shared/devices/smoke_detector.toml`): 0 = head mounted (clear in [`SmokeState::Fault`]),
    /// 1 = service alarm (never set), 2 = smoke alarm, 3 = relay (follows the alarm); holding
    /// register 0 (alarm reset). No input registers.
    SmokeBits,
}

/// What a simulated smoke detector reports (status register values of `generic-smoke`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmokeState {
    /// 0.
    Normal,
    /// 1: a fire input.
    Alarm,
    /// 3: a warning only.
    PreAlarm,
    /// 2, with fault bit 0 (chamber) set.
    Fault,
    /// 4: the detector's test button.
    Test,
}

impl SmokeState {
    fn register(self) -> u16 {
        match self {
            SmokeState::Normal => 0,
            SmokeState::Alarm => 1,
            SmokeState::Fault => 2,
            SmokeState::PreAlarm => 3,
            SmokeState::Test => 4,
        }
    }
}

/// Something the simulated field did or had done to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimEvent {
    /// When: for writes, the instant the request was fully received (on a serial line, when
    /// its last byte would have arrived): the moment a real relay would switch.
    pub at: Instant,
    pub unit: UnitId,
    pub what: SimChange,
}

/// The kinds of [`SimEvent`].
#[derive(Debug, Clone, PartialEq)]
pub enum SimChange {
    /// A master wrote a coil (FC05, FC15, or broadcast).
    CoilWritten { address: u16, on: bool },
    /// A master wrote a holding register (FC06, FC16).
    HoldingWritten { address: u16, value: u16 },
    /// [`Simulator::set_smoke`] changed a detector.
    SmokeChanged { state: SmokeState },
}

/// A simulated field of Modbus units. Cheap to clone: clones share the same units.
#[derive(Debug, Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The units' registers. A lock because the ports' threads, the console and the tests all
    /// touch them; it is held only for a few field updates, never across an await or a sleep.
    state: Mutex<State>,
    events: broadcast::Sender<SimEvent>,
    served: AtomicU64,
    started: Instant,
}

#[derive(Debug)]
struct State {
    baud: u32,
    parity: Parity,
    stop_bits: u8,
    units: BTreeMap<u8, Unit>,
    /// Fault injection: echo every received byte back, like an RS-485 adapter that reads back
    /// the gateway's own transmission.
    echo: bool,
    /// Fault injection: bad replies armed per unit id ([`Simulator::inject`]).
    injected: BTreeMap<u8, faults::Armed>,
}

impl State {
    fn bits_per_char(&self) -> u32 {
        9 + u32::from(self.parity != Parity::None) + u32::from(self.stop_bits.clamp(1, 2))
    }
}

#[derive(Debug)]
struct Unit {
    profile: SimProfile,
    offline: bool,
    smoke: SmokeState,
    /// Smoke density in 0.01 dB/m.
    density: u16,
    coils: Vec<bool>,
    inputs: Vec<bool>,
    holding: BTreeMap<u16, u16>,
    /// Extra delay before this unit's replies (fault injection: a slow or late unit).
    reply_delay: Duration,
    /// Fault injection: this unit's RTU replies carry a wrong CRC.
    corrupt_replies: bool,
    /// Fault injection: the heartbeat register stays at this value (stuck firmware).
    frozen_heartbeat: Option<u16>,
    /// Fault injection: the next this-many reads of the input registers report alarm (a
    /// corrupted status that passed the CRC), then the real state again.
    alarm_glitch: u32,
    /// How many answered FC04 requests covered each input register (for tests of read plans).
    input_reads: BTreeMap<u16, u64>,
}

impl Unit {
    fn new(profile: SimProfile) -> Unit {
        let (coils, inputs, holding): (usize, usize, &[u16]) = match profile {
            SimProfile::Smoke => (0, 0, &[16]),
            SimProfile::Relay => (8, 8, &[]),
            SimProfile::Door => (1, 0, &[32]),
            SimProfile::SmokeBits => (0, 4, &[0]),
        };
        Unit {
            profile,
            offline: false,
            smoke: SmokeState::Normal,
            density: 0,
            coils: vec![false; coils],
            inputs: vec![false; inputs],
            holding: holding.iter().map(|a| (*a, 0)).collect(),
            reply_delay: Duration::ZERO,
            corrupt_replies: false,
            frozen_heartbeat: None,
            alarm_glitch: 0,
            input_reads: BTreeMap::new(),
        }
    }

    fn input_registers(&mut self, heartbeat: u16) -> Vec<u16> {
        match self.profile {
            SimProfile::Smoke => {
                let fault_bits = u16::from(self.smoke == SmokeState::Fault);
                let status = if self.alarm_glitch > 0 {
                    self.alarm_glitch -= 1;
                    SmokeState::Alarm.register()
                } else {
                    self.smoke.register()
                };
                let heartbeat = self.frozen_heartbeat.unwrap_or(heartbeat);
                vec![status, self.density, fault_bits, heartbeat]
            }
            // Contact closed, FIFO empty: depth, head seq, card (2 words), kind, age.
            SimProfile::Door => vec![0; 7],
            SimProfile::Relay | SimProfile::SmokeBits => Vec::new(),
        }
    }
}

/// Checks `address..address+count` against a table of `len` entries.
fn range(address: u16, count: usize, len: usize) -> Result<std::ops::Range<usize>, ExceptionCode> {
    if len == 0 {
        return Err(ExceptionCode::ILLEGAL_FUNCTION);
    }
    let start = usize::from(address);
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(ExceptionCode::ILLEGAL_DATA_ADDRESS),
    }
}

impl Simulator {
    /// A simulator of `devices` on a line at `baud` (bits/s), 8N1 (see [`Simulator::set_line`]).
    /// A unit id given twice keeps the last profile.
    pub fn new(baud: u32, devices: impl IntoIterator<Item = (UnitId, SimProfile)>) -> Simulator {
        let units = devices
            .into_iter()
            .map(|(u, p)| (u.0, Unit::new(p)))
            .collect();
        let (events, _) = broadcast::channel(1024);
        Simulator {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    baud,
                    parity: Parity::None,
                    stop_bits: 1,
                    units,
                    echo: false,
                    injected: BTreeMap::new(),
                }),
                events,
                served: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registers inconsistent (each update
        // is a single assignment), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, at: Instant, unit: UnitId, what: SimChange) {
        // No subscriber is fine.
        let _ = self.inner.events.send(SimEvent { at, unit, what });
    }

    /// Sets the framing used for wire-time emulation and by [`Simulator::serve_port`]
    /// (8 data bits; default 8N1). Stop bits other than 1 or 2 count as the nearest.
    pub fn set_line(&self, parity: Parity, stop_bits: u8) {
        let mut s = self.state();
        s.parity = parity;
        s.stop_bits = stop_bits.clamp(1, 2);
    }

    /// Sets a detector's state (no effect on other profiles or unknown units). Emits
    /// [`SimChange::SmokeChanged`] when it changes.
    pub fn set_smoke(&self, unit: UnitId, state: SmokeState) {
        let changed = match self.state().units.get_mut(&unit.0) {
            Some(u)
                if matches!(u.profile, SimProfile::Smoke | SimProfile::SmokeBits)
                    && u.smoke != state =>
            {
                u.smoke = state;
                true
            }
            _ => false,
        };
        if changed {
            self.emit(Instant::now(), unit, SimChange::SmokeChanged { state });
        }
    }

    /// Sets a detector's smoke density in dB/m (stored in 0.01 dB/m, clamped to 0..=655.35;
    /// NaN counts as 0).
    pub fn set_density(&self, unit: UnitId, db_per_m: f32) {
        let hundredths = (db_per_m * 100.0).round().clamp(0.0, 65_535.0);
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            // In range by the clamp above; NaN casts to 0.
            u.density = hundredths as u16;
        }
    }

    /// Takes a unit off the bus (it stops answering) or puts it back.
    pub fn set_offline(&self, unit: UnitId, offline: bool) {
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            u.offline = offline;
        }
    }

    /// Presses or releases discrete input `input` (0..=7) of a relay module (a panel key).
    /// Ignored for other profiles and out-of-range inputs.
    pub fn set_key(&self, unit: UnitId, input: u16, pressed: bool) {
        if let Some(slot) = self
            .state()
            .units
            .get_mut(&unit.0)
            .and_then(|u| u.inputs.get_mut(usize::from(input)))
        {
            *slot = pressed;
        }
    }

    /// Fault injection: delays every reply of `unit` by `delay` beyond the emulated wire time
    /// (a slow unit, or one whose replies arrive after the master's timeout).
    pub fn set_reply_delay(&self, unit: UnitId, delay: Duration) {
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            u.reply_delay = delay;
        }
    }

    /// Fault injection: the RTU replies of `unit` carry a wrong CRC (line noise). Modbus TCP
    /// has no CRC and is not affected.
    pub fn set_corrupt_replies(&self, unit: UnitId, corrupt: bool) {
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            u.corrupt_replies = corrupt;
        }
    }

    /// Fault injection on serial transports: every byte the gateway sends is echoed back to it
    /// at once, as by an RS-485 adapter that reads back its own transmission (the gateway's
    /// `echo = true` setting).
    pub fn set_adapter_echo(&self, echo: bool) {
        self.state().echo = echo;
    }

    /// Fault injection on serial transports: the next `replies` RTU replies of `unit` go on the
    /// wire as `fault` says (see [`ReplyFault`]); `replies` = 0 disarms, `u32::MAX` = until
    /// disarmed. The requests themselves still take effect.
    pub fn inject(&self, unit: UnitId, fault: ReplyFault, replies: u32) {
        let mut s = self.state();
        if replies == 0 {
            s.injected.remove(&unit.0);
        } else {
            s.injected.insert(unit.0, faults::Armed { fault, replies });
        }
    }

    /// The fault to apply to `unit`'s reply now, if one is armed (counts it down).
    fn take_fault(&self, unit: UnitId) -> Option<ReplyFault> {
        let mut s = self.state();
        let armed = s.injected.get_mut(&unit.0)?;
        let fault = armed.fault.clone();
        if armed.replies != u32::MAX {
            armed.replies -= 1;
            if armed.replies == 0 {
                s.injected.remove(&unit.0);
            }
        }
        Some(fault)
    }

    /// Fault injection: sets coil `address` of `unit` behind the master's back (a relay module
    /// that lost power comes back with its coils off). Ignored for unknown units and coils.
    pub fn set_coil(&self, unit: UnitId, address: u16, on: bool) {
        if let Some(slot) = self
            .state()
            .units
            .get_mut(&unit.0)
            .and_then(|u| u.coils.get_mut(usize::from(address)))
        {
            *slot = on;
        }
    }

    /// Fault injection: freezes a detector's heartbeat register at its current value (stuck
    /// firmware), or lets it count again.
    pub fn set_heartbeat_frozen(&self, unit: UnitId, frozen: bool) {
        let now = self.heartbeat();
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            u.frozen_heartbeat = frozen.then_some(now);
        }
    }

    /// Fault injection: the next `reads` reads of a detector's input registers report alarm
    /// whatever its state (a corrupted status that passed the CRC), then the real state again.
    pub fn glitch_alarm(&self, unit: UnitId, reads: u32) {
        if let Some(u) = self.state().units.get_mut(&unit.0) {
            u.alarm_glitch = reads;
        }
    }

    /// The state of coil `address` of `unit`, or `None` if the unit or coil does not exist.
    pub fn coil(&self, unit: UnitId, address: u16) -> Option<bool> {
        self.state()
            .units
            .get(&unit.0)
            .and_then(|u| u.coils.get(usize::from(address)).copied())
    }

    /// How many answered FC04 requests read input register `address` of `unit` (0 for an
    /// unknown unit).
    pub fn input_register_reads(&self, unit: UnitId, address: u16) -> u64 {
        self.state()
            .units
            .get(&unit.0)
            .and_then(|u| u.input_reads.get(&address).copied())
            .unwrap_or(0)
    }

    /// The value of holding register `address` of `unit`, if it exists.
    pub fn holding(&self, unit: UnitId, address: u16) -> Option<u16> {
        self.state()
            .units
            .get(&unit.0)
            .and_then(|u| u.holding.get(&address).copied())
    }

    /// Events from now on (coil and register writes, smoke changes). A receiver that falls more
    /// than 1024 events behind gets `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<SimEvent> {
        self.inner.events.subscribe()
    }

    /// Requests answered (normal or exception replies) plus broadcasts applied, on all ports.
    pub fn requests_served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    fn heartbeat(&self) -> u16 {
        // Wraps at 65536 like a real counter.
        (self.inner.started.elapsed().as_secs() % 65_536) as u16
    }

    /// Applies one decoded request (or a request the codec already refused with an exception)
    /// received at `at`. Returns the reply to send, or `None` for silence (unknown or offline
    /// unit, broadcast).
    fn handle(
        &self,
        unit: UnitId,
        request: Result<&Request, ExceptionCode>,
        at: Instant,
    ) -> Option<Reply> {
        let heartbeat = self.heartbeat();
        let mut changes = Vec::new();
        let reply = {
            let mut state = self.state();
            if unit.0 == 0 {
                if let Ok(req) = request {
                    for (id, u) in state.units.iter_mut().filter(|(_, u)| !u.offline) {
                        if req.is_write() {
                            let _ =
                                apply(u, req, heartbeat, &mut |c| changes.push((UnitId(*id), c)));
                        }
                    }
                }
                None
            } else {
                match state.units.get_mut(&unit.0) {
                    Some(u) if !u.offline => Some(match request {
                        Ok(req) => apply(u, req, heartbeat, &mut |c| changes.push((unit, c))),
                        Err(code) => Err(code),
                    }),
                    _ => None,
                }
            }
        };
        for (u, what) in changes {
            self.emit(at, u, what);
        }
        if reply.is_some() || unit.0 == 0 {
            self.inner.served.fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    /// The injected faults of `unit`: (reply delay, corrupt CRC).
    fn faults(&self, unit: UnitId) -> (Duration, bool) {
        self.state()
            .units
            .get(&unit.0)
            .map_or((Duration::ZERO, false), |u| {
                (u.reply_delay, u.corrupt_replies)
            })
    }

    /// Opens a pseudo-terminal pair in raw mode and serves the units on its master side from a
    /// background thread. The gateway opens [`PtyGuard::path`] (`/dev/pts/N`) like a real
    /// `/dev/ttyUSB0`. Dropping the guard stops serving (within 50 ms) and closes the pty.
    ///
    /// # Errors
    /// When the OS cannot allocate a pty or start the thread.
    pub fn serve_pty(&self) -> io::Result<PtyGuard> {
        let pty = nix::pty::openpty(None, None)?;
        let mut termios = nix::sys::termios::tcgetattr(&pty.slave)?;
        nix::sys::termios::cfmakeraw(&mut termios);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)?;
        let path = nix::unistd::ttyname(&pty.slave)?
            .to_string_lossy()
            .into_owned();
        // The gateway opens the slave by path; keeping it open here would hide its hangups.
        drop(pty.slave);
        let stop = Arc::new(AtomicBool::new(false));
        spawn_serial_thread(
            self.clone(),
            pty.master,
            Arc::clone(&stop),
            format!("sim-{path}"),
        )?;
        Ok(PtyGuard { path, stop })
    }

    /// Serves the units on a real serial port at the simulator's baud rate and framing until
    /// the port fails or the future is dropped.
    ///
    /// # Errors
    /// When the port cannot be opened or configured (unsupported baud rate included), or fails.
    pub async fn serve_port(&self, path: &str) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
            .open(path)?;
        let (baud, parity, stop_bits) = {
            let s = self.state();
            (s.baud, s.parity, s.stop_bits)
        };
        configure_serial(&file, baud, parity, stop_bits)?;
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let sim = self.clone();
        std::thread::Builder::new()
            .name(format!("sim-{path}"))
            .spawn(move || {
                let _ = done_tx.send(run_serial_thread(sim, OwnedFd::from(file), &stop));
            })?;
        done_rx
            .await
            .unwrap_or_else(|_| Err(io::Error::other("simulator thread ended")))
    }

    /// Serves the units as a Modbus TCP server on `listener` until accepting fails or the
    /// future is dropped (which also closes every connection). No wire-time emulation;
    /// `set_reply_delay` still applies.
    ///
    /// # Errors
    /// When accepting a connection fails.
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = accepted?;
                    debug!(%peer, "Simulator accepted a Modbus TCP connection.");
                    let sim = self.clone();
                    connections.spawn(async move { sim.serve_tcp_connection(stream).await });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_tcp_connection(&self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            loop {
                let at = Instant::now();
                let tid = buf.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                let (unit, function, reply, used) = match decode_tcp_request(&buf) {
                    Ok(Decoded::NeedMore(_)) => break,
                    Ok(Decoded::Complete((_, unit, req), used)) => {
                        let reply = self.handle(unit, Ok(&req), at);
                        (unit, req.function_code(), reply, used)
                    }
                    Err(FrameError::Rejected {
                        unit,
                        function,
                        exception,
                        consumed,
                    }) => (
                        unit,
                        function,
                        self.handle(unit, Err(exception), at),
                        consumed,
                    ),
                    // A broken MBAP stream cannot be resynchronised: close it.
                    Err(_) => return,
                };
                buf.drain(..used.min(buf.len()));
                if let Some(reply) = reply {
                    let (delay, _) = self.faults(unit);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let bytes = encode_tcp_response(tid, unit, function, &reply);
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Runs the installers' text console: reads commands from `input`, answers on `out`, and
    /// prints coil and register writes as they happen (`12:00:01.234 unit 100 coil 0 ON`, UTC).
    /// Returns when `input` ends.
    ///
    /// Commands: `alarm K`, `prealarm K`, `fault K`, `test K`, `normal K`, `density K DB`,
    /// `offline K`, `online K`, `key K N on|off`, `coils K`, `help` (K = unit id).
    ///
    /// # Errors
    /// When reading `input` or writing `out` fails.
    pub async fn run_console<R, W>(&self, input: R, mut out: W) -> io::Result<()>
    where
        R: AsyncBufRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut lines = input.lines();
        let mut events = self.subscribe();
        out.write_all(b"village-gateway field simulator. Type `help` for commands.\n")
            .await?;
        out.flush().await?;
        loop {
            let text = tokio::select! {
                line = lines.next_line() => match line? {
                    Some(line) => self.console_command(&line),
                    None => return Ok(()),
                },
                event = events.recv() => match event {
                    Ok(e) => match describe_event(&e) {
                        Some(text) => text,
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => format!("({n} events not shown)\n"),
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            };
            out.write_all(text.as_bytes()).await?;
            out.flush().await?;
        }
    }

    /// Executes one console line; returns the text to print (empty for a blank line).
    fn console_command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&command, args)) = words.split_first() else {
            return String::new();
        };
        let unit = |i: usize| -> Result<UnitId, String> {
            let word = args
                .get(i)
                .ok_or_else(|| format!("`{command}` needs a unit id"))?;
            let id: u8 = word
                .parse()
                .map_err(|_| format!("`{word}` is not a unit id (1..247)"))?;
            if self.state().units.contains_key(&id) {
                Ok(UnitId(id))
            } else {
                Err(format!("no simulated unit {id}"))
            }
        };
        let result = (|| -> Result<String, String> {
            let smoke = |state: SmokeState| -> Result<String, String> {
                let u = unit(0)?;
                self.set_smoke(u, state);
                Ok(format!("unit {u} is now {}", smoke_name(state)))
            };
            match command {
                "help" | "?" => Ok(HELP.to_owned()),
                "alarm" => smoke(SmokeState::Alarm),
                "prealarm" => smoke(SmokeState::PreAlarm),
                "fault" => smoke(SmokeState::Fault),
                "test" => smoke(SmokeState::Test),
                "normal" => smoke(SmokeState::Normal),
                "density" => {
                    let u = unit(0)?;
                    let value: f32 = args
                        .get(1)
                        .and_then(|w| w.parse().ok())
                        .filter(|v: &f32| v.is_finite() && *v >= 0.0)
                        .ok_or("usage: density K DB_PER_M (e.g. density 1 0.15)")?;
                    self.set_density(u, value);
                    Ok(format!("unit {u} density {value} dB/m"))
                }
                "offline" | "online" => {
                    let u = unit(0)?;
                    self.set_offline(u, command == "offline");
                    Ok(format!("unit {u} is {command}"))
                }
                "key" => {
                    let u = unit(0)?;
                    let usage = "usage: key K N on|off (N = input 0..7)";
                    let n: u16 = args
                        .get(1)
                        .and_then(|w| w.parse().ok())
                        .filter(|n| *n < 8)
                        .ok_or(usage)?;
                    let pressed = match args.get(2).copied() {
                        Some("on" | "1" | "press") => true,
                        Some("off" | "0" | "release") => false,
                        _ => return Err(usage.to_owned()),
                    };
                    if self
                        .state()
                        .units
                        .get(&u.0)
                        .is_none_or(|x| x.profile != SimProfile::Relay)
                    {
                        return Err(format!("unit {u} is not a relay module"));
                    }
                    self.set_key(u, n, pressed);
                    Ok(format!(
                        "unit {u} key {n} {}",
                        if pressed { "pressed" } else { "released" }
                    ))
                }
                "coils" => {
                    let u = unit(0)?;
                    let coils: Vec<String> = (0..8u16)
                        .map_while(|a| {
                            self.coil(u, a)
                                .map(|on| format!("{a}:{}", if on { "ON" } else { "off" }))
                        })
                        .collect();
                    if coils.is_empty() {
                        Err(format!("unit {u} has no coils"))
                    } else {
                        Ok(format!("unit {u} coils {}", coils.join(" ")))
                    }
                }
                other => Err(format!("unknown command `{other}`; type `help`")),
            }
        })();
        match result {
            Ok(text) => format!("{text}\n"),
            Err(text) => format!("error: {text}\n"),
        }
    }
}

const HELP: &str = "commands (K = unit id):
  alarm K | prealarm K | fault K | test K | normal K   set a smoke detector's state
  density K DB                                          set smoke density in dB/m
  offline K | online K                                  take a unit off the bus / back
  key K N on|off                                        press/release panel key N (0..7) of relay module K
  coils K                                               show a unit's coils
  help                                                  this text
coil and register writes from the gateway are printed as they happen (UTC).";

fn smoke_name(state: SmokeState) -> &'static str {
    match state {
        SmokeState::Normal => "normal",
        SmokeState::Alarm => "ALARM",
        SmokeState::PreAlarm => "pre-alarm",
        SmokeState::Fault => "fault",
        SmokeState::Test => "test",
    }
}

/// The console line for an event, `None` for changes the console made itself.
fn describe_event(e: &SimEvent) -> Option<String> {
    let what = match e.what {
        SimChange::CoilWritten { address, on } => {
            format!("coil {address} {}", if on { "ON" } else { "off" })
        }
        SimChange::HoldingWritten { address, value } => format!("holding {address} = {value}"),
        SimChange::SmokeChanged { .. } => return None,
    };
    Some(format!("{} unit {} {what}\n", clock_utc(e.at), e.unit))
}

/// `hh:mm:ss.mmm` (UTC) of a monotonic instant.
fn clock_utc(at: Instant) -> String {
    let wall = SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::now());
    let ms = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Applies `req` to `u`; returns the reply. `changed` receives each write.
fn apply(u: &mut Unit, req: &Request, heartbeat: u16, changed: &mut dyn FnMut(SimChange)) -> Reply {
    match req {
        Request::ReadCoils { address, count } => {
            let r = range(*address, usize::from(*count), u.coils.len())?;
            Ok(Response::Bits(u.coils[r].to_vec()))
        }
        Request::ReadDiscreteInputs { address, count } => {
            if u.profile == SimProfile::SmokeBits {
                let alarm = u.smoke == SmokeState::Alarm;
                u.inputs = vec![u.smoke != SmokeState::Fault, false, alarm, alarm];
            }
            let r = range(*address, usize::from(*count), u.inputs.len())?;
            Ok(Response::Bits(u.inputs[r].to_vec()))
        }
        Request::ReadInputRegisters { address, count } => {
            let regs = u.input_registers(heartbeat);
            let r = range(*address, usize::from(*count), regs.len())?;
            for a in *address..address.saturating_add(*count) {
                *u.input_reads.entry(a).or_default() += 1;
            }
            Ok(Response::Registers(regs[r].to_vec()))
        }
        Request::ReadHoldingRegisters { address, count } => {
            if u.holding.is_empty() {
                return Err(ExceptionCode::ILLEGAL_FUNCTION);
            }
            (0..*count)
                .map(|i| {
                    address
                        .checked_add(i)
                        .and_then(|a| u.holding.get(&a).copied())
                })
                .collect::<Option<Vec<u16>>>()
                .map(Response::Registers)
                .ok_or(ExceptionCode::ILLEGAL_DATA_ADDRESS)
        }
        Request::WriteSingleCoil { address, on } => {
            write_coils(u, *address, &[*on], changed)?;
            Ok(Response::WriteSingleCoil {
                address: *address,
                on: *on,
            })
        }
        Request::WriteMultipleCoils { address, values } => {
            write_coils(u, *address, values, changed)?;
            Ok(Response::WriteMultiple {
                address: *address,
                count: count_u16(values.len()),
            })
        }
        Request::WriteSingleRegister { address, value } => {
            write_holding(u, *address, &[*value], changed)?;
            Ok(Response::WriteSingleRegister {
                address: *address,
                value: *value,
            })
        }
        Request::WriteMultipleRegisters { address, values } => {
            write_holding(u, *address, values, changed)?;
            Ok(Response::WriteMultiple {
                address: *address,
                count: count_u16(values.len()),
            })
        }
    }
}

fn write_coils(
    u: &mut Unit,
    address: u16,
    values: &[bool],
    changed: &mut dyn FnMut(SimChange),
) -> Result<(), ExceptionCode> {
    let r = range(address, values.len(), u.coils.len())?;
    for ((a, slot), on) in r.clone().zip(&mut u.coils[r]).zip(values) {
        *slot = *on;
        changed(SimChange::CoilWritten {
            address: count_u16(a),
            on: *on,
        });
    }
    Ok(())
}

fn write_holding(
    u: &mut Unit,
    address: u16,
    values: &[u16],
    changed: &mut dyn FnMut(SimChange),
) -> Result<(), ExceptionCode> {
    if u.holding.is_empty() {
        return Err(ExceptionCode::ILLEGAL_FUNCTION);
    }
    let addresses: Vec<u16> = (0..values.len())
        .map(|i| {
            address
                .checked_add(count_u16(i))
                .filter(|a| u.holding.contains_key(a))
        })
        .collect::<Option<_>>()
        .ok_or(ExceptionCode::ILLEGAL_DATA_ADDRESS)?;
    for (a, v) in addresses.into_iter().zip(values) {
        u.holding.insert(a, *v);
        changed(SimChange::HoldingWritten {
            address: a,
            value: *v,
        });
    }
    Ok(())
}

/// Counts here are bounded by the Modbus limits (≤ 2000); saturate rather than wrap.
fn count_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Keeps a pty served; dropping it stops the simulator thread of this pty.
#[derive(Debug)]
pub struct PtyGuard {
    path: String,
    stop: Arc<AtomicBool>,
}

impl PtyGuard {
    /// The slave side's path (`/dev/pts/N`): give it to the gateway as its serial port.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for PtyGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn spawn_serial_thread(
    sim: Simulator,
    fd: OwnedFd,
    stop: Arc<AtomicBool>,
    name: String,
) -> io::Result<()> {
    std::thread::Builder::new().name(name).spawn(move || {
        if let Err(e) = run_serial_thread(sim, fd, &stop) {
            warn!(error = %e, "Simulator port stopped.");
        }
    })?;
    Ok(())
}

/// The body of a serial port's thread: its own current-thread runtime (for readiness only;
/// timing uses blocking sleeps, which are precise and stall nothing else).
fn run_serial_thread(sim: Simulator, fd: OwnedFd, stop: &AtomicBool) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve_serial(sim, fd, stop))
}

/// How long the thread waits for bytes before checking its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Back-off when the pty master reports EIO/hangup (no one has the slave open).
const HANGUP_RETRY: Duration = Duration::from_millis(20);

async fn serve_serial(sim: Simulator, fd: OwnedFd, stop: &AtomicBool) -> io::Result<()> {
    set_nonblocking(&fd)?;
    // SAFETY: the `File` owns the descriptor and the `AsyncFd` owns the `File`, so the
    // descriptor stays open and the same for the `AsyncFd`'s whole life.
    let mut port = unsafe { AsyncFd::register(File::from(fd)) }?;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (baud, bits, echo) = {
            let s = sim.state();
            (s.baud, s.bits_per_char(), s.echo)
        };
        let t35 = silent_interval_for(baud, bits);
        // A partial frame is dropped after a silence (t3.5, at least 10 ms: USB adapters and the
        // scheduler add gaps no real line has).
        let wait = if buf.is_empty() {
            STOP_POLL
        } else {
            t35.max(Duration::from_millis(10))
        };
        let mut ready = match tokio::time::timeout(wait, port.readable()).await {
            Err(_) => {
                buf.clear();
                continue;
            }
            Ok(ready) => ready?,
        };
        let hung_up = ready.ready().is_read_closed();
        let arrival = match ready.try_io(|f| f.get_ref().read(&mut chunk)) {
            Err(_would_block) => {
                if hung_up {
                    // tokio keeps "read closed" once seen (the hang-up of a pty master while
                    // no one had the slave open) and reports readable forever after, which
                    // spun this loop on EAGAIN. Registering afresh starts from the fd's
                    // real state.
                    let file = port.into_inner();
                    // SAFETY: as above: the `File` owns the descriptor for the new
                    // `AsyncFd`'s whole life.
                    port = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
                }
                continue;
            }
            Ok(Ok(0)) => {
                drop(ready);
                tokio::time::sleep(HANGUP_RETRY).await;
                continue;
            }
            Ok(Ok(n)) => {
                let arrival = Instant::now();
                drop(ready);
                if echo {
                    write_all(&port, &chunk[..n]).await;
                }
                buf.extend_from_slice(&chunk[..n]);
                arrival
            }
            Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::EIO) => {
                // The pty's slave is not open (yet, or any more): wait for the gateway.
                buf.clear();
                drop(ready);
                tokio::time::sleep(HANGUP_RETRY).await;
                continue;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
        };
        while !buf.is_empty() {
            let (unit, function, request, used) = match decode_rtu_request(&buf) {
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Complete((unit, req), used)) => {
                    (unit, req.function_code(), Ok(req), used)
                }
                Err(FrameError::Rejected {
                    unit,
                    function,
                    exception,
                    consumed,
                }) => (unit, function, Err(exception), consumed),
                // Bad CRC or garbage: a real slave stays silent and waits for the next frame.
                Err(_) => {
                    buf.clear();
                    break;
                }
            };
            buf.drain(..used.min(buf.len()));
            // On a real line the request's last byte arrives one wire time after its first.
            let received = arrival + wire_time(used, baud, bits);
            sleep_until(received);
            let Some(reply) = sim.handle(unit, request.as_ref().map_err(|c| *c), received) else {
                continue;
            };
            let mut bytes = encode_rtu_response(unit, function, &reply);
            let (delay, corrupt) = sim.faults(unit);
            if corrupt {
                if let Some(crc_high) = bytes.last_mut() {
                    *crc_high ^= 0x5A;
                }
            }
            let (bytes, late) = match sim.take_fault(unit) {
                Some(fault) => faults::apply(&fault, unit, function, bytes),
                None => (Some(bytes), Duration::ZERO),
            };
            let Some(bytes) = bytes else { continue };
            sleep_until(received + t35 + wire_time(bytes.len(), baud, bits) + delay + late);
            write_all(&port, &bytes).await;
        }
    }
}

/// Blocking sleep until `t` (this thread serves one port only; see `run_serial_thread`).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

async fn write_all(port: &AsyncFd<File>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let Ok(mut ready) = port.writable().await else {
            return;
        };
        match ready.try_io(|f| f.get_ref().write(bytes)) {
            Ok(Ok(n)) => bytes = &bytes[n.min(bytes.len())..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                // No one on the other side: the reply is lost, as on a real bus.
                debug!(error = %e, "Simulator reply not written.");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Raw mode, 8 data bits, `parity`, `stop_bits`, `baud`, no flow control.
fn configure_serial(file: &File, baud: u32, parity: Parity, stop_bits: u8) -> io::Result<()> {
    use nix::sys::termios::{self, BaudRate, ControlFlags, SetArg};
    let rate = match baud {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19_200 => BaudRate::B19200,
        38_400 => BaudRate::B38400,
        57_600 => BaudRate::B57600,
        115_200 => BaudRate::B115200,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported baud rate {other}"),
            ))
        }
    };
    let mut t = termios::tcgetattr(file.as_fd())?;
    termios::cfmakeraw(&mut t);
    termios::cfsetspeed(&mut t, rate)?;
    t.control_flags &= !(ControlFlags::CSIZE
        | ControlFlags::PARENB
        | ControlFlags::PARODD
        | ControlFlags::CSTOPB
        | ControlFlags::CRTSCTS);
    t.control_flags |= ControlFlags::CS8 | ControlFlags::CLOCAL | ControlFlags::CREAD;
    match parity {
        Parity::None => {}
        Parity::Even => t.control_flags |= ControlFlags::PARENB,
        Parity::Odd => t.control_flags |= ControlFlags::PARENB | ControlFlags::PARODD,
    }
    if stop_bits >= 2 {
        t.control_flags |= ControlFlags::CSTOPB;
    }
    termios::tcsetattr(file.as_fd(), SetArg::TCSANOW, &t)?;
    Ok(())
}
