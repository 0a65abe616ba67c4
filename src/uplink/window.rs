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
//! seq, the seqs of a batch, or [`Tag::Other`] for status and command results); the next `Outgoing::Publish` takes
//! the oldest queued tag and files it under its pkid; the PUBACK returns it.
//!
//! Invariants:
//! - at most `capacity` events are in the window (queued, held or sent); other publishes do not
//!   count against it;
//! - a seq is in the window at most once ([`AckWindow::contains`] lets the refill skip it);
//! - any mismatch ([`Desync`]) means our picture of the client is wrong: the caller drops the
//!   connection and resends from the store, which is always safe (duplicates are fine upstream).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::{EventKind, Lane, Seq};

/// What a publish carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tag {
    /// A store event: remove `seq` from the store on its PUBACK.
    Event { seq: Seq, kind: EventKind },
    /// A CloudEvents batch of store events, in publish order: remove them all on its PUBACK.
    /// Each takes a slot of the window.
    Batch(Arc<[(Seq, EventKind)]>),
    /// Status or a command result: nothing to do on its PUBACK.
    Other,
}

impl Tag {
    /// The store events the publish carried (none for [`Tag::Other`]).
    pub(crate) fn events(&self) -> impl Iterator<Item = (Seq, EventKind)> + '_ {
        let (one, many) = match self {
            Tag::Event { seq, kind } => (Some((*seq, *kind)), &[][..]),
            Tag::Batch(events) => (None, &events[..]),
            Tag::Other => (None, &[][..]),
        };
        one.into_iter().chain(many.iter().copied())
    }
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
    /// Seqs of all events in the window, with their lanes.
    seqs: HashMap<Seq, Lane>,
    /// Events in the window per lane (index: `Lane as usize`).
    per_lane: [usize; 3],
}

impl AckWindow {
    /// An empty window holding at most `capacity` events.
    pub(crate) fn new(capacity: usize) -> Self {
        AckWindow {
            capacity,
            queued: VecDeque::new(),
            held: None,
            sent: HashMap::new(),
            seqs: HashMap::new(),
            per_lane: [0; 3],
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
        self.seqs.contains_key(&seq)
    }

    /// Events in the window whose lane drains before `lane` (lane 0 before 1 before 2).
    pub(crate) fn events_in_lanes_before(&self, lane: Lane) -> usize {
        self.per_lane[..lane as usize].iter().sum()
    }

    /// A publish was handed to the client (`try_publish` returned `Ok`) at `now`.
    pub(crate) fn queued(&mut self, tag: Tag, now: Instant) {
        for (seq, kind) in tag.events() {
            let lane = kind.lane();
            if self.seqs.insert(seq, lane).is_none() {
                self.per_lane[lane as usize] += 1;
            }
        }
        self.queued.push_back((tag, now));
    }

    /// Forgets event `seq` (its PUBACK came, or none will).
    fn forget(&mut self, seq: Seq) {
        if let Some(lane) = self.seqs.remove(&seq) {
            self.per_lane[lane as usize] -= 1;
        }
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
            for (seq, _) in tag.events() {
                self.forget(seq);
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
        for (seq, _) in tag.events() {
            self.forget(seq);
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
    use std::collections::HashSet;

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
    fn a_batch_takes_a_slot_per_event_and_its_puback_returns_them_all() {
        let now = Instant::now();
        let mut w = AckWindow::new(4);
        let batch = Tag::Batch(
            [
                (Seq(3), EventKind::AccessGranted),
                (Seq(5), EventKind::DoorForced),
                (Seq(6), EventKind::AccessDenied),
            ]
            .into(),
        );
        w.queued(batch.clone(), now);
        assert_eq!(w.free_slots(), 1);
        assert_eq!(w.events_in_lanes_before(Lane::Routine), 3);
        assert!(w.contains(Seq(5)));
        w.on_publish_sent(1).unwrap();
        let acked = w.on_puback(1).unwrap();
        assert_eq!(acked, batch);
        assert_eq!(
            acked.events().map(|(seq, _)| seq.0).collect::<Vec<_>>(),
            [3, 5, 6]
        );
        assert_eq!(w.events_in_flight(), 0);
        assert!(!w.contains(Seq(5)));
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

    #[test]
    fn lanes_before_count_only_events_of_earlier_lanes_in_the_window() {
        let now = Instant::now();
        let mut w = AckWindow::new(8);
        let access = |seq| Tag::Event {
            seq: Seq(seq),
            kind: EventKind::AccessGranted,
        };
        w.queued(ev(1), now);
        w.queued(access(2), now);
        w.queued(access(3), now);
        assert_eq!(w.events_in_lanes_before(Lane::Urgent), 0);
        assert_eq!(w.events_in_lanes_before(Lane::Access), 1);
        assert_eq!(w.events_in_lanes_before(Lane::Routine), 3);
        w.on_publish_sent(1).unwrap();
        assert_eq!(w.on_puback(1), Some(ev(1)));
        assert_eq!(w.events_in_lanes_before(Lane::Access), 0);
        assert_eq!(w.events_in_lanes_before(Lane::Routine), 2);
    }

    /// rumqttc 0.25.1's outgoing QoS 1 path (`state.rs`), reduced to what the window sees:
    /// packet ids cycle 1..=`max_inflight`; a request is taken only while fewer than
    /// `max_inflight` are unacked and no publish is held; a pkid still unacked is a collision
    /// (`AwaitAck`, the publish is held and sent right after that pkid's PUBACK).
    struct ModelClient {
        max_inflight: u16,
        last_pkid: u16,
        requests: VecDeque<Tag>,
        outgoing: HashMap<u16, Tag>,
        collision: Option<(u16, Tag)>,
    }

    enum Seen {
        Publish(u16),
        AwaitAck(u16),
        PubAck(u16, Tag),
    }

    impl ModelClient {
        fn next_pkid(&mut self) -> u16 {
            let next = self.last_pkid + 1;
            self.last_pkid = if next == self.max_inflight { 0 } else { next };
            next
        }

        /// The event loop takes the next request, if flow control lets it.
        fn send_next(&mut self) -> Option<Seen> {
            if self.outgoing.len() >= usize::from(self.max_inflight) || self.collision.is_some() {
                return None;
            }
            let tag = self.requests.pop_front()?;
            let pkid = self.next_pkid();
            if self.outgoing.contains_key(&pkid) {
                self.collision = Some((pkid, tag));
                return Some(Seen::AwaitAck(pkid));
            }
            self.outgoing.insert(pkid, tag);
            Some(Seen::Publish(pkid))
        }

        /// The broker acknowledges the `pick`-th unacked pkid (any order).
        fn ack(&mut self, pick: usize) -> Vec<Seen> {
            let mut pkids: Vec<u16> = self.outgoing.keys().copied().collect();
            if pkids.is_empty() {
                return Vec::new();
            }
            pkids.sort_unstable();
            let pkid = pkids[pick % pkids.len()];
            let tag = self.outgoing.remove(&pkid).unwrap();
            let mut seen = vec![Seen::PubAck(pkid, tag)];
            if self.collision.as_ref().is_some_and(|(p, _)| *p == pkid) {
                let (p, held) = self.collision.take().unwrap();
                self.outgoing.insert(p, held);
                seen.push(Seen::Publish(p));
            }
            seen
        }
    }

    proptest::proptest! {
        /// Whatever order the broker acknowledges in, every PUBACK the window resolves names
        /// the very publish that carried that packet id (checked against the model's own
        /// record), and no event is lost from the window or resolved twice.
        #[test]
        fn every_puback_resolves_to_the_publish_that_carried_its_packet_id(
            max_inflight in 2u16..12,
            ops in proptest::collection::vec((0u8..3, 0usize..64), 1..400),
        ) {
            let now = Instant::now();
            let mut w = AckWindow::new(usize::from(max_inflight));
            let mut client = ModelClient {
                max_inflight,
                last_pkid: 0,
                requests: VecDeque::new(),
                outgoing: HashMap::new(),
                collision: None,
            };
            let mut next_seq = 1u64;
            let mut acked = HashSet::new();
            for (op, pick) in ops {
                let seen = match op {
                    // The uplink hands a publish to the client: an event or a batch of up to 4
                    // if slots are free, otherwise a status publish.
                    0 => {
                        let n = (1 + pick % 4).min(w.free_slots()) as u64;
                        let tag = match n {
                            0 => Tag::Other,
                            1 => ev(next_seq),
                            _ => Tag::Batch(
                                (next_seq..next_seq + n)
                                    .map(|seq| (Seq(seq), EventKind::AccessGranted))
                                    .collect(),
                            ),
                        };
                        next_seq += n;
                        w.queued(tag.clone(), now);
                        client.requests.push_back(tag);
                        Vec::new()
                    }
                    1 => client.send_next().into_iter().collect(),
                    _ => client.ack(pick),
                };
                for s in seen {
                    match s {
                        Seen::Publish(pkid) => w.on_publish_sent(pkid).unwrap(),
                        Seen::AwaitAck(pkid) => w.on_collision(pkid).unwrap(),
                        Seen::PubAck(pkid, carried) => {
                            proptest::prop_assert_eq!(w.on_puback(pkid), Some(carried.clone()));
                            for (seq, _) in carried.events() {
                                proptest::prop_assert!(acked.insert(seq), "seq {:?} acked twice", seq);
                            }
                        }
                    }
                }
            }
            let events = |t: &Tag| t.events().count();
            let in_model_events = client.requests.iter().map(events).sum::<usize>()
                + client.outgoing.values().map(events).sum::<usize>()
                + client.collision.iter().map(|(_, t)| events(t)).sum::<usize>();
            proptest::prop_assert_eq!(w.events_in_flight(), in_model_events);
            proptest::prop_assert_eq!(w.events_in_flight() + acked.len(), usize::try_from(next_seq - 1).unwrap());
        }
    }
}
