//! Transports only: they move bytes and hand decoded requests to `ops`.

pub mod mp;
