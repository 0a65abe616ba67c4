//! The ack correlation window: which store seq a PUBACK confirms. Pure, no I/O.
//!
//! rumqttc never returns the packet id of a publish. What it does give, in order:
//! - `Outgoing::Publish(pkid)` once per publish, in the order the requests left the request
//!   channel, which is the order of our successful `try_publish` calls (one task publishes);
//! - `Outgoing::AwaitAck(pkid)` instead, when that pkid is still unacked (a "collision": the
//!   broker acked out of order). rumqttc holds that publish and emits `Outgoing::Publish(pkid)`
//!   for it later, right after the `Incoming::PubAck(pkid)` that frees the id;
//! - `Incoming::PubAck(pkid)` when the broker confirms.
//!
//! So every publish we hand to the client is [`AckWindow::queued`] with a [`Tag`] (an event's
//! seq, or [`Tag::Other`] for status and command results); the next `Outgoing::Publish` takes
//! the oldest queued tag and files it under its pkid; the PUBACK returns it.
//!
//! Invariants:
//! - at most `capacity` events are in the window (queued, held or sent); other publishes do not
//!   count against it;
//! - a seq is in the window at most once ([`AckWindow::contains`] lets the refill skip it);
//! - any mismatch ([`Desync`]) means our picture of the client is wrong: the caller drops the
//!   connection and resends from the store, which is always safe (duplicates are fine upstream).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{EventKind, Seq};

/// What a publish carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    /// A store event: remove `seq` from the store on its PUBACK.
    Event { seq: Seq, kind: EventKind },
    /// Status or a command result: nothing to do on its PUBACK.
    Other,
}

/// The client's events no longer match what we queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Desync {
    #[error("the client sent publish {0} but nothing was queued")]
    NothingQueued(u16),
    #[error("packet id {0} was sent again before its PUBACK")]
    PkidInUse(u16),
}

/// The correlation state of one connection. A new connection starts a new window.
#[derive(Debug)]
pub(crate) struct AckWindow {
    capacity: usize,
    /// Handed to the client, not yet seen leaving, in hand-over order.
    queued: VecDeque<(Tag, Instant)>,
    /// The publish rumqttc holds after a collision on this pkid.
    held: Option<(u16, Tag, Instant)>,
    /// On the wire, waiting for the PUBACK of this pkid.
    sent: HashMap<u16, (Tag, Instant)>,
    /// Seqs of all events in the window.
    seqs: HashSet<Seq>,
}

impl AckWindow {
    /// An empty window holding at most `capacity` events.
    pub(crate) fn new(capacity: usize) -> Self {
        AckWindow {
            capacity,
            queued: VecDeque::new(),
            held: None,
            sent: HashMap::new(),
            seqs: HashSet::new(),
        }
    }

    /// How many more events may be queued.
    pub(crate) fn free_slots(&self) -> usize {
        self.capacity.saturating_sub(self.seqs.len())
    }

    /// Events in the window.
    pub(crate) fn events_in_flight(&self) -> usize {
        self.seqs.len()
    }

    /// Whether `seq` is already in the window (do not publish it again on this connection).
    pub(crate) fn contains(&self, seq: Seq) -> bool {
        self.seqs.contains(&seq)
    }

    /// A publish was handed to the client (`try_publish` returned `Ok`) at `now`.
    pub(crate) fn queued(&mut self, tag: Tag, now: Instant) {
        if let Tag::Event { seq, .. } = tag {
            self.seqs.insert(seq);
        }
        self.queued.push_back((tag, now));
    }

    /// `Outgoing::Publish(pkid)`: the oldest queued publish (or the held one) went out.
    pub(crate) fn on_publish_sent(&mut self, pkid: u16) -> Result<(), Desync> {
        let (tag, at) = match self.held.take() {
            Some((held_pkid, tag, at)) if held_pkid == pkid => (tag, at),
            other => {
                self.held = other;
                self.queued.pop_front().ok_or(Desync::NothingQueued(pkid))?
            }
        };
        if pkid == 0 {
            // QoS 0: no PUBACK will come. We never send events at QoS 0; forget the tag.
            if let Tag::Event { seq, .. } = tag {
                self.seqs.remove(&seq);
            }
            return Ok(());
        }
        match self.sent.insert(pkid, (tag, at)) {
            None => Ok(()),
            Some(_) => Err(Desync::PkidInUse(pkid)),
        }
    }

    /// `Outgoing::AwaitAck(pkid)`: the oldest queued publish collided and is held by rumqttc.
    pub(crate) fn on_collision(&mut self, pkid: u16) -> Result<(), Desync> {
        let (tag, at) = self.queued.pop_front().ok_or(Desync::NothingQueued(pkid))?;
        self.held = Some((pkid, tag, at));
        Ok(())
    }

    /// `Incoming::PubAck(pkid)`: returns what it confirms; `None` for an unknown pkid.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<Tag> {
        let (tag, _) = self.sent.remove(&pkid)?;
        if let Tag::Event { seq, .. } = tag {
            self.seqs.remove(&seq);
        }
        Some(tag)
    }

    /// How long the oldest unacknowledged publish has waited, if any.
    pub(crate) fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        let oldest = self
            .queued
            .iter()
            .map(|(_, at)| *at)
            .chain(self.held.iter().map(|(_, _, at)| *at))
            .chain(self.sent.values().map(|(_, at)| *at))
            .min()?;
        Some(now.saturating_duration_since(oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Tag {
        Tag::Event {
            seq: Seq(seq),
            kind: EventKind::FireAlarm,
        }
    }

    #[test]
    fn pubacks_return_the_seqs_in_the_order_publishes_were_queued() {
        let now = Instant::now();
        let mut w = AckWindow::new(4);
        w.queued(ev(1), now);
        w.queued(ev(2), now);
        w.on_publish_sent(7).unwrap();
        w.on_publish_sent(8).unwrap();
        assert_eq!(w.on_puback(8), Some(ev(2)));
        assert_eq!(w.on_puback(7), Some(ev(1)));
        assert_eq!(w.events_in_flight(), 0);
    }

    #[test]
    fn status_and_command_results_do_not_use_event_slots() {
        let now = Instant::now();
        let mut w = AckWindow::new(2);
        w.queued(Tag::Other, now);
        w.queued(ev(5), now);
        assert_eq!(w.free_slots(), 1);
        assert!(w.contains(Seq(5)));
        w.on_publish_sent(1).unwrap();
        w.on_publish_sent(2).unwrap();
        assert_eq!(w.on_puback(1), Some(Tag::Other));
        assert_eq!(w.on_puback(2), Some(ev(5)));
        assert!(!w.contains(Seq(5)));
        assert_eq!(w.free_slots(), 2);
    }

    #[test]
    fn an_unknown_puback_is_ignored() {
        let mut w = AckWindow::new(2);
        assert_eq!(w.on_puback(3), None);
    }

    #[test]
    fn a_publish_nothing_was_queued_for_is_a_desync() {
        let mut w = AckWindow::new(2);
        assert_eq!(w.on_publish_sent(1), Err(Desync::NothingQueued(1)));
    }

    #[test]
    fn a_pkid_reused_before_its_puback_is_a_desync() {
        let now = Instant::now();
        let mut w = AckWindow::new(4);
        w.queued(ev(1), now);
        w.queued(ev(2), now);
        w.on_publish_sent(3).unwrap();
        assert_eq!(w.on_publish_sent(3), Err(Desync::PkidInUse(3)));
    }

    #[test]
    fn a_collided_publish_is_matched_when_rumqttc_sends_it_after_the_ack() {
        let now = Instant::now();
        let mut w = AckWindow::new(4);
        w.queued(ev(1), now);
        w.queued(ev(2), now);
        w.queued(ev(3), now);
        w.on_publish_sent(1).unwrap();
        // Seq 2 gets pkid 1 again while pkid 1 is unacked: rumqttc holds it.
        w.on_collision(1).unwrap();
        // PUBACK 1 confirms seq 1, then rumqttc sends the held publish under pkid 1.
        assert_eq!(w.on_puback(1), Some(ev(1)));
        w.on_publish_sent(1).unwrap();
        w.on_publish_sent(2).unwrap();
        assert_eq!(w.on_puback(1), Some(ev(2)));
        assert_eq!(w.on_puback(2), Some(ev(3)));
    }

    #[test]
    fn the_oldest_wait_covers_queued_and_sent_publishes() {
        let t0 = Instant::now();
        let mut w = AckWindow::new(4);
        assert_eq!(w.oldest_wait(t0), None);
        w.queued(ev(1), t0);
        w.on_publish_sent(1).unwrap();
        w.queued(ev(2), t0 + Duration::from_secs(5));
        assert_eq!(
            w.oldest_wait(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(10))
        );
        w.on_puback(1);
        assert_eq!(
            w.oldest_wait(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(5))
        );
    }
}
