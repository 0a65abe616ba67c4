//! The field buses: Modbus RTU on RS-485 serial ports and Modbus TCP converters.
//!
//! - [`frame`]: the Modbus PDU and its RTU/TCP framing, pure (shared with the simulator).
//! - [`link`]: one transaction at a time on a port, with timeouts, flushing and resync.
//! - [`profile`]: decoding a detector's registers with its profile, pure.
//! - [`poller`]: one poller per bus, writing outputs ahead of polls.
//! - [`budget`]: the worst-case detection time of each bus, computed from the config, pure.
//! - [`commission`]: `scan` and `read` for installers.

pub mod budget;
pub mod commission;
pub mod frame;
pub mod link;
pub mod poller;
pub mod profile;

pub use poller::{
    BusPlan, BusStats, CoilOutput, FieldReport, PolledDetector, PolledInput, WriteRequest,
};
