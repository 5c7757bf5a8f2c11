//! ringvip's own per-Service annotations (`ringvip.io/*`) → the typed
//! [`ServiceOptions`]. One function per annotation; every bad value is a
//! [`super::FieldError`] at `metadata.annotations[<name>]`, so `ringvip
//! check` and the file source report it and the running state stays.
//! Unknown `ringvip.io/` annotations are left alone (a newer ringvip's).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Errors;
use crate::balance::maglev::{is_prime, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MIN_TABLE_SIZE};
use crate::model::{Balance, ServiceOptions};

/// `ringvip.io/balance`: `random` (default), `round-robin`,
/// `least-connections` or `maglev`.
pub const ANNOTATION_BALANCE: &str = "ringvip.io/balance";
/// `ringvip.io/maglev-table-size`: a prime, default 65537 (maglev only).
pub const ANNOTATION_MAGLEV_TABLE_SIZE: &str = "ringvip.io/maglev-table-size";
/// `ringvip.io/slow-start-seconds`: slow-start window, 1..=3600 seconds.
pub const ANNOTATION_SLOW_START: &str = "ringvip.io/slow-start-seconds";

/// Longest slow-start window accepted (an hour).
pub const MAX_SLOW_START_SECS: u64 = 3600;

/// Parses every `ringvip.io/*` annotation of a Service, reporting each bad
/// value in `errs`.
pub(super) fn options(meta: &ObjectMeta, errs: &mut Errors) -> ServiceOptions {
    let empty = BTreeMap::new();
    let a = meta.annotations.as_ref().unwrap_or(&empty);
    ServiceOptions {
        balance: balance(a, errs),
        slow_start: slow_start(a, errs),
    }
}

fn field(name: &str) -> String {
    format!("metadata.annotations[{name}]")
}

/// `ringvip.io/balance` with `ringvip.io/maglev-table-size`.
fn balance(a: &BTreeMap<String, String>, errs: &mut Errors) -> Balance {
    let table_size = maglev_table_size(a, errs);
    let raw = a.get(ANNOTATION_BALANCE).map_or("random", |s| s.trim());
    let b = match raw {
        "random" => Balance::Random,
        "round-robin" => Balance::RoundRobin,
        "least-connections" => Balance::LeastConnections,
        "maglev" => Balance::Maglev { table_size },
        other => {
            errs.push(
                field(ANNOTATION_BALANCE),
                format!(
                    "unknown balancing {other:?} (expected random, round-robin, least-connections or maglev)"
                ),
            );
            Balance::Random
        }
    };
    if a.contains_key(ANNOTATION_MAGLEV_TABLE_SIZE) && !matches!(b, Balance::Maglev { .. }) {
        errs.push(
            field(ANNOTATION_MAGLEV_TABLE_SIZE),
            format!("only meaningful with {ANNOTATION_BALANCE}: maglev"),
        );
    }
    b
}

/// `ringvip.io/maglev-table-size`: a prime in range, default 65537.
fn maglev_table_size(a: &BTreeMap<String, String>, errs: &mut Errors) -> u32 {
    let Some(raw) = a.get(ANNOTATION_MAGLEV_TABLE_SIZE) else {
        return DEFAULT_TABLE_SIZE;
    };
    let r = match raw.trim().parse::<u32>() {
        Ok(n) if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&n) => Err(format!(
            "{n} is out of range {MIN_TABLE_SIZE}..{MAX_TABLE_SIZE}"
        )),
        Ok(n) if !is_prime(n) => Err(format!(
            "{n} is not a prime (Maglev needs a prime table size, e.g. 65537)"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{raw:?} is not a whole number")),
    };
    errs.ok(field(ANNOTATION_MAGLEV_TABLE_SIZE), r)
        .unwrap_or(DEFAULT_TABLE_SIZE)
}

/// `ringvip.io/slow-start-seconds`: whole seconds, 1..=3600; 0 turns it off.
fn slow_start(a: &BTreeMap<String, String>, errs: &mut Errors) -> Option<Duration> {
    let raw = a.get(ANNOTATION_SLOW_START)?;
    let r = match raw.trim().parse::<u64>() {
        Ok(0) => return None,
        Ok(n) if n > MAX_SLOW_START_SECS => Err(format!(
            "{n} is out of range 0..{MAX_SLOW_START_SECS} seconds"
        )),
        Ok(n) => Ok(Duration::from_secs(n)),
        Err(_) => Err(format!(
            "{raw:?} is not a whole number of seconds (0..{MAX_SLOW_START_SECS})"
        )),
    };
    errs.ok(field(ANNOTATION_SLOW_START), r)
}
