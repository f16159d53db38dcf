//! Per-tenant byte budgets: how much of L1 one `cache_salt` may occupy.
//!
//! A limit is set per salt (`""`, named `_default` on the HTTP surface, is the salt of requests
//! that send none) or for every salt without one of its own (`--l1-quota-gb-per-salt`). L1
//! enforces it at admission: a chunk that would take its salt over the limit first evicts that
//! salt's own least-recently-used chunks, never another tenant's; when they are locked or being
//! read, the chunk is refused (the store reports it not stored). Lowering a limit takes effect
//! at the salt's next admission. Usage is counted in L1's allocation units (what the salt's
//! objects really occupy).

use std::collections::HashMap;

use parking_lot::RwLock;

/// The salt name the HTTP surface uses for the empty salt.
pub const DEFAULT_SALT_NAME: &str = "_default";

/// The tiers a quota can name. Only L1 is enforced so far; the durable tiers are refused with
/// that reason (issue 24).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum QuotaTier {
    L1,
    L2,
    L3,
}

/// Byte limits per salt, shared by L1 (which enforces them) and the admin surface.
#[derive(Debug, Default)]
pub struct Quotas {
    inner: RwLock<Limits>,
}

#[derive(Debug, Default, Clone)]
struct Limits {
    per_salt: HashMap<String, u64>,
    /// For every salt without a limit of its own.
    default: Option<u64>,
}

/// One salt's limit as reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct QuotaEntry {
    pub cache_salt: String,
    pub tier: QuotaTier,
    pub limit_bytes: u64,
    pub limit_gb: f64,
    /// Set for this salt itself (`true`) or inherited from the default for all salts.
    pub explicit: bool,
}

/// The salt an HTTP path names: `_default` is the empty salt.
pub fn salt_from_path(name: &str) -> &str {
    if name == DEFAULT_SALT_NAME {
        ""
    } else {
        name
    }
}

fn salt_name(salt: &str) -> String {
    if salt.is_empty() {
        DEFAULT_SALT_NAME.to_string()
    } else {
        salt.to_string()
    }
}

/// GiB (as the flags and LMCache's coordinator give them) to bytes; `None` for a value that
/// is not a finite, non-negative number.
pub fn gb_to_bytes(gb: f64) -> Option<u64> {
    (gb.is_finite() && gb >= 0.0).then_some((gb * (1u64 << 30) as f64) as u64)
}

impl Quotas {
    pub fn new(default_l1_bytes: Option<u64>) -> Quotas {
        Quotas {
            inner: RwLock::new(Limits {
                per_salt: HashMap::new(),
                default: default_l1_bytes,
            }),
        }
    }

    /// Set (or clear, `None`) the limit of every salt without one of its own.
    pub fn set_default(&self, bytes: Option<u64>) {
        self.inner.write().default = bytes;
    }

    /// The L1 limit of `salt`, if any.
    pub fn l1_limit(&self, salt: &str) -> Option<u64> {
        let l = self.inner.read();
        l.per_salt.get(salt).copied().or(l.default)
    }

    /// Set `salt`'s limit.
    pub fn set(&self, salt: &str, bytes: u64) {
        self.inner.write().per_salt.insert(salt.to_string(), bytes);
    }

    /// Remove `salt`'s own limit (the default for all salts applies again); whether it had one.
    pub fn remove(&self, salt: &str) -> bool {
        self.inner.write().per_salt.remove(salt).is_some()
    }

    /// `salt`'s limit as reported, if it has one (its own or the default).
    pub fn entry(&self, salt: &str) -> Option<QuotaEntry> {
        let l = self.inner.read();
        let (bytes, explicit) = match l.per_salt.get(salt) {
            Some(&b) => (b, true),
            None => (l.default?, false),
        };
        Some(Self::report(salt, bytes, explicit))
    }

    /// Every salt's own limit, by name, then the default (salt `"*"`) if set.
    pub fn entries(&self) -> Vec<QuotaEntry> {
        let l = self.inner.read();
        let mut out: Vec<QuotaEntry> = l
            .per_salt
            .iter()
            .map(|(s, &b)| Self::report(s, b, true))
            .collect();
        out.sort_by(|a, b| a.cache_salt.cmp(&b.cache_salt));
        if let Some(b) = l.default {
            let mut d = Self::report("", b, false);
            d.cache_salt = "*".into();
            out.push(d);
        }
        out
    }

    fn report(salt: &str, bytes: u64, explicit: bool) -> QuotaEntry {
        QuotaEntry {
            cache_salt: salt_name(salt),
            tier: QuotaTier::L1,
            limit_bytes: bytes,
            limit_gb: bytes as f64 / (1u64 << 30) as f64,
            explicit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_limits_override_the_default_and_removal_restores_it() {
        let q = Quotas::new(Some(100));
        assert_eq!(q.l1_limit("alice"), Some(100));
        q.set("alice", 10);
        assert_eq!(q.l1_limit("alice"), Some(10));
        assert_eq!(q.l1_limit("bob"), Some(100));
        assert!(q.remove("alice"));
        assert!(!q.remove("alice"));
        assert_eq!(q.l1_limit("alice"), Some(100));
        assert_eq!(Quotas::new(None).l1_limit("x"), None);
    }

    #[test]
    fn the_empty_salt_is_named_default() {
        let q = Quotas::new(None);
        q.set(salt_from_path("_default"), 1 << 30);
        let e = q.entry("").unwrap();
        assert_eq!(
            (e.cache_salt.as_str(), e.limit_gb, e.explicit),
            ("_default", 1.0, true)
        );
        assert_eq!(q.entries().len(), 1);
    }

    #[test]
    fn gigabytes_must_be_finite_and_not_negative() {
        assert_eq!(gb_to_bytes(0.5), Some(1 << 29));
        assert_eq!(gb_to_bytes(-1.0), None);
        assert_eq!(gb_to_bytes(f64::NAN), None);
        assert_eq!(gb_to_bytes(f64::INFINITY), None);
    }
}
