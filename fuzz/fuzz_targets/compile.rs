//! Any bytes as a manifest, compiled into a snapshot: never a panic, the
//! SEMANTICS.md endpoint and listener rules hold, compile is deterministic
//! (see `ringvip::testing::compile`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvip::testing::compile(data);
});
