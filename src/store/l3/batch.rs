//! Many single-key commands as one pipeline per Redis node: a lookup's existence checks, its
//! reads and write-behind's writes each cost one round trip per node, not one per chunk.
//!
//! On one server every batch is a single pipeline. On a cluster the commands are grouped by the
//! master that owns their key's slot (the slot map is read with `CLUSTER SLOTS` once and again
//! after a group fails for routing, e.g. `MOVED` after a resharding); a group the map routed
//! wrongly is retried command by command, which the cluster client redirects itself.
//!
//! Values of several MiB go the other way (`spread`): one command in flight per connection.
//!
//! `round_trips` counts pipelines (and single commands) sent, so tests and `cwm bench` can
//! check the cost of a lookup by counting, not timing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use futures_util::future::join_all;
use parking_lot::Mutex;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, RedisResult, Value};

use super::link::{broken_redis, out_of_memory, Conn, Link, LinkError};

/// Redis Cluster's slot count.
const SLOTS: u16 = 16384;

/// The cluster's masters and which of them owns each slot.
struct SlotMap {
    /// (first slot, last slot, index into `masters`), sorted.
    ranges: Vec<(u16, u16, usize)>,
    masters: Vec<(String, u16)>,
}

impl SlotMap {
    /// From a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id…], replicas…]…]`.
    fn parse(v: &Value) -> Option<SlotMap> {
        let Value::Array(entries) = v else {
            return None;
        };
        let mut map = SlotMap {
            ranges: Vec::new(),
            masters: Vec::new(),
        };
        for e in entries {
            let Value::Array(e) = e else { return None };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(node))) =
                (e.first(), e.get(1), e.get(2))
            else {
                return None;
            };
            let host = match node.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let Some(Value::Int(port)) = node.get(1) else {
                return None;
            };
            let master = (host, u16::try_from(*port).ok()?);
            let i = match map.masters.iter().position(|m| *m == master) {
                Some(i) => i,
                None => {
                    map.masters.push(master);
                    map.masters.len() - 1
                }
            };
            map.ranges
                .push((u16::try_from(*first).ok()?, u16::try_from(*last).ok()?, i));
        }
        map.ranges.sort();
        Some(map)
    }

    /// The master owning `slot`, if the map covers it.
    fn master_of(&self, slot: u16) -> Option<usize> {
        let i = self
            .ranges
            .partition_point(|r| r.0 <= slot)
            .checked_sub(1)?;
        let (first, last, master) = self.ranges[i];
        (first..=last).contains(&slot).then_some(master)
    }
}

/// The slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key without one.
pub fn slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let len = key[open + 1..].iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS
}

/// The key of a single-key command: its first argument after the name, or a script's first
/// key (`EVAL script numkeys key …`: a script's keys share one slot).
fn key_of(cmd: &Cmd) -> &[u8] {
    let mut args = cmd.args_iter();
    let script =
        matches!(args.next(), Some(redis::Arg::Simple(n)) if n.eq_ignore_ascii_case(b"EVAL"));
    match args.nth(if script { 2 } else { 0 }) {
        Some(redis::Arg::Simple(k)) => k,
        _ => &[],
    }
}

/// What the link keeps for batches: the slot map and the round-trip count.
#[derive(Default)]
pub struct Batches {
    slots: Mutex<Option<Arc<SlotMap>>>,
    /// Pipelines and single commands sent by batches.
    pub round_trips: AtomicU64,
    /// `CLUSTER SLOTS` queries (once, then after misrouted groups).
    pub topology_reads: AtomicU64,
}

impl Link {
    /// Send `cmds` (single-key commands) and return their replies in order: one pipeline per
    /// node. The first error reply fails the batch.
    pub fn batch(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, LinkError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let batches = self.batches().clone();
        let map = batches.slots.lock().clone();
        self.run(move |conn| async move {
            match conn {
                Conn::Single(mut c) => {
                    batches.round_trips.fetch_add(1, Relaxed);
                    let mut pipe = redis::pipe();
                    for cmd in cmds {
                        pipe.add_command(cmd);
                    }
                    pipe.query_async(&mut c).await
                }
                Conn::Cluster(c) => cluster_batch(c, cmds, map, &batches).await,
            }
        })
    }
}

impl Link {
    /// Send `cmds` with one command in flight per connection (`connections` per node), for
    /// multi-MiB values: Redis moves the unread rest of a client's query buffer after every
    /// command, so pipelining large SETs on one socket is several times slower than spreading
    /// them over sockets (BENCHMARKS.md, "L3: Redis"). Replies in order; the first error fails
    /// the batch.
    pub fn spread(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, LinkError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let batches = self.batches().clone();
        self.run_all(move |conns| async move {
            let next = AtomicUsize::new(0);
            let (cmds, next, batches) = (&cmds, &next, &batches);
            let workers = conns.into_iter().map(|mut c| async move {
                let mut replies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    let Some(cmd) = cmds.get(i) else { break };
                    batches.round_trips.fetch_add(1, Relaxed);
                    replies.push((i, c.query::<Value>(cmd).await?));
                }
                Ok::<_, redis::RedisError>(replies)
            });
            let mut out = vec![Value::Nil; cmds.len()];
            for worker in join_all(workers).await {
                for (i, v) in worker? {
                    out[i] = v;
                }
            }
            Ok(out)
        })
    }
}

async fn cluster_batch(
    mut conn: ClusterConnection,
    cmds: Vec<Cmd>,
    map: Option<Arc<SlotMap>>,
    batches: &Batches,
) -> RedisResult<Vec<Value>> {
    let map = match map {
        Some(m) => m,
        None => {
            batches.topology_reads.fetch_add(1, Relaxed);
            let mut slots = redis::cmd("CLUSTER");
            slots.arg("SLOTS");
            let reply = conn
                .route_command(
                    slots,
                    redis::cluster_routing::RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                )
                .await?;
            let m = Arc::new(SlotMap::parse(&reply).ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"))
            })?);
            *batches.slots.lock() = Some(m.clone());
            m
        }
    };
    // Commands by master; those of a slot the map does not cover go one by one.
    let mut groups: HashMap<Option<usize>, Vec<(usize, Cmd)>> = HashMap::new();
    let n = cmds.len();
    for (i, cmd) in cmds.into_iter().enumerate() {
        let master = map.master_of(slot(key_of(&cmd)));
        groups.entry(master).or_default().push((i, cmd));
    }
    let sent = groups.into_iter().map(|(master, group)| {
        let mut conn = conn.clone();
        let master = master.map(|m| map.masters[m].clone());
        async move {
            let (order, cmds): (Vec<usize>, Vec<Cmd>) = group.into_iter().unzip();
            let replies = match master {
                Some((host, port)) => {
                    batches.round_trips.fetch_add(1, Relaxed);
                    let mut pipe = redis::pipe();
                    for cmd in &cmds {
                        pipe.add_command(cmd.clone());
                    }
                    let route = SingleNodeRoutingInfo::ByAddress { host, port };
                    match conn.route_pipeline(pipe, 0, cmds.len(), route).await {
                        Ok(r) => Ok(r),
                        Err(e) if broken_redis(&e) || out_of_memory(&e) => Err(e),
                        Err(e) => {
                            tracing::debug!("L3: a pipeline went to the wrong node ({e})");
                            *batches.slots.lock() = None;
                            one_by_one(&conn, &cmds, batches).await
                        }
                    }
                }
                None => one_by_one(&conn, &cmds, batches).await,
            };
            replies.map(|r| order.into_iter().zip(r).collect::<Vec<_>>())
        }
    });
    let mut out = vec![Value::Nil; n];
    for group in join_all(sent).await {
        for (i, v) in group? {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Each command on its own (the cluster client follows redirections).
async fn one_by_one(
    conn: &ClusterConnection,
    cmds: &[Cmd],
    batches: &Batches,
) -> RedisResult<Vec<Value>> {
    batches.round_trips.fetch_add(cmds.len() as u64, Relaxed);
    join_all(cmds.iter().map(|cmd| {
        let mut c = conn.clone();
        async move { cmd.query_async::<Value>(&mut c).await }
    }))
    .await
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from Redis' CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{foo}{bar}"), slot(b"foo"), "the first tag counts");
        assert_ne!(slot(b"{}foo"), slot(b"foo"), "an empty tag: the whole key");
    }

    #[test]
    fn a_scripts_slot_is_its_first_keys() {
        let mut eval = redis::cmd("EVAL");
        eval.arg("return 1").arg(1).arg("{t}a");
        let mut get = redis::cmd("GET");
        get.arg("{t}b");
        assert_eq!(key_of(&eval), b"{t}a");
        assert_eq!(slot(key_of(&eval)), slot(key_of(&get)));
    }

    #[test]
    fn slot_map_finds_the_owner() {
        let node = |p| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(p),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7002)]),
        ]);
        let m = SlotMap::parse(&reply).unwrap();
        let port = |s| m.master_of(s).map(|i| m.masters[i].1);
        assert_eq!(port(0), Some(7000));
        assert_eq!(port(5461), Some(7001));
        assert_eq!(port(16383), Some(7002));
        let partial = SlotMap {
            ranges: vec![(10, 20, 0)],
            masters: vec![("h".into(), 1)],
        };
        assert_eq!(partial.master_of(5), None);
        assert_eq!(partial.master_of(21), None);
    }
}
