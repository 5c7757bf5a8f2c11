//! Fuzzes the TUN packet path: classification against a snapshot, then the
//! smoltcp stack, with held SYNs answered as if a backend accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvip::dataplane::tun::stack::{Stack, TunSettings};
use ringvip::testing::tun::{ingest_offline, sample_snapshot};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static SNAP: OnceLock<ringvip::state::Snapshot> = OnceLock::new();
    let snap = SNAP.get_or_init(|| sample_snapshot(true));
    let mut stack = Stack::new(TunSettings::default());
    ingest_offline(&mut stack, snap, data);
});
