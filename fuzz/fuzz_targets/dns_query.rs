//! Any bytes as a DNS query: never a panic, and every response well-formed
//! (see `ringvip::dns::fuzz_one`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvip::dns::fuzz_one(data);
});
