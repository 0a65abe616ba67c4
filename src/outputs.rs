//! Outputs: sounders and the panel's LEDs and buzzer, as the engine's wanted levels.
//!
//! - Every output is a level in a `watch` channel: the engine (through the daemon) sets it, a
//!   driver makes the hardware follow it. A driver that fails keeps the level pending and
//!   retries; the newest level always wins.
//! - Coil outputs are driven by their bus's poller (see [`crate::field::poller`]), ahead of
//!   its next poll, so they share the bus with no lock.
//! - GPIO outputs are driven here through [`OutputDriver`], implemented for Raspberry Pi pins
//!   with rppal. Off a Pi, opening a pin fails with rppal's `UnknownModel`, which is reported
//!   as an [`Error`] so the operator sees that the output cannot sound.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Why an output could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GPIO {pin}: {source}")]
    Gpio {
        pin: u8,
        #[source]
        source: rppal::gpio::Error,
    },
}

/// Something that can be switched on and off.
pub trait OutputDriver: Send {
    /// Drives the output to `on`.
    ///
    /// # Errors
    /// The driver's error; the caller retries.
    fn set(&mut self, on: bool) -> Result<(), Error>;
}

/// A Raspberry Pi GPIO output pin (BCM numbering).
#[derive(Debug)]
pub struct GpioOutput {
    pin: rppal::gpio::OutputPin,
    active_low: bool,
}

impl GpioOutput {
    /// Opens BCM pin `pin` as an output, driven inactive at once.
    ///
    /// The pin keeps its level when the process exits (`reset_on_drop` off): a restarting
    /// daemon must not silence a sounding alarm in between; the new process drives every
    /// output to the level the engine wants within one step.
    ///
    /// # Errors
    /// [`Error::Gpio`]: not a Pi (`UnknownModel`), pin in use, or no permission (group `gpio`).
    pub fn open(pin: u8, active_low: bool) -> Result<Self, Error> {
        let gpio = rppal::gpio::Gpio::new().map_err(|source| Error::Gpio { pin, source })?;
        let mut out = gpio
            .get(pin)
            .map_err(|source| Error::Gpio { pin, source })?
            .into_output();
        out.set_reset_on_drop(false);
        let mut o = GpioOutput {
            pin: out,
            active_low,
        };
        o.set(false)?;
        Ok(o)
    }
}

impl OutputDriver for GpioOutput {
    fn set(&mut self, on: bool) -> Result<(), Error> {
        if on != self.active_low {
            self.pin.set_high();
        } else {
            self.pin.set_low();
        }
        Ok(())
    }
}

/// Makes `driver` follow `wanted` until `shutdown`. A failed set is retried every second.
pub async fn follow(
    name: String,
    mut driver: Box<dyn OutputDriver>,
    mut wanted: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut confirmed: Option<bool> = None;
    loop {
        let on = *wanted.borrow_and_update();
        if confirmed != Some(on) {
            match driver.set(on) {
                Ok(()) => {
                    confirmed = Some(on);
                    info!(output = %name, on, "Output driven.");
                }
                Err(e) => {
                    confirmed = None;
                    error!(output = %name, on, error = %e, "Output cannot be driven; retrying.");
                }
            }
        }
        let retry = confirmed.is_none();
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports the levels it is driven to (a test double of pure logic only).
    struct Recorder(tokio::sync::mpsc::UnboundedSender<bool>);

    impl OutputDriver for Recorder {
        fn set(&mut self, on: bool) -> Result<(), Error> {
            let _ = self.0.send(on);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_driver_follows_the_wanted_level() {
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let (tx, rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow(
            "s".into(),
            Box::new(Recorder(seen_tx)),
            rx,
            stop.clone(),
        ));
        assert_eq!(seen.recv().await, Some(false));
        tx.send(true).unwrap();
        assert_eq!(seen.recv().await, Some(true));
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn opening_a_gpio_off_a_pi_is_an_error_not_a_panic() {
        // Off a Raspberry Pi, rppal reports UnknownModel.
        if std::fs::read_to_string("/proc/device-tree/model").is_ok_and(|m| m.contains("Raspberry"))
        {
            return;
        }
        assert!(matches!(
            GpioOutput::open(17, false),
            Err(Error::Gpio { pin: 17, .. })
        ));
    }
}
