//! A small HTTP client for the admin routes of a test's sidecar (`/quota`, `/metrics`, ...).

use reqwest::StatusCode;
use serde_json::Value;

pub struct Http {
    pub rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub fn new(s: &cwm::serve::Sidecar) -> Http {
        Http {
            rt: super::runtime(),
            client: reqwest::Client::new(),
            base: format!("http://{}", s.http_addr),
        }
    }

    pub fn send(&self, method: reqwest::Method, path: &str, body: &str) -> (StatusCode, Value) {
        let req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(std::time::Duration::from_secs(30))
            .body(body.to_string());
        self.rt.block_on(async {
            let r = req.send().await.expect("the request gets an answer");
            let status = r.status();
            let text = r.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }

    pub fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, "")
    }

    pub fn put(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, body)
    }

    pub fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, "")
    }

    /// `salt`'s L1 bytes (`GET /quota/{salt}`).
    pub fn used(&self, salt: &str) -> u64 {
        self.used_on(salt, "l1")
    }

    /// `salt`'s bytes on `tier` ("l1", "l2", "l3").
    pub fn used_on(&self, salt: &str, tier: &str) -> u64 {
        let (st, v) = self.get(&format!("/quota/{salt}"));
        assert_eq!(st, StatusCode::OK, "{v}");
        v["tiers"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["tier"] == tier))
            .and_then(|t| t["used_bytes"].as_u64())
            .unwrap_or_else(|| panic!("no {tier} usage in {v}"))
    }

    /// The value of the unlabelled series `name` in `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, m) = self.get("/metrics");
        let m = m.as_str().expect("metrics are text").to_string();
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
    }
}

/// Bytes as the GiB a quota request carries (exact: a power-of-two division).
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
