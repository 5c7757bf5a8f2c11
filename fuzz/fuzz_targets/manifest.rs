//! Any bytes as a manifest file, parsed as YAML and as JSON: never a panic,
//! every error names the file, every object valid (see
//! `ringvip::testing::manifest`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvip::testing::manifest(data);
});
