//! Modbus PDUs and their RTU and TCP (MBAP) framing, for both ends of a bus: the gateway
//! (master/client) and the simulator (slave/server). Pure: no I/O, no clock, no allocation
//! beyond the frames it returns.
//!
//! Invariants:
//! - Nothing here panics on any input: a malformed, truncated, foreign or corrupted frame is a
//!   [`FrameError`] value (a proptest feeds arbitrary bytes to every decoder).
//! - A request is validated against the spec's count limits before it is encoded
//!   ([`RequestError`]); an invalid request never reaches the wire.
//! - A reply is accepted only if it is complete, its CRC (RTU) or MBAP header (TCP) checks out,
//!   it comes from the unit asked, carries the function asked, and its count and write echo match
//!   the request exactly. Anything else is an error, never a value attributed to a device.
//! - RTU CRC is CRC-16/MODBUS, low byte first on the wire.
//!
//! Not here: timing (the silent interval is only computed here, [`silent_interval`]), reading or
//! writing ports, retries, device register maps.
//!
//! References: *MODBUS Application Protocol Specification V1.1b3* (PDUs, limits, exception
//! codes), *MODBUS over Serial Line Specification and Implementation Guide V1.02* (RTU framing,
//! CRC, timing), *MODBUS Messaging on TCP/IP Implementation Guide V1.0b* (MBAP header).

use std::fmt;
use std::time::Duration;

use crate::event::UnitId;

/// Most bits one FC01/FC02 read may ask for (Application Protocol V1.1b3 §6.1, §6.2).
pub const MAX_READ_BITS: u16 = 2000;
/// Most registers one FC03/FC04 read may ask for (§6.3, §6.4).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most coils one FC15 write may carry (§6.11).
pub const MAX_WRITE_COILS: u16 = 1968;
/// Most registers one FC16 write may carry (§6.12).
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Largest RTU frame in bytes: address + PDU (253) + CRC (Serial Line V1.02 §2.5.1).
pub const MAX_RTU_FRAME: usize = 256;
/// Largest MBAP frame in bytes: 7-byte header + PDU (253) (TCP Implementation Guide §3.1.3).
pub const MAX_TCP_FRAME: usize = 260;
/// Highest unit id that addresses one serial unit; 248..=255 are reserved (Serial Line §2.2).
pub const MAX_RTU_UNIT: u8 = 247;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// A Modbus request (the PDU a master sends). Addresses are PDU addresses (0-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// FC01: read `count` coils (1..=2000).
    ReadCoils { address: u16, count: u16 },
    /// FC02: read `count` discrete inputs (1..=2000).
    ReadDiscreteInputs { address: u16, count: u16 },
    /// FC03: read `count` holding registers (1..=125).
    ReadHoldingRegisters { address: u16, count: u16 },
    /// FC04: read `count` input registers (1..=125).
    ReadInputRegisters { address: u16, count: u16 },
    /// FC05: write one coil (`0xFF00` = on, `0x0000` = off on the wire).
    WriteSingleCoil { address: u16, on: bool },
    /// FC06: write one holding register.
    WriteSingleRegister { address: u16, value: u16 },
    /// FC15: write 1..=1968 coils from `address`.
    WriteMultipleCoils { address: u16, values: Vec<bool> },
    /// FC16: write 1..=123 holding registers from `address`.
    WriteMultipleRegisters { address: u16, values: Vec<u16> },
}

/// Why a [`Request`] cannot be sent (or, on the slave side, why it must be refused with
/// exception 3, illegal data value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The count is 0 or above the spec's limit for this function.
    #[error("count {count} out of range 1..={max} for function {function}")]
    CountOutOfRange {
        function: u8,
        count: usize,
        max: u16,
    },
    /// `address + count` runs past address 65535.
    #[error("address {address} + count {count} runs past 65535")]
    AddressOverflow { address: u16, count: usize },
    /// A unit id above 247 on a serial line (248..=255 are reserved).
    #[error("unit id {0} is reserved (serial units are 1..=247, 0 = broadcast)")]
    ReservedUnit(u8),
    /// A read sent to the broadcast address 0, which no unit answers.
    #[error("a read cannot be broadcast (unit 0)")]
    BroadcastRead,
}

impl Request {
    /// The Modbus function code (1, 2, 3, 4, 5, 6, 15 or 16).
    pub fn function_code(&self) -> u8 {
        match self {
            Request::ReadCoils { .. } => 0x01,
            Request::ReadDiscreteInputs { .. } => 0x02,
            Request::ReadHoldingRegisters { .. } => 0x03,
            Request::ReadInputRegisters { .. } => 0x04,
            Request::WriteSingleCoil { .. } => 0x05,
            Request::WriteSingleRegister { .. } => 0x06,
            Request::WriteMultipleCoils { .. } => 0x0F,
            Request::WriteMultipleRegisters { .. } => 0x10,
        }
    }

    /// Whether this request writes (the only kind that may be broadcast).
    pub fn is_write(&self) -> bool {
        self.function_code() >= 5
    }

    /// Checks the count against the spec's limits and that the range stays inside 0..=65535.
    ///
    /// # Errors
    /// [`RequestError::CountOutOfRange`] or [`RequestError::AddressOverflow`].
    pub fn validate(&self) -> Result<(), RequestError> {
        let (address, count, max) = match self {
            Request::ReadCoils { address, count }
            | Request::ReadDiscreteInputs { address, count } => {
                (*address, usize::from(*count), MAX_READ_BITS)
            }
            Request::ReadHoldingRegisters { address, count }
            | Request::ReadInputRegisters { address, count } => {
                (*address, usize::from(*count), MAX_READ_REGISTERS)
            }
            Request::WriteSingleCoil { .. } | Request::WriteSingleRegister { .. } => return Ok(()),
            Request::WriteMultipleCoils { address, values } => {
                (*address, values.len(), MAX_WRITE_COILS)
            }
            Request::WriteMultipleRegisters { address, values } => {
                (*address, values.len(), MAX_WRITE_REGISTERS)
            }
        };
        if count == 0 || count > usize::from(max) {
            return Err(RequestError::CountOutOfRange {
                function: self.function_code(),
                count,
                max,
            });
        }
        if usize::from(address) + count > 0x1_0000 {
            return Err(RequestError::AddressOverflow { address, count });
        }
        Ok(())
    }

    /// The PDU (function code + data). The request must have passed [`Request::validate`];
    /// the casts below are bounded by its limits.
    fn encode_pdu(&self, out: &mut Vec<u8>) {
        out.push(self.function_code());
        match self {
            Request::ReadCoils { address, count }
            | Request::ReadDiscreteInputs { address, count }
            | Request::ReadHoldingRegisters { address, count }
            | Request::ReadInputRegisters { address, count } => {
                push_u16(out, *address);
                push_u16(out, *count);
            }
            Request::WriteSingleCoil { address, on } => {
                push_u16(out, *address);
                push_u16(out, coil_word(*on));
            }
            Request::WriteSingleRegister { address, value } => {
                push_u16(out, *address);
                push_u16(out, *value);
            }
            Request::WriteMultipleCoils { address, values } => {
                push_u16(out, *address);
                push_u16(out, len_u16(values.len()));
                let packed = pack_bits(values);
                out.push(len_u8(packed.len()));
                out.extend_from_slice(&packed);
            }
            Request::WriteMultipleRegisters { address, values } => {
                push_u16(out, *address);
                push_u16(out, len_u16(values.len()));
                out.push(len_u8(values.len() * 2));
                for v in values {
                    push_u16(out, *v);
                }
            }
        }
    }

    /// Length in bytes of the normal (non-exception) reply PDU.
    fn reply_pdu_len(&self) -> usize {
        match self {
            Request::ReadCoils { count, .. } | Request::ReadDiscreteInputs { count, .. } => {
                2 + usize::from(*count).div_ceil(8)
            }
            Request::ReadHoldingRegisters { count, .. }
            | Request::ReadInputRegisters { count, .. } => 2 + 2 * usize::from(*count),
            _ => 5,
        }
    }
}

/// A successful reply, as decoded (or as a slave builds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// FC01/FC02: exactly the bits asked for, first address first.
    Bits(Vec<bool>),
    /// FC03/FC04: exactly the registers asked for, first address first.
    Registers(Vec<u16>),
    /// FC05 echo.
    WriteSingleCoil { address: u16, on: bool },
    /// FC06 echo.
    WriteSingleRegister { address: u16, value: u16 },
    /// FC15/FC16 confirmation: start address and number of coils/registers written.
    WriteMultiple { address: u16, count: u16 },
}

/// A Modbus exception code: the device understood the request and refused it
/// (Application Protocol V1.1b3 §7). Not a transport error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExceptionCode(pub u8);

impl ExceptionCode {
    /// 1: the function is not supported by the unit.
    pub const ILLEGAL_FUNCTION: ExceptionCode = ExceptionCode(0x01);
    /// 2: the address range is not in the unit's map.
    pub const ILLEGAL_DATA_ADDRESS: ExceptionCode = ExceptionCode(0x02);
    /// 3: a value in the request (a count, a coil word) is not allowed.
    pub const ILLEGAL_DATA_VALUE: ExceptionCode = ExceptionCode(0x03);
    /// 4: the unit failed while performing the request.
    pub const SERVER_DEVICE_FAILURE: ExceptionCode = ExceptionCode(0x04);
    /// 5: accepted, will take long (the master should poll later).
    pub const ACKNOWLEDGE: ExceptionCode = ExceptionCode(0x05);
    /// 6: the unit is busy with a long command.
    pub const SERVER_DEVICE_BUSY: ExceptionCode = ExceptionCode(0x06);
    /// 8: parity error in the unit's extended memory.
    pub const MEMORY_PARITY_ERROR: ExceptionCode = ExceptionCode(0x08);
    /// 0x0A: a gateway has no path to the target.
    pub const GATEWAY_PATH_UNAVAILABLE: ExceptionCode = ExceptionCode(0x0A);
    /// 0x0B: a gateway's target did not answer.
    pub const GATEWAY_TARGET_FAILED: ExceptionCode = ExceptionCode(0x0B);

    /// The standard name of the code, if it is a standard one.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "illegal function",
            0x02 => "illegal data address",
            0x03 => "illegal data value",
            0x04 => "server device failure",
            0x05 => "acknowledge",
            0x06 => "server device busy",
            0x08 => "memory parity error",
            0x0A => "gateway path unavailable",
            0x0B => "gateway target device failed to respond",
            _ => return None,
        })
    }
}

impl fmt::Display for ExceptionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "exception {:#04x} ({name})", self.0),
            None => write!(f, "exception {:#04x} (non-standard)", self.0),
        }
    }
}

/// Why received bytes are not an acceptable frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The RTU CRC does not match: line noise, a collision, a baud or parity mismatch.
    #[error("CRC mismatch")]
    Crc,
    /// A well-formed frame from (or to) another unit than the one asked: a late reply or a
    /// second master.
    #[error("frame from foreign unit {got}")]
    ForeignUnit { got: UnitId },
    /// A well-formed frame with another function code than the one asked.
    #[error("reply carries function {got:#04x}, not the one asked")]
    WrongFunction { got: u8 },
    /// A reply whose byte count or quantity does not match the request.
    #[error("reply count does not match the request")]
    WrongCount,
    /// A write confirmation (FC05/06/15/16) that does not echo the address and value asked.
    #[error("write confirmation does not echo the request")]
    EchoMismatch,
    /// An MBAP reply with another transaction id (TCP): a late reply on the connection.
    #[error("MBAP transaction id {got} is not the one sent")]
    WrongTransaction { got: u16 },
    /// Bytes that cannot be a frame: impossible lengths, a non-zero MBAP protocol id, a bad
    /// coil word, trailing garbage inside a frame.
    #[error("malformed frame")]
    Malformed,
    /// Slave side: a well-framed, intact request that the slave must answer with `exception`
    /// (an unknown function, a count out of range). `consumed` bytes make up the frame.
    #[error("request to unit {unit} function {function:#04x} refused: {exception}")]
    Rejected {
        unit: UnitId,
        function: u8,
        exception: ExceptionCode,
        consumed: usize,
    },
}

/// What a decoder made of the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The frame is incomplete: at least this many more bytes are needed.
    NeedMore(usize),
    /// A complete, valid frame, and how many bytes of the input it used (bytes after it are not
    /// part of it).
    Complete(T, usize),
}

/// A reply as a master sees it: a response or the device's exception.
pub type Reply = Result<Response, ExceptionCode>;

// ---------------------------------------------------------------------------------------------
// Timing (Serial Line V1.02 §2.5.1.1)

/// Duration of one character on the wire: `bits_per_char` bits at `baud` bits/s.
///
/// `bits_per_char` = 1 start + 8 data + parity (0 or 1) + stop (1 or 2): 10 for 8N1, 11 for 8E1,
/// 8O1 and 8N2. A `baud` of 0 is treated as 1 (never divides by zero).
pub fn char_time(baud: u32, bits_per_char: u32) -> Duration {
    let nanos = u64::from(bits_per_char) * 1_000_000_000 / u64::from(baud.max(1));
    Duration::from_nanos(nanos)
}

/// Wire time of `bytes` characters of `bits_per_char` bits at `baud` bits/s.
pub fn wire_time(bytes: usize, baud: u32, bits_per_char: u32) -> Duration {
    let bits = u64::try_from(bytes)
        .unwrap_or(u64::MAX)
        .saturating_mul(u64::from(bits_per_char));
    Duration::from_nanos(bits.saturating_mul(1_000_000_000) / u64::from(baud.max(1)))
}

/// The inter-frame silent interval t3.5 for characters of `bits_per_char` bits: 3.5 character
/// times up to 19200 baud, a fixed 1750 µs above (Serial Line V1.02 §2.5.1.1: "for baud rates
/// greater than 19200 Bps, fixed values for the 2 timers should be used: 750µs for the
/// inter-character time-out (t1.5) and a value of 1.750ms for inter-frame delay (t3.5)").
pub fn silent_interval_for(baud: u32, bits_per_char: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        char_time(baud, bits_per_char) * 7 / 2
    }
}

/// The silent interval t3.5 with the spec's 11-bit character (Serial Line V1.02 §2.5.1: a
/// character is 11 bits in RTU mode), the conservative value for a master: 3.5 × 11 bit times up
/// to 19200 baud (4.01 ms at 9600), 1750 µs above.
pub fn silent_interval(baud: u32) -> Duration {
    silent_interval_for(baud, 11)
}

// ---------------------------------------------------------------------------------------------
// RTU, master side

/// CRC-16/MODBUS of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC16.checksum(bytes)
}

/// Whether `frame` (address … CRC low, CRC high) ends with a valid CRC. False for frames
/// shorter than 4 bytes.
pub fn check_crc(frame: &[u8]) -> bool {
    match frame.len().checked_sub(2) {
        Some(body) if frame.len() >= 4 => {
            let crc = crc16(&frame[..body]);
            frame[body..] == crc.to_le_bytes()
        }
        _ => false,
    }
}

/// Encodes `req` to `unit` as an RTU frame: address, PDU, CRC (low byte first).
///
/// # Errors
/// [`RequestError`] if the request breaks the spec's limits, if `unit` is reserved (> 247), or
/// if a read is addressed to the broadcast unit 0. Nothing is encoded then.
pub fn encode_rtu_request(unit: UnitId, req: &Request) -> Result<Vec<u8>, RequestError> {
    req.validate()?;
    if unit.0 > MAX_RTU_UNIT {
        return Err(RequestError::ReservedUnit(unit.0));
    }
    if unit.0 == 0 && !req.is_write() {
        return Err(RequestError::BroadcastRead);
    }
    let mut out = Vec::with_capacity(16);
    out.push(unit.0);
    req.encode_pdu(&mut out);
    push_crc(&mut out);
    Ok(out)
}

/// Length in bytes of the normal RTU reply to `req` (address + PDU + CRC); an exception reply is
/// always 5 bytes. Example: FC04 of 4 registers → 13.
pub fn expected_rtu_reply_len(req: &Request) -> usize {
    1 + req.reply_pdu_len() + 2
}

/// Decodes the RTU reply to `req` sent to `unit` from `buf`, the bytes received since the
/// request went out.
///
/// Returns [`Decoded::NeedMore`] while the frame is incomplete, [`Decoded::Complete`] with the
/// response or the device's exception once a valid frame is there.
///
/// # Errors
/// [`FrameError::Crc`] for a corrupted frame, [`FrameError::ForeignUnit`] for a valid frame from
/// another unit, [`FrameError::WrongFunction`], [`FrameError::WrongCount`] when the quantity
/// differs from the request, [`FrameError::EchoMismatch`] when a write confirmation does not echo
/// the request, [`FrameError::Malformed`] for impossible lengths.
pub fn decode_rtu_response(
    buf: &[u8],
    unit: UnitId,
    req: &Request,
) -> Result<Decoded<Reply>, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::NeedMore(5 - buf.len()));
    }
    let fc = buf[1];
    // The frame's length follows from its own function code, so that a frame from another unit
    // or with another function is still delimited and CRC-checked before it is classified.
    let len = if fc & 0x80 != 0 {
        5
    } else {
        match fc {
            0x01..=0x04 => {
                let Some(&byte_count) = buf.get(2) else {
                    return Ok(Decoded::NeedMore(3));
                };
                if byte_count == 0 || usize::from(byte_count) > MAX_RTU_FRAME - 5 {
                    return Err(FrameError::Malformed);
                }
                5 + usize::from(byte_count)
            }
            0x05 | 0x06 | 0x0F | 0x10 => 8,
            // Not a reply shape we know: it cannot be delimited, so it cannot be ours.
            _ if buf[0] != unit.0 => {
                return Err(FrameError::ForeignUnit {
                    got: UnitId(buf[0]),
                })
            }
            _ => return Err(FrameError::WrongFunction { got: fc }),
        }
    };
    if buf.len() < len {
        return Ok(Decoded::NeedMore(len - buf.len()));
    }
    let frame = &buf[..len];
    if !check_crc(frame) {
        return Err(FrameError::Crc);
    }
    if frame[0] != unit.0 {
        return Err(FrameError::ForeignUnit {
            got: UnitId(frame[0]),
        });
    }
    let reply = decode_response_pdu(&frame[1..len - 2], req)?;
    Ok(Decoded::Complete(reply, len))
}

/// Decodes an exact response PDU (function code + data) against the request it answers.
fn decode_response_pdu(pdu: &[u8], req: &Request) -> Result<Reply, FrameError> {
    let Some((&fc, data)) = pdu.split_first() else {
        return Err(FrameError::Malformed);
    };
    let asked = req.function_code();
    if fc == asked | 0x80 {
        return match data {
            [code] => Ok(Err(ExceptionCode(*code))),
            _ => Err(FrameError::Malformed),
        };
    }
    if fc != asked {
        return Err(FrameError::WrongFunction { got: fc });
    }
    match req {
        Request::ReadCoils { count, .. } | Request::ReadDiscreteInputs { count, .. } => {
            let bytes = byte_counted(data)?;
            if bytes.len() != usize::from(*count).div_ceil(8) {
                return Err(FrameError::WrongCount);
            }
            Ok(Ok(Response::Bits(unpack_bits(bytes, usize::from(*count)))))
        }
        Request::ReadHoldingRegisters { count, .. } | Request::ReadInputRegisters { count, .. } => {
            let bytes = byte_counted(data)?;
            if bytes.len() != 2 * usize::from(*count) {
                return Err(FrameError::WrongCount);
            }
            Ok(Ok(Response::Registers(words(bytes))))
        }
        Request::WriteSingleCoil { address, on } => {
            let (a, v) = two_words(data)?;
            if a != *address || v != coil_word(*on) {
                return Err(FrameError::EchoMismatch);
            }
            Ok(Ok(Response::WriteSingleCoil {
                address: a,
                on: *on,
            }))
        }
        Request::WriteSingleRegister { address, value } => {
            let (a, v) = two_words(data)?;
            if a != *address || v != *value {
                return Err(FrameError::EchoMismatch);
            }
            Ok(Ok(Response::WriteSingleRegister {
                address: a,
                value: v,
            }))
        }
        Request::WriteMultipleCoils { address, values } => {
            multiple_echo(data, *address, values.len())
        }
        Request::WriteMultipleRegisters { address, values } => {
            multiple_echo(data, *address, values.len())
        }
    }
}

/// Checks an FC15/FC16 confirmation against the start address and quantity sent.
fn multiple_echo(data: &[u8], address: u16, sent: usize) -> Result<Reply, FrameError> {
    let (a, n) = two_words(data)?;
    if a != address {
        return Err(FrameError::EchoMismatch);
    }
    if usize::from(n) != sent {
        return Err(FrameError::WrongCount);
    }
    Ok(Ok(Response::WriteMultiple {
        address: a,
        count: n,
    }))
}

/// `data` = byte count + exactly that many bytes.
fn byte_counted(data: &[u8]) -> Result<&[u8], FrameError> {
    match data.split_first() {
        Some((&n, rest)) if usize::from(n) == rest.len() => Ok(rest),
        _ => Err(FrameError::Malformed),
    }
}

fn two_words(data: &[u8]) -> Result<(u16, u16), FrameError> {
    match data {
        [a0, a1, b0, b1] => Ok((
            u16::from_be_bytes([*a0, *a1]),
            u16::from_be_bytes([*b0, *b1]),
        )),
        _ => Err(FrameError::Malformed),
    }
}

// ---------------------------------------------------------------------------------------------
// RTU, slave side

/// Decodes one RTU request from `buf` (slave side). The unit id is returned as sent: the caller
/// decides whether it serves it (0 = broadcast).
///
/// A request with a function code outside 1..=6, 15, 16 cannot be delimited by its content: it
/// is reported as [`FrameError::Rejected`] (exception 1) once the whole buffer carries a valid
/// CRC, else as [`Decoded::NeedMore`]; the caller drops a partial frame after a silent interval.
///
/// # Errors
/// [`FrameError::Crc`] for a corrupted frame (a slave stays silent), [`FrameError::Malformed`]
/// for an impossible length, [`FrameError::Rejected`] for an intact request the slave must
/// answer with an exception (1: unknown function, 3: count out of range or inconsistent byte
/// count, or a coil word other than 0xFF00/0x0000).
pub fn decode_rtu_request(buf: &[u8]) -> Result<Decoded<(UnitId, Request)>, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::NeedMore(8 - buf.len()));
    }
    let fc = buf[1];
    let len = match fc {
        0x01..=0x06 => 8,
        0x0F | 0x10 => {
            let Some(&byte_count) = buf.get(6) else {
                return Ok(Decoded::NeedMore(9 - buf.len()));
            };
            9 + usize::from(byte_count)
        }
        _ => {
            if buf.len() > MAX_RTU_FRAME {
                return Err(FrameError::Malformed);
            }
            if check_crc(buf) {
                return Err(FrameError::Rejected {
                    unit: UnitId(buf[0]),
                    function: fc,
                    exception: ExceptionCode::ILLEGAL_FUNCTION,
                    consumed: buf.len(),
                });
            }
            return Ok(Decoded::NeedMore(1));
        }
    };
    if buf.len() < len {
        return Ok(Decoded::NeedMore(len - buf.len()));
    }
    let frame = &buf[..len];
    if !check_crc(frame) {
        return Err(FrameError::Crc);
    }
    let unit = UnitId(frame[0]);
    match decode_request_pdu(&frame[1..len - 2]) {
        Ok(req) => Ok(Decoded::Complete((unit, req), len)),
        Err(exception) => Err(FrameError::Rejected {
            unit,
            function: fc,
            exception,
            consumed: len,
        }),
    }
}

/// Decodes an exact request PDU; the error is the exception a slave answers with.
fn decode_request_pdu(pdu: &[u8]) -> Result<Request, ExceptionCode> {
    let Some((&fc, data)) = pdu.split_first() else {
        return Err(ExceptionCode::ILLEGAL_FUNCTION);
    };
    let word = |i: usize| -> Result<u16, ExceptionCode> {
        match (data.get(i), data.get(i + 1)) {
            (Some(h), Some(l)) => Ok(u16::from_be_bytes([*h, *l])),
            _ => Err(ExceptionCode::ILLEGAL_DATA_VALUE),
        }
    };
    let req = match fc {
        0x01..=0x06 => {
            if data.len() != 4 {
                return Err(ExceptionCode::ILLEGAL_DATA_VALUE);
            }
            let (address, n) = (word(0)?, word(2)?);
            match fc {
                0x01 => Request::ReadCoils { address, count: n },
                0x02 => Request::ReadDiscreteInputs { address, count: n },
                0x03 => Request::ReadHoldingRegisters { address, count: n },
                0x04 => Request::ReadInputRegisters { address, count: n },
                0x05 => match n {
                    0xFF00 => Request::WriteSingleCoil { address, on: true },
                    0x0000 => Request::WriteSingleCoil { address, on: false },
                    _ => return Err(ExceptionCode::ILLEGAL_DATA_VALUE),
                },
                _ => Request::WriteSingleRegister { address, value: n },
            }
        }
        0x0F | 0x10 => {
            let (address, n) = (word(0)?, word(2)?);
            let Some((&byte_count, payload)) = data.get(4..).and_then(<[u8]>::split_first) else {
                return Err(ExceptionCode::ILLEGAL_DATA_VALUE);
            };
            let count = usize::from(n);
            let want = if fc == 0x0F {
                count.div_ceil(8)
            } else {
                2 * count
            };
            if usize::from(byte_count) != payload.len() || payload.len() != want {
                return Err(ExceptionCode::ILLEGAL_DATA_VALUE);
            }
            if fc == 0x0F {
                Request::WriteMultipleCoils {
                    address,
                    values: unpack_bits(payload, count),
                }
            } else {
                Request::WriteMultipleRegisters {
                    address,
                    values: words(payload),
                }
            }
        }
        _ => return Err(ExceptionCode::ILLEGAL_FUNCTION),
    };
    req.validate()
        .map_err(|_| ExceptionCode::ILLEGAL_DATA_VALUE)?;
    Ok(req)
}

/// Encodes a slave's RTU reply to function `function` of `unit`: the response, or the exception
/// frame (`function | 0x80`, code).
///
/// Never fails: a response too large for one frame (more than 2000 bits or 125 registers) is
/// replaced by exception 4 (server device failure) rather than sent truncated.
pub fn encode_rtu_response(unit: UnitId, function: u8, reply: &Reply) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.push(unit.0);
    encode_response_pdu(&mut out, function, reply);
    push_crc(&mut out);
    out
}

fn encode_response_pdu(out: &mut Vec<u8>, function: u8, reply: &Reply) {
    let start = out.len();
    let exception = |out: &mut Vec<u8>, code: ExceptionCode| {
        out.truncate(start);
        out.push(function | 0x80);
        out.push(code.0);
    };
    match reply {
        Err(code) => exception(out, *code),
        Ok(Response::Bits(bits)) if bits.len() <= usize::from(MAX_READ_BITS) => {
            let packed = pack_bits(bits);
            out.push(function);
            out.push(len_u8(packed.len()));
            out.extend_from_slice(&packed);
        }
        Ok(Response::Registers(regs)) if regs.len() <= usize::from(MAX_READ_REGISTERS) => {
            out.push(function);
            out.push(len_u8(regs.len() * 2));
            for r in regs {
                push_u16(out, *r);
            }
        }
        Ok(Response::WriteSingleCoil { address, on }) => {
            out.push(function);
            push_u16(out, *address);
            push_u16(out, coil_word(*on));
        }
        Ok(Response::WriteSingleRegister { address, value }) => {
            out.push(function);
            push_u16(out, *address);
            push_u16(out, *value);
        }
        Ok(Response::WriteMultiple { address, count }) => {
            out.push(function);
            push_u16(out, *address);
            push_u16(out, *count);
        }
        Ok(Response::Bits(_) | Response::Registers(_)) => {
            exception(out, ExceptionCode::SERVER_DEVICE_FAILURE);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Modbus TCP (MBAP header: transaction id, protocol id 0, length, unit id)

/// Encodes `req` to `unit` as a Modbus TCP frame with `transaction` as MBAP transaction id.
///
/// # Errors
/// [`RequestError`] if the request breaks the spec's limits.
pub fn encode_tcp_request(
    transaction: u16,
    unit: UnitId,
    req: &Request,
) -> Result<Vec<u8>, RequestError> {
    req.validate()?;
    let mut pdu = Vec::with_capacity(16);
    req.encode_pdu(&mut pdu);
    Ok(mbap(transaction, unit, &pdu))
}

fn mbap(transaction: u16, unit: UnitId, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + pdu.len());
    push_u16(&mut out, transaction);
    push_u16(&mut out, 0);
    push_u16(&mut out, len_u16(pdu.len() + 1));
    out.push(unit.0);
    out.extend_from_slice(pdu);
    out
}

/// An MBAP frame's transaction id, unit id and PDU.
type MbapFrame<'a> = (u16, UnitId, &'a [u8]);

/// Splits one MBAP frame off `buf`: (transaction, unit, PDU, frame length).
fn split_mbap(buf: &[u8]) -> Result<Decoded<MbapFrame<'_>>, FrameError> {
    if buf.len() < 7 {
        return Ok(Decoded::NeedMore(7 - buf.len()));
    }
    let transaction = u16::from_be_bytes([buf[0], buf[1]]);
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    let length = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    // Length counts the unit id and the PDU: at least unit + function code, at most 254.
    if protocol != 0 || !(2..=MAX_TCP_FRAME - 6).contains(&length) {
        return Err(FrameError::Malformed);
    }
    let total = 6 + length;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total - buf.len()));
    }
    Ok(Decoded::Complete(
        (transaction, UnitId(buf[6]), &buf[7..total]),
        total,
    ))
}

/// Decodes the Modbus TCP reply to `req` sent as `transaction` to `unit`.
///
/// # Errors
/// [`FrameError::Malformed`] for a non-zero protocol id or an impossible length,
/// [`FrameError::WrongTransaction`], [`FrameError::ForeignUnit`], and the PDU errors of
/// [`decode_rtu_response`].
pub fn decode_tcp_response(
    buf: &[u8],
    transaction: u16,
    unit: UnitId,
    req: &Request,
) -> Result<Decoded<Reply>, FrameError> {
    let (tid, got_unit, pdu, total) = match split_mbap(buf)? {
        Decoded::NeedMore(n) => return Ok(Decoded::NeedMore(n)),
        Decoded::Complete((tid, u, pdu), total) => (tid, u, pdu, total),
    };
    if tid != transaction {
        return Err(FrameError::WrongTransaction { got: tid });
    }
    if got_unit != unit {
        return Err(FrameError::ForeignUnit { got: got_unit });
    }
    Ok(Decoded::Complete(decode_response_pdu(pdu, req)?, total))
}

/// Decodes one Modbus TCP request (slave side): (transaction, unit, request).
///
/// # Errors
/// [`FrameError::Malformed`] for a bad MBAP header; [`FrameError::Rejected`] for a request the
/// server must answer with an exception (the caller needs the transaction id for that reply:
/// it is the first two bytes of the frame).
pub fn decode_tcp_request(buf: &[u8]) -> Result<Decoded<(u16, UnitId, Request)>, FrameError> {
    let (tid, unit, pdu, total) = match split_mbap(buf)? {
        Decoded::NeedMore(n) => return Ok(Decoded::NeedMore(n)),
        Decoded::Complete((tid, u, pdu), total) => (tid, u, pdu, total),
    };
    match decode_request_pdu(pdu) {
        Ok(req) => Ok(Decoded::Complete((tid, unit, req), total)),
        Err(exception) => Err(FrameError::Rejected {
            unit,
            function: pdu.first().copied().unwrap_or(0),
            exception,
            consumed: total,
        }),
    }
}

/// Encodes a server's Modbus TCP reply. Never fails (see [`encode_rtu_response`]).
pub fn encode_tcp_response(transaction: u16, unit: UnitId, function: u8, reply: &Reply) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(16);
    encode_response_pdu(&mut pdu, function, reply);
    mbap(transaction, unit, &pdu)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn push_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn push_crc(out: &mut Vec<u8>) {
    let crc = crc16(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn coil_word(on: bool) -> u16 {
    if on {
        0xFF00
    } else {
        0x0000
    }
}

/// Packs bits LSB first, first bit in bit 0 of the first byte (Application Protocol §6.1).
fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        if let Some(byte) = out.get_mut(i / 8) {
            *byte |= 1 << (i % 8);
        }
    }
    out
}

fn unpack_bits(bytes: &[u8], count: usize) -> Vec<bool> {
    (0..count)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

fn words(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// Lengths here are bounded by the validated limits (≤ 1968 values, ≤ 250 bytes); saturate
/// rather than wrap if that invariant were ever broken.
fn len_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn len_u8(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_input(count: u16) -> Request {
        Request::ReadInputRegisters { address: 0, count }
    }

    /// A reply frame as a slave would send it.
    fn rtu_reply(unit: u8, function: u8, reply: &Reply) -> Vec<u8> {
        encode_rtu_response(UnitId(unit), function, reply)
    }

    #[test]
    fn crc_of_a_known_frame_matches_the_spec_example() {
        // 01 04 00 00 00 04 → CRC 0xC9F1, sent low byte first: F1 C9.
        let frame = encode_rtu_request(UnitId(1), &read_input(4)).unwrap();
        assert_eq!(frame, [0x01, 0x04, 0x00, 0x00, 0x00, 0x04, 0xF1, 0xC9]);
        // Serial Line V1.02 appendix B example: 02 07 → CRC 0x1241, sent as 41 12.
        assert_eq!(crc16(&[0x02, 0x07]).to_le_bytes(), [0x41, 0x12]);
        assert!(check_crc(&frame));
    }

    #[test]
    fn every_request_survives_an_rtu_round_trip() {
        let requests = [
            Request::ReadCoils {
                address: 3,
                count: 11,
            },
            Request::ReadDiscreteInputs {
                address: 0,
                count: 2000,
            },
            Request::ReadHoldingRegisters {
                address: 16,
                count: 1,
            },
            read_input(125),
            Request::WriteSingleCoil {
                address: 7,
                on: true,
            },
            Request::WriteSingleCoil {
                address: 7,
                on: false,
            },
            Request::WriteSingleRegister {
                address: 16,
                value: 0xBEEF,
            },
            Request::WriteMultipleCoils {
                address: 1,
                values: vec![true, false, true, true, false, false, true, false, true],
            },
            Request::WriteMultipleRegisters {
                address: 65_535,
                values: vec![42],
            },
        ];
        for req in requests {
            let frame = encode_rtu_request(UnitId(17), &req).unwrap();
            assert_eq!(
                decode_rtu_request(&frame).unwrap(),
                Decoded::Complete((UnitId(17), req.clone()), frame.len()),
                "{req:?}"
            );
        }
    }

    #[test]
    fn every_reply_survives_an_rtu_round_trip() {
        let cases = [
            (
                Request::ReadCoils {
                    address: 0,
                    count: 10,
                },
                Response::Bits(vec![
                    true, false, false, true, true, false, false, false, true, true,
                ]),
            ),
            (read_input(4), Response::Registers(vec![1, 20, 0, 65_535])),
            (
                Request::WriteSingleCoil {
                    address: 2,
                    on: true,
                },
                Response::WriteSingleCoil {
                    address: 2,
                    on: true,
                },
            ),
            (
                Request::WriteSingleRegister {
                    address: 16,
                    value: 1,
                },
                Response::WriteSingleRegister {
                    address: 16,
                    value: 1,
                },
            ),
            (
                Request::WriteMultipleRegisters {
                    address: 5,
                    values: vec![1, 2, 3],
                },
                Response::WriteMultiple {
                    address: 5,
                    count: 3,
                },
            ),
        ];
        for (req, resp) in cases {
            let frame = rtu_reply(9, req.function_code(), &Ok(resp.clone()));
            assert_eq!(frame.len(), expected_rtu_reply_len(&req));
            assert_eq!(
                decode_rtu_response(&frame, UnitId(9), &req).unwrap(),
                Decoded::Complete(Ok(resp), frame.len())
            );
        }
    }

    #[test]
    fn exception_reply_is_the_devices_answer_not_a_frame_error() {
        let frame = rtu_reply(1, 0x04, &Err(ExceptionCode::ILLEGAL_DATA_ADDRESS));
        assert_eq!(frame.len(), 5);
        assert_eq!(
            decode_rtu_response(&frame, UnitId(1), &read_input(4)).unwrap(),
            Decoded::Complete(Err(ExceptionCode(2)), 5)
        );
        assert_eq!(
            ExceptionCode(2).to_string(),
            "exception 0x02 (illegal data address)"
        );
        assert_eq!(
            ExceptionCode(0x0B).name(),
            Some("gateway target device failed to respond")
        );
    }

    #[test]
    fn truncated_reply_asks_for_the_missing_bytes() {
        let frame = rtu_reply(1, 0x04, &Ok(Response::Registers(vec![0, 0, 0, 0])));
        for cut in 0..frame.len() {
            match decode_rtu_response(&frame[..cut], UnitId(1), &read_input(4)).unwrap() {
                Decoded::NeedMore(n) => {
                    assert!(n >= 1 && cut + n <= frame.len(), "cut {cut} n {n}");
                }
                Decoded::Complete(..) => panic!("complete at {cut}"),
            }
        }
    }

    #[test]
    fn reply_from_a_foreign_unit_is_rejected_after_its_crc_checks() {
        let frame = rtu_reply(2, 0x04, &Ok(Response::Registers(vec![1, 2, 3, 4])));
        assert_eq!(
            decode_rtu_response(&frame, UnitId(1), &read_input(4)),
            Err(FrameError::ForeignUnit { got: UnitId(2) })
        );
    }

    #[test]
    fn corrupted_byte_is_a_crc_error() {
        let mut frame = rtu_reply(1, 0x04, &Ok(Response::Registers(vec![1, 2, 3, 4])));
        frame[4] ^= 0x10;
        assert_eq!(
            decode_rtu_response(&frame, UnitId(1), &read_input(4)),
            Err(FrameError::Crc)
        );
    }

    #[test]
    fn reply_with_another_function_is_rejected() {
        let frame = rtu_reply(1, 0x03, &Ok(Response::Registers(vec![1, 2, 3, 4])));
        assert_eq!(
            decode_rtu_response(&frame, UnitId(1), &read_input(4)),
            Err(FrameError::WrongFunction { got: 0x03 })
        );
    }

    #[test]
    fn reply_with_another_count_is_rejected_not_accepted() {
        let frame = rtu_reply(1, 0x04, &Ok(Response::Registers(vec![1, 2, 3])));
        assert_eq!(
            decode_rtu_response(&frame, UnitId(1), &read_input(4)),
            Err(FrameError::WrongCount)
        );
        let bits = rtu_reply(1, 0x01, &Ok(Response::Bits(vec![true; 16])));
        let req = Request::ReadCoils {
            address: 0,
            count: 8,
        };
        assert_eq!(
            decode_rtu_response(&bits, UnitId(1), &req),
            Err(FrameError::WrongCount)
        );
        let multi = rtu_reply(
            1,
            0x10,
            &Ok(Response::WriteMultiple {
                address: 0,
                count: 2,
            }),
        );
        let req = Request::WriteMultipleRegisters {
            address: 0,
            values: vec![1, 2, 3],
        };
        assert_eq!(
            decode_rtu_response(&multi, UnitId(1), &req),
            Err(FrameError::WrongCount)
        );
    }

    #[test]
    fn write_confirmation_must_echo_address_and_value() {
        let req = Request::WriteSingleCoil {
            address: 0,
            on: true,
        };
        let wrong = rtu_reply(
            1,
            0x05,
            &Ok(Response::WriteSingleCoil {
                address: 0,
                on: false,
            }),
        );
        assert_eq!(
            decode_rtu_response(&wrong, UnitId(1), &req),
            Err(FrameError::EchoMismatch)
        );
        let req = Request::WriteSingleRegister {
            address: 16,
            value: 1,
        };
        let wrong = rtu_reply(
            1,
            0x06,
            &Ok(Response::WriteSingleRegister {
                address: 17,
                value: 1,
            }),
        );
        assert_eq!(
            decode_rtu_response(&wrong, UnitId(1), &req),
            Err(FrameError::EchoMismatch)
        );
    }

    #[test]
    fn invalid_counts_are_refused_before_encoding() {
        assert!(matches!(
            encode_rtu_request(UnitId(1), &read_input(126)),
            Err(RequestError::CountOutOfRange { max: 125, .. })
        ));
        assert!(encode_rtu_request(UnitId(1), &read_input(0)).is_err());
        assert!(encode_rtu_request(
            UnitId(1),
            &Request::ReadCoils {
                address: 0,
                count: 2001
            }
        )
        .is_err());
        let coils = Request::WriteMultipleCoils {
            address: 0,
            values: vec![true; 1969],
        };
        assert!(encode_rtu_request(UnitId(1), &coils).is_err());
        let regs = Request::WriteMultipleRegisters {
            address: 0,
            values: vec![0; 124],
        };
        assert!(encode_tcp_request(1, UnitId(1), &regs).is_err());
        assert_eq!(
            encode_rtu_request(
                UnitId(1),
                &Request::ReadInputRegisters {
                    address: 65_530,
                    count: 10
                }
            ),
            Err(RequestError::AddressOverflow {
                address: 65_530,
                count: 10
            })
        );
        assert_eq!(
            encode_rtu_request(UnitId(248), &read_input(1)),
            Err(RequestError::ReservedUnit(248))
        );
        assert_eq!(
            encode_rtu_request(UnitId(0), &read_input(1)),
            Err(RequestError::BroadcastRead)
        );
    }

    #[test]
    fn slave_refuses_a_bad_count_with_illegal_data_value() {
        let mut frame = vec![5, 0x04, 0, 0, 0, 200];
        push_crc(&mut frame);
        assert_eq!(
            decode_rtu_request(&frame),
            Err(FrameError::Rejected {
                unit: UnitId(5),
                function: 4,
                exception: ExceptionCode(3),
                consumed: 8
            })
        );
    }

    #[test]
    fn slave_refuses_an_unknown_function_once_the_crc_delimits_it() {
        let mut frame = vec![5, 0x2B, 0x0E, 0x01, 0x00];
        assert_eq!(decode_rtu_request(&frame), Ok(Decoded::NeedMore(1)));
        push_crc(&mut frame);
        assert_eq!(
            decode_rtu_request(&frame),
            Err(FrameError::Rejected {
                unit: UnitId(5),
                function: 0x2B,
                exception: ExceptionCode(1),
                consumed: 7
            })
        );
    }

    #[test]
    fn tcp_request_and_reply_round_trip_with_the_transaction_id() {
        let req = Request::ReadHoldingRegisters {
            address: 16,
            count: 2,
        };
        let frame = encode_tcp_request(0x1234, UnitId(3), &req).unwrap();
        assert_eq!(&frame[..7], &[0x12, 0x34, 0, 0, 0, 6, 3]);
        assert_eq!(
            decode_tcp_request(&frame).unwrap(),
            Decoded::Complete((0x1234, UnitId(3), req.clone()), 12)
        );
        let reply = encode_tcp_response(0x1234, UnitId(3), 3, &Ok(Response::Registers(vec![7, 8])));
        assert_eq!(
            decode_tcp_response(&reply, 0x1234, UnitId(3), &req).unwrap(),
            Decoded::Complete(Ok(Response::Registers(vec![7, 8])), reply.len())
        );
        assert_eq!(
            decode_tcp_response(&reply, 0x1235, UnitId(3), &req),
            Err(FrameError::WrongTransaction { got: 0x1234 })
        );
        assert_eq!(
            decode_tcp_response(&reply, 0x1234, UnitId(4), &req),
            Err(FrameError::ForeignUnit { got: UnitId(3) })
        );
        assert_eq!(
            decode_tcp_response(&reply[..9], 0x1234, UnitId(3), &req),
            Ok(Decoded::NeedMore(4))
        );
        let mut bad_protocol = reply.clone();
        bad_protocol[3] = 1;
        assert_eq!(
            decode_tcp_response(&bad_protocol, 0x1234, UnitId(3), &req),
            Err(FrameError::Malformed)
        );
    }

    #[test]
    fn silent_interval_is_three_and_a_half_chars_up_to_19200_then_fixed() {
        assert_eq!(char_time(9600, 10), Duration::from_nanos(1_041_666));
        assert_eq!(
            silent_interval_for(9600, 10),
            Duration::from_nanos(3_645_831)
        );
        assert_eq!(silent_interval(19_200), Duration::from_nanos(2_005_206));
        assert_eq!(silent_interval(38_400), Duration::from_micros(1750));
        assert_eq!(silent_interval(0), silent_interval(1));
        assert_eq!(wire_time(21, 9600, 10), Duration::from_nanos(21_875_000));
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300), count in 0u16..200) {
            let req = read_input(count);
            let _ = decode_rtu_response(&bytes, UnitId(1), &req);
            let _ = decode_rtu_response(&bytes, UnitId(1), &Request::ReadCoils { address: 0, count });
            let _ = decode_rtu_response(&bytes, UnitId(1), &Request::WriteMultipleCoils { address: 0, values: vec![true; usize::from(count)] });
            let _ = decode_rtu_request(&bytes);
            let _ = decode_tcp_response(&bytes, 0, UnitId(1), &req);
            let _ = decode_tcp_request(&bytes);
        }

        #[test]
        fn a_complete_decode_never_consumes_more_than_it_was_given(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Decoded::Complete(_, n)) = decode_rtu_request(&bytes) {
                prop_assert!(n <= bytes.len());
            }
            if let Ok(Decoded::Complete(_, n)) = decode_rtu_response(&bytes, UnitId(bytes.first().copied().unwrap_or(0)), &read_input(1)) {
                prop_assert!(n <= bytes.len());
            }
        }

        #[test]
        fn any_valid_register_write_round_trips(unit in 1u8..=247, address in 0u16..1000, values in proptest::collection::vec(any::<u16>(), 1..=123)) {
            let req = Request::WriteMultipleRegisters { address, values };
            let frame = encode_rtu_request(UnitId(unit), &req).unwrap();
            prop_assert_eq!(decode_rtu_request(&frame).unwrap(), Decoded::Complete((UnitId(unit), req), frame.len()));
        }
    }
}
