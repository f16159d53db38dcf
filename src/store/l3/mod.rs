//! L3: Redis or Redis Cluster, shared by a fleet of sidecars.
//!
//! Values are records (`store::record`: header with the full key, codec, checksums), so every
//! tier verifies integrity the same way; a value that fails its checks or carries another key
//! is a miss (counted, logged), never served. Keys: `keys`. Connections, deadlines and
//! reconnection: `link`. Window manifests: `catalog` (the fleet's `WindowCatalog`).
//!
//! The whole tier contract, remote: Redis keeps no index in this process, so `may_contain`
//! answers "unknown" and lookups leave L3 to their prefetch jobs, which `probe` a whole
//! prefix at once (EXISTS, one pipeline per node: `batch`) and `fetch` the leading present
//! chunks (GETs spread over the connections), each value verified and decoded into the L1
//! object the facade reserved. Write-behind `put`s batches of records as concurrent SETs with
//! a TTL, only where absent (cache data); frozen windows are kept without one (`catalog`).
//! While the link is down, puts are given up at once (counted), never waited for.

pub mod batch;
pub mod catalog;
pub mod config;
pub mod keys;
pub mod ledger;
pub mod link;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use connector_protocol::ObjectKey;
use rayon::prelude::*;
use thiserror::Error;

use self::config::{L3Config, L3ConfigError, WritePolicy};
use self::keys::KeyLayout;
use self::ledger::{Ledger, Written};
use self::link::{Link, LinkError};
use super::codec::Codec;
use super::quota::{OverQuota, QuotaTier};
use super::record::Record;
use super::tier::{Fetched, Figure, Presence, Reserve, Tier, TierError, TierStats, WindowCatalog};
use super::Reservation;
use crate::log_every::LogEvery;

/// Salts whose usage a report reads again from their ledgers (forgetting what expired).
const REPORT_REFRESHED: usize = 64;

#[derive(Debug, Default)]
pub struct L3Counters {
    /// Keys asked about by lookups, and those found.
    pub exists_checked: AtomicU64,
    pub exists_found: AtomicU64,
    pub read_records: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Values that failed verification or carried another key: served as misses.
    pub corrupt_records: AtomicU64,
    pub written_records: AtomicU64,
    pub written_bytes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Operations that failed for the link (down, timeout).
    pub link_errors: AtomicU64,
    /// Records given up without trying (the link down).
    pub dropped: AtomicU64,
    /// Cache records refused: their salt's windows left no room in its L3 quota.
    pub quota_refused: AtomicU64,
    /// Cache records of a salt evicted (deleted, or not written) to keep it within its quota.
    pub quota_evicted: AtomicU64,
}

pub struct L3 {
    link: Arc<Link>,
    keys: KeyLayout,
    config: L3Config,
    pub counters: Arc<L3Counters>,
    drops_logged: LogEvery,
    /// Values that fail verification (or do not open with this server's key) are logged
    /// at most this often: in a shared Redis one misconfigured writer can make every read one.
    corrupt_logged: LogEvery,
    /// Each salt's usage, in Redis, shared by the fleet (its L3 quotas and reports).
    ledger: Ledger,
}

impl L3 {
    /// Connects lazily: a Redis absent at start is a link that is down, not an error.
    pub fn open(config: L3Config) -> Result<Arc<L3>, L3Error> {
        config.validate()?;
        let link = Arc::new(Link::new(&config).map_err(|e| L3Error::Link(e.into()))?);
        let l3 = Arc::new(L3 {
            link: link.clone(),
            keys: KeyLayout::new(&config.namespace),
            ledger: Ledger::new(link.clone(), KeyLayout::new(&config.namespace), config.ttl),
            config,
            counters: Arc::default(),
            drops_logged: LogEvery::new(),
            corrupt_logged: LogEvery::new(),
        });
        tracing::info!(
            endpoints = ?l3.config.endpoints_redacted(),
            namespace = %l3.config.namespace,
            write = ?l3.config.write,
            "L3 Redis tier configured"
        );
        Ok(l3)
    }

    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Count records given up, logging at most every 10 s.
    fn drop_records(&self, n: u64) {
        self.counters.dropped.fetch_add(n, Relaxed);
        if self.drops_logged.due() {
            tracing::warn!(
                dropped_total = self.counters.dropped.load(Relaxed),
                "L3 is giving records up (Redis unreachable)"
            );
        }
    }

    /// Which of `keys` exist in Redis: one concurrent batch (pipelined per node). Empty while
    /// the link is down.
    pub fn existing(&self, keys: &[ObjectKey]) -> HashSet<ObjectKey> {
        if keys.is_empty() {
            return HashSet::new();
        }
        let found = self
            .link
            .batch(self.per_chunk("EXISTS", keys))
            .and_then(|replies| {
                replies
                    .iter()
                    .map(|v| {
                        redis::from_redis_value_ref::<bool>(v)
                            .map_err(|e| LinkError::from(redis::RedisError::from(e)))
                    })
                    .collect::<Result<Vec<bool>, LinkError>>()
            });
        self.counters
            .exists_checked
            .fetch_add(keys.len() as u64, Relaxed);
        match found {
            Ok(found) => {
                let set: HashSet<ObjectKey> = keys
                    .iter()
                    .zip(found)
                    .filter(|(_, f)| *f)
                    .map(|(k, _)| k.clone())
                    .collect();
                self.counters
                    .exists_found
                    .fetch_add(set.len() as u64, Relaxed);
                set
            }
            Err(e) => {
                self.link_error(&e);
                HashSet::new()
            }
        }
    }

    /// `command` once per key, on the key's chunk record.
    fn per_chunk(&self, command: &str, keys: &[ObjectKey]) -> Vec<redis::Cmd> {
        keys.iter()
            .map(|k| {
                let mut c = redis::cmd(command);
                c.arg(self.keys.chunk(k));
                c
            })
            .collect()
    }

    /// The raw values of `keys` (None where absent), in one concurrent batch.
    fn values(&self, keys: &[ObjectKey]) -> Result<Vec<Option<Vec<u8>>>, LinkError> {
        self.link
            .spread(self.per_chunk("GET", keys))?
            .into_iter()
            .map(|v| {
                redis::from_redis_value::<Option<Vec<u8>>>(v)
                    .map_err(|e| LinkError::from(redis::RedisError::from(e)))
            })
            .collect()
    }

    /// Verify a value fetched for `key` and decode its object into an L1 object from `reserve`.
    fn install(&self, key: &ObjectKey, value: &[u8], reserve: Reserve) -> Fetched {
        let r = match Record::parse(value, 0) {
            Ok(r) if r.header.key == *key => r,
            Ok(r) => return self.corrupt(key, &format!("value carries key {:?}", r.header.key)),
            Err(e) => return self.corrupt(key, &e.to_string()),
        };
        let mut object = match reserve(key, r.header.raw_len) {
            Reservation::Reserved(object) => object,
            Reservation::Present => return Fetched::Resident,
            Reservation::NoSpace => return Fetched::NoSpace,
        };
        if r.header.codec == Codec::Raw && !r.header.sealed {
            // A raw payload (verified by `parse`) goes straight in.
            if r.payload.len() as u64 != r.header.raw_len {
                return self.corrupt(key, "raw payload length differs from the raw length");
            }
            object.copy_from_slice(r.payload);
        } else {
            // Decoded (and opened, if sealed) into private memory first: no reference may
            // cover pool pages.
            let mut raw = vec![0; r.header.raw_len as usize];
            if let Err(e) = self.config.sealer.decode_into(&r, &mut raw) {
                return self.corrupt(key, &e.to_string());
            }
            object.copy_from_slice(&raw);
        }
        object.set_itemsize(r.header.itemsize);
        self.counters.read_records.fetch_add(1, Relaxed);
        self.counters
            .read_bytes
            .fetch_add(r.header.raw_len, Relaxed);
        Fetched::Read(object)
    }

    fn corrupt(&self, key: &ObjectKey, why: &str) -> Fetched {
        let total = self.counters.corrupt_records.fetch_add(1, Relaxed) + 1;
        if self.corrupt_logged.due() {
            tracing::error!(
                ?key,
                corrupt_total = total,
                "L3: ignoring a value that fails verification (logged at most every {:?}): \
                 {why}",
                crate::log_every::PERIOD
            );
        }
        Fetched::Failed(TierError::new("L3", L3Error::Corrupt(why.to_string())))
    }

    /// Write records in one concurrent batch: cache data with the TTL and only where absent
    /// (so a window's record never gets one; the ledger counts them next), window data
    /// (`ttl` false) unconditionally and without a TTL, then counted as kept in the ledger.
    /// Returns how many were written.
    pub fn set(&self, records: Vec<(ObjectKey, Vec<u8>)>, ttl: bool) -> Result<usize, LinkError> {
        if records.is_empty() {
            return Ok(0);
        }
        let ttl_secs = self.ttl_secs();
        let bytes: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
        let sizes: Vec<(ObjectKey, u64)> = records
            .iter()
            .map(|(k, r)| (k.clone(), r.len() as u64))
            .collect();
        let n = records.len();
        let cmds: Vec<redis::Cmd> = records
            .into_iter()
            .map(|(k, v)| {
                let mut c = redis::cmd("SET");
                c.arg(self.keys.chunk(&k)).arg(v);
                if ttl {
                    c.arg("EX").arg(ttl_secs).arg("NX");
                }
                c
            })
            .collect();
        match self.link.spread(cmds) {
            Ok(_) => {
                self.link.note_write_ok();
                if !ttl {
                    // Written: a ledger that missed them undercounts the salt until a release.
                    let _ = self.ledger.keep(sizes).inspect_err(|e| self.link_error(e));
                }
                self.counters.written_records.fetch_add(n as u64, Relaxed);
                self.counters.written_bytes.fetch_add(bytes, Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.write_failed(&e);
                Err(e)
            }
        }
    }

    /// A write (or the ledger update before it) failed: counted; a Redis out of memory is
    /// noted as full, anything else as a link error.
    fn write_failed(&self, e: &LinkError) {
        self.counters.write_errors.fetch_add(1, Relaxed);
        match e {
            LinkError::Redis(r) if link::out_of_memory(r) => self.link.note_full(r),
            _ => self.link_error(e),
        }
    }

    /// Window records named by no window any more (given their TTL back): counted as cache
    /// data again, evictable for their salt's quota.
    pub(crate) fn released(&self, keys: &[ObjectKey]) -> Result<(), LinkError> {
        self.ledger.release(keys)
    }

    /// Count `records` (cache data, just written) in their salts' ledgers, keeping each salt
    /// within its L3 quota fleet-wide: the ledger evicts the salt's least recently used cache
    /// records first (deleted here, counted), or refuses a record (deleted here, counted) when
    /// the salt's windows leave no room for it.
    fn count_written(
        &self,
        records: &[(&ObjectKey, &[u8])],
    ) -> Result<Vec<Result<(), OverQuota>>, LinkError> {
        let mut by_salt: Vec<Written> = Vec::new();
        let mut at: Vec<(usize, usize)> = Vec::with_capacity(records.len());
        for (key, record) in records {
            let i = match by_salt.iter().position(|w| w.salt == key.cache_salt) {
                Some(i) => i,
                None => {
                    by_salt.push(Written {
                        salt: key.cache_salt.clone(),
                        limit: self.config.quotas.limit(QuotaTier::L3, &key.cache_salt),
                        records: Vec::new(),
                    });
                    by_salt.len() - 1
                }
            };
            at.push((i, by_salt[i].records.len()));
            by_salt[i]
                .records
                .push(((*key).clone(), record.len() as u64));
        }
        let admissions = self.ledger.admit(&by_salt)?;
        let evicted: Vec<Vec<u8>> = admissions.iter().flat_map(|a| a.evicted.clone()).collect();
        self.counters
            .quota_evicted
            .fetch_add(evicted.len() as u64, Relaxed);
        let verdicts: Vec<Result<(), OverQuota>> = at
            .into_iter()
            .map(|(i, j)| {
                let (w, a) = (&by_salt[i], &admissions[i]);
                if !a.refused[j] {
                    return Ok(());
                }
                self.counters.quota_refused.fetch_add(1, Relaxed);
                Err(OverQuota {
                    tier: QuotaTier::L3,
                    cache_salt: w.salt.to_string(),
                    need_bytes: w.records[j].1,
                    kept_bytes: a.kept,
                    limit_bytes: w.limit.unwrap_or(u64::MAX),
                })
            })
            .collect();
        let refused = records
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_err())
            .map(|((k, _), _)| self.keys.chunk(k));
        let doomed: Vec<Vec<u8>> = evicted.into_iter().chain(refused).collect();
        if !doomed.is_empty() {
            let _ = (self.ledger.delete_evicted(doomed)).inspect_err(|e| self.link_error(e));
        }
        Ok(verdicts)
    }

    fn ttl_secs(&self) -> u64 {
        self.config.ttl.as_secs().max(1)
    }

    fn link_error(&self, e: &LinkError) {
        self.counters.link_errors.fetch_add(1, Relaxed);
        tracing::debug!("L3: {e}");
    }
}

/// Why L3 could not be set up, or a value was refused.
#[derive(Debug, Error)]
pub enum L3Error {
    #[error("invalid L3 configuration")]
    Config(#[from] L3ConfigError),
    #[error("cannot set up the L3 link")]
    Link(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("value fails verification: {0}")]
    Corrupt(String),
    #[error("{0:?} is not in L3")]
    Missing(Box<ObjectKey>),
}

impl Tier for L3 {
    fn name(&self) -> &'static str {
        "L3"
    }

    /// Redis keeps no index here: only a probe can tell.
    fn may_contain(&self, keys: &[ObjectKey]) -> Vec<Presence> {
        vec![Presence::Unknown; keys.len()]
    }

    fn probe(&self, keys: &[ObjectKey]) -> Vec<bool> {
        let found = self.existing(keys);
        keys.iter().map(|k| found.contains(k)).collect()
    }

    fn fetch(&self, keys: &[ObjectKey], reserve: Reserve) -> Vec<Fetched> {
        let values = match self.values(keys) {
            Ok(v) => v,
            Err(e) => {
                self.link_error(&e);
                let e = Arc::new(e);
                return keys
                    .iter()
                    .map(|_| Fetched::Failed(TierError::new("L3", e.clone())))
                    .collect();
            }
        };
        let read: Vec<&ObjectKey> = keys
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k)
            .collect();
        if !read.is_empty() {
            // Recency for the salts' quotas: best effort, a read never fails for it.
            let _ = self.ledger.touch(&read).inspect_err(|e| self.link_error(e));
        }
        keys.par_iter()
            .zip(values)
            .map(|(key, value)| match value {
                Some(value) => self.install(key, &value, reserve),
                None => Fetched::Missing,
            })
            .collect()
    }

    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError> {
        let value = self
            .values(std::slice::from_ref(key))
            .inspect_err(|e| self.link_error(e))
            .map_err(|e| TierError::new("L3", e))?
            .pop()
            .flatten()
            .ok_or_else(|| TierError::new("L3", L3Error::Missing(Box::new(key.clone()))))?;
        match Record::parse(&value, 0) {
            Ok(r) if r.header.key == *key => Ok(value),
            Ok(r) => Err(TierError::new(
                "L3",
                L3Error::Corrupt(format!("value carries key {:?}", r.header.key)),
            )),
            Err(e) => Err(TierError::new("L3", e)),
        }
    }

    /// Cache records (write policy `always`), with the TTL, where absent, then counted in their
    /// salts' ledgers (`count_written`: what the quota evicts or refuses is deleted). While the
    /// link is down they are given up at once (counted); a failed batch is counted too, not
    /// retried: L3 is a cache.
    fn put(&self, records: &[(&ObjectKey, &[u8])]) -> Vec<Result<(), TierError>> {
        let taken = || records.iter().map(|_| Ok(())).collect();
        if self.config.write != WritePolicy::Always || records.is_empty() {
            return taken();
        }
        if !self.link.usable() {
            self.drop_records(records.len() as u64);
            return taken();
        }
        let batch = records
            .iter()
            .map(|(k, r)| ((*k).clone(), r.to_vec()))
            .collect();
        if self.set(batch, true).is_err() {
            // Counted by `set`; not retried: L3 is a cache.
            return taken();
        }
        match self.count_written(records) {
            Ok(verdicts) => verdicts
                .into_iter()
                .map(|v| v.map_err(|refused| TierError::new("L3", refused)))
                .collect(),
            Err(e) => {
                // Written but not counted: their salts' usage is low until their TTL.
                self.link_error(&e);
                taken()
            }
        }
    }

    /// Fleet-wide, from the ledgers in Redis (the largest re-read); empty while unreachable.
    fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        self.ledger
            .largest_first(REPORT_REFRESHED)
            .inspect_err(|e| self.link_error(e))
            .unwrap_or_default()
    }

    /// A window's records are kept in Redis without a TTL (`WindowCatalog::keep`): those the
    /// salt's windows keep already (fleet-wide), plus the new ones, must fit its L3 quota.
    /// While Redis is unreachable nothing can be kept there, and nothing is refused here.
    fn admit_window(&self, salt: &str, records: &[(ObjectKey, u64)]) -> Result<(), OverQuota> {
        if self.config.quotas.limit(QuotaTier::L3, salt).is_none() {
            return Ok(());
        }
        match self.ledger.usage(salt, records) {
            Ok(u) => self
                .config
                .quotas
                .admit(QuotaTier::L3, salt, u.kept, u.need),
            Err(e) => {
                self.link_error(&e);
                Ok(())
            }
        }
    }

    /// Redis keeps a window's records by giving them no TTL (`WindowCatalog::keep`), not by
    /// pins of this node's.
    fn pin(&self, _key: &ObjectKey) -> bool {
        false
    }

    fn unpin(&self, _key: &ObjectKey) {}

    /// A put is acknowledged by Redis when it returns: nothing waits here.
    fn sync(&self) -> Result<(), TierError> {
        Ok(())
    }

    /// The fleet's shared cache is not one node's to clear.
    fn clear(&self) -> Result<usize, TierError> {
        Ok(0)
    }

    fn stats(&self) -> TierStats {
        let c = &self.counters;
        let link = self.link.status();
        let figures = vec![
            Figure::gauge(
                "up",
                "1 while the L3 Redis link answers, 0 while it is down or not yet connected",
                u64::from(link.state == "up"),
            ),
            Figure::gauge(
                "full",
                "1 while L3 Redis refuses writes for lack of memory (maxmemory)",
                u64::from(link.full),
            ),
            Figure::counter(
                "incidents_total",
                "Times the L3 link went down",
                link.incidents,
            ),
            Figure::counter(
                "link_errors_total",
                "L3 operations failed for the link (down, timeout)",
                c.link_errors.load(Relaxed),
            ),
            Figure::counter(
                "exists_checked_total",
                "Keys looked up in L3",
                c.exists_checked.load(Relaxed),
            ),
            Figure::counter(
                "exists_found_total",
                "Keys found in L3",
                c.exists_found.load(Relaxed),
            ),
            Figure::counter(
                "read_records_total",
                "Values read from L3 into L1",
                c.read_records.load(Relaxed),
            ),
            Figure::counter(
                "read_bytes_total",
                "Object bytes read from L3 into L1",
                c.read_bytes.load(Relaxed),
            ),
            Figure::counter(
                "corrupt_records_total",
                "L3 values that failed verification or carried another key (served as misses)",
                c.corrupt_records.load(Relaxed),
            ),
            Figure::counter(
                "written_records_total",
                "Values written to L3",
                c.written_records.load(Relaxed),
            ),
            Figure::counter(
                "written_bytes_total",
                "Value bytes written to L3",
                c.written_bytes.load(Relaxed),
            ),
            Figure::counter(
                "write_errors_total",
                "L3 write batches that failed",
                c.write_errors.load(Relaxed),
            ),
            Figure::counter(
                "write_behind_dropped_total",
                "Objects L3 gave up without trying (link down)",
                c.dropped.load(Relaxed),
            ),
            Figure::counter(
                "quota_refused_total",
                "L3 writes refused: the cache_salt's windows left no room in its L3 quota",
                c.quota_refused.load(Relaxed),
            ),
            Figure::counter(
                "quota_evicted_records_total",
                "L3 cache records of a cache_salt evicted (least recently used first) to keep it \
                 within its fleet-wide L3 quota",
                c.quota_evicted.load(Relaxed),
            ),
            Figure::counter(
                "round_trips_total",
                "Pipelines sent to L3 nodes (a lookup's existence checks cost one per node)",
                self.link.batches().round_trips.load(Relaxed),
            ),
            Figure::counter(
                "topology_reads_total",
                "Times the L3 cluster's slot map was read",
                self.link.batches().topology_reads.load(Relaxed),
            ),
        ];
        TierStats {
            name: self.name().into(),
            read_records: c.read_records.load(Relaxed),
            read_bytes: c.read_bytes.load(Relaxed),
            written_records: c.written_records.load(Relaxed),
            written_stored_bytes: c.written_bytes.load(Relaxed),
            corrupt_records: c.corrupt_records.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
            link: Some(link),
            figures,
            ..TierStats::default()
        }
    }

    fn window_catalog(self: Arc<Self>) -> Option<Arc<dyn WindowCatalog>> {
        Some(self)
    }
}
