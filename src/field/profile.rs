//! Decoding a detector's registers with its profile. Pure.
//!
//! A profile names one FC04 read per poll ([`SmokeProfile::first_register`],
//! [`SmokeProfile::register_count`]) and where in it the status, density, fault bits and
//! heartbeat are. A status value the profile does not know is a fault, never a silent normal.

use crate::config::SmokeProfile;
use crate::event::{DetectorReading, DetectorStatus};

/// Why registers could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("reply has {got} registers, the profile reads {want}")]
    WrongCount { got: usize, want: usize },
}

/// Decodes the registers of one poll (`registers[0]` is `profile.first_register`).
///
/// # Errors
/// [`DecodeError::WrongCount`] when the reply does not hold the profile's registers.
pub fn decode(profile: &SmokeProfile, registers: &[u16]) -> Result<DetectorReading, DecodeError> {
    let want = usize::from(profile.register_count);
    if registers.len() != want {
        return Err(DecodeError::WrongCount {
            got: registers.len(),
            want,
        });
    }
    let at = |offset: u16| registers.get(usize::from(offset)).copied();
    let raw = at(profile.status_offset).unwrap_or(u16::MAX);
    let fault_bits = profile.fault_bits_offset.and_then(at).unwrap_or(0);
    let status = if profile.alarm_values.contains(&raw) {
        DetectorStatus::Alarm
    } else if profile.fault_values.contains(&raw) {
        DetectorStatus::Fault
    } else if profile.pre_alarm_values.contains(&raw) {
        DetectorStatus::PreAlarm
    } else if profile.test_values.contains(&raw) {
        DetectorStatus::Test
    } else if profile.normal_values.contains(&raw) {
        DetectorStatus::Normal
    } else {
        // Unknown status value: report a fault rather than guess.
        DetectorStatus::Fault
    };
    let smoke_db_per_m = profile
        .density
        .and_then(|(offset, scale)| at(offset).map(|v| f32::from(v) * scale));
    Ok(DetectorReading {
        status,
        smoke_db_per_m,
        fault_bits,
        heartbeat: profile.heartbeat_offset.and_then(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_smoke_registers_decode_to_status_density_and_bits() {
        let p = SmokeProfile::generic_smoke();
        let r = decode(&p, &[1, 250, 0, 7]).unwrap();
        assert_eq!(r.status, DetectorStatus::Alarm);
        assert!((r.smoke_db_per_m.unwrap() - 2.5).abs() < 1e-6);
        assert_eq!(r.heartbeat, Some(7));
        let r = decode(&p, &[0, 0, 0b10, 8]).unwrap();
        assert_eq!((r.status, r.fault_bits), (DetectorStatus::Normal, 0b10));
        assert_eq!(
            decode(&p, &[3, 0, 0, 0]).unwrap().status,
            DetectorStatus::PreAlarm
        );
        assert_eq!(
            decode(&p, &[4, 0, 0, 0]).unwrap().status,
            DetectorStatus::Test
        );
    }

    #[test]
    fn an_unknown_status_value_is_a_fault() {
        assert_eq!(
            decode(&SmokeProfile::generic_smoke(), &[99, 0, 0, 0])
                .unwrap()
                .status,
            DetectorStatus::Fault
        );
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_reading() {
        assert_eq!(
            decode(&SmokeProfile::generic_smoke(), &[1, 0]),
            Err(DecodeError::WrongCount { got: 2, want: 4 })
        );
    }
}
