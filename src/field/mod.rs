//! (being written)
pub mod frame;
pub mod link;
