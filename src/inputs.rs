//! Panel keys on Raspberry Pi GPIO inputs (the silence and reset keys of the micro fire-station
//! panel, `[panel] silence_key = { gpio = 13 }`): sampled, debounced, and reported to the
//! daemon as [`FieldReport::Input`], the same report as a key on a Modbus discrete input, so
//! the daemon turns a press into silence or reset the same way.
//!
//! - Each pin is sampled every [`SAMPLE_PERIOD`] (10 ms) by a task of its own; a reading is a
//!   memory-mapped register read (rppal), so it never blocks the runtime.
//! - [`Debouncer`] (pure): a level counts once it has been read the same for [`STABLE_FOR`]
//!   (50 ms); then it is reported, once per change. The first stable level is reported too:
//!   the daemon takes a first report as the key's resting level, never as a press.
//! - Off a Pi (rppal's `UnknownModel`), or without permission (group `gpio`), opening fails:
//!   that is logged once as an error and reported once as an unreadable input (`on: None`,
//!   which the daemon logs as "Panel key cannot be read."); opening is retried every
//!   [`RETRY`] without more logging.
//!
//! Not here: what a press means (the daemon and the engine), keys on Modbus discrete inputs
//! (read by their bus's poller).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::config::{InputSpec, Panel};
use crate::daemon::{RESET_KEY, SILENCE_KEY};
use crate::field::FieldReport;

/// How often a GPIO key is sampled: 10 ms, five samples inside [`STABLE_FOR`].
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

/// How long a key's level must read the same before it counts: 50 ms. Contact bounce of
/// ordinary push-buttons lasts a few milliseconds (J. Ganssle, "A Guide to Debouncing", 2004,
/// found most of the switches he measured settled within 10 ms), while a deliberate press
/// lasts well over 100 ms; 50 ms rejects bounce and short spikes on a long panel cable and
/// delays a press by nothing an officer notices.
pub const STABLE_FOR: Duration = Duration::from_millis(50);

/// How often opening a GPIO key that failed is tried again.
pub const RETRY: Duration = Duration::from_secs(10);

/// A key's level, debounced. Pure: samples and their instants in, stable changes out.
#[derive(Debug, Clone)]
pub struct Debouncer {
    stable_for: Duration,
    /// The level last reported, `None` before the first.
    reported: Option<bool>,
    /// The level of the current run of equal samples, and the instant of its first sample.
    run: Option<(bool, Instant)>,
}

impl Debouncer {
    /// A debouncer that reports a level once it has been sampled the same for `stable_for`.
    pub fn new(stable_for: Duration) -> Debouncer {
        Debouncer {
            stable_for,
            reported: None,
            run: None,
        }
    }

    /// Takes the sample `level` read at `now` (instants never go back); returns the level
    /// when it has just become stable and differs from the last one reported (or is the first).
    pub fn sample(&mut self, level: bool, now: Instant) -> Option<bool> {
        let since = match self.run {
            Some((l, since)) if l == level => since,
            _ => {
                self.run = Some((level, now));
                now
            }
        };
        if self.reported != Some(level) && now.saturating_duration_since(since) >= self.stable_for {
            self.reported = Some(level);
            Some(level)
        } else {
            None
        }
    }
}

/// The GPIO keys of `panel`, with the daemon's names for them: (name, BCM pin, active low).
pub fn gpio_keys(panel: &Panel) -> Vec<(&'static str, u8, bool)> {
    [
        (SILENCE_KEY, &panel.silence_key),
        (RESET_KEY, &panel.reset_key),
    ]
    .into_iter()
    .filter_map(|(name, spec)| match spec {
        Some(InputSpec::Gpio { pin, active_low }) => Some((name, *pin, *active_low)),
        _ => None,
    })
    .collect()
}

/// Starts one task per GPIO key of `panel` on `tracker`, reporting into `reports` until
/// `shutdown`. Keys on discrete inputs are not touched (their bus reads them).
pub fn spawn_gpio_keys(
    panel: &Panel,
    reports: &mpsc::Sender<FieldReport>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    for (name, pin, active_low) in gpio_keys(panel) {
        tracker.spawn(run_gpio_key(
            name,
            pin,
            active_low,
            reports.clone(),
            shutdown.clone(),
        ));
    }
}

/// Opens BCM `pin` as an input with the internal pull resistor that holds it released
/// (pull-up for an active-low key wired to ground, pull-down otherwise).
///
/// # Errors
/// rppal's: not a Pi (`UnknownModel`), pin in use, or no permission (group `gpio`).
fn open(pin: u8, active_low: bool) -> Result<rppal::gpio::InputPin, rppal::gpio::Error> {
    let pin = rppal::gpio::Gpio::new()?.get(pin)?;
    Ok(if active_low {
        pin.into_input_pullup()
    } else {
        pin.into_input_pulldown()
    })
}

/// Samples the key `name` on `pin` until `shutdown`; see the module doc.
async fn run_gpio_key(
    name: &'static str,
    pin: u8,
    active_low: bool,
    reports: mpsc::Sender<FieldReport>,
    shutdown: CancellationToken,
) {
    let mut told = false;
    let input = loop {
        match open(pin, active_low) {
            Ok(input) => {
                if told {
                    info!(key = name, pin, "Panel key can be read again.");
                }
                break input;
            }
            Err(e) => {
                if !std::mem::replace(&mut told, true) {
                    error!(key = name, pin, error = %e, "Panel key on GPIO cannot be read; retrying every 10 s.");
                    let report = FieldReport::Input {
                        name: name.to_owned(),
                        on: None,
                        at: Instant::now(),
                    };
                    if reports.send(report).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    watch_key(
        name,
        move || input.is_high() != active_low,
        &reports,
        &shutdown,
    )
    .await;
}

/// Samples `pressed` every [`SAMPLE_PERIOD`] and reports each debounced change of `name`
/// until `shutdown` or until the daemon stops listening.
async fn watch_key(
    name: &str,
    mut pressed: impl FnMut() -> bool,
    reports: &mpsc::Sender<FieldReport>,
    shutdown: &CancellationToken,
) {
    let mut debouncer = Debouncer::new(STABLE_FOR);
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        if let Some(on) = debouncer.sample(pressed(), now) {
            let report = FieldReport::Input {
                name: name.to_owned(),
                on: Some(on),
                at: now,
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `samples` (level, ms since the previous sample) from `t0`; returns the reports
    /// with the index of the sample that produced them.
    fn run(samples: &[(bool, u64)]) -> Vec<(usize, bool)> {
        let mut d = Debouncer::new(STABLE_FOR);
        let mut now = Instant::now();
        let mut out = Vec::new();
        for (i, &(level, dt)) in samples.iter().enumerate() {
            now += MS * u32::try_from(dt).unwrap();
            if let Some(l) = d.sample(level, now) {
                out.push((i, l));
            }
        }
        out
    }

    #[test]
    fn a_level_counts_after_fifty_ms_and_is_reported_once() {
        // Released from the start: reported at the sample 50 ms after the first.
        let r = run(&[
            (false, 0),
            (false, 10),
            (false, 40),
            (false, 10),
            (false, 10),
        ]);
        assert_eq!(r, [(2, false)]);
    }

    #[test]
    fn bounces_shorter_than_fifty_ms_are_ignored() {
        let mut s = vec![(false, 10); 6];
        // A bouncing press that never settles for 50 ms.
        for _ in 0..10 {
            s.push((true, 10));
            s.push((true, 10));
            s.push((false, 10));
        }
        let r = run(&s);
        assert_eq!(r, [(5, false)]);
    }

    #[test]
    fn a_press_held_fifty_ms_is_reported_then_its_release() {
        let mut s = vec![(false, 10); 6];
        s.extend([(true, 10); 6]);
        s.extend([(false, 10); 6]);
        let r = run(&s);
        assert_eq!(r, [(5, false), (11, true), (17, false)]);
    }

    proptest! {
        /// Reports alternate, and each reported level had been sampled the same, without a
        /// break, for at least 50 ms.
        #[test]
        fn every_report_is_a_change_and_was_stable_for_fifty_ms(
            samples in proptest::collection::vec((any::<bool>(), 0u64..30), 1..200)
        ) {
            let r = run(&samples);
            for w in r.windows(2) {
                prop_assert_ne!(w[0].1, w[1].1);
            }
            let t: Vec<u64> = samples.iter().scan(0, |t, &(_, dt)| { *t += dt; Some(*t) }).collect();
            for &(i, level) in &r {
                prop_assert_eq!(samples[i].0, level);
                // The run of equal samples ending at i started at least 50 ms before it.
                let start = (0..=i).rev().take_while(|&j| samples[j].0 == level).last().unwrap();
                prop_assert!(t[i] - t[start] >= 50, "{:?} at {}", r, i);
            }
        }

        /// A level held for 50 ms at the end is the last one reported.
        #[test]
        fn a_level_held_long_enough_is_reported(
            samples in proptest::collection::vec((any::<bool>(), 0u64..30), 0..100),
            last in any::<bool>(),
        ) {
            let mut s = samples;
            s.extend([(last, 10); 7]);
            let r = run(&s);
            prop_assert_eq!(r.last().map(|&(_, l)| l), Some(last));
        }
    }

    /// The next key report (name, level); panics after 5 s.
    async fn next(rx: &mut mpsc::Receiver<FieldReport>) -> (String, Option<bool>) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(FieldReport::Input { name, on, .. })) => (name, on),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_sampled_key_reports_its_resting_level_then_each_press_and_release() {
        let key = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let (k, s) = (key.clone(), stop.clone());
        let task = tokio::spawn(async move {
            watch_key("silence_key", move || k.load(Ordering::SeqCst), &tx, &s).await;
        });
        assert_eq!(next(&mut rx).await, ("silence_key".into(), Some(false)));
        key.store(true, Ordering::SeqCst);
        assert_eq!(next(&mut rx).await, ("silence_key".into(), Some(true)));
        key.store(false, Ordering::SeqCst);
        assert_eq!(next(&mut rx).await, ("silence_key".into(), Some(false)));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_gpio_key_off_a_pi_is_reported_unreadable_once() {
        if std::fs::read_to_string("/proc/device-tree/model").is_ok_and(|m| m.contains("Raspberry"))
        {
            return;
        }
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_gpio_key("reset_key", 19, true, tx, stop.clone()));
        match rx.recv().await {
            Some(FieldReport::Input { name, on, .. }) => {
                assert_eq!((name.as_str(), on), ("reset_key", None));
            }
            other => panic!("{other:?}"),
        }
        stop.cancel();
        task.await.unwrap();
        assert!(rx.recv().await.is_none(), "reported once");
    }
}
