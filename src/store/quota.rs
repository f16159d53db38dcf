//! Per-tenant byte budgets: how much of each tier one `cache_salt` may occupy.
//!
//! A limit is set per salt and tier (`""`, named `_default` on the HTTP surface, is the salt of
//! requests that send none) or for every salt without one of its own on that tier
//! (`--l1-quota-gb-per-salt`, `--l2-quota-gb-per-salt`, `--l3-quota-gb-per-salt`). Each tier
//! enforces its own at admission: L1 (`store::l1`) first evicts that salt's own least recently
//! used objects, L2 (`store::disk`) and L3 (`store::l3`, counted fleet-wide in Redis:
//! `l3::ledger`) its least recently used records, never another tenant's, and each refuses
//! what still does not fit.
//! Frozen windows count against a salt's L2 and L3 budgets and are never dropped for them: a
//! freeze that would not fit is refused (`OverQuota`). Lowering a limit takes effect at the
//! salt's next admission.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use thiserror::Error;

/// The salt name the HTTP surface uses for the empty salt.
pub const DEFAULT_SALT_NAME: &str = "_default";

/// The tiers a quota can name.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum QuotaTier {
    L1,
    L2,
    L3,
}

impl QuotaTier {
    pub const ALL: [QuotaTier; 3] = [QuotaTier::L1, QuotaTier::L2, QuotaTier::L3];

    fn index(self) -> usize {
        self as usize
    }

    /// The tier a `Tier::name` ("L2", "L3") stands for.
    pub fn named(name: &str) -> Option<QuotaTier> {
        QuotaTier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// As tiers name themselves: "L1", "L2", "L3".
    pub fn name(self) -> &'static str {
        match self {
            QuotaTier::L1 => "L1",
            QuotaTier::L2 => "L2",
            QuotaTier::L3 => "L3",
        }
    }
}

impl std::fmt::Display for QuotaTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A write or a freeze refused: it would take `cache_salt` over its quota on `tier` even after
/// dropping everything of that salt the tier may drop. Nothing was changed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error(
    "cache_salt {} is over its {tier} quota: {need_bytes} more bytes on top of {kept_bytes} the \
     tier keeps for it (frozen windows) exceed its limit of {limit_bytes} \
     bytes",
    salt_name(.cache_salt)
)]
pub struct OverQuota {
    pub tier: QuotaTier,
    pub cache_salt: String,
    /// Bytes the write or freeze would add.
    pub need_bytes: u64,
    /// Bytes of the salt the tier does not drop for it (its frozen windows').
    pub kept_bytes: u64,
    pub limit_bytes: u64,
}

/// Whether `need` more bytes of `salt` fit `limit` on `tier` on top of `kept`, bytes the tier
/// will not drop for it.
pub fn fit(tier: QuotaTier, salt: &str, limit: u64, kept: u64, need: u64) -> Result<(), OverQuota> {
    if kept + need <= limit {
        return Ok(());
    }
    Err(OverQuota {
        tier,
        cache_salt: salt.to_string(),
        need_bytes: need,
        kept_bytes: kept,
        limit_bytes: limit,
    })
}

/// Byte limits per salt and tier, shared by the tiers (which enforce them) and the admin
/// surface.
#[derive(Debug, Default)]
pub struct Quotas {
    inner: RwLock<[Limits; 3]>,
}

#[derive(Debug, Default, Clone)]
struct Limits {
    per_salt: HashMap<String, u64>,
    /// For every salt without a limit of its own.
    default: Option<u64>,
}

/// One salt's limit on one tier as reported.
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

/// A salt as the admin surface names it: `_default` for the empty salt.
pub fn salt_name(salt: &str) -> String {
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

/// Bytes per salt, largest first (ties by name): how every tier reports its tenants.
pub type BySalt = Vec<(Arc<str>, u64)>;

/// `usage` as `BySalt` (salts holding nothing left out).
pub fn largest_first<'a>(usage: impl IntoIterator<Item = (&'a Arc<str>, &'a u64)>) -> BySalt {
    let mut v: Vec<(Arc<str>, u64)> = usage
        .into_iter()
        .filter(|(_, &b)| b > 0)
        .map(|(s, &b)| (s.clone(), b))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

impl Quotas {
    /// Set (or clear, `None`) the limit on `tier` of every salt without one of its own.
    pub fn set_default(&self, tier: QuotaTier, bytes: Option<u64>) {
        self.inner.write()[tier.index()].default = bytes;
    }

    /// The limit of `salt` on `tier`, if any.
    pub fn limit(&self, tier: QuotaTier, salt: &str) -> Option<u64> {
        let l = &self.inner.read()[tier.index()];
        l.per_salt.get(salt).copied().or(l.default)
    }

    /// Whether `need` more bytes of `salt` fit its limit on `tier` (if any) on top of `kept`.
    pub fn admit(
        &self,
        tier: QuotaTier,
        salt: &str,
        kept: u64,
        need: u64,
    ) -> Result<(), OverQuota> {
        self.limit(tier, salt)
            .map_or(Ok(()), |limit| fit(tier, salt, limit, kept, need))
    }

    /// Set `salt`'s limit on `tier`.
    pub fn set(&self, tier: QuotaTier, salt: &str, bytes: u64) {
        self.inner.write()[tier.index()]
            .per_salt
            .insert(salt.to_string(), bytes);
    }

    /// Remove `salt`'s own limit on `tier` (the default for all salts applies again); whether
    /// it had one.
    pub fn remove(&self, tier: QuotaTier, salt: &str) -> bool {
        self.inner.write()[tier.index()]
            .per_salt
            .remove(salt)
            .is_some()
    }

    /// `salt`'s limit on `tier` as reported, if it has one (its own or the default).
    pub fn entry(&self, tier: QuotaTier, salt: &str) -> Option<QuotaEntry> {
        let l = &self.inner.read()[tier.index()];
        let (bytes, explicit) = match l.per_salt.get(salt) {
            Some(&b) => (b, true),
            None => (l.default?, false),
        };
        Some(Self::report(tier, salt, bytes, explicit))
    }

    /// For each tier in order: every salt's own limit, by name, then the default (salt `"*"`)
    /// if set.
    pub fn entries(&self) -> Vec<QuotaEntry> {
        let all = self.inner.read();
        let mut out = Vec::new();
        for tier in QuotaTier::ALL {
            let l = &all[tier.index()];
            let mut own: Vec<QuotaEntry> = l
                .per_salt
                .iter()
                .map(|(s, &b)| Self::report(tier, s, b, true))
                .collect();
            own.sort_by(|a, b| a.cache_salt.cmp(&b.cache_salt));
            out.extend(own);
            if let Some(b) = l.default {
                let mut d = Self::report(tier, "", b, false);
                d.cache_salt = "*".into();
                out.push(d);
            }
        }
        out
    }

    fn report(tier: QuotaTier, salt: &str, bytes: u64, explicit: bool) -> QuotaEntry {
        QuotaEntry {
            cache_salt: salt_name(salt),
            tier,
            limit_bytes: bytes,
            limit_gb: bytes as f64 / (1u64 << 30) as f64,
            explicit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use QuotaTier::{L1, L2, L3};

    #[test]
    fn own_limits_override_the_default_and_removal_restores_it() {
        let q = Quotas::default();
        q.set_default(L1, Some(100));
        assert_eq!(q.limit(L1, "alice"), Some(100));
        q.set(L1, "alice", 10);
        assert_eq!(q.limit(L1, "alice"), Some(10));
        assert_eq!(q.limit(L1, "bob"), Some(100));
        assert!(q.remove(L1, "alice"));
        assert!(!q.remove(L1, "alice"));
        assert_eq!(q.limit(L1, "alice"), Some(100));
        assert_eq!(Quotas::default().limit(L1, "x"), None);
    }

    #[test]
    fn each_tier_has_its_own_limits() {
        let q = Quotas::default();
        q.set_default(L2, Some(7));
        q.set(L3, "alice", 5);
        assert_eq!(
            (
                q.limit(L1, "alice"),
                q.limit(L2, "alice"),
                q.limit(L3, "alice")
            ),
            (None, Some(7), Some(5))
        );
        assert!(
            !q.remove(L2, "alice"),
            "L2's limit is the default, not hers"
        );
        let tiers: Vec<(QuotaTier, String)> = q
            .entries()
            .into_iter()
            .map(|e| (e.tier, e.cache_salt))
            .collect();
        assert_eq!(tiers, [(L2, "*".to_string()), (L3, "alice".to_string())]);
        assert_eq!(QuotaTier::named("L2"), Some(L2));
        assert_eq!(QuotaTier::named("disk"), None);
    }

    #[test]
    fn the_empty_salt_is_named_default() {
        let q = Quotas::default();
        q.set(L1, salt_from_path("_default"), 1 << 30);
        let e = q.entry(L1, "").unwrap();
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

    #[test]
    fn an_over_quota_refusal_names_the_salt_and_the_tier() {
        let e = OverQuota {
            tier: L2,
            cache_salt: String::new(),
            need_bytes: 3,
            kept_bytes: 2,
            limit_bytes: 4,
        };
        let msg = e.to_string();
        assert!(
            msg.contains("_default") && msg.contains("L2 quota"),
            "{msg}"
        );
    }
}
