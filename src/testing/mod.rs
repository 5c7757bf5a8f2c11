//! Test and fuzz support, compiled only for unit tests and with the
//! `testing` feature (benches, the fuzz crate): nothing here ships.
//!
//! - the fuzz oracles, entry points of the cargo-fuzz targets in fuzz/ and
//!   replayed over their checked-in corpora by the tests below: [`manifest`],
//!   [`compile`], [`admin_http`], [`dns_query`]. Each runs the production code
//!   on the input and panics when a result breaks a rule that must hold for
//!   any input — panicking is how an oracle reports;
//! - [`builders`]: the Services, EndpointSlices, node contexts and stores that
//!   unit tests and benches build;
//! - [`engine`]: the io_uring engine alone on loopback.
// Test support: a panic here is a test's (or a fuzzer's) report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod admin_http;
pub mod builders;
mod compile;
mod dns;
pub mod engine;
mod manifest;
pub mod scale;
pub mod tun;

pub use admin_http::admin_http;
pub use compile::{check_snapshot, compile, listeners_in, node_context, normalized};
pub use dns::dns_query;
pub use manifest::{check_object, manifest, manifest_text};

/// Runs `f` to completion on a current-thread runtime with a `LocalSet`,
/// as the data-plane and TUN threads run (`spawn_local` works inside).
pub fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Replays a checked-in corpus directory through `oracle`; the number of files.
pub fn replay(dir: &std::path::Path, oracle: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("{}: no corpus", dir.display())
    };
    let mut n = 0;
    for e in entries.flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            panic!("{}: unreadable", e.path().display())
        };
        oracle(&data);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Update;
    use crate::state::{ListenerMode, Store};
    use crate::telemetry::Metrics;

    fn corpus(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name)
    }

    /// A fuzz oracle: panics when its input breaks a rule.
    type Oracle = fn(&[u8]);

    /// Every oracle replays its checked-in corpus, of at least ten inputs.
    #[test]
    fn corpora_replay() {
        let oracles: [(&str, Oracle); 4] = [
            ("manifest", manifest),
            ("compile", compile),
            ("dns_query", dns_query),
            ("admin_http", admin_http),
        ];
        for (name, oracle) in oracles {
            let n = replay(&corpus(name), oracle);
            assert!(n >= 10, "{name} corpus too small: {n}");
        }
    }

    /// The compile seeds are real: together they give frontends with
    /// endpoints, listeners of both modes and health checks.
    #[test]
    fn compile_seeds_cover_listeners_and_health_checks() {
        let mut accept = 0;
        let mut drop = 0;
        let mut checks = 0;
        for e in std::fs::read_dir(corpus("compile")).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
            let objects = manifest_text("seed.yaml", &text);
            let mut st = Store::new();
            st.apply(Update::Reset(objects));
            let snap = st.compile(&node_context(), &Metrics::new(), 1);
            accept += listeners_in(&snap, ListenerMode::Accept);
            drop += listeners_in(&snap, ListenerMode::Drop);
            checks += snap.health_checks.len();
        }
        assert!(
            accept > 0 && drop > 0 && checks > 0,
            "{accept} {drop} {checks}"
        );
    }
}
