//! `register_kv_cache`'s descriptor list (ext-1 `DeviceIPCWrapper`s): no input may panic, and
//! supported lists must round-trip through our encoder.
#![no_main]

#[allow(dead_code)]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::descriptors(data);
    // The metadata decoder on its own (forbids unknown fields).
    common::typed::<connector_protocol::TensorMetadata>("metadata", data);
});
