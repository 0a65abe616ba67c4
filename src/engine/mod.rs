//! (being written)
pub mod fire;
