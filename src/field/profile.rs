//! Smoke detector profiles: which points a detector has, how they are read (the read plan),
//! and how the replies decode into a [`DetectorReading`](crate::event::DetectorReading). Pure: no I/O, no clock.
//!
//! - A profile names **points** ([`Point`]: a Modbus table, a PDU address, and `every`, the
//!   scan cycles between two reads). The status (a register with a value map, or separate
//!   alarm / fault / mounted bits) and the fault bits are read **every** cycle; smoke density and
//!   the heartbeat may be read every Nth cycle.
//! - [`plan_cycle`] turns the points due in one scan cycle into block reads: points of the same
//!   table are read in one request when they are adjacent or at most [`MERGE_GAP`] apart, and a
//!   request never exceeds the Modbus limits ([`MAX_REGISTERS`], [`MAX_BITS`]). A slow point of
//!   unit `u` is due in cycle `c` when `(c + u) % every == 0`, so the slow reads of the units
//!   on a bus are spread over the cycles instead of all landing in the same one.
//! - [`decode`] turns the blocks read into a [`Decoded`]; a point not read this cycle is
//!   `None` (the poller keeps its last value). A status value the profile does not know is a
//!   fault, never a silent normal; a block of the wrong length or kind is an error (a missed
//!   poll), never a panic.
//!
//! The built-in `generic-smoke` ([`SmokeProfile::generic_smoke`], `shared/devices/generic.toml`)
//! plans to exactly one FC04 read of input registers 0..3 in every cycle.

use std::time::Duration;

use super::frame::Request;
use crate::event::{DetectorStatus, UnitId};

/// The most registers one FC03/FC04 request may read (Modbus Application Protocol V1.1b3
/// §6.3, §6.4: quantity 1 to 125).
pub const MAX_REGISTERS: u16 = 125;

/// The most bits one FC01/FC02 request may read (Modbus Application Protocol V1.1b3 §6.1,
/// §6.2: quantity 1 to 2000).
pub const MAX_BITS: u16 = 2000;

/// Points of one table at most this many registers (or bits) apart are read in one request.
/// At 9600 baud one more transaction costs about 14 bytes of framing, CRC and silent
/// intervals (≈ 16 ms) where one more register in a reply costs 2 bytes (≈ 2.3 ms), so
/// reading a gap of up to 8 registers is cheaper than a second request.
pub const MERGE_GAP: u16 = 8;

/// `generic-smoke`'s frozen-heartbeat limit: "a value frozen for 60 s = device fault (stuck
/// firmware)" (`shared/devices/generic.toml`).
pub const GENERIC_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

/// A Modbus data table (`shared/devices/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Coils, read with FC01 (bits).
    Coil,
    /// Discrete inputs, read with FC02 (bits).
    DiscreteInput,
    /// Holding registers, read with FC03.
    Holding,
    /// Input registers, read with FC04.
    Input,
}

impl Table {
    /// Whether the table holds bits (coils, discrete inputs) rather than 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }

    /// The most entries one read request of this table may cover ([`MAX_BITS`] or
    /// [`MAX_REGISTERS`]).
    pub fn limit(self) -> u16 {
        if self.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        }
    }

    /// The name used in the config (`input`, `holding`, `discrete_input`, `coil`).
    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::Holding => "holding",
            Table::Input => "input",
        }
    }
}

/// One readable point of a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub table: Table,
    /// PDU address (0-based, as on the wire).
    pub address: u16,
    /// Read in every `every`th scan cycle (1 = every cycle; 0 is treated as 1).
    pub every: u16,
}

impl Point {
    /// A point read every cycle.
    pub fn every_cycle(table: Table, address: u16) -> Point {
        Point {
            table,
            address,
            every: 1,
        }
    }
}

/// The status register's values (each list may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusValues {
    pub normal: Vec<u16>,
    pub alarm: Vec<u16>,
    pub pre_alarm: Vec<u16>,
    pub fault: Vec<u16>,
    pub test: Vec<u16>,
}

/// Where a detector shows alarm and fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusPoints {
    /// One register whose value is the status (generic-smoke, FAAST-style).
    Register { point: Point, values: StatusValues },
    /// Separate bits (Calectro UG-3-O-MB-R style): `alarm` set = fire; `fault` set = fault;
    /// `mounted` clear = head removed = fault.
    Bits {
        alarm: Point,
        fault: Option<Point>,
        mounted: Option<Point>,
    },
}

/// A smoke detector profile: its points and how to decode them.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeProfile {
    pub name: String,
    pub status: StatusPoints,
    /// Smoke density register and its scale to dB/m (raw × scale).
    pub density: Option<(Point, f32)>,
    /// Fault bits register (any bit set = fault); read every cycle.
    pub fault_bits: Option<Point>,
    /// Heartbeat register (a counter the detector increments).
    pub heartbeat: Option<Point>,
    /// Holding register written with 1 on reset.
    pub remote_reset_register: Option<u16>,
    /// A heartbeat unchanged for this long is a device fault (stuck firmware).
    pub heartbeat_timeout: Option<Duration>,
    /// Registers (or bits) of the largest request of a cycle (the alarm block with any slow
    /// points merged into it): what [`super::budget`] counts per detector. Set by
    /// [`SmokeProfile::with_register_count`].
    pub register_count: u16,
}

impl SmokeProfile {
    /// The built-in `generic-smoke` profile (`shared/devices/generic.toml`): input registers
    /// 0..3 = status (0 normal, 1 alarm, 2 fault, 3 pre-alarm, 4 test), density ×0.01 dB/m,
    /// fault bits, heartbeat, all read every cycle in one FC04 request; holding register 16 =
    /// remote reset.
    pub fn generic_smoke() -> Self {
        SmokeProfile {
            name: "generic-smoke".to_owned(),
            status: StatusPoints::Register {
                point: Point::every_cycle(Table::Input, 0),
                values: StatusValues {
                    normal: vec![0],
                    alarm: vec![1],
                    pre_alarm: vec![3],
                    fault: vec![2],
                    test: vec![4],
                },
            },
            density: Some((Point::every_cycle(Table::Input, 1), 0.01)),
            fault_bits: Some(Point::every_cycle(Table::Input, 2)),
            heartbeat: Some(Point::every_cycle(Table::Input, 3)),
            remote_reset_register: Some(16),
            heartbeat_timeout: Some(GENERIC_HEARTBEAT_TIMEOUT),
            register_count: 0,
        }
        .with_register_count()
    }

    /// Sets [`SmokeProfile::register_count`]: the largest block that reads all points.
    #[must_use]
    pub fn with_register_count(mut self) -> Self {
        self.register_count = plan_points(&self.points())
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0);
        self
    }

    /// Every point of the profile that is read, the every-cycle ones first.
    pub fn points(&self) -> Vec<Point> {
        let mut out = self.alarm_points();
        out.extend(self.density.map(|(p, _)| p));
        out.extend(self.heartbeat);
        out
    }

    /// The points that carry alarm or fault (the status points and the fault bits): they must
    /// be read every cycle.
    pub fn alarm_points(&self) -> Vec<Point> {
        let mut out = Vec::new();
        match &self.status {
            StatusPoints::Register { point, .. } => out.push(*point),
            StatusPoints::Bits {
                alarm,
                fault,
                mounted,
            } => {
                out.push(*alarm);
                out.extend(fault.iter().chain(mounted.iter()).copied());
            }
        }
        out.extend(self.fault_bits);
        out
    }
}

/// One read request: `count` entries of `table` from `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub table: Table,
    pub address: u16,
    pub count: u16,
}

impl Block {
    /// The Modbus request that reads this block.
    pub fn request(&self) -> Request {
        let (address, count) = (self.address, self.count);
        match self.table {
            Table::Coil => Request::ReadCoils { address, count },
            Table::DiscreteInput => Request::ReadDiscreteInputs { address, count },
            Table::Holding => Request::ReadHoldingRegisters { address, count },
            Table::Input => Request::ReadInputRegisters { address, count },
        }
    }

    /// Whether `p` is read by this block.
    pub fn covers(&self, p: &Point) -> bool {
        p.table == self.table
            && p.address >= self.address
            && u32::from(p.address) < u32::from(self.address) + u32::from(self.count)
    }
}

/// Whether a point read every `every` cycles is due in scan cycle `cycle` on unit `unit`.
pub fn is_due(every: u16, cycle: u64, unit: UnitId) -> bool {
    every <= 1 || (cycle + u64::from(unit.0)).is_multiple_of(u64::from(every))
}

/// The blocks that read `points`: per table, in address order, a point joins the previous
/// block when it is at most [`MERGE_GAP`] past its end and the block stays within the table's
/// [`Table::limit`].
pub fn plan_points(points: &[Point]) -> Vec<Block> {
    let mut sorted: Vec<(Table, u16)> = points.iter().map(|p| (p.table, p.address)).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut blocks: Vec<Block> = Vec::new();
    for (table, address) in sorted {
        if let Some(b) = blocks.last_mut().filter(|b| b.table == table) {
            // Sorted: `address` is past the block's first entry.
            let end = u32::from(b.address) + u32::from(b.count); // one past the last entry
            let span = u32::from(address) - u32::from(b.address) + 1;
            if u32::from(address) <= end + u32::from(MERGE_GAP) && span <= u32::from(table.limit())
            {
                // span <= limit <= 2000: fits a u16.
                b.count = u16::try_from(span).unwrap_or(b.count);
                continue;
            }
        }
        blocks.push(Block {
            table,
            address,
            count: 1,
        });
    }
    blocks
}

/// The blocks to read from `unit` in scan cycle `cycle`: every point due then.
pub fn plan_cycle(profile: &SmokeProfile, cycle: u64, unit: UnitId) -> Vec<Block> {
    let due: Vec<Point> = profile
        .points()
        .into_iter()
        .filter(|p| is_due(p.every, cycle, unit))
        .collect();
    plan_points(&due)
}

/// The blocks that read the alarm and fault points only (the confirming re-read).
pub fn alarm_plan(profile: &SmokeProfile) -> Vec<Block> {
    plan_points(&profile.alarm_points())
}

/// What one block read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockData {
    /// FC03/FC04.
    Registers(Vec<u16>),
    /// FC01/FC02.
    Bits(Vec<bool>),
}

/// Why blocks could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("reply has {got} entries, the block reads {want}")]
    WrongCount { got: usize, want: usize },
    #[error("reply to a {table} read holds the other kind of data")]
    WrongKind { table: &'static str },
    #[error("the status point was not read")]
    NoStatus,
}

/// One cycle's decoded values; `None` = not read in this cycle (or not in the profile).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    pub status: DetectorStatus,
    pub fault_bits: Option<u16>,
    /// dB/m.
    pub smoke_db_per_m: Option<f32>,
    pub heartbeat: Option<u16>,
}

/// Decodes the blocks read in one cycle.
///
/// # Errors
/// [`DecodeError::WrongCount`] / [`DecodeError::WrongKind`] when a reply does not hold its
/// block, [`DecodeError::NoStatus`] when no block read the status.
pub fn decode(profile: &SmokeProfile, read: &[(Block, BlockData)]) -> Result<Decoded, DecodeError> {
    for (block, data) in read {
        let got = match (data, block.table.is_bits()) {
            (BlockData::Bits(b), true) => b.len(),
            (BlockData::Registers(r), false) => r.len(),
            _ => {
                return Err(DecodeError::WrongKind {
                    table: block.table.name(),
                })
            }
        };
        if got != usize::from(block.count) {
            return Err(DecodeError::WrongCount {
                got,
                want: usize::from(block.count),
            });
        }
    }
    let find = |p: &Point| {
        read.iter()
            .find(|(b, _)| b.covers(p))
            .map(|(b, d)| (d, usize::from(p.address - b.address)))
    };
    let register = |p: &Point| match find(p) {
        Some((BlockData::Registers(r), i)) => r.get(i).copied(),
        _ => None,
    };
    let bit = |p: &Point| match find(p) {
        Some((BlockData::Bits(b), i)) => b.get(i).copied(),
        _ => None,
    };
    let status = match &profile.status {
        StatusPoints::Register { point, values } => {
            let raw = register(point).ok_or(DecodeError::NoStatus)?;
            if values.alarm.contains(&raw) {
                DetectorStatus::Alarm
            } else if values.fault.contains(&raw) {
                DetectorStatus::Fault
            } else if values.pre_alarm.contains(&raw) {
                DetectorStatus::PreAlarm
            } else if values.test.contains(&raw) {
                DetectorStatus::Test
            } else if values.normal.contains(&raw) {
                DetectorStatus::Normal
            } else {
                // Unknown status value: report a fault rather than guess.
                DetectorStatus::Fault
            }
        }
        StatusPoints::Bits {
            alarm,
            fault,
            mounted,
        } => {
            let alarm = bit(alarm).ok_or(DecodeError::NoStatus)?;
            // A fault or mounted point the profile names but this cycle did not read is
            // missing data: a fault, not a silent normal.
            let fault = fault.map(|p| bit(&p).unwrap_or(true)).unwrap_or(false);
            let removed = mounted.map(|p| !bit(&p).unwrap_or(false)).unwrap_or(false);
            if alarm {
                DetectorStatus::Alarm
            } else if fault || removed {
                DetectorStatus::Fault
            } else {
                DetectorStatus::Normal
            }
        }
    };
    Ok(Decoded {
        status,
        fault_bits: profile.fault_bits.as_ref().and_then(register),
        smoke_db_per_m: profile
            .density
            .and_then(|(p, scale)| register(&p).map(|v| f32::from(v) * scale)),
        heartbeat: profile.heartbeat.as_ref().and_then(register),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn generic_read(regs: &[u16]) -> Result<Decoded, DecodeError> {
        let p = SmokeProfile::generic_smoke();
        let blocks = plan_cycle(&p, 0, UnitId(1));
        decode(&p, &[(blocks[0], BlockData::Registers(regs.to_vec()))])
    }

    #[test]
    fn generic_smoke_is_one_fc04_of_registers_0_to_3_in_every_cycle() {
        let p = SmokeProfile::generic_smoke();
        for cycle in 0..10 {
            let plan = plan_cycle(&p, cycle, UnitId(7));
            assert_eq!(plan.len(), 1);
            assert_eq!(
                plan[0].request(),
                Request::ReadInputRegisters {
                    address: 0,
                    count: 4
                }
            );
        }
        assert_eq!(p.register_count, 4);
    }

    #[test]
    fn generic_smoke_registers_decode_to_status_density_and_bits() {
        let r = generic_read(&[1, 250, 0, 7]).unwrap();
        assert_eq!(r.status, DetectorStatus::Alarm);
        assert!((r.smoke_db_per_m.unwrap() - 2.5).abs() < 1e-6);
        assert_eq!(r.heartbeat, Some(7));
        let r = generic_read(&[0, 0, 0b10, 8]).unwrap();
        assert_eq!(
            (r.status, r.fault_bits),
            (DetectorStatus::Normal, Some(0b10))
        );
        assert_eq!(
            generic_read(&[3, 0, 0, 0]).unwrap().status,
            DetectorStatus::PreAlarm
        );
        assert_eq!(
            generic_read(&[4, 0, 0, 0]).unwrap().status,
            DetectorStatus::Test
        );
    }

    #[test]
    fn an_unknown_status_value_is_a_fault() {
        assert_eq!(
            generic_read(&[99, 0, 0, 0]).unwrap().status,
            DetectorStatus::Fault
        );
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_reading() {
        assert_eq!(
            generic_read(&[1, 0]),
            Err(DecodeError::WrongCount { got: 2, want: 4 })
        );
    }

    #[test]
    fn a_reply_of_the_wrong_kind_is_an_error_not_a_reading() {
        let p = SmokeProfile::generic_smoke();
        let blocks = plan_cycle(&p, 0, UnitId(1));
        assert!(matches!(
            decode(&p, &[(blocks[0], BlockData::Bits(vec![true; 4]))]),
            Err(DecodeError::WrongKind { .. })
        ));
        assert_eq!(decode(&p, &[]), Err(DecodeError::NoStatus));
    }

    fn slow_generic(every: u16) -> SmokeProfile {
        let mut p = SmokeProfile::generic_smoke();
        p.density = Some((
            Point {
                every,
                ..Point::every_cycle(Table::Input, 1)
            },
            0.01,
        ));
        p.heartbeat = Some(Point {
            every,
            ..Point::every_cycle(Table::Input, 3)
        });
        p.with_register_count()
    }

    #[test]
    fn slow_points_are_read_once_in_every_n_cycles_and_left_out_otherwise() {
        let p = slow_generic(4);
        let unit = UnitId(1);
        let mut slow = 0;
        for cycle in 0..40 {
            let plan = plan_cycle(&p, cycle, unit);
            assert_eq!(plan.len(), 1, "status and fault bits are one block");
            if plan[0].count == 4 {
                slow += 1;
                assert_eq!((cycle + 1) % 4, 0);
            } else {
                // Status and fault bits (registers 0 and 2) with the gap read.
                assert_eq!(plan[0].count, 3);
            }
        }
        assert_eq!(slow, 10);
        // A cycle without the slow points decodes the heartbeat as not read; the density,
        // read anyway in the gap between status and fault bits, is a real value and is used.
        let r = decode(
            &p,
            &[(
                plan_cycle(&p, 0, unit)[0],
                BlockData::Registers(vec![0, 9, 0]),
            )],
        )
        .unwrap();
        assert_eq!(r.heartbeat, None);
        assert!((r.smoke_db_per_m.unwrap() - 0.09).abs() < 1e-6);
        assert_eq!(alarm_plan(&p), plan_cycle(&p, 0, unit));
    }

    #[test]
    fn slow_reads_of_consecutive_units_fall_in_different_cycles() {
        let p = slow_generic(4);
        for cycle in 0..4 {
            let slow_units: Vec<u8> = (1..=4)
                .filter(|&u| plan_cycle(&p, cycle, UnitId(u))[0].count == 4)
                .collect();
            assert_eq!(slow_units.len(), 1, "cycle {cycle}: {slow_units:?}");
        }
    }

    #[test]
    fn far_apart_points_are_separate_requests_and_near_ones_merge() {
        let pts = [
            Point::every_cycle(Table::Holding, 3),
            Point::every_cycle(Table::Holding, 12), // 8 registers after 3: merged
            Point::every_cycle(Table::Holding, 68), // far: its own request
            Point::every_cycle(Table::DiscreteInput, 0),
            Point::every_cycle(Table::DiscreteInput, 2),
        ];
        let plan = plan_points(&pts);
        assert_eq!(
            plan,
            vec![
                Block {
                    table: Table::DiscreteInput,
                    address: 0,
                    count: 3
                },
                Block {
                    table: Table::Holding,
                    address: 3,
                    count: 10
                },
                Block {
                    table: Table::Holding,
                    address: 68,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn calectro_style_bits_decode_alarm_fault_and_head_removed() {
        let p = SmokeProfile {
            name: "calectro".to_owned(),
            status: StatusPoints::Bits {
                alarm: Point::every_cycle(Table::DiscreteInput, 2),
                fault: Some(Point::every_cycle(Table::DiscreteInput, 1)),
                mounted: Some(Point::every_cycle(Table::DiscreteInput, 0)),
            },
            density: None,
            fault_bits: None,
            heartbeat: None,
            remote_reset_register: None,
            heartbeat_timeout: None,
            register_count: 0,
        }
        .with_register_count();
        let plan = plan_cycle(&p, 5, UnitId(3));
        assert_eq!(
            plan.iter().map(Block::request).collect::<Vec<_>>(),
            vec![Request::ReadDiscreteInputs {
                address: 0,
                count: 3
            }]
        );
        let status = |bits: [bool; 3]| {
            decode(&p, &[(plan[0], BlockData::Bits(bits.to_vec()))])
                .unwrap()
                .status
        };
        assert_eq!(status([true, false, false]), DetectorStatus::Normal);
        assert_eq!(status([true, false, true]), DetectorStatus::Alarm);
        assert_eq!(status([true, true, false]), DetectorStatus::Fault);
        assert_eq!(status([false, false, false]), DetectorStatus::Fault);
        // A fire is never masked by a removed head or a fault.
        assert_eq!(status([false, true, true]), DetectorStatus::Alarm);
    }

    fn table() -> impl Strategy<Value = Table> {
        prop_oneof![
            Just(Table::Coil),
            Just(Table::DiscreteInput),
            Just(Table::Holding),
            Just(Table::Input)
        ]
    }

    fn point() -> impl Strategy<Value = Point> {
        (
            table(),
            prop_oneof![0u16..40, 0u16..3000, any::<u16>()],
            1u16..6,
        )
            .prop_map(|(table, address, every)| Point {
                table,
                address,
                every,
            })
    }

    proptest! {
        #[test]
        fn every_due_point_is_in_exactly_one_block_within_the_limits(
            alarm in point(),
            fault in proptest::option::of(point()),
            density in proptest::option::of(point()),
            heartbeat in proptest::option::of(point()),
            cycle in 0u64..100,
            unit in 1u8..=247,
        ) {
            let every_cycle = |p: Point| Point { every: 1, ..p };
            let p = SmokeProfile {
                name: "p".to_owned(),
                status: StatusPoints::Register { point: every_cycle(alarm), values: StatusValues::default() },
                density: density.map(|d| (d, 1.0)),
                fault_bits: fault.map(every_cycle),
                heartbeat,
                remote_reset_register: None,
                heartbeat_timeout: None,
                register_count: 0,
            };
            let unit = UnitId(unit);
            let plan = plan_cycle(&p, cycle, unit);
            for b in &plan {
                prop_assert!(b.count >= 1 && b.count <= b.table.limit());
                prop_assert!(u32::from(b.address) + u32::from(b.count) <= 65536);
            }
            for pt in p.points() {
                let n = plan.iter().filter(|b| b.covers(&pt)).count();
                if is_due(pt.every, cycle, unit) {
                    prop_assert_eq!(n, 1, "{:?} in {:?}", pt, plan);
                }
            }
            for pt in p.alarm_points() {
                prop_assert_eq!(plan.iter().filter(|b| b.covers(&pt)).count(), 1);
            }
            // Every block reads at least one due point (no request for a gap alone).
            for b in &plan {
                prop_assert!(p.points().iter().any(|pt| b.covers(pt) && is_due(pt.every, cycle, unit)));
            }
        }
    }
}
