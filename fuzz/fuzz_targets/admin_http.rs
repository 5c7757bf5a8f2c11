//! Any bytes sent to the admin HTTP servers (health, metrics + API,
//! healthCheckNodePort) over loopback: never a panic or a hung connection,
//! only their own answers, and the health check port serves nothing but the
//! health answer (see `ringvip::testing::admin_http`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvip::testing::admin_http(data);
});
