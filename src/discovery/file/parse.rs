//! Manifest text → model objects: YAML (multi-document, `kind: List`) or JSON,
//! every error with its file, line and, when known, column and field.

use std::collections::HashMap;
use std::path::Path;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use tracing::debug;

use super::{locate, ManifestError, Position};
use crate::config::Limits;
use crate::discovery::convert::{self, ConvertError};
use crate::model::{Kind, Object, ObjectKey};

/// An object with where it was defined.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Located {
    pub(super) object: Object,
    pub(super) origin: String,
    pub(super) line: usize,
}

/// Text format of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

impl Format {
    fn of(origin: &str) -> Self {
        let is_json = Path::new(origin)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// Whether a file of this name is read as JSON (else YAML).
pub(super) fn is_json(origin: &str) -> bool {
    Format::of(origin) == Format::Json
}

/// Parses one file's text. `origin` names the file in errors, and a name ending in
/// `.json` selects the JSON parser. Returns every error of the file, or its objects.
pub fn parse_str(
    origin: &str,
    text: &str,
    limits: &Limits,
) -> Result<Vec<Object>, Vec<ManifestError>> {
    let (objects, errors) = parse_located(origin, text, limits);
    if errors.is_empty() {
        Ok(objects.into_iter().map(|l| l.object).collect())
    } else {
        Err(errors)
    }
}

/// Parses one file: its valid objects (first definition of duplicates) and errors.
pub(super) fn parse_located(
    origin: &str,
    text: &str,
    limits: &Limits,
) -> (Vec<Located>, Vec<ManifestError>) {
    let mut p = Parser {
        origin,
        text,
        format: Format::of(origin),
        limits,
        out: Vec::new(),
        errors: Vec::new(),
    };
    p.parse();
    let mut errors = p.errors;
    let objects = dedup(p.out, &mut errors);
    (objects, errors)
}

/// Keeps the first of each (kind, key); reports the others.
pub(super) fn dedup(objects: Vec<Located>, errors: &mut Vec<ManifestError>) -> Vec<Located> {
    let mut seen: HashMap<(Kind, ObjectKey), (String, usize)> = HashMap::new();
    let mut out = Vec::with_capacity(objects.len());
    for l in objects {
        let (kind, key) = l.object.id();
        if let Some((first_origin, first_line)) = seen.get(&(kind, key.clone())) {
            errors.push(ManifestError::Duplicate {
                origin: l.origin.clone(),
                line: l.line,
                object: convert::describe(kind, &key),
                first_origin: first_origin.clone(),
                first_line: *first_line,
            });
            continue;
        }
        seen.insert((kind, key), (l.origin.clone(), l.line));
        out.push(l);
    }
    out
}

/// Where a value sits in the file, for messages.
struct DocCtx {
    /// First line of the document holding it.
    line: usize,
    /// Index of the top-level document, when the value is one (not a List item):
    /// lets a type error be re-located to the exact line and column.
    top_level: Option<usize>,
    /// `items[3]` inside a List (nested: `items[1].items[3]`), empty at top level.
    item: String,
}

struct Parser<'a> {
    origin: &'a str,
    text: &'a str,
    format: Format,
    limits: &'a Limits,
    out: Vec<Located>,
    errors: Vec<ManifestError>,
}

impl Parser<'_> {
    fn parse(&mut self) {
        match self.format {
            Format::Json => match serde_json::from_str::<Value>(self.text) {
                Ok(v) => {
                    let line = first_content_line(self.text);
                    self.value(
                        v,
                        DocCtx {
                            line,
                            top_level: Some(0),
                            item: String::new(),
                        },
                        None,
                    );
                }
                Err(e) => self.errors.push(ManifestError::Syntax {
                    origin: self.origin.to_string(),
                    line: e.line(),
                    column: e.column(),
                    message: strip_location(&e.to_string(), e.line(), e.column()),
                }),
            },
            Format::Yaml => {
                let starts = doc_starts(self.text);
                for (i, doc) in serde_yaml::Deserializer::from_str(self.text).enumerate() {
                    let line = starts.get(i).or(starts.last()).copied().unwrap_or(1);
                    match Value::deserialize(doc) {
                        Ok(v) => self.value(
                            v,
                            DocCtx {
                                line,
                                top_level: Some(i),
                                item: String::new(),
                            },
                            None,
                        ),
                        Err(e) => {
                            self.yaml_error(&e, line);
                            // The parser cannot resume after an error (it would
                            // yield the same error forever).
                            break;
                        }
                    }
                }
            }
        }
    }

    fn yaml_error(&mut self, e: &serde_yaml::Error, doc_line: usize) {
        let origin = self.origin.to_string();
        self.errors.push(match e.location() {
            Some(l) => ManifestError::Syntax {
                origin,
                line: l.line(),
                column: l.column(),
                message: strip_location(&e.to_string(), l.line(), l.column()),
            },
            None => ManifestError::Document {
                origin,
                line: doc_line,
                message: e.to_string(),
            },
        });
    }

    fn document_error(&mut self, ctx: &DocCtx, message: String) {
        let message = if ctx.item.is_empty() {
            message
        } else {
            format!("{}: {message}", ctx.item)
        };
        self.errors.push(ManifestError::Document {
            origin: self.origin.to_string(),
            line: ctx.line,
            message,
        });
    }

    /// One document or List item. `default_type` is the (apiVersion, kind) of the
    /// items of a typed list (`ServiceList`), whose items carry neither.
    fn value(&mut self, mut v: Value, ctx: DocCtx, default_type: Option<(&str, &str)>) {
        if ctx.top_level.is_some() {
            if let Err(e) = v.apply_merge() {
                self.document_error(&ctx, format!("YAML merge key: {e}"));
                return;
            }
        }
        let map = match &v {
            Value::Null => return, // empty document
            Value::Mapping(m) if m.is_empty() => return,
            Value::Mapping(m) => m,
            other => {
                let found = match other {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Sequence(_) => "a sequence",
                    _ => "a tagged value",
                };
                self.document_error(
                    &ctx,
                    format!("expected a Kubernetes object (a mapping with apiVersion and kind), found {found}"),
                );
                return;
            }
        };
        let field = |name: &str| -> Result<Option<String>, String> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{name} must be a string")),
            }
        };
        let (api_version, kind) = match (field("apiVersion"), field("kind")) {
            (Ok(a), Ok(k)) => (a, k),
            (Err(m), _) | (_, Err(m)) => {
                self.document_error(&ctx, m);
                return;
            }
        };
        let (api_version, kind) = match (api_version, kind, default_type) {
            (a, None, Some((da, dk))) => (a.unwrap_or_else(|| da.to_string()), dk.to_string()),
            (Some(a), Some(k), _) => (a, k),
            (None, Some(k), Some((da, _))) => (da.to_string(), k),
            (None, Some(k), None) => {
                self.document_error(&ctx, format!("{k} object has no apiVersion"));
                return;
            }
            (_, None, None) => {
                self.document_error(&ctx, "object has no kind".to_string());
                return;
            }
        };

        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                if let Some(s) = self.typed::<core::Service>(v, &ctx, "Service", true) {
                    let r = convert::service(&s, self.limits).map(Object::Service);
                    self.converted(r, &ctx);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(s) =
                    self.typed::<discovery::EndpointSlice>(v, &ctx, "EndpointSlice", true)
                {
                    let r = convert::endpoint_slice(&s).map(Object::EndpointSlice);
                    self.converted(r, &ctx);
                }
            }
            ("v1", "Node") => {
                if let Some(n) = self.typed::<core::Node>(v, &ctx, "Node", false) {
                    let r = convert::node(&n).map(Object::Node);
                    self.converted(r, &ctx);
                }
            }
            ("v1", "Pod") => {
                if let Some(p) = self.typed::<core::Pod>(v, &ctx, "Pod", true) {
                    let r = convert::pod(&p).map(Object::Pod);
                    self.converted(r, &ctx);
                }
            }
            ("v1", "Endpoints") => {
                if let Some(e) = self.typed::<core::Endpoints>(v, &ctx, "Endpoints", true) {
                    let r = convert::endpoints(&e).map(Object::Endpoints);
                    self.converted(r, &ctx);
                }
            }
            ("v1", "List") => self.list(v, &ctx, None),
            ("v1", "EndpointsList") => self.list(v, &ctx, Some(("v1", "Endpoints"))),
            ("v1", "ServiceList") => self.list(v, &ctx, Some(("v1", "Service"))),
            ("v1", "NodeList") => self.list(v, &ctx, Some(("v1", "Node"))),
            ("v1", "PodList") => self.list(v, &ctx, Some(("v1", "Pod"))),
            ("discovery.k8s.io/v1", "EndpointSliceList") => {
                self.list(v, &ctx, Some(("discovery.k8s.io/v1", "EndpointSlice")))
            }
            (a, k) => {
                // A supported kind in another version of the same API group is
                // almost certainly a mistake (e.g. discovery.k8s.io/v1beta1, removed
                // in Kubernetes 1.25); the same kind in another group (Knative's
                // serving.knative.dev/v1 Service) is a different thing.
                let expected = match k {
                    "Service" | "Node" | "Pod" | "Endpoints" | "List" | "ServiceList"
                    | "NodeList" | "PodList" | "EndpointsList" => Some("v1"),
                    "EndpointSlice" | "EndpointSliceList" => Some("discovery.k8s.io/v1"),
                    _ => None,
                };
                match expected {
                    Some(want) if api_group(a) == api_group(want) => self.document_error(
                        &ctx,
                        format!("unsupported apiVersion {a} for {k} (expected {want})"),
                    ),
                    _ => debug!(
                        origin = self.origin,
                        line = ctx.line,
                        "ignoring {a} {k}: not a kind ringvip uses"
                    ),
                }
            }
        }
    }

    fn list(&mut self, mut v: Value, ctx: &DocCtx, default_type: Option<(&str, &str)>) {
        let items = match v.get_mut("items").map(std::mem::take) {
            None | Some(Value::Null) => return,
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                self.document_error(ctx, "items must be a list".to_string());
                return;
            }
        };
        for (i, item) in items.into_iter().enumerate() {
            let item_path = if ctx.item.is_empty() {
                format!("items[{i}]")
            } else {
                format!("{}.items[{i}]", ctx.item)
            };
            self.value(
                item,
                DocCtx {
                    line: ctx.line,
                    top_level: None,
                    item: item_path,
                },
                default_type,
            );
        }
    }

    /// Deserializes into a k8s-openapi type, reporting a type error with its path.
    fn typed<T: DeserializeOwned>(
        &mut self,
        v: Value,
        ctx: &DocCtx,
        kind: &str,
        namespaced: bool,
    ) -> Option<T> {
        let object = describe_value(&v, kind, namespaced, &ctx.item);
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let message = e.inner().to_string();
                let position = ctx
                    .top_level
                    .and_then(|i| self.locate(i, e.path()))
                    .unwrap_or(Position {
                        line: ctx.line,
                        column: None,
                    });
                self.errors.push(ManifestError::Type {
                    origin: self.origin.to_string(),
                    position,
                    object,
                    path: e.path().to_string(),
                    message,
                });
                None
            }
        }
    }

    /// Where the value at `path` of top-level document `index` is in the
    /// text (a `Value` has no positions).
    fn locate(&self, index: usize, path: &serde_path_to_error::Path) -> Option<Position> {
        match self.format {
            Format::Yaml => locate::in_yaml(self.text, index, path),
            Format::Json => locate::in_json(self.text, path),
        }
    }

    fn converted(&mut self, r: Result<Object, ConvertError>, ctx: &DocCtx) {
        match r {
            Ok(object) => self.out.push(Located {
                object,
                origin: self.origin.to_string(),
                line: ctx.line,
            }),
            Err(e) => {
                let mut object = convert::describe(e.kind, &e.key);
                if !ctx.item.is_empty() {
                    object = format!("{object} ({})", ctx.item);
                }
                for fe in e.errors {
                    self.errors.push(ManifestError::Invalid {
                        origin: self.origin.to_string(),
                        line: ctx.line,
                        object: object.clone(),
                        kind: e.kind,
                        key: e.key.clone(),
                        field: fe.field,
                        message: fe.message,
                    });
                }
            }
        }
    }
}

/// `Service default/web` from a raw value, for type errors (the name may be unknown).
fn describe_value(v: &Value, kind: &str, namespaced: bool, item: &str) -> String {
    let meta = v.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let mut s = match name {
        Some(n) if namespaced => format!("{kind} {namespace}/{n}"),
        Some(n) => format!("{kind} {n}"),
        None => format!("{kind} (no name)"),
    };
    if !item.is_empty() {
        s = format!("{s} ({item})");
    }
    s
}

/// The group of an apiVersion (`""` for the core group `v1`).
fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// Removes the parser's own " at line L column C" (the error already carries it).
fn strip_location(message: &str, line: usize, column: usize) -> String {
    message.replacen(&format!(" at line {line} column {column}"), "", 1)
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// First line that is not blank or a comment (1 when there is none).
fn first_content_line(text: &str) -> usize {
    text.lines()
        .position(|l| !is_blank_or_comment(l))
        .map_or(1, |i| i + 1)
}

/// Whether `line` is the document marker `marker` (`---` or `...`) and, if so,
/// whether content follows it on the same line.
pub(super) fn marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?;
    if rest.is_empty() || rest.starts_with([' ', '\t', '\r']) {
        Some(rest)
    } else {
        None
    }
}

/// The first line of each YAML document, in the order the parser yields them.
/// Only used to label messages: parsing itself is the YAML parser's.
pub(super) fn doc_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut implicit_allowed = true;
    let mut pending: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(rest) = marker(line, "---") {
            if let Some(p) = pending.take() {
                starts.push(p);
            }
            implicit_allowed = false;
            if is_blank_or_comment(rest) {
                pending = Some(n);
            } else {
                starts.push(n);
            }
            continue;
        }
        if marker(line, "...").is_some() {
            if let Some(p) = pending.take() {
                starts.push(p);
            }
            continue;
        }
        if is_blank_or_comment(line) || (implicit_allowed && line.starts_with('%')) {
            continue;
        }
        if pending.take().is_some() {
            starts.push(n);
        } else if implicit_allowed {
            starts.push(n);
            implicit_allowed = false;
        }
    }
    if let Some(p) = pending {
        starts.push(p);
    }
    starts
}
