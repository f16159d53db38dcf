//! Tenant quotas as requests: what `PUT/GET/DELETE /quota/{cache_salt}`, `GET /quota` and the
//! MCP tools `quota_set`, `quota_get`, `quota_delete`, `quota_list` do, with no transport in
//! it. The HTTP routes (`server::quota`) and the tools (`mcp`) only map these results to their
//! own shapes (status codes, tool errors).
//!
//! A salt is named as on LMCache's coordinator: `_default` is the empty salt. The limits
//! themselves and their enforcement live in `store::quota`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::quota::{gb_to_bytes, salt_from_path, QuotaEntry, QuotaTier, DEFAULT_SALT_NAME};
use crate::store::tiered::Tiers;

/// Salts listed one by one in a quota listing (the rest are summed as "other").
pub const TOP_SALTS: usize = 20;

/// A request to set one salt's limit.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    /// The limit in GiB (a number >= 0).
    pub limit_gb: f64,
    /// The tier it bounds: "l1" (the default; the only one enforced so far).
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
    #[error("tier {0:?}: quotas on the durable tiers are not enforced yet; only \"l1\"")]
    TierNotEnforced(QuotaTier),
    #[error("cache_salt {0:?} has no quota of its own")]
    NoOwnQuota(String),
}

/// One salt's limit and what it uses now.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaltQuota {
    /// The salt, `_default` for the empty one.
    pub cache_salt: String,
    /// Its limit: its own, or the default for every salt; none if neither is set.
    pub quota: Option<QuotaEntry>,
    pub usage: SaltUsage,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaltUsage {
    pub l1_bytes: u64,
}

/// Every limit and the salts using the most of L1.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct QuotaList {
    /// Each salt's own limit, by name, then the default for all (salt `"*"`) if set.
    pub quotas: Vec<QuotaEntry>,
    pub usage: UsageSummary,
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

/// The salt a name stands for, checked as a request's salt would be.
fn salt(name: &str) -> Result<&str, QuotaError> {
    let salt = salt_from_path(name);
    connector_protocol::validate_cache_salt(salt)
        .map_err(|e| QuotaError::BadSalt(name.to_string(), e.to_string()))?;
    Ok(salt)
}

fn shown(salt: &str) -> String {
    if salt.is_empty() {
        DEFAULT_SALT_NAME
    } else {
        salt
    }
    .to_string()
}

/// Set the limit of the salt `name`; its entry as it now stands.
pub fn set(tiers: &Tiers, name: &str, req: &SetQuota) -> Result<QuotaEntry, QuotaError> {
    let salt = salt(name)?;
    if req.tier != QuotaTier::L1 {
        return Err(QuotaError::TierNotEnforced(req.tier));
    }
    let bytes = gb_to_bytes(req.limit_gb).ok_or(QuotaError::BadLimit(req.limit_gb))?;
    tiers.quotas().set(salt, bytes);
    tracing::info!(cache_salt = %salt, limit_bytes = bytes, "L1 quota set");
    Ok(tiers.quotas().entry(salt).expect("a limit was just set"))
}

/// The salt `name`'s limit and usage.
pub fn get(tiers: &Tiers, name: &str) -> Result<SaltQuota, QuotaError> {
    let salt = salt(name)?;
    let l1_bytes = tiers
        .salt_usage()
        .into_iter()
        .find(|(s, _)| &**s == salt)
        .map_or(0, |(_, b)| b);
    Ok(SaltQuota {
        cache_salt: shown(salt),
        quota: tiers.quotas().entry(salt),
        usage: SaltUsage { l1_bytes },
    })
}

/// Remove the salt `name`'s own limit; what applies to it now (the default, if any).
pub fn remove(tiers: &Tiers, name: &str) -> Result<Option<QuotaEntry>, QuotaError> {
    let salt = salt(name)?;
    if !tiers.quotas().remove(salt) {
        return Err(QuotaError::NoOwnQuota(name.to_string()));
    }
    tracing::info!(cache_salt = %salt, "L1 quota removed");
    Ok(tiers.quotas().entry(salt))
}

/// Every limit, and who uses L1.
pub fn list(tiers: &Tiers) -> QuotaList {
    let usage = tiers.salt_usage();
    QuotaList {
        quotas: tiers.quotas().entries(),
        usage: UsageSummary {
            top: usage
                .iter()
                .take(TOP_SALTS)
                .map(|(s, b)| SaltBytes {
                    cache_salt: shown(s),
                    l1_bytes: *b,
                })
                .collect(),
            other_l1_bytes: usage.iter().skip(TOP_SALTS).map(|(_, b)| b).sum(),
            salts: usage.len(),
        },
    }
}
