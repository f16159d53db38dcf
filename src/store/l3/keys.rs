//! The Redis key layout (documented in docs/FORMATS.md).
//!
//! ```text
//! chunk:   <ns>:c1:{<tag>}:<model bytes>:<model>:<kv_rank 8 hex>:<object_group hex>:<chunk hash 64 hex>:<salt bytes>:<salt>
//! windows: <ns>:w1:{windows}
//! ledger:  <ns>:q1:{<salt tag>}:<salt bytes>:<salt>:lru|exp|len|sum
//! totals:  <ns>:q1:{salts}
//! ```
//!
//! Model and salt are arbitrary strings, so each is preceded by its length in bytes (decimal):
//! no two keys collide whatever the strings hold. `kv_rank` encodes the world size and the
//! rank. The cluster hash tag `{<tag>}` comes before any free text (so a `{` in a model or salt
//! never moves it): 16 hex digits of blake3 over (model, salt, chunk hash), the same for every
//! rank and part of one chunk and different between chunks, and between salts sharing a prefix,
//! so chunks spread over the cluster's slots. A salt's ledger (`l3::ledger`: its L3 usage, shared by
//! the fleet) is four keys under one tag, 16 hex digits of blake3 over the salt, so one script
//! reaches all four; the totals every report reads are one key.

use connector_protocol::ObjectKey;

#[derive(Debug, Clone)]
pub struct KeyLayout {
    ns: String,
}

impl KeyLayout {
    /// `ns` must satisfy `config::valid_namespace` (no `:` `{` `}`).
    pub fn new(ns: &str) -> KeyLayout {
        KeyLayout { ns: ns.to_string() }
    }

    /// The key of one chunk object.
    pub fn chunk(&self, key: &ObjectKey) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.ns.len() + 140 + key.model.len() + key.cache_salt.len());
        out.extend_from_slice(self.ns.as_bytes());
        out.extend_from_slice(b":c1:{");
        out.extend_from_slice(tag(key).as_bytes());
        out.extend_from_slice(b"}:");
        push_str(&mut out, &key.model);
        out.extend_from_slice(
            format!(
                "{:08x}:{:x}:{}:",
                key.kv_rank,
                key.object_group,
                hex::encode(key.chunk_hash.0)
            )
            .as_bytes(),
        );
        push_str(&mut out, &key.cache_salt);
        out.pop(); // the trailing ':' of the last field
        out
    }

    /// The four keys of `salt`'s ledger (`l3::ledger`): `lru`, `exp`, `len`, `sum`, in one slot.
    pub fn ledger(&self, salt: &str) -> [Vec<u8>; 4] {
        let mut h = blake3::Hasher::new();
        h.update(salt.as_bytes());
        let mut head = format!("{}:q1:{{", self.ns).into_bytes();
        head.extend_from_slice(hex::encode(&h.finalize().as_bytes()[..8]).as_bytes());
        head.extend_from_slice(b"}:");
        push_str(&mut head, salt);
        ["lru", "exp", "len", "sum"].map(|part| [&head[..], part.as_bytes()].concat())
    }

    /// The sorted set of every salt's L3 bytes, for reports.
    pub fn ledger_totals(&self) -> Vec<u8> {
        format!("{}:q1:{{salts}}", self.ns).into_bytes()
    }

    /// The hash holding every window manifest (one slot: list, get, create and delete are
    /// single-key operations, atomic even on a cluster).
    pub fn windows(&self) -> String {
        format!("{}:w1:{{windows}}", self.ns)
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(format!("{}:", s.len()).as_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(b':');
}

fn tag(key: &ObjectKey) -> String {
    let mut h = blake3::Hasher::new();
    for s in [&*key.model, &*key.cache_salt] {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update(&key.chunk_hash.0);
    hex::encode(&h.finalize().as_bytes()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_protocol::{kv_rank, ChunkHash};

    fn key(model: &str, salt: &str, rank: u32, hash: u8) -> ObjectKey {
        ObjectKey {
            model: model.into(),
            kv_rank: kv_rank(4, rank),
            object_group: 0,
            chunk_hash: ChunkHash([hash; 32]),
            cache_salt: salt.into(),
        }
    }

    fn slot_tag(k: &[u8]) -> &[u8] {
        let open = k.iter().position(|&b| b == b'{').unwrap();
        let close = open + k[open..].iter().position(|&b| b == b'}').unwrap();
        &k[open + 1..close]
    }

    #[test]
    fn layout_is_readable_and_exact() {
        let l = KeyLayout::new("cwm");
        let k = String::from_utf8(l.chunk(&key("m/x", "s:1", 2, 0xab))).unwrap();
        let tag = tag(&key("m/x", "s:1", 0, 0xab));
        assert_eq!(
            k,
            format!(
                "cwm:c1:{{{tag}}}:3:m/x:04020402:0:{}:3:s:1",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn strings_cannot_collide_and_the_tag_ignores_braces_in_them() {
        let l = KeyLayout::new("cwm");
        // Same concatenated text, different split between model and salt.
        let a = l.chunk(&key("a:1:b", "c", 0, 1));
        let b = l.chunk(&key("a", "1:b:c", 0, 1));
        assert_ne!(a, b);
        // A salt that looks like a whole key suffix.
        let c = l.chunk(&key("m", "x:00000000:0:y", 0, 1));
        let d = l.chunk(&key("m", "x", 0, 1));
        assert_ne!(c, d);
        let braces = l.chunk(&key("{m}", "{s}", 0, 1));
        assert_eq!(slot_tag(&braces).len(), 16);
    }

    #[test]
    fn a_salts_ledger_keys_share_one_slot_and_salts_differ() {
        let l = KeyLayout::new("cwm");
        let [lru, exp, len, sum] = l.ledger("s:1");
        assert_eq!(
            String::from_utf8(lru.clone()).unwrap(),
            format!(
                "cwm:q1:{{{}}}:3:s:1:lru",
                std::str::from_utf8(slot_tag(&lru)).unwrap()
            )
        );
        for k in [&exp, &len, &sum] {
            assert_eq!(slot_tag(k), slot_tag(&lru));
        }
        assert_ne!(slot_tag(&l.ledger("s")[0]), slot_tag(&lru));
        assert_eq!(slot_tag(&l.ledger("{x}")[0]).len(), 16);
    }

    #[test]
    fn ranks_share_a_slot_chunks_and_salts_spread() {
        let l = KeyLayout::new("cwm");
        let t = |m, s, r, h| slot_tag(&l.chunk(&key(m, s, r, h))).to_vec();
        assert_eq!(t("m", "s", 0, 1), t("m", "s", 3, 1));
        assert_ne!(t("m", "s", 0, 1), t("m", "s", 0, 2));
        assert_ne!(t("m", "s", 0, 1), t("m", "t", 0, 1));
        assert_ne!(t("m", "s", 0, 1), t("n", "s", 0, 1));
    }
}
