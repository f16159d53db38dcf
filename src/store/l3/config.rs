//! What L3 is told: where Redis is, how to authenticate, what to write and how long to wait.
//! The password is a secret: it never appears in `Debug`, logs or `/status` (see `redacted`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::store::quota::Quotas;
use crate::store::seal::Sealer;

/// Which stored chunks write-behind pushes to L3. Frozen windows are always pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePolicy {
    /// Every chunk committed to L1.
    Always,
    /// Only chunks of frozen windows (pushed by `window_freeze`).
    Frozen,
    /// Nothing: L3 is read-only for this node (windows are still published).
    Never,
}

impl WritePolicy {
    pub fn parse(s: &str) -> Option<WritePolicy> {
        match s {
            "always" => Some(WritePolicy::Always),
            "frozen" => Some(WritePolicy::Frozen),
            "never" => Some(WritePolicy::Never),
            _ => None,
        }
    }
}

/// A single Redis or the seed nodes of a Redis Cluster.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoints {
    Single(String),
    Cluster(Vec<String>),
}

#[derive(Clone)]
pub struct L3Config {
    pub endpoints: Endpoints,
    /// Overrides the URL's password (`CWM_L3_PASSWORD`).
    pub password: Option<String>,
    /// PEM file of the CA that signed the servers' certificates (`rediss://`); without it the
    /// system's roots are used.
    pub tls_ca: Option<PathBuf>,
    pub namespace: String,
    pub write: WritePolicy,
    /// Deadline of one L3 operation (a batch of existence checks, reads or writes).
    pub timeout: Duration,
    /// Connections per node.
    pub connections: usize,
    /// TTL of cache chunks (windows have none), so `volatile-lru` evicts cache before windows.
    pub ttl: Duration,
    /// Seals the records L3 encodes and opens the sealed values it reads (`store::seal`).
    pub sealer: Sealer,
    /// Per-salt byte budgets; L3's own (`QuotaTier::L3`) bound each salt's records in Redis,
    /// fleet-wide (`ledger`).
    pub quotas: Arc<Quotas>,
}

impl std::fmt::Debug for L3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L3Config")
            .field("endpoints", &self.endpoints_redacted())
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("namespace", &self.namespace)
            .field("write", &self.write)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .field("ttl", &self.ttl)
            .field("sealer", &self.sealer)
            .finish()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum L3ConfigError {
    #[error("L3 URL {0}: expected redis://[user[:password]@]host[:port][/db] or rediss://…")]
    Url(String),
    #[error("l3_namespace {0:?}: expected 1-64 characters of [A-Za-z0-9_.-]")]
    Namespace(String),
}

impl L3Config {
    /// The URLs with any password replaced by `***`: safe to log and show.
    pub fn endpoints_redacted(&self) -> Vec<String> {
        match &self.endpoints {
            Endpoints::Single(u) => vec![redacted(u)],
            Endpoints::Cluster(us) => us.iter().map(|u| redacted(u)).collect(),
        }
    }

    pub fn validate(&self) -> Result<(), L3ConfigError> {
        let urls = match &self.endpoints {
            Endpoints::Single(u) => std::slice::from_ref(u),
            Endpoints::Cluster(us) => us.as_slice(),
        };
        if urls.is_empty() {
            return Err(L3ConfigError::Url("(no seed node)".into()));
        }
        for u in urls {
            let ok = (u.starts_with("redis://") || u.starts_with("rediss://"))
                && redis::parse_redis_url(u).is_some();
            if !ok {
                return Err(L3ConfigError::Url(redacted(u)));
            }
        }
        if !valid_namespace(&self.namespace) {
            return Err(L3ConfigError::Namespace(self.namespace.clone()));
        }
        Ok(())
    }
}

/// Namespaces are plain names: the key layout relies on them holding no `{` `}` or `:`.
pub fn valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `url` with the password of its userinfo replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: Endpoints, password: Option<&str>) -> L3Config {
        L3Config {
            endpoints,
            password: password.map(String::from),
            tls_ca: None,
            namespace: "cwm".into(),
            write: WritePolicy::Always,
            timeout: Duration::from_secs(1),
            connections: 1,
            ttl: Duration::from_secs(1),
            sealer: Sealer::default(),
            quotas: Arc::default(),
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("redis://cwm:s3cret@127.0.0.1:6379/0"),
            "redis://cwm:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("rediss://:pw@h:1"),
            "rediss://:***@h:1",
            "password-only userinfo"
        );
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        assert_eq!(redacted("redis://user@h:1"), "redis://user@h:1");
        let c = config(
            Endpoints::Cluster(vec!["redis://a:topsecret@h:1".into()]),
            Some("alsosecret"),
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("alsosecret"),
            "{shown}"
        );
    }

    #[test]
    fn bad_urls_and_namespaces_are_refused_without_showing_the_password() {
        let mut c = config(Endpoints::Single("http://u:pw@h".into()), None);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("http://u:***@h") && !e.contains("pw@"), "{e}");
        c.endpoints = Endpoints::Single("redis://127.0.0.1:6379".into());
        c.validate().unwrap();
        for ns in ["", "a{b}", "a:b", &"x".repeat(65)] {
            c.namespace = ns.into();
            assert!(c.validate().is_err(), "namespace {ns:?} accepted");
        }
    }
}
