//! The outbox: every event the gateway produced and upstream has not acknowledged yet, in sled.
//!
//! The store owns the sled database (`<state_dir>/...`) and nothing else touches it. The uplink
//! reads [`Store::pending`] and calls [`Store::remove`] after a PUBACK; the daemon calls
//! [`Store::append`] for every event and [`Store::flush`] at shutdown.
//!
//! Invariants:
//! - **Gap-free seq.** Seqs start at 1 and grow by exactly 1 per appended event, across restarts:
//!   the next seq lives in the `meta` tree and is written in the same sled transaction as the
//!   event (sled's `generate_id` is unique but jumps after a restart).
//! - **Order.** Outbox keys are `[lane byte] ++ seq as big-endian u64`, so a scan yields lane 0
//!   (fire and fault) first, then lane 1 (access), then lane 2 (routine), each in seq (FIFO) order.
//! - **Durable point.** [`Store::append`] of a [`Lane::Urgent`] event returns only after sled's
//!   `flush()` *and* an `fdatasync` of sled's data file: sled's flush uses `sync_file_range`,
//!   which does not survive a power cut (sled issue 1452, CRATES.md). Events of the other lanes
//!   count as stored when `append` returns but reach the disk with sled's background flush
//!   (`flush_every_ms` = 500 ms) or the next urgent append, whichever comes first: a power cut
//!   may lose the last ~500 ms of access and routine events (SD-card wear is the reason: a flush
//!   per 200-byte event writes ~24× its size).
//! - **Removal only by seq, idempotent.** [`Store::remove`] of an unknown seq is not an error
//!   (duplicate PUBACKs after a reconnect are normal).
//! - **A bad record never stops the outbox.** A value that cannot be decoded is moved to the
//!   `quarantine` tree under its outbox key, logged at ERROR, and skipped by [`Store::pending`].
//! - **A database that cannot be opened never stops alarming.** If sled reports corruption (or
//!   panics) while opening, the directory is renamed to `<dir>.corrupt-<unix seconds>` and a
//!   fresh store is created; [`Store::recovery`] says so, so the daemon can report it. The fresh
//!   store's seqs start at the current Unix time in milliseconds rather than 1, so they stay above
//!   every seq upstream may already have seen (the id `<gw>-<seq>` is upstream's de-duplication
//!   key; reusing a seq would make upstream drop new events as duplicates). I/O errors such as
//!   "locked by another process" or "permission denied" are returned, never moved aside.
//! - `Store` is a cheap `Clone` (an `Arc` inside); all methods take `&self` and may be called
//!   from several tasks at once. They block on disk I/O (an `fdatasync` for urgent appends, a few
//!   ms on an SD card): call them where blocking that long is acceptable.
//!
//! - **State records** ([`Store::save_state`]): small records beside the outbox (the engine's
//!   latched alarms), durable when `save_state` returns.
//!
//! Not done here (yet): the byte budget and eviction of low lanes (`[store] max_bytes`), card
//! lists, quarantining a database that fails *after* opening. The layout leaves
//! room for them: more trees, the lane byte in every key.

use std::fs::{File, OpenOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::event::{Event, Lane, Seq};

/// sled's page cache. Its default (1 GiB) is far beyond a Pi's budget; 16 MiB holds the hot end
/// of a large backlog.
const CACHE_CAPACITY_BYTES: u64 = 16 * 1024 * 1024;
/// sled's background flush period (its default), the loss window of non-urgent events.
const FLUSH_EVERY_MS: u64 = 500;
/// Key of the next seq to assign in the `meta` tree (big-endian u64).
const NEXT_SEQ_KEY: &[u8] = b"next_seq";
/// Prefix of state records in the `meta` tree (beside `next_seq`).
const STATE_PREFIX: &str = "state/";
/// Every lane, in drain order.
const LANES: [Lane; 3] = [Lane::Urgent, Lane::Access, Lane::Routine];

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed (I/O, corruption detected while running, ...).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// The database could not be opened and could not be moved aside either.
    #[error("cannot move the damaged store {from} aside to {to}: {source}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `fdatasync` that makes an urgent event durable failed.
    #[error("fdatasync of {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An event could not be serialized (not expected: events are plain data).
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The stored next seq is not 8 bytes: the metadata is damaged.
    #[error("the store's next-seq record is damaged ({len} bytes)")]
    DamagedMeta { len: usize },
}

/// What [`Store::open`] did when the existing database could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the unreadable directory now is (`<dir>.corrupt-<unix seconds>`).
    pub moved_to: PathBuf,
    /// Why it could not be opened (sled's error or panic message).
    pub reason: String,
    /// The first seq the fresh store assigns (the Unix time in ms at recovery).
    pub first_seq: Seq,
}

/// Outbox figures for the status message and the `outbox` subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Events waiting for a PUBACK.
    pub depth: u64,
    /// Bytes of their encoded records (values only, not sled's overhead).
    pub bytes: u64,
    /// The `time` of the oldest waiting event (the earliest head of the three lanes).
    pub oldest: Option<SystemTime>,
    /// The last seq assigned, `None` before the first append.
    pub last_seq: Option<Seq>,
}

/// The sled outbox. See the module doc for its invariants.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    outbox: sled::Tree,
    meta: sled::Tree,
    quarantine: sled::Tree,
    /// sled's data file, kept open for the `fdatasync` of urgent appends.
    data_file: File,
    data_path: PathBuf,
    /// Records in `outbox`, kept in memory because `Tree::len` walks the whole tree.
    depth: AtomicU64,
    /// Sum of the value sizes in `outbox`.
    bytes: AtomicU64,
    recovery: Option<Recovery>,
}

/// Why an open attempt failed: worth moving the directory aside, or not.
enum OpenFailure {
    Damaged(String),
    Other(Error),
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// On a damaged database the directory is moved aside and a fresh one created (see the
    /// module doc and [`Store::recovery`]).
    ///
    /// # Errors
    /// I/O errors (permissions, another process holding the lock, a full disk), or the rename
    /// of a damaged directory failing.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        match open_attempt(dir, None) {
            Ok(store) => Ok(store),
            Err(OpenFailure::Other(e)) => Err(e),
            Err(OpenFailure::Damaged(reason)) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let mut name = dir.as_os_str().to_owned();
                name.push(format!(".corrupt-{}", now.as_secs()));
                let moved_to = PathBuf::from(name);
                std::fs::rename(dir, &moved_to).map_err(|source| Error::MoveAside {
                    from: dir.to_owned(),
                    to: moved_to.clone(),
                    source,
                })?;
                let first_seq = Seq(u64::try_from(now.as_millis())
                    .unwrap_or(u64::MAX / 2)
                    .max(1));
                tracing::error!(
                    dir = %dir.display(),
                    moved_to = %moved_to.display(),
                    reason = %reason,
                    first_seq = first_seq.0,
                    "The outbox could not be opened; it was moved aside and a fresh one started."
                );
                let recovery = Recovery {
                    moved_to,
                    reason,
                    first_seq,
                };
                open_attempt(dir, Some(recovery)).map_err(|f| match f {
                    OpenFailure::Other(e) => e,
                    OpenFailure::Damaged(reason) => Error::Sled(sled::Error::ReportableBug(reason)),
                })
            }
        }
    }

    /// Set when [`Store::open`] found the database unreadable and started a fresh one.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.inner.recovery.as_ref()
    }

    /// Stores `event` under the next seq and returns that seq.
    ///
    /// For [`Lane::Urgent`] events this returns only once the event is on disk (flush plus
    /// `fdatasync`); for the other lanes, once it is in sled (on disk within 500 ms).
    ///
    /// # Errors
    /// sled or the sync failed; the event may then not be stored and its seq is not used.
    pub fn append(&self, event: &Event) -> Result<Seq, Error> {
        let inner = &*self.inner;
        let value = serde_json::to_vec(event)?;
        let lane = event.kind.lane();
        // One transaction for the event and the counter: either both or neither (gap-free seq).
        let seq = (&inner.outbox, &inner.meta)
            .transaction(|(outbox, meta)| {
                let next = match meta.get(NEXT_SEQ_KEY)? {
                    Some(raw) => decode_u64(&raw).ok_or_else(|| {
                        ConflictableTransactionError::Abort(Error::DamagedMeta { len: raw.len() })
                    })?,
                    None => 1,
                };
                outbox.insert(&key(lane, Seq(next))[..], value.as_slice())?;
                meta.insert(NEXT_SEQ_KEY, &(next + 1).to_be_bytes()[..])?;
                Ok(Seq(next))
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => Error::Sled(e),
            })?;
        inner.depth.fetch_add(1, Ordering::Relaxed);
        inner.bytes.fetch_add(value.len() as u64, Ordering::Relaxed);
        if lane == Lane::Urgent {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Up to `limit` waiting events: lane 0 first, then 1, then 2; seq order within a lane.
    ///
    /// Records that cannot be decoded are moved to the quarantine tree (logged at ERROR) and
    /// not counted against `limit`.
    ///
    /// # Errors
    /// sled failed while reading or quarantining.
    pub fn pending(&self, limit: usize) -> Result<Vec<(Seq, Event)>, Error> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for lane in LANES {
            for item in self.inner.outbox.scan_prefix([lane as u8]) {
                if out.len() >= limit {
                    return Ok(out);
                }
                let (k, v) = item?;
                match (decode_key(&k), serde_json::from_slice::<Event>(&v)) {
                    (Some(seq), Ok(event)) => out.push((seq, event)),
                    (_, Err(e)) => self.quarantine(&k, &v, &e.to_string())?,
                    (None, Ok(_)) => self.quarantine(&k, &v, "bad key length")?,
                }
            }
        }
        Ok(out)
    }

    /// Removes the event `seq` (after its PUBACK). Removing an unknown seq is a no-op.
    ///
    /// # Errors
    /// sled failed.
    pub fn remove(&self, seq: Seq) -> Result<(), Error> {
        // The key starts with the lane, which the caller does not know: try the three.
        for lane in LANES {
            if let Some(old) = self.inner.outbox.remove(&key(lane, seq)[..])? {
                self.inner.depth.fetch_sub(1, Ordering::Relaxed);
                self.inner
                    .bytes
                    .fetch_sub(old.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Depth, bytes, oldest waiting event time and last assigned seq.
    ///
    /// # Errors
    /// sled failed.
    pub fn stats(&self) -> Result<OutboxStats, Error> {
        let inner = &*self.inner;
        let mut oldest: Option<SystemTime> = None;
        for lane in LANES {
            // Seq order is time order within a lane, up to clock steps: the head is enough.
            if let Some(item) = inner.outbox.scan_prefix([lane as u8]).next() {
                let (_, v) = item?;
                if let Ok(event) = serde_json::from_slice::<Event>(&v) {
                    oldest = Some(oldest.map_or(event.time, |o| o.min(event.time)));
                }
            }
        }
        let next = match inner.meta.get(NEXT_SEQ_KEY)? {
            Some(raw) => decode_u64(&raw).ok_or(Error::DamagedMeta { len: raw.len() })?,
            None => 1,
        };
        Ok(OutboxStats {
            depth: inner.depth.load(Ordering::Relaxed),
            bytes: inner.bytes.load(Ordering::Relaxed),
            oldest,
            last_seq: (next > 1).then(|| Seq(next - 1)),
        })
    }

    /// Saves the small state record `key` (the engine's latched alarms) and makes it durable
    /// (flush plus `fdatasync`) before returning, like an urgent event.
    ///
    /// # Errors
    /// sled or the `fdatasync` failed.
    pub fn save_state(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.inner.meta.insert(state_key(key), value)?;
        self.flush()
    }

    /// The state record `key`, if one was saved.
    ///
    /// # Errors
    /// sled failed.
    pub fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.inner.meta.get(state_key(key))?.map(|v| v.to_vec()))
    }

    /// Writes everything to disk: sled's flush plus an `fdatasync` of its data file.
    ///
    /// # Errors
    /// sled or the sync failed.
    pub fn flush(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        inner.db.flush()?;
        // sled's flush ends in sync_file_range, which is no barrier against power loss
        // (sled issue 1452): make it durable ourselves.
        inner.data_file.sync_data().map_err(|source| Error::Sync {
            path: inner.data_path.clone(),
            source,
        })
    }

    /// Moves a record that cannot be decoded out of the outbox.
    fn quarantine(&self, k: &[u8], v: &[u8], why: &str) -> Result<(), Error> {
        tracing::error!(
            key = ?k,
            bytes = v.len(),
            error = why,
            "An outbox record could not be decoded; it was moved to quarantine and will not be sent."
        );
        // Insert first: a crash between the two leaves a copy in both, never in neither.
        self.inner.quarantine.insert(k, v)?;
        if let Some(old) = self.inner.outbox.remove(k)? {
            self.inner.depth.fetch_sub(1, Ordering::Relaxed);
            self.inner
                .bytes
                .fetch_sub(old.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// One try at opening `dir`; `recovery` is set on the second try after a move-aside.
fn open_attempt(dir: &Path, recovery: Option<Recovery>) -> Result<Store, OpenFailure> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY_BYTES)
        .flush_every_ms(Some(FLUSH_EVERY_MS));
    // sled has been seen to panic (not only to return Corruption) on damaged files; a panic
    // here would crash-loop the daemon and stop alarming.
    let opened = catch_unwind(AssertUnwindSafe(|| -> sled::Result<_> {
        let db = config.open()?;
        let outbox = db.open_tree("outbox")?;
        let meta = db.open_tree("meta")?;
        let quarantine = db.open_tree("quarantine")?;
        let mut depth = 0u64;
        let mut bytes = 0u64;
        for item in outbox.iter() {
            let (_, v) = item?;
            depth += 1;
            bytes += v.len() as u64;
        }
        Ok((db, outbox, meta, quarantine, depth, bytes))
    }));
    let (db, outbox, meta, quarantine, depth, bytes) = match opened {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) if is_damage(&e) => return Err(OpenFailure::Damaged(e.to_string())),
        Ok(Err(e)) => return Err(OpenFailure::Other(Error::Sled(e))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "sled panicked".to_owned());
            return Err(OpenFailure::Damaged(format!(
                "sled panicked while opening: {msg}"
            )));
        }
    };
    if let Some(r) = &recovery {
        if meta
            .get(NEXT_SEQ_KEY)
            .map_err(|e| OpenFailure::Other(e.into()))?
            .is_none()
        {
            meta.insert(NEXT_SEQ_KEY, &r.first_seq.0.to_be_bytes()[..])
                .map_err(|e| OpenFailure::Other(e.into()))?;
        }
    }
    // sled 0.34 keeps everything in `<dir>/db`.
    let data_path = dir.join("db");
    let data_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_path)
        .map_err(|e| OpenFailure::Other(Error::Sled(sled::Error::Io(e))))?;
    Ok(Store {
        inner: Arc::new(Inner {
            db,
            outbox,
            meta,
            quarantine,
            data_file,
            data_path,
            depth: AtomicU64::new(depth),
            bytes: AtomicU64::new(bytes),
            recovery,
        }),
    })
}

/// Whether an open error means damaged files (move aside) rather than an environment problem
/// (lock held, permissions, disk full: return it, the data may be fine).
fn is_damage(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::Unsupported(_)
        | sled::Error::CollectionNotFound(_) => true,
    }
}

/// The outbox key: lane byte, then the seq big-endian (so iteration is lane, then FIFO).
fn key(lane: Lane, seq: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = lane as u8;
    k[1..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

fn decode_key(k: &[u8]) -> Option<Seq> {
    k.get(1..).and_then(decode_u64).map(Seq)
}

fn decode_u64(raw: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(raw).ok().map(u64::from_be_bytes)
}

fn state_key(key: &str) -> Vec<u8> {
    format!("{STATE_PREFIX}{key}").into_bytes()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::event::{EventData, EventKind};

    fn event(kind: EventKind, ms: u64) -> Event {
        Event::new(
            kind,
            UNIX_EPOCH + Duration::from_millis(ms),
            EventData::default(),
        )
    }

    /// Opens `path` again after a drop. sled releases its file lock from a background I/O
    /// thread shortly after the last handle is dropped, and offers nothing to wait on: retry
    /// the open (bounded) while the lock is still held.
    fn reopen(path: &Path) -> Store {
        for _ in 0..400 {
            match Store::open(path) {
                Ok(s) => return s,
                Err(Error::Sled(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("reopen failed: {e}"),
            }
        }
        panic!("sled kept its lock for 2 s after the store was dropped");
    }

    #[test]
    fn seq_starts_at_one_and_stays_gap_free_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.stats().unwrap().last_seq, None);
            assert_eq!(
                store.append(&event(EventKind::FireAlarm, 1)).unwrap(),
                Seq(1)
            );
            assert_eq!(
                store.append(&event(EventKind::AccessGranted, 2)).unwrap(),
                Seq(2)
            );
            store.remove(Seq(2)).unwrap();
            store.flush().unwrap();
        }
        let store = reopen(&path);
        assert!(store.recovery().is_none());
        assert_eq!(
            store.append(&event(EventKind::GatewayStarted, 3)).unwrap(),
            Seq(3)
        );
        let stats = store.stats().unwrap();
        assert_eq!(stats.last_seq, Some(Seq(3)));
        assert_eq!(stats.depth, 2);
    }

    #[test]
    fn pending_yields_lane_zero_first_then_seq_order_within_a_lane() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kinds = [
            EventKind::GatewayStarted,
            EventKind::AccessGranted,
            EventKind::FireAlarm,
            EventKind::DoorForced,
            EventKind::DeviceOffline,
        ];
        for (i, k) in kinds.iter().enumerate() {
            store.append(&event(*k, i as u64)).unwrap();
        }
        let seqs: Vec<u64> = store
            .pending(10)
            .unwrap()
            .iter()
            .map(|(s, _)| s.0)
            .collect();
        assert_eq!(seqs, vec![3, 5, 2, 4, 1]);
        let limited: Vec<u64> = store.pending(2).unwrap().iter().map(|(s, _)| s.0).collect();
        assert_eq!(limited, vec![3, 5]);
    }

    #[test]
    fn remove_takes_the_event_out_and_tolerates_unknown_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.append(&event(EventKind::DoorHeld, 10)).unwrap();
        let b = store.append(&event(EventKind::DoorHeld, 20)).unwrap();
        store.remove(a).unwrap();
        store.remove(a).unwrap();
        store.remove(Seq(999)).unwrap();
        let pending = store.pending(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0, b);
        let stats = store.stats().unwrap();
        assert_eq!(stats.depth, 1);
        assert_eq!(stats.oldest, Some(UNIX_EPOCH + Duration::from_millis(20)));
    }

    #[test]
    fn a_record_that_cannot_be_decoded_is_quarantined_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append(&event(EventKind::FireAlarm, 1)).unwrap();
        let bad = store.append(&event(EventKind::FireAlarm, 2)).unwrap();
        store.append(&event(EventKind::FireAlarm, 3)).unwrap();
        store
            .inner
            .outbox
            .insert(&key(Lane::Urgent, bad)[..], &b"{not json"[..])
            .unwrap();

        let seqs: Vec<u64> = store
            .pending(10)
            .unwrap()
            .iter()
            .map(|(s, _)| s.0)
            .collect();
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(store.inner.quarantine.len(), 1);
        assert!(store
            .inner
            .quarantine
            .get(&key(Lane::Urgent, bad)[..])
            .unwrap()
            .is_some());
        assert_eq!(store.stats().unwrap().depth, 2);
    }

    #[test]
    fn an_unreadable_store_is_moved_aside_and_a_fresh_one_starts_above_old_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        std::fs::create_dir(&path).unwrap();
        // A `conf` sled cannot parse makes the open fail as damaged.
        std::fs::write(path.join("conf"), b"\x00garbage that is no sled config\xff").unwrap();
        std::fs::write(path.join("db"), vec![0xA5u8; 4096]).unwrap();

        let store = Store::open(&path).unwrap();
        let recovery = store.recovery().cloned().expect("moved aside");
        assert!(recovery.moved_to.exists());
        assert!(recovery
            .moved_to
            .to_string_lossy()
            .contains("store.corrupt-"));
        let seq = store.append(&event(EventKind::GatewayStarted, 1)).unwrap();
        assert_eq!(seq, recovery.first_seq);
        assert!(seq.0 > 1_600_000_000_000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        /// Remove the n-th pending event (modulo the depth), or an unknown seq when empty.
        Remove(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3).prop_map(Op::Append),
            3 => any::<usize>().prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn store_behaves_like_an_ordered_map_through_appends_removes_and_reopens(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let mut store = Some(Store::open(&path).unwrap());
            let mut model: BTreeMap<(u8, u64), Event> = BTreeMap::new();
            let mut next = 1u64;
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Append(lane) => {
                        let kind = [EventKind::DeviceFault, EventKind::AccessDenied, EventKind::GatewayStarted][lane as usize];
                        let e = event(kind, i as u64);
                        let seq = store.as_ref().unwrap().append(&e).unwrap();
                        prop_assert_eq!(seq, Seq(next));
                        model.insert((lane, next), e);
                        next += 1;
                    }
                    Op::Remove(n) => {
                        let target = if model.is_empty() {
                            None
                        } else {
                            model.keys().nth(n % model.len()).copied()
                        };
                        match target {
                            Some(k) => {
                                store.as_ref().unwrap().remove(Seq(k.1)).unwrap();
                                model.remove(&k);
                            }
                            None => store.as_ref().unwrap().remove(Seq(next + 7)).unwrap(),
                        }
                    }
                    Op::Reopen => {
                        drop(store.take());
                        store = Some(reopen(&path));
                    }
                }
                let s = store.as_ref().unwrap();
                let got: Vec<(Seq, Event)> = s.pending(usize::MAX).unwrap();
                let want: Vec<(Seq, Event)> = model.iter().map(|((_, q), e)| (Seq(*q), e.clone())).collect();
                prop_assert_eq!(got, want);
                let stats = s.stats().unwrap();
                prop_assert_eq!(stats.depth, model.len() as u64);
                prop_assert_eq!(stats.last_seq, (next > 1).then(|| Seq(next - 1)));
            }
        }
    }
}
