//! The pure rules of the gateway: readings and commands in, actions and events out.
//!
//! No tokio, no sled, no serial port: everything here is synchronous, takes `now` as an
//! argument and is tested with a fake clock. The daemon applies the actions (outputs first)
//! and hands the events to the store.

pub mod fire;

pub use fire::{Action, FireEngine, Input, Latched, OutputId, Step};
