//! # village-gateway
//!
//! One gateway per village. It owns the RS-485 buses of the village's rental buildings, decides
//! locally what a smoke reading means, drives sounders and the micro fire-station panel at once,
//! and forwards every event upstream over MQTT, durably, in order, through outages.
//!
//! ```text
//!  RS-485 / Modbus RTU ─┐                         ┌─► outputs: sounders, panel LEDs/buzzer
//!  Modbus TCP          ─┼─► field (one poller     │     (Modbus coils on the bus, or Pi GPIO)
//!                       ┘    task per bus)        │
//!                            │ readings           │ actions (first, never waiting on disk or network)
//!                            ▼                    │
//!                       engine (pure, no I/O) ────┤
//!                            │ events             ▼
//!                            └────────────► store (sled): outbox, gap-free seq
//!                                                 │ after durable
//!                                                 ▼
//!                                      uplink (rumqttc): publish QoS 1, delete on PUBACK,
//!                                      commands in, status + will
//! ```
//!
//! Modules:
//! - [`config`]: the TOML contract, validated, with file:line errors.
//! - [`event`]: the shared vocabulary (ids, readings, events, commands).
//! - [`engine`]: the pure fire rules.
//! - [`field`]: Modbus RTU/TCP buses: framing, transactions with timeouts, one poller per bus.
//! - [`outputs`]: sounders and panel outputs, as coils on a bus or GPIO pins.
//! - [`inputs`]: panel keys on GPIO pins, debounced.
//! - [`store`]: the sled outbox.
//! - [`uplink`]: MQTT forwarder, commands, status.
//! - [`sim`]: the built-in field simulator.
//! - [`broker`]: the embedded MQTT broker of the demo and the tests.
//! - [`daemon`]: the wiring; [`demo`]: the guided scenario.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod event;
pub mod field;
pub mod inputs;
pub mod logging;
pub mod outputs;
pub mod sim;
pub mod store;
pub mod uplink;
