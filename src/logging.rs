//! The process's log lines on stderr (tracing): text, coloured only when
//! stderr is a terminal, or JSON lines (`--log-format json`). The level
//! filter comes from `RINGVIP_LOG` (tracing's env-filter syntax).

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber: `format` lines on stderr, at
/// `RINGVIP_LOG`'s levels or else `default_level`. Call once, first thing.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGVIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Escapes only for a terminal: a file or pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.event_format(JsonLines).init(),
    }
}

/// One JSON object per event: `timestamp` (RFC 3339, UTC), `level`,
/// `target`, `spans` (names, outermost first, when inside any), `message`,
/// then the event's fields (a field named like one of these keys is written
/// as `field.<name>`).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut obj = Map::new();
        obj.insert(
            "timestamp".into(),
            jiff::Timestamp::now().to_string().into(),
        );
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|s| s.name().into()).collect();
            obj.insert("spans".into(), spans.into());
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(m) = fields.message {
            obj.insert("message".into(), m);
        }
        for (k, v) in fields.rest {
            let key = if obj.contains_key(&k) {
                format!("field.{k}")
            } else {
                k
            };
            obj.insert(key, v);
        }
        writeln!(writer, "{}", Value::Object(obj))
    }
}

/// An event's fields as JSON values, in the order recorded.
#[derive(Default)]
struct Fields {
    message: Option<Value>,
    rest: Vec<(String, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: Value) {
        if field.name() == "message" {
            self.message = Some(v);
        } else {
            self.rest.push((field.name().to_string(), v));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields arrive here too, Display-formatted.
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::Buffer;
    use tracing_subscriber::fmt::MakeWriter;

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_hold_level_message_and_typed_fields() {
        let buf = Buffer::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("sync");
            let _g = span.enter();
            let addr: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
            tracing::warn!(generation = 7u64, ok = true, %addr, level = "x", "snapshot \"published\"");
        });
        let text = buf.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "snapshot \"published\"");
        assert_eq!(v["generation"], 7);
        assert_eq!(v["ok"], true);
        assert_eq!(v["addr"], "127.0.0.1:80");
        assert_eq!(v["field.level"], "x");
        assert_eq!(v["spans"], serde_json::json!(["sync"]));
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
