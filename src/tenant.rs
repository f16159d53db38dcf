//! Tenant quotas as requests: what `PUT/GET/DELETE /quota/{cache_salt}`, `GET /quota` and the
//! MCP tools `quota_set`, `quota_get`, `quota_delete`, `quota_list` do, with no transport in
//! it. The HTTP routes (`server::quota`) and the tools (`mcp`) only map these results to their
//! own shapes (status codes, tool errors). `/status` and `/metrics` report usage through
//! `usage`.
//!
//! A salt is named as on LMCache's coordinator: `_default` is the empty salt. A limit names a
//! tier (`l1`, `l2`, `l3`; `l1` when left out). The limits themselves: `store::quota`; their
//! enforcement: each tier's admission.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::quota::{gb_to_bytes, salt_from_path, salt_name, QuotaEntry, QuotaTier};
use crate::store::tiered::Tiers;

/// Salts listed one by one in a usage report (the rest are summed as "other").
pub const TOP_SALTS: usize = 20;

/// A request to set one salt's limit.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    /// The limit in GiB (a number >= 0).
    pub limit_gb: f64,
    /// The tier it bounds: "l1" (memory; the default), "l2" (disk, frozen windows included)
    /// or "l3" (Redis, counted for the whole fleet).
    #[serde(default = "l1")]
    pub tier: QuotaTier,
}

fn l1() -> QuotaTier {
    QuotaTier::L1
}

/// Why a quota request was refused. Nothing changed.
#[derive(Debug, Error)]
pub enum QuotaError {
    #[error("invalid cache_salt {0:?}: {1}")]
    BadSalt(String, String),
    #[error("limit_gb {0}: want a number >= 0")]
    BadLimit(f64),
    #[error("tier {0}: this sidecar has no such tier (L2 needs --l2-size-gb, L3 --l3-url)")]
    NoSuchTier(QuotaTier),
    #[error("cache_salt {salt:?} has no quota of its own{}", .tier.map(|t| format!(" on {t}")).unwrap_or_default())]
    NoOwnQuota {
        salt: String,
        tier: Option<QuotaTier>,
    },
}

/// One salt's limit and what it uses now, on every tier.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaltQuota {
    /// The salt, `_default` for the empty one.
    pub cache_salt: String,
    /// Its L1 limit: its own, or the default for every salt; none if neither is set.
    pub quota: Option<QuotaEntry>,
    /// Its L1 usage.
    pub usage: SaltUsage,
    /// Each tier of this sidecar: the salt's limit there and what it uses.
    pub tiers: Vec<TierQuota>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaltUsage {
    pub l1_bytes: u64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TierQuota {
    pub tier: QuotaTier,
    /// Its own limit there, or the default for every salt; none if neither is set.
    pub limit: Option<QuotaEntry>,
    /// Bytes it occupies there (L3: the whole fleet's, from Redis).
    pub used_bytes: u64,
}

/// Every limit and the salts using the most of each tier.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct QuotaList {
    /// For each tier in order: each salt's own limit, by name, then the default for all
    /// (salt `"*"`) if set.
    pub quotas: Vec<QuotaEntry>,
    /// Who uses L1.
    pub usage: UsageSummary,
    /// Who uses each tier of this sidecar.
    pub tiers: Vec<TierUsage>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct UsageSummary {
    /// The salts using the most of L1, largest first (at most `TOP_SALTS`).
    pub top: Vec<SaltBytes>,
    /// L1 bytes of every other salt together.
    pub other_l1_bytes: u64,
    /// How many salts hold anything in L1.
    pub salts: usize,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaltBytes {
    pub cache_salt: String,
    pub l1_bytes: u64,
}

/// Who uses one tier: the largest salts and the rest together (bounded, whatever the number
/// of salts: `/metrics` labels come from here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TierUsage {
    pub tier: String,
    /// The salts using the most, largest first (at most `TOP_SALTS`).
    pub top: Vec<SaltUse>,
    /// Bytes of every other salt together.
    pub other_bytes: u64,
    /// How many salts hold anything there.
    pub salts: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SaltUse {
    pub cache_salt: String,
    pub bytes: u64,
}

/// The salt a name stands for, checked as a request's salt would be.
fn salt(name: &str) -> Result<&str, QuotaError> {
    let salt = salt_from_path(name);
    connector_protocol::validate_cache_salt(salt)
        .map_err(|e| QuotaError::BadSalt(name.to_string(), e.to_string()))?;
    Ok(salt)
}

fn tier_here(tiers: &Tiers, tier: QuotaTier) -> Result<QuotaTier, QuotaError> {
    if tiers.quota_tiers().contains(&tier) {
        Ok(tier)
    } else {
        Err(QuotaError::NoSuchTier(tier))
    }
}

/// Set the limit of the salt `name` on the tier `req` names; its entry as it now stands.
pub fn set(tiers: &Tiers, name: &str, req: &SetQuota) -> Result<QuotaEntry, QuotaError> {
    let salt = salt(name)?;
    let bytes = gb_to_bytes(req.limit_gb).ok_or(QuotaError::BadLimit(req.limit_gb))?;
    let tier = tier_here(tiers, req.tier)?;
    tiers.quotas().set(tier, salt, bytes);
    tracing::info!(cache_salt = %salt, %tier, limit_bytes = bytes, "quota set");
    Ok(tiers
        .quotas()
        .entry(tier, salt)
        .expect("a limit was just set"))
}

/// The salt `name`'s limits and usage on every tier.
pub fn get(tiers: &Tiers, name: &str) -> Result<SaltQuota, QuotaError> {
    let salt = salt(name)?;
    let tiers_report: Vec<TierQuota> = tiers
        .usage_by_tier()
        .into_iter()
        .map(|(tier, usage)| TierQuota {
            tier,
            limit: tiers.quotas().entry(tier, salt),
            used_bytes: usage
                .into_iter()
                .find(|(s, _)| &**s == salt)
                .map_or(0, |(_, b)| b),
        })
        .collect();
    Ok(SaltQuota {
        cache_salt: salt_name(salt),
        quota: tiers.quotas().entry(QuotaTier::L1, salt),
        usage: SaltUsage {
            l1_bytes: tiers_report[0].used_bytes,
        },
        tiers: tiers_report,
    })
}

/// Remove the salt `name`'s own limit on `tier`, or on every tier; the tiers it had one on.
pub fn remove(
    tiers: &Tiers,
    name: &str,
    tier: Option<QuotaTier>,
) -> Result<Vec<QuotaTier>, QuotaError> {
    let salt = salt(name)?;
    let removed: Vec<QuotaTier> = match tier {
        Some(t) => vec![t],
        None => QuotaTier::ALL.to_vec(),
    }
    .into_iter()
    .filter(|&t| tiers.quotas().remove(t, salt))
    .collect();
    if removed.is_empty() {
        return Err(QuotaError::NoOwnQuota {
            salt: name.to_string(),
            tier,
        });
    }
    tracing::info!(cache_salt = %salt, tiers = ?removed, "quota removed");
    Ok(removed)
}

/// Every limit, and who uses each tier.
pub fn list(tiers: &Tiers) -> QuotaList {
    let by_tier = usage(tiers);
    let l1 = &by_tier[0];
    QuotaList {
        quotas: tiers.quotas().entries(),
        usage: UsageSummary {
            top: l1
                .top
                .iter()
                .map(|s| SaltBytes {
                    cache_salt: s.cache_salt.clone(),
                    l1_bytes: s.bytes,
                })
                .collect(),
            other_l1_bytes: l1.other_bytes,
            salts: l1.salts,
        },
        tiers: by_tier,
    }
}

/// Who uses each tier here (L1 first): the `TOP_SALTS` largest salts and the rest together.
pub fn usage(tiers: &Tiers) -> Vec<TierUsage> {
    tiers
        .usage_by_tier()
        .into_iter()
        .map(|(tier, usage)| TierUsage {
            tier: tier.name().to_string(),
            top: usage
                .iter()
                .take(TOP_SALTS)
                .map(|(s, b)| SaltUse {
                    cache_salt: salt_name(s),
                    bytes: *b,
                })
                .collect(),
            other_bytes: usage.iter().skip(TOP_SALTS).map(|(_, b)| b).sum(),
            salts: usage.len(),
        })
        .collect()
}
