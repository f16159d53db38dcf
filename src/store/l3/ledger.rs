//! Each salt's L3 usage, kept in Redis itself so that every sidecar sharing the Redis (or Redis
//! Cluster) counts the same bytes and the salt's L3 quota bounds the fleet, not each sidecar.
//!
//! Per salt, four keys under one hash tag (`KeyLayout::ledger`, so a Lua script may touch all of
//! them at once, on a cluster too): `lru` (a sorted set: each cache record's key by its last use,
//! in Redis' microseconds), `exp` (the same records by when their TTL runs out), `len` (a hash:
//! every counted record's key → its bytes, cache and window records alike) and `sum` (a hash:
//! `bytes`, all of them, and `kept`, those of window records, which have no TTL and are never
//! evicted for a quota). Each change is one script, so concurrent sidecars never lose an update:
//!
//! - `ADMIT` (write-behind, right after its SETs): forgets the salt's records whose TTL ran
//!   out, then counts each new record, evicting the salt's least recently used cache records
//!   (its own, never another salt's, never a window's) until it fits; a record that cannot fit
//!   even then (windows hold the rest) is refused. The evicted and the refused records are
//!   returned and deleted by the caller (`DEL_IF_VOLATILE`: only while they still carry a TTL,
//!   so a record a window kept meanwhile stays). A record that Redis had evicted or expired
//!   already is simply forgotten: choosing it costs nothing and corrects the count.
//! - `TOUCH` (after a fetch read records): they become the salt's most recently used.
//! - `KEEP` / `RELEASE` (windows): records counted as kept without a TTL, and back to cache.
//! - `USAGE`: the salt's bytes and kept bytes, after forgetting what expired.
//!
//! Recency is what L3 sees: a write or a read from L3, by any sidecar. Sizes are the records'
//! bytes (the values SET), which every sidecar computes alike. A record and its salt's ledger
//! are in different slots, so no one script can write both: the ledger counts a record after
//! its SET, so that eviction only ever chooses records that exist (counting first, another
//! sidecar could evict and delete a record before its SET, which would then put it back
//! uncounted). Meanwhile a salt may exceed its quota by the batch in flight; a sidecar that
//! dies between the two leaves that batch uncounted until its TTL. Records Redis evicts
//! (`maxmemory`) stay counted until chosen for eviction or until their TTL.
//!
//! The usage of every salt, for `/status` and `/metrics`, is a sorted set of its own
//! (`KeyLayout::ledger_totals`): salt → bytes, written after each script with the total the
//! script returned (another slot on a cluster, so not in the same script; a report may lag one
//! write behind). Quotas never read it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use connector_protocol::ObjectKey;
use redis::{Cmd, Value};

use super::keys::KeyLayout;
use super::link::{Link, LinkError};

/// What every script starts with: its keys, Redis' clock, `forget`, and the expired records
/// forgotten.
const PRELUDE: &str = r#"
local lru, exp, len, sum = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function total(f) return tonumber(redis.call('HGET', sum, f) or '0') end
local function forget(m)
  local l = redis.call('HGET', len, m)
  if not l then return 0 end
  l = tonumber(l)
  redis.call('HDEL', len, m)
  if redis.call('ZREM', lru, m) == 0 then redis.call('HINCRBY', sum, 'kept', -l) end
  redis.call('ZREM', exp, m)
  redis.call('HINCRBY', sum, 'bytes', -l)
  return l
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now)) do forget(m) end
"#;

/// ARGV: limit (-1: none), TTL in µs, then (key, bytes) pairs. Returns one flag per record
/// (1 admitted, 0 refused), the keys evicted (some of them perhaps admitted by this call), the
/// salt's bytes and its kept bytes.
const ADMIT: &str = r#"
local limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local bytes, kept = total('bytes'), total('kept')
local out, evicted = {}, {}
for i = 1, (#ARGV - 2) / 2 do
  local m, l = ARGV[2 * i + 1], tonumber(ARGV[2 * i + 2])
  out[i] = 0
  if redis.call('HEXISTS', len, m) == 1 then
    if redis.call('ZSCORE', lru, m) then
      redis.call('ZADD', lru, now + i, m)
      redis.call('ZADD', exp, now + ttl, m)
    end
    out[i] = 1
  elseif limit < 0 or kept + l <= limit then
    while limit >= 0 and bytes + l > limit do
      local v = redis.call('ZRANGE', lru, 0, 0)[1]
      if not v then break end
      bytes = bytes - forget(v)
      evicted[#evicted + 1] = v
    end
    if limit < 0 or bytes + l <= limit then
      redis.call('HSET', len, m, l)
      redis.call('ZADD', lru, now + i, m)
      redis.call('ZADD', exp, now + ttl, m)
      redis.call('HINCRBY', sum, 'bytes', l)
      bytes = bytes + l
      out[i] = 1
    end
  end
end
return {out, evicted, bytes, kept}
"#;

/// ARGV: keys read. Returns the salt's bytes.
const TOUCH: &str = r#"
for i = 1, #ARGV do
  if redis.call('ZSCORE', lru, ARGV[i]) then redis.call('ZADD', lru, now + i, ARGV[i]) end
end
return total('bytes')
"#;

/// ARGV: (key, bytes) pairs of window records written without a TTL. Returns the salt's bytes.
const KEEP: &str = r#"
for i = 1, #ARGV / 2 do
  local m, l = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  forget(m)
  redis.call('HSET', len, m, l)
  redis.call('HINCRBY', sum, 'bytes', l)
  redis.call('HINCRBY', sum, 'kept', l)
end
return total('bytes')
"#;

/// ARGV: TTL in µs, then keys given their TTL back. Returns the salt's bytes.
const RELEASE: &str = r#"
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  local m = ARGV[i]
  local l = redis.call('HGET', len, m)
  if l and not redis.call('ZSCORE', lru, m) then
    redis.call('ZADD', lru, now + i, m)
    redis.call('ZADD', exp, now + ttl, m)
    redis.call('HINCRBY', sum, 'kept', -tonumber(l))
  end
end
return total('bytes')
"#;

/// ARGV: (key, bytes) pairs a window would keep. Returns the salt's bytes, its kept bytes,
/// and the bytes of those records not kept already.
const USAGE: &str = r#"
local need = 0
for i = 1, #ARGV / 2 do
  local m = ARGV[2 * i - 1]
  if redis.call('HEXISTS', len, m) == 0 or redis.call('ZSCORE', lru, m) then
    need = need + tonumber(ARGV[2 * i])
  end
end
return {total('bytes'), total('kept'), need}
"#;

/// Delete a record evicted for its salt's quota, unless it lost its TTL meanwhile (a window
/// keeps it). 1 if deleted, 0 if gone already or kept.
const DEL_IF_VOLATILE: &str =
    "if redis.call('PTTL', KEYS[1]) >= 0 then return redis.call('DEL', KEYS[1]) end return 0";

/// One salt's cache records just written, for `admit`.
pub struct Written {
    pub salt: Arc<str>,
    /// Its L3 quota.
    pub limit: Option<u64>,
    /// Each record's key and bytes.
    pub records: Vec<(ObjectKey, u64)>,
}

/// What one `admit` decided for one salt's records, in order.
#[derive(Debug, Default, PartialEq)]
pub struct Admission {
    /// Per record: refused, its salt's windows leaving no room (to delete: `delete_evicted`).
    pub refused: Vec<bool>,
    /// Records of the salt evicted for these (perhaps some of them): to delete
    /// (`delete_evicted`).
    pub evicted: Vec<Vec<u8>>,
    /// The salt's bytes afterwards, and those of them windows keep.
    pub bytes: u64,
    pub kept: u64,
}

/// A salt's usage as the ledger holds it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SaltUsage {
    pub bytes: u64,
    /// Of window records (kept without a TTL).
    pub kept: u64,
    /// Of the records asked about that windows do not keep yet.
    pub need: u64,
}

/// The per-salt ledgers of one namespace.
pub struct Ledger {
    link: Arc<Link>,
    keys: KeyLayout,
    ttl_us: u64,
}

impl Ledger {
    pub fn new(link: Arc<Link>, keys: KeyLayout, ttl: Duration) -> Ledger {
        Ledger {
            link,
            keys,
            ttl_us: ttl.as_micros().max(1) as u64,
        }
    }

    fn script(&self, body: &str, salt: &str, args: impl IntoIterator<Item = Vec<u8>>) -> Cmd {
        let mut c = redis::cmd("EVAL");
        c.arg(format!("{PRELUDE}{body}")).arg(4);
        for k in self.keys.ledger(salt) {
            c.arg(k);
        }
        for a in args {
            c.arg(a);
        }
        c
    }

    /// `(chunk key, bytes)` pairs as script arguments.
    fn pairs<'a>(&'a self, records: &'a [(ObjectKey, u64)]) -> impl Iterator<Item = Vec<u8>> + 'a {
        records
            .iter()
            .flat_map(|(k, l)| [self.keys.chunk(k), l.to_string().into_bytes()])
    }

    /// Count each salt's cache records just written (`limit`: the salt's L3 quota), one script
    /// per salt in one batch; the totals noted for reporting.
    pub fn admit(&self, by_salt: &[Written]) -> Result<Vec<Admission>, LinkError> {
        let cmds = by_salt
            .iter()
            .map(|w| {
                let limit = w.limit.map_or(-1, |l| l.min(i64::MAX as u64) as i64);
                let head = [
                    limit.to_string().into_bytes(),
                    self.ttl_us.to_string().into_bytes(),
                ];
                self.script(
                    ADMIT,
                    &w.salt,
                    head.into_iter().chain(self.pairs(&w.records)),
                )
            })
            .collect();
        let admissions = self
            .link
            .batch(cmds)?
            .iter()
            .map(parse_admission)
            .collect::<Result<Vec<_>, _>>()?;
        let totals = by_salt
            .iter()
            .map(|w| w.salt.clone())
            .zip(admissions.iter().map(|a| a.bytes));
        self.note_totals(totals.collect());
        Ok(admissions)
    }

    /// Delete records evicted or refused for their salts' quotas, in one batch, each only
    /// while it still has a TTL; how many were deleted.
    pub fn delete_evicted(&self, keys: Vec<Vec<u8>>) -> Result<u64, LinkError> {
        let cmds = keys
            .into_iter()
            .map(|k| {
                let mut c = redis::cmd("EVAL");
                c.arg(DEL_IF_VOLATILE).arg(1).arg(k);
                c
            })
            .collect();
        let replies = self.link.batch(cmds)?;
        Ok(replies
            .iter()
            .filter(|v| matches!(v, Value::Int(1)))
            .count() as u64)
    }

    /// Records read from L3: their salts' most recently used now.
    pub fn touch(&self, keys: &[&ObjectKey]) -> Result<(), LinkError> {
        self.per_salt(keys.iter().map(|k| ((*k).clone(), 0)), |salt, records| {
            self.script(TOUCH, salt, records.iter().map(|(k, _)| self.keys.chunk(k)))
        })
    }

    /// Window records written without a TTL: counted as kept.
    pub fn keep(
        &self,
        records: impl IntoIterator<Item = (ObjectKey, u64)>,
    ) -> Result<(), LinkError> {
        self.per_salt(records, |salt, records| {
            self.script(KEEP, salt, self.pairs(records))
        })
    }

    /// Window records given their TTL back: counted as cache records again.
    pub fn release(&self, keys: &[ObjectKey]) -> Result<(), LinkError> {
        self.per_salt(keys.iter().map(|k| (k.clone(), 0)), |salt, records| {
            let ttl = std::iter::once(self.ttl_us.to_string().into_bytes());
            self.script(
                RELEASE,
                salt,
                ttl.chain(records.iter().map(|(k, _)| self.keys.chunk(k))),
            )
        })
    }

    /// `salt`'s usage, and the bytes of `records` a window would newly keep.
    pub fn usage(&self, salt: &str, records: &[(ObjectKey, u64)]) -> Result<SaltUsage, LinkError> {
        let reply = self
            .link
            .batch(vec![self.script(USAGE, salt, self.pairs(records))])?;
        let n = ints(&reply[0])?;
        let u = SaltUsage {
            bytes: n[0],
            kept: n[1],
            need: n[2],
        };
        self.note_totals(vec![(salt.into(), u.bytes)]);
        Ok(u)
    }

    /// Every salt's bytes as last noted, largest first; the `refresh` largest read again (what
    /// expired forgotten) first.
    pub fn largest_first(&self, refresh: usize) -> Result<Vec<(Arc<str>, u64)>, LinkError> {
        let mut all = self.totals()?;
        let stale: Vec<(Arc<str>, u64)> = all.iter().take(refresh).cloned().collect();
        if stale.is_empty() {
            return Ok(all);
        }
        let cmds = stale
            .iter()
            .map(|(salt, _)| self.script(USAGE, salt, []))
            .collect();
        let fresh = self
            .link
            .batch(cmds)?
            .iter()
            .map(|v| ints(v).map(|n| n[0]))
            .collect::<Result<Vec<u64>, _>>()?;
        let changed: Vec<(Arc<str>, u64)> = stale
            .into_iter()
            .zip(fresh)
            .filter(|((_, old), new)| old != new)
            .map(|((s, _), new)| (s, new))
            .collect();
        if changed.is_empty() {
            return Ok(all);
        }
        let now: HashMap<Arc<str>, u64> = changed.iter().cloned().collect();
        self.note_totals(changed);
        for (s, b) in &mut all {
            if let Some(n) = now.get(s) {
                *b = *n;
            }
        }
        Ok(crate::store::quota::largest_first(
            all.iter().map(|(s, b)| (s, b)),
        ))
    }

    /// The totals as noted, largest first.
    fn totals(&self) -> Result<Vec<(Arc<str>, u64)>, LinkError> {
        let key = self.keys.ledger_totals();
        let pairs: Vec<(Vec<u8>, f64)> = self.link.run(move |mut c| async move {
            c.query(
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("REV")
                    .arg("WITHSCORES"),
            )
            .await
        })?;
        Ok(pairs
            .into_iter()
            .map(|(s, b)| (String::from_utf8_lossy(&s).into(), b as u64))
            .collect())
    }

    /// One script per salt of `records`, in one batch; the totals they return noted.
    fn per_salt(
        &self,
        records: impl IntoIterator<Item = (ObjectKey, u64)>,
        script: impl Fn(&str, &[(ObjectKey, u64)]) -> Cmd,
    ) -> Result<(), LinkError> {
        let mut by_salt: HashMap<Arc<str>, Vec<(ObjectKey, u64)>> = HashMap::new();
        for (k, l) in records {
            by_salt
                .entry(k.cache_salt.clone())
                .or_default()
                .push((k, l));
        }
        let (salts, cmds): (Vec<Arc<str>>, Vec<Cmd>) = by_salt
            .iter()
            .map(|(salt, records)| (salt.clone(), script(salt, records)))
            .unzip();
        let totals = self
            .link
            .batch(cmds)?
            .iter()
            .map(int)
            .collect::<Result<Vec<u64>, _>>()?;
        self.note_totals(salts.into_iter().zip(totals).collect());
        Ok(())
    }

    /// Note salts' totals for reporting (best effort: a failure only delays the report).
    fn note_totals(&self, totals: Vec<(Arc<str>, u64)>) {
        let key = self.keys.ledger_totals();
        let cmds = totals
            .into_iter()
            .map(|(salt, bytes)| {
                let mut c = redis::cmd(if bytes > 0 { "ZADD" } else { "ZREM" });
                c.arg(&key);
                if bytes > 0 {
                    c.arg(bytes);
                }
                c.arg(salt.as_bytes());
                c
            })
            .collect();
        if let Err(e) = self.link.batch(cmds) {
            tracing::debug!("L3: usage totals not noted: {e}");
        }
    }
}

fn protocol(what: &str) -> LinkError {
    LinkError::Redis(redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply from an L3 ledger script",
        what.to_string(),
    )))
}

fn int(v: &Value) -> Result<u64, LinkError> {
    match v {
        Value::Int(n) => Ok((*n).max(0) as u64),
        other => Err(protocol(&format!("{other:?}"))),
    }
}

fn ints(v: &Value) -> Result<Vec<u64>, LinkError> {
    match v {
        Value::Array(a) => a.iter().map(int).collect(),
        other => Err(protocol(&format!("{other:?}"))),
    }
}

fn parse_admission(v: &Value) -> Result<Admission, LinkError> {
    let bad = || protocol(&format!("{v:?}"));
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    let [flags, evicted, bytes, kept] = parts.as_slice() else {
        return Err(bad());
    };
    let flags = ints(flags)?;
    let Value::Array(evicted) = evicted else {
        return Err(bad());
    };
    Ok(Admission {
        refused: flags.iter().map(|&f| f == 0).collect(),
        evicted: evicted
            .iter()
            .map(|k| match k {
                Value::BulkString(b) => Ok(b.clone()),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        bytes: int(bytes)?,
        kept: int(kept)?,
    })
}
