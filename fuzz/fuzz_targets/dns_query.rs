//! Any bytes as a DNS query: never a panic, and every response well-formed
//! (see `ringvip::testing::dns_query`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvip::testing::dns_query(data);
});
