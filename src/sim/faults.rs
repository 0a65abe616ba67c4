//! Fault injection on the wire: what a simulated unit's RTU reply turns into on a bad bus
//! (stray bytes, a frame from another unit or with another function code, a truncated frame, a
//! CRC error, an exception, a late or missing reply). Pure byte surgery on the encoded reply;
//! [`super::Simulator::inject`] arms a fault for a unit's next replies and the serial serving
//! loop applies it.
//!
//! Invariants:
//! - A fault changes only what goes on the wire: the request still takes effect in the unit
//!   (a write is applied), as when a reply is lost or mangled on a real line.
//! - Frames that are meant to be well-formed (another unit, another function, an exception)
//!   carry a valid CRC, so that only the gateway's validation of unit and function can catch
//!   them; a CRC error is the only fault with a bad CRC.
//!
//! Not here: Modbus TCP (its stream has no CRC and no silent interval to lose), the adapter echo
//! ([`super::Simulator::set_adapter_echo`]).

use std::time::Duration;

use crate::event::UnitId;
use crate::field::frame::{crc16, encode_rtu_response, ExceptionCode};

/// One kind of bad reply (Modbus over Serial Line V1.02 §2.5.1: a frame is address, PDU, CRC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFault {
    /// These bytes arrive just before the reply (line noise as the transceivers turn around).
    StrayBytes(Vec<u8>),
    /// The reply carries this unit id instead (a valid frame from another unit).
    FromUnit(UnitId),
    /// The reply carries this function code instead (a valid frame with another function).
    Function(u8),
    /// The last this-many bytes of the reply never arrive.
    Truncated(usize),
    /// The reply's CRC is wrong.
    BadCrc,
    /// The unit answers with this exception code instead.
    Exception(ExceptionCode),
    /// The reply leaves this much later than it should (after the master's timeout: a late
    /// reply that lands in the next transaction).
    Late(Duration),
    /// No reply at all.
    Silent,
}

/// A fault armed for a unit: applied to its next `replies` replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Armed {
    pub(super) fault: ReplyFault,
    pub(super) replies: u32,
}

/// What goes on the wire instead of `reply` (the encoded RTU reply of `unit` to `function`),
/// and how much later. `None` bytes = silence.
pub(super) fn apply(
    fault: &ReplyFault,
    unit: UnitId,
    function: u8,
    reply: Vec<u8>,
) -> (Option<Vec<u8>>, Duration) {
    let mut bytes = reply;
    match fault {
        ReplyFault::StrayBytes(stray) => {
            let mut out = stray.clone();
            out.extend_from_slice(&bytes);
            return (Some(out), Duration::ZERO);
        }
        ReplyFault::FromUnit(other) => {
            if let Some(first) = bytes.first_mut() {
                *first = other.0;
            }
            recrc(&mut bytes);
        }
        ReplyFault::Function(fc) => {
            if let Some(second) = bytes.get_mut(1) {
                *second = *fc;
            }
            recrc(&mut bytes);
        }
        ReplyFault::Truncated(n) => {
            let keep = bytes.len().saturating_sub(*n);
            bytes.truncate(keep);
        }
        ReplyFault::BadCrc => {
            if let Some(crc_high) = bytes.last_mut() {
                *crc_high ^= 0x5A;
            }
        }
        ReplyFault::Exception(code) => bytes = encode_rtu_response(unit, function, &Err(*code)),
        ReplyFault::Late(delay) => return (Some(bytes), *delay),
        ReplyFault::Silent => return (None, Duration::ZERO),
    }
    (Some(bytes), Duration::ZERO)
}

/// Recomputes the CRC of a frame whose body was changed.
fn recrc(frame: &mut [u8]) {
    let Some(body) = frame.len().checked_sub(2) else {
        return;
    };
    let crc = crc16(&frame[..body]).to_le_bytes();
    frame[body..].copy_from_slice(&crc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::frame::{decode_rtu_response, Decoded, FrameError, Request, Response};

    fn reply() -> Vec<u8> {
        encode_rtu_response(UnitId(2), 4, &Ok(Response::Registers(vec![0, 0, 0, 9])))
    }

    fn decode(bytes: &[u8]) -> Result<Decoded<crate::field::frame::Reply>, FrameError> {
        let req = Request::ReadInputRegisters {
            address: 0,
            count: 4,
        };
        decode_rtu_response(bytes, UnitId(2), &req)
    }

    #[test]
    fn a_frame_from_another_unit_keeps_a_valid_crc() {
        let (bytes, _) = apply(&ReplyFault::FromUnit(UnitId(7)), UnitId(2), 4, reply());
        assert_eq!(
            decode(&bytes.unwrap()),
            Err(FrameError::ForeignUnit { got: UnitId(7) })
        );
    }

    #[test]
    fn another_function_code_keeps_a_valid_crc() {
        let (bytes, _) = apply(&ReplyFault::Function(3), UnitId(2), 4, reply());
        assert_eq!(
            decode(&bytes.unwrap()),
            Err(FrameError::WrongFunction { got: 3 })
        );
    }

    #[test]
    fn an_exception_replaces_the_reply() {
        let code = ExceptionCode::SERVER_DEVICE_BUSY;
        let (bytes, _) = apply(&ReplyFault::Exception(code), UnitId(2), 4, reply());
        assert_eq!(decode(&bytes.unwrap()), Ok(Decoded::Complete(Err(code), 5)));
    }

    #[test]
    fn truncation_and_bad_crc_are_not_complete_frames() {
        let (bytes, _) = apply(&ReplyFault::Truncated(3), UnitId(2), 4, reply());
        assert!(matches!(decode(&bytes.unwrap()), Ok(Decoded::NeedMore(3))));
        let (bytes, _) = apply(&ReplyFault::BadCrc, UnitId(2), 4, reply());
        assert_eq!(decode(&bytes.unwrap()), Err(FrameError::Crc));
    }
}
