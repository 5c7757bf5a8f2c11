//! ringvip's own per-Service annotations (`ringvip.io/*`) → the typed
//! [`ServiceOptions`]. One function per annotation; every bad value is a
//! [`super::FieldError`] at `metadata.annotations[<name>]`, so `ringvip
//! check` and the file source report it and the running state stays.
//! Unknown `ringvip.io/` annotations are left alone (a newer ringvip's).

use super::Errors;
use crate::balance::maglev::{is_prime, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MIN_TABLE_SIZE};
use crate::model::{Balance, CheckKind, HealthCheckSpec, ProxyProtocol, ServiceOptions};
use std::collections::BTreeMap;
use std::time::Duration;

/// `ringvip.io/balance`: `random` (default), `round-robin`,
/// `least-connections` or `maglev`.
pub const ANNOTATION_BALANCE: &str = "ringvip.io/balance";
/// `ringvip.io/maglev-table-size`: a prime, default 65537 (maglev only).
pub const ANNOTATION_MAGLEV_TABLE_SIZE: &str = "ringvip.io/maglev-table-size";
/// `ringvip.io/slow-start-seconds`: slow-start window, 1..=3600 seconds.
pub const ANNOTATION_SLOW_START: &str = "ringvip.io/slow-start-seconds";

/// Longest slow-start window accepted (an hour).
pub const MAX_SLOW_START_SECS: u64 = 3600;

/// `tcp` or `http:/path`: turns on active health checks of the endpoints.
pub const HEALTH_CHECK: &str = "ringvip.io/health-check";
/// Time between checks of one endpoint (HAProxy `inter`), default 2s.
pub const HEALTH_CHECK_INTERVAL: &str = "ringvip.io/health-check-interval";
/// How long one check may take (HAProxy `timeout check`), default the interval.
pub const HEALTH_CHECK_TIMEOUT: &str = "ringvip.io/health-check-timeout";
/// Consecutive successes that bring an endpoint up (HAProxy `rise`), default 2.
pub const HEALTH_CHECK_RISE: &str = "ringvip.io/health-check-rise";
/// Consecutive failures that take an endpoint down (HAProxy `fall`), default 3.
pub const HEALTH_CHECK_FALL: &str = "ringvip.io/health-check-fall";
/// `v1` or `v2`: a PROXY protocol header before the client's bytes.
pub const PROXY_PROTOCOL: &str = "ringvip.io/proxy-protocol";

/// HAProxy's default `inter`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// HAProxy's default `rise`.
pub const DEFAULT_RISE: u32 = 2;
/// HAProxy's default `fall`.
pub const DEFAULT_FALL: u32 = 3;
/// Shortest interval or timeout accepted: below it checks would load the
/// endpoints more than they tell.
pub const MIN_CHECK_TIME: Duration = Duration::from_millis(100);
/// Largest `rise` or `fall` accepted.
pub const MAX_RISE_FALL: u32 = 1000;

type Annotations = BTreeMap<String, String>;

/// Every ringvip annotation of a Service, parsed; each bad value reported
/// in `errs`.
pub(super) fn options(annotations: Option<&Annotations>, errs: &mut Errors) -> ServiceOptions {
    let empty = Annotations::new();
    let a = annotations.unwrap_or(&empty);
    ServiceOptions {
        balance: balance(a, errs),
        slow_start: slow_start(a, errs),
        health_check: health_check(a, errs),
        proxy_protocol: proxy_protocol(a, errs),
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

/// `ringvip.io/proxy-protocol: v1 | v2`.
fn proxy_protocol(a: &Annotations, errs: &mut Errors) -> Option<ProxyProtocol> {
    let raw = a.get(PROXY_PROTOCOL)?;
    match raw.trim() {
        "v1" => Some(ProxyProtocol::V1),
        "v2" => Some(ProxyProtocol::V2),
        other => {
            errs.push(
                field(PROXY_PROTOCOL),
                format!("unknown PROXY protocol version {other:?} (expected v1 or v2)"),
            );
            None
        }
    }
}

/// `ringvip.io/health-check: tcp | http:/path` with its interval, timeout,
/// rise and fall. The tuning annotations without the check are an error
/// (they would silently do nothing).
fn health_check(a: &Annotations, errs: &mut Errors) -> Option<HealthCheckSpec> {
    let interval = check_time(a, HEALTH_CHECK_INTERVAL, errs);
    let timeout = check_time(a, HEALTH_CHECK_TIMEOUT, errs);
    let rise = count(a, HEALTH_CHECK_RISE, errs);
    let fall = count(a, HEALTH_CHECK_FALL, errs);
    let Some(raw) = a.get(HEALTH_CHECK) else {
        for name in [
            HEALTH_CHECK_INTERVAL,
            HEALTH_CHECK_TIMEOUT,
            HEALTH_CHECK_RISE,
            HEALTH_CHECK_FALL,
        ] {
            if a.contains_key(name) {
                errs.push(
                    field(name),
                    format!("has no effect without {HEALTH_CHECK} (tcp or http:/path)"),
                );
            }
        }
        return None;
    };
    let kind = errs.ok(field(HEALTH_CHECK), check_kind(raw))?;
    let interval = interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
    Some(HealthCheckSpec {
        kind,
        interval,
        timeout: timeout.unwrap_or(interval),
        rise: rise.unwrap_or(DEFAULT_RISE),
        fall: fall.unwrap_or(DEFAULT_FALL),
    })
}

/// `tcp` or `http:/path`.
fn check_kind(raw: &str) -> Result<CheckKind, String> {
    let raw = raw.trim();
    if raw == "tcp" {
        return Ok(CheckKind::Tcp);
    }
    match raw.strip_prefix("http:") {
        Some(path) if path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(CheckKind::Http {
                path: path.to_string(),
            })
        }
        Some(path) => Err(format!(
            "HTTP check path {path:?} must start with / and hold no spaces or control characters"
        )),
        None => Err(format!(
            "unknown health check {raw:?} (expected tcp or http:/path)"
        )),
    }
}

/// A time in HAProxy's format (a number with an optional unit `us`, `ms`,
/// `s`, `m`, `h`, `d`; no unit means milliseconds), at least 100 ms.
fn check_time(a: &Annotations, name: &str, errs: &mut Errors) -> Option<Duration> {
    let raw = a.get(name)?;
    errs.ok(field(name), haproxy_time(raw))
}

/// Parses HAProxy's time format.
pub fn haproxy_time(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let bad =
        || format!("{raw:?} is not a time (e.g. 500ms, 2s, 1m; a bare number is milliseconds)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "us" => Duration::from_micros(n),
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(bad()),
    };
    if d < MIN_CHECK_TIME {
        return Err(format!("{raw:?} is shorter than the minimum of 100ms"));
    }
    Ok(d)
}

/// `rise` or `fall`: 1..=1000.
fn count(a: &Annotations, name: &str, errs: &mut Errors) -> Option<u32> {
    let raw = a.get(name)?;
    let r = match raw.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_RISE_FALL).contains(&n) => Ok(n),
        _ => Err(format!("{raw:?} is not a count in 1..{MAX_RISE_FALL}")),
    };
    errs.ok(field(name), r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (ServiceOptions, Vec<String>) {
        let a: Annotations = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut errs = Errors::default();
        let o = options(Some(&a), &mut errs);
        (o, errs.0.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn no_annotations_ask_for_nothing() {
        let (o, e) = parse(&[("other.io/x", "y")]);
        assert_eq!(o, ServiceOptions::default());
        assert!(e.is_empty());
    }

    #[test]
    fn health_check_defaults_are_haproxys() {
        let (o, e) = parse(&[(HEALTH_CHECK, "http:/healthz")]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            o.health_check,
            Some(HealthCheckSpec {
                kind: CheckKind::Http {
                    path: "/healthz".into()
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(2),
                rise: 2,
                fall: 3,
            })
        );
        let (o, e) = parse(&[
            (HEALTH_CHECK, "tcp"),
            (HEALTH_CHECK_INTERVAL, "500"),
            (HEALTH_CHECK_TIMEOUT, "1s"),
            (HEALTH_CHECK_RISE, "1"),
            (HEALTH_CHECK_FALL, "5"),
        ]);
        assert!(e.is_empty(), "{e:?}");
        let hc = o.health_check.unwrap();
        assert_eq!(hc.kind, CheckKind::Tcp);
        assert_eq!(hc.interval, Duration::from_millis(500), "bare number is ms");
        assert_eq!(hc.timeout, Duration::from_secs(1));
        assert_eq!((hc.rise, hc.fall), (1, 5));
    }

    #[test]
    fn every_bad_value_is_reported_at_its_annotation() {
        let (o, e) = parse(&[
            (HEALTH_CHECK, "udp"),
            (HEALTH_CHECK_INTERVAL, "2 parsecs"),
            (HEALTH_CHECK_TIMEOUT, "10ms"),
            (HEALTH_CHECK_RISE, "0"),
            (HEALTH_CHECK_FALL, "-1"),
            (PROXY_PROTOCOL, "v3"),
        ]);
        assert_eq!(o, ServiceOptions::default());
        let want = [
            "metadata.annotations[ringvip.io/health-check-interval]: \"2 parsecs\" is not a time",
            "metadata.annotations[ringvip.io/health-check-timeout]: \"10ms\" is shorter than the minimum of 100ms",
            "metadata.annotations[ringvip.io/health-check-rise]: \"0\" is not a count in 1..1000",
            "metadata.annotations[ringvip.io/health-check-fall]: \"-1\" is not a count in 1..1000",
            "metadata.annotations[ringvip.io/health-check]: unknown health check \"udp\" (expected tcp or http:/path)",
            "metadata.annotations[ringvip.io/proxy-protocol]: unknown PROXY protocol version \"v3\" (expected v1 or v2)",
        ];
        assert_eq!(e.len(), want.len(), "{e:#?}");
        for w in want {
            assert!(e.iter().any(|m| m.starts_with(w)), "{w} not in {e:#?}");
        }
        let (_, e) = parse(&[(HEALTH_CHECK, "http:healthz")]);
        assert!(e[0].contains("must start with /"), "{e:?}");
        let (_, e) = parse(&[(HEALTH_CHECK_RISE, "2")]);
        assert!(e[0].contains("has no effect without"), "{e:?}");
    }

    #[test]
    fn proxy_protocol_versions() {
        assert_eq!(
            parse(&[(PROXY_PROTOCOL, "v1")]).0.proxy_protocol,
            Some(ProxyProtocol::V1)
        );
        assert_eq!(
            parse(&[(PROXY_PROTOCOL, "v2")]).0.proxy_protocol,
            Some(ProxyProtocol::V2)
        );
    }
}
