//! Fuzzes the TUN packet path: classification against a snapshot, then the
//! smoltcp stack, with held SYNs answered as if a backend accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvip::dataplane::tun::stack::{ingest_offline, sample_snapshot, Stack, TunSettings};
use std::sync::OnceLock;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    static SNAP: OnceLock<ringvip::state::Snapshot> = OnceLock::new();
    let snap = SNAP.get_or_init(|| sample_snapshot(true));
    let mut stack = Stack::new(TunSettings::default(), Duration::from_secs(30));
    ingest_offline(&mut stack, snap, data);
});
