//! Transports only: they move bytes and hand decoded requests to `ops`.

pub mod http;
pub mod lm;
pub mod mp;
pub mod quota;
