//! The file source: Kubernetes manifests (YAML or JSON files and directories)
//! parsed, validated and watched for changes.
//!
//! Accepted input is what `kubectl get -o yaml` prints and what people write by
//! hand: single objects, multi-document YAML (`---`), `kind: List` (and typed lists
//! such as `ServiceList`), and directories (every `*.yaml`, `*.yml` and `*.json`
//! file below them, sorted, hidden entries skipped). Kinds other than `v1 Service`,
//! `discovery.k8s.io/v1 EndpointSlice`, `v1 Node` and `v1 Pod` are ignored.
//!
//! Every error names the file and line; semantic errors also name the object and
//! the field (see [`super::convert`]). A file with any error keeps serving its last
//! good objects, so a half-saved edit never takes a Service down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::convert::{self, ConvertError};
use super::{Batch, Update};
use crate::config::Limits;
use crate::model::{Kind, Object, ObjectKey};

/// How long the watcher waits for a burst of file events to end before reloading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Upper bound on the debounce wait while events keep arriving.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);
/// Reload period when no file watcher could be set up.
const POLL_FALLBACK: Duration = Duration::from_secs(5);

/// A position in a file: a line, and a column when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, when known.
    pub column: Option<usize>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(c) => write!(f, "{}:{}", self.line, c),
            None => write!(f, "{}", self.line),
        }
    }
}

/// A problem with the manifests. `Display` is one line starting with the file path
/// (and line), ready for `ringvip check` and for the log.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The text is not valid YAML (or JSON, for `*.json`).
    #[error("{origin}:{line}:{column}: syntax error: {message}")]
    Syntax {
        /// File path.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Parser message.
        message: String,
    },
    /// A document that is not a usable Kubernetes object (not a mapping, no
    /// `kind`, an unsupported `apiVersion` of a supported kind, …).
    #[error("{origin}:{line}: {message}")]
    Document {
        /// File path.
        origin: String,
        /// Line where the document starts.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A field has the wrong type or shape (e.g. `port: abc`).
    #[error("{origin}:{position}: {object}: {}", with_path(path, message))]
    Type {
        /// File path.
        origin: String,
        /// The field's position when known, else the document's first line.
        position: Position,
        /// `Service default/web`, as far as known.
        object: String,
        /// Field path (`spec.ports[0].port`), `.` for the object itself.
        path: String,
        /// Deserializer message.
        message: String,
    },
    /// An object that parses but is not valid (see [`convert`]).
    #[error("{origin}:{line}: {object}: {field}: {message}")]
    Invalid {
        /// File path.
        origin: String,
        /// Line where the object's document starts.
        line: usize,
        /// `Service default/web` (with `(items[3])` inside a List).
        object: String,
        /// Kind of the object.
        kind: Kind,
        /// Namespace and name.
        key: ObjectKey,
        /// Field path in the object, e.g. `spec.ports[1].port`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The same kind and namespace/name is defined twice.
    #[error("{origin}:{line}: duplicate {object}: already defined at {first_origin}:{first_line}")]
    Duplicate {
        /// File of the second definition (the one not used).
        origin: String,
        /// Line of the second definition.
        line: usize,
        /// `Service default/web`.
        object: String,
        /// File of the first definition.
        first_origin: String,
        /// Line of the first definition.
        first_line: usize,
    },
}

fn with_path(path: &str, message: &str) -> String {
    if path.is_empty() || path == "." {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}

/// An object with where it was defined.
#[derive(Debug, Clone, PartialEq)]
struct Located {
    object: Object,
    origin: String,
    line: usize,
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

/// Loads every path (files and directories) once: every error, and the objects
/// that [`FileSource::run`] would serve at start-up — the objects of every file
/// without errors (a file with an error contributes nothing, since it has no last
/// good version yet). A duplicate keeps its first definition. This is `ringvip check`.
pub fn load(paths: &[PathBuf], limits: &Limits) -> (Vec<Object>, Vec<ManifestError>) {
    FileSource::new(paths.to_vec(), limits.clone()).reload()
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
fn parse_located(origin: &str, text: &str, limits: &Limits) -> (Vec<Located>, Vec<ManifestError>) {
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
fn dedup(objects: Vec<Located>, errors: &mut Vec<ManifestError>) -> Vec<Located> {
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
            ("v1", "List") => self.list(v, &ctx, None),
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
                    "Service" | "Node" | "Pod" | "List" | "ServiceList" | "NodeList"
                    | "PodList" => Some("v1"),
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
                let path = e.path().to_string();
                let message = e.inner().to_string();
                let position = ctx
                    .top_level
                    .and_then(|i| self.locate::<T>(i, &path))
                    .unwrap_or(Position {
                        line: ctx.line,
                        column: None,
                    });
                self.errors.push(ManifestError::Type {
                    origin: self.origin.to_string(),
                    position,
                    object,
                    path,
                    message,
                });
                None
            }
        }
    }

    /// Deserializes top-level document `index` straight from the text to find the
    /// line and column of the error at `path` (a `Value` has no positions).
    fn locate<T: DeserializeOwned>(&self, index: usize, path: &str) -> Option<Position> {
        match self.format {
            Format::Yaml => {
                let doc = serde_yaml::Deserializer::from_str(self.text).nth(index)?;
                let e = serde_path_to_error::deserialize::<_, T>(doc).err()?;
                if e.path().to_string() != path {
                    return None;
                }
                let l = e.inner().location()?;
                Some(Position {
                    line: l.line(),
                    column: Some(l.column()),
                })
            }
            Format::Json => {
                let mut de = serde_json::Deserializer::from_str(self.text);
                let e = serde_path_to_error::deserialize::<_, T>(&mut de).err()?;
                if e.path().to_string() != path || e.inner().line() == 0 {
                    return None;
                }
                Some(Position {
                    line: e.inner().line(),
                    column: Some(e.inner().column()),
                })
            }
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
fn marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?;
    if rest.is_empty() || rest.starts_with([' ', '\t', '\r']) {
        Some(rest)
    } else {
        None
    }
}

/// The first line of each YAML document, in the order the parser yields them.
/// Only used to label messages: parsing itself is the YAML parser's.
fn doc_starts(text: &str) -> Vec<usize> {
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

/// Whether a directory entry is a manifest by its name.
fn is_manifest_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e.eq_ignore_ascii_case("yaml")
            || e.eq_ignore_ascii_case("yml")
            || e.eq_ignore_ascii_case("json")
    })
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The files the configured paths name right now.
#[derive(Default)]
struct Listing {
    /// Files in load order.
    files: Vec<PathBuf>,
    /// Errors listing paths.
    errors: Vec<ManifestError>,
    /// Paths that could not be listed for a reason other than not existing: the
    /// files below them keep their last good objects.
    unreadable: Vec<PathBuf>,
}

fn list_files(paths: &[PathBuf]) -> Listing {
    let mut l = Listing::default();
    let mut seen = HashSet::new();
    let mut visited_dirs = HashSet::new();
    for p in paths {
        match std::fs::metadata(p) {
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    l.unreadable.push(p.clone());
                }
                l.errors.push(ManifestError::Io {
                    path: p.clone(),
                    source: e,
                });
            }
            Ok(m) if m.is_dir() => walk(p, &mut l, &mut seen, &mut visited_dirs),
            Ok(_) => {
                if seen.insert(p.clone()) {
                    l.files.push(p.clone());
                }
            }
        }
    }
    l
}

fn walk(dir: &Path, l: &mut Listing, seen: &mut HashSet<PathBuf>, visited: &mut HashSet<PathBuf>) {
    // Symlinked directories may form loops: visit each real directory once.
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !visited.insert(real) {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            l.unreadable.push(dir.to_path_buf());
            l.errors.push(ManifestError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
            return;
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !is_hidden(&e.file_name()))
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, l, seen, visited),
            Ok(_) => {
                if is_manifest_name(&path) && seen.insert(path.clone()) {
                    l.files.push(path);
                }
            }
            // Vanished meanwhile: gone. A dangling symlink with a manifest name is
            // worth a word.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if is_manifest_name(&path) && std::fs::symlink_metadata(&path).is_ok() {
                    l.errors.push(ManifestError::Io { path, source: e });
                }
            }
            Err(e) => {
                if is_manifest_name(&path) {
                    l.unreadable.push(path.clone());
                    l.errors.push(ManifestError::Io { path, source: e });
                }
            }
        }
    }
}

/// Manifests from files and directories, reloaded on change.
///
/// Keeps, per file, the objects of its last good load: a file with any error keeps
/// serving those (none if it never loaded cleanly) until it is fixed or deleted.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    limits: Limits,
    /// Last good objects of each file.
    files: HashMap<PathBuf, Vec<Located>>,
    /// Files in load order (the order of `paths`, directories sorted).
    order: Vec<PathBuf>,
}

impl FileSource {
    /// A source for these files and directories; nothing is read yet.
    pub fn new(paths: Vec<PathBuf>, limits: Limits) -> Self {
        Self {
            paths,
            limits,
            files: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Loads every path once. Per-file: a file with any error keeps its last good
    /// objects (none at first load) and the errors are returned. A file that is gone
    /// drops its objects. When two files define the same object, the first file in
    /// load order wins and the other definition is reported.
    pub fn reload(&mut self) -> (Vec<Object>, Vec<ManifestError>) {
        let listing = list_files(&self.paths);
        let mut errors = listing.errors;
        let mut previous = std::mem::take(&mut self.files);
        let mut files = HashMap::new();
        let mut order = Vec::new();
        for path in listing.files {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let origin = path.display().to_string();
                    let (objects, errs) = parse_located(&origin, &text, &self.limits);
                    if errs.is_empty() {
                        files.insert(path.clone(), objects);
                    } else {
                        errors.extend(errs);
                        if let Some(old) = previous.remove(&path) {
                            files.insert(path.clone(), old);
                        }
                    }
                    order.push(path);
                }
                // Deleted between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if let Some(old) = previous.remove(&path) {
                        files.insert(path.clone(), old);
                    }
                    order.push(path.clone());
                    errors.push(ManifestError::Io { path, source: e });
                }
            }
        }
        // Files below a directory we could not list this time keep their objects.
        let mut kept: Vec<PathBuf> = previous
            .keys()
            .filter(|p| {
                !files.contains_key(*p) && listing.unreadable.iter().any(|u| p.starts_with(u))
            })
            .cloned()
            .collect();
        kept.sort();
        for p in kept {
            if let Some(old) = previous.remove(&p) {
                files.insert(p.clone(), old);
                order.push(p);
            }
        }
        self.files = files;
        self.order = order;

        let all: Vec<Located> = self
            .order
            .iter()
            .filter_map(|p| self.files.get(p))
            .flatten()
            .cloned()
            .collect();
        let objects = dedup(all, &mut errors)
            .into_iter()
            .map(|l| l.object)
            .collect();
        (objects, errors)
    }

    /// Directories to watch: a directory path recursively; for a file, its parent
    /// (editors replace files by rename, which a watch on the file itself misses),
    /// and the parent of its real path when it is a symlink.
    fn watch_targets(&self) -> BTreeMap<PathBuf, RecursiveMode> {
        let mut t = BTreeMap::new();
        for p in &self.paths {
            if p.is_dir() {
                t.insert(p.clone(), RecursiveMode::Recursive);
                continue;
            }
            let mut parents = vec![parent_dir(p)];
            if let Ok(real) = std::fs::canonicalize(p) {
                parents.push(parent_dir(&real));
            }
            for parent in parents {
                if parent.is_dir() {
                    t.entry(parent).or_insert(RecursiveMode::NonRecursive);
                }
            }
        }
        t
    }

    /// Loads, sends a [`Batch`] of one [`Update::Reset`] with all good objects,
    /// then watches the paths
    /// (debounced ~100 ms; also reloads when `reload_now` is notified, e.g. on
    /// SIGHUP) and sends a new `Reset` whenever the set of good objects changed.
    /// Errors are logged with `tracing::warn!`, one line each, and the last good
    /// objects of that file keep serving. Runs until `tx` is closed. A batch
    /// after a change carries, as its trigger time, when the change was
    /// noticed (the first file event, the reload request or the poll), so
    /// manifest edits feed the network programming latency like the API's
    /// EndpointSlice changes do.
    ///
    /// Reading and parsing happen on tokio's blocking pool, so a slow disk never
    /// stalls the control runtime. Without a working file watcher (e.g. inotify
    /// limits reached) the paths are polled every few seconds instead.
    pub async fn run(self, tx: mpsc::Sender<Batch>, reload_now: Arc<Notify>) {
        let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
        let mut watcher: Option<notify::RecommendedWatcher> = None;
        let mut poll = tokio::time::interval(POLL_FALLBACK);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut watch_warned: HashSet<PathBuf> = HashSet::new();

        let mut source = self;
        let mut last_sent: Option<Vec<Object>> = None;
        let mut last_errors: Vec<String> = Vec::new();
        let mut forced = true;
        // When the change that led to this reload was noticed; none at start.
        let mut noticed: Option<SystemTime> = None;
        loop {
            // Watch first, then read: a change made while reading raises an event
            // and another reload. A fresh watcher each time carries no stale
            // watches (a directory deleted and re-created may even reuse its inode).
            // Without a new watcher the old one (or polling) stays in use.
            if let Some(mut w) = make_watcher(&ev_tx) {
                for (p, mode) in source.watch_targets() {
                    if let Err(e) = w.watch(&p, mode) {
                        if watch_warned.insert(p.clone()) {
                            warn!(path = %p.display(), error = %e, "cannot watch; changes there need a reload (SIGHUP)");
                        }
                    }
                }
                watcher = Some(w);
            }
            let job = tokio::task::spawn_blocking(move || {
                let (objects, errors) = source.reload();
                (source, objects, errors)
            });
            let (s, objects, errors) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "manifest reload failed; file source stopped");
                    return;
                }
            };
            source = s;

            let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
            if forced || rendered != last_errors {
                for e in &rendered {
                    warn!("{e}");
                }
                if rendered.is_empty() && !last_errors.is_empty() {
                    info!("manifest errors resolved");
                }
            }
            last_errors = rendered;

            if last_sent.as_ref() != Some(&objects) {
                info!(
                    objects = objects.len(),
                    errors = last_errors.len(),
                    "manifests loaded"
                );
                let batch = Batch {
                    updates: vec![Update::Reset(objects.clone())],
                    queued: SystemTime::now(),
                    triggers: noticed.into_iter().collect(),
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
                last_sent = Some(objects);
            }

            let (f, at) = tokio::select! {
                _ = tx.closed() => return,
                _ = reload_now.notified() => (true, SystemTime::now()),
                Some(()) = ev_rx.recv(), if watcher.is_some() => {
                    let at = SystemTime::now();
                    debounce(&mut ev_rx).await;
                    (false, at)
                }
                _ = poll.tick(), if watcher.is_none() => (false, SystemTime::now()),
            };
            forced = f;
            noticed = Some(at);
        }
    }
}

/// Whether a file event can change what the files contain. Opens and reads (ours
/// included) cannot; a close after writing can.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Waits until no event arrived for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`]).
async fn debounce(rx: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        tokio::time::sleep(DEBOUNCE).await;
        let mut more = false;
        while rx.try_recv().is_ok() {
            more = true;
        }
        if !more || tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// A watcher forwarding every event that can change a file into `ev_tx`;
/// `None` (with a warning) when the platform refuses one.
fn make_watcher(ev_tx: &mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let ev_tx = ev_tx.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let wanted = match &res {
            Ok(ev) => is_change(&ev.kind),
            Err(e) => {
                warn!(error = %e, "manifest watcher error; reloading");
                true
            }
        };
        if wanted {
            // A full channel already holds a pending reload.
            let _ = ev_tx.try_send(());
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch manifests; polling every {}s instead", POLL_FALLBACK.as_secs());
            None
        }
    }
}

/// The directory holding `p` (`.` for a bare file name).
fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceType, TargetPort};
    use std::fs;

    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                let (kind, key) = o.id();
                convert::describe(kind, &key)
            })
            .collect()
    }

    fn messages(errors: &[ManifestError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    fn service(name: &str, port: u32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: {port}\n"
        )
    }

    /// What `kubectl get svc,endpointslices -o yaml` prints (kubectl 1.33, kind
    /// cluster), noise included.
    const KUBECTL_GET: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2025-04-23T08:12:31Z"
    labels:
      component: apiserver
      provider: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "199"
    uid: 2f0a6a0e-3b0f-4d8e-9d6c-6f7d0b7f6c11
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"labels":{"app":"web"},"name":"web","namespace":"default"},"spec":{"ports":[{"name":"http","nodePort":30080,"port":80,"targetPort":"http"}],"selector":{"app":"web"},"type":"NodePort"}}
    creationTimestamp: "2025-04-23T08:20:02Z"
    labels:
      app: web
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:metadata:
          f:annotations:
            .: {}
            f:kubectl.kubernetes.io/last-applied-configuration: {}
          f:labels:
            .: {}
            f:app: {}
        f:spec:
          f:externalTrafficPolicy: {}
          f:internalTrafficPolicy: {}
          f:ports:
            .: {}
            k:{"port":80,"protocol":"TCP"}:
              .: {}
              f:name: {}
              f:nodePort: {}
              f:port: {}
              f:protocol: {}
              f:targetPort: {}
          f:selector: {}
          f:sessionAffinity: {}
          f:type: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2025-04-23T08:20:02Z"
    name: web
    namespace: default
    resourceVersion: "1043"
    uid: 8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77
  spec:
    clusterIP: 10.96.187.12
    clusterIPs:
    - 10.96.187.12
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      nodePort: 30080
      port: 80
      protocol: TCP
      targetPort: http
    selector:
      app: web
    sessionAffinity: None
    type: NodePort
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2025-04-23T08:21:40Z"
    name: db
    namespace: shop
    resourceVersion: "1101"
    uid: 0b9b2c1e-8f0e-4c38-a0c5-2d0b5a3b1e42
  spec:
    clusterIP: None
    clusterIPs:
    - None
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: pg
      port: 5432
      protocol: TCP
      targetPort: 5432
    selector:
      app: db
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 172.18.0.2
    conditions:
      ready: true
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2025-04-23T08:12:31Z"
    generation: 1
    labels:
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "201"
    uid: 7b0f3f0c-5d3c-4b8a-8f0e-1c1d2e3f4a5b
  ports:
  - name: https
    port: 6443
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.7
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: kind-worker
    targetRef:
      kind: Pod
      name: web-6d4cf56db6-4xk8p
      namespace: default
      uid: 3c7e9d10-6a4b-4f0e-9a2b-5e6f7a8b9c0d
    zone: zone-a
  - addresses:
    - 10.244.2.9
    conditions:
      ready: false
      serving: true
      terminating: true
    nodeName: kind-worker2
    targetRef:
      kind: Pod
      name: web-6d4cf56db6-m2l7q
      namespace: default
      uid: 9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2025-04-23T08:20:09Z"
    creationTimestamp: "2025-04-23T08:20:02Z"
    generateName: web-
    generation: 3
    labels:
      app: web
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    managedFields:
    - apiVersion: discovery.k8s.io/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:addressType: {}
        f:endpoints: {}
        f:metadata:
          f:annotations:
            .: {}
            f:endpoints.kubernetes.io/last-change-trigger-time: {}
          f:generateName: {}
          f:labels:
            .: {}
            f:app: {}
            f:endpointslice.kubernetes.io/managed-by: {}
            f:kubernetes.io/service-name: {}
          f:ownerReferences:
            .: {}
            k:{"uid":"8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77"}: {}
        f:ports: {}
      manager: kube-controller-manager
      operation: Update
      time: "2025-04-23T08:20:09Z"
    name: web-x5v8k
    namespace: default
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: 8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77
    resourceVersion: "1162"
    uid: 5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a
  ports:
  - name: http
    port: 8080
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints: null
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2025-04-23T08:21:40Z"
    generateName: db-
    generation: 1
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: db
      service.kubernetes.io/headless: ""
    name: db-p9w2x
    namespace: shop
    resourceVersion: "1102"
    uid: 1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6
  ports: null
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn kubectl_get_output_parses() {
        let objects = parse_str("get.yaml", KUBECTL_GET, &Limits::default()).unwrap();
        assert_eq!(
            names(&objects),
            vec![
                "Service default/kubernetes",
                "Service default/web",
                "Service shop/db",
                "EndpointSlice default/kubernetes",
                "EndpointSlice default/web-x5v8k",
                "EndpointSlice shop/db-p9w2x",
            ]
        );
        let Object::Service(web) = &objects[1] else {
            panic!("not a service")
        };
        assert_eq!(web.service_type, ServiceType::NodePort);
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(web.ports[0].target_port, TargetPort::Name("http".into()));
        let Object::Service(db) = &objects[2] else {
            panic!("not a service")
        };
        assert!(db.headless);
        let Object::EndpointSlice(slice) = &objects[4] else {
            panic!("not a slice")
        };
        assert_eq!(slice.service_name, "web");
        assert_eq!(slice.endpoints.len(), 2);
        assert!(slice.endpoints[1].terminating && !slice.endpoints[1].ready);
        assert_eq!(slice.endpoints[0].zone.as_deref(), Some("zone-a"));
        let Object::EndpointSlice(empty) = &objects[5] else {
            panic!("not a slice")
        };
        assert!(empty.endpoints.is_empty() && empty.ports.is_empty());
    }

    #[test]
    fn list_and_multi_document_files_parse() {
        let text = format!(
            "# leading comment\n---\n---\n{}---\napiVersion: v1\nkind: List\nitems:\n- {}\n- apiVersion: v1\n  kind: Node\n  metadata: {{name: node-a}}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: cm}}\n---\n# only a comment\n---\napiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {{name: typed, namespace: shop}}\n  spec: {{ports: [{{port: 9}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\n...\n",
            service("a", 80),
            "{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: [{port: 81}]}}"
        );
        let objects = parse_str("multi.yaml", &text, &Limits::default()).unwrap();
        assert_eq!(
            names(&objects),
            vec![
                "Service default/a",
                "Service default/b",
                "Node node-a",
                "Service shop/typed",
                "Pod default/p",
            ]
        );
        // An empty file is fine too.
        assert_eq!(parse_str("e.yaml", "", &Limits::default()).unwrap(), vec![]);
        assert_eq!(
            parse_str("e.yaml", "# nothing\n---\n", &Limits::default()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: m\nspec:\n  ports:\n  - &p {name: a, port: 80, protocol: UDP}\n  - <<: *p\n    name: b\n    port: 81\n";
        let objects = parse_str("m.yaml", text, &Limits::default()).unwrap();
        let Object::Service(s) = &objects[0] else {
            panic!()
        };
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.ports[1].port, 81);
    }

    #[test]
    fn doc_starts_follow_the_parser() {
        assert_eq!(doc_starts("a: 1\n"), vec![1]);
        assert_eq!(doc_starts("# c\n\n---\na: 1\n---\nb: 1\n"), vec![4, 6]);
        assert_eq!(doc_starts("---\n---\na: 1\n"), vec![1, 3]);
        assert_eq!(doc_starts("a: 1\n---\n"), vec![1, 2]);
        assert_eq!(doc_starts("--- {a: 1}\n--- # x\nb: 1\n"), vec![1, 3]);
        assert_eq!(
            doc_starts("%YAML 1.2\n---\na: 1\n...\n---\nb: 2\n"),
            vec![3, 6]
        );
        assert_eq!(doc_starts("a: |\n  ---x\n  y\n"), vec![1]);
    }

    #[test]
    fn yaml_syntax_error_has_line_and_column() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: x\n   bad: indent\n",
            service("a", 80)
        );
        let errors = parse_str("dir/bad.yaml", &text, &Limits::default()).unwrap_err();
        assert_eq!(errors.len(), 1);
        match &errors[0] {
            ManifestError::Syntax { line, column, .. } => assert_eq!((*line, *column), (13, 7)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            errors[0].to_string(),
            "dir/bad.yaml:13:7: syntax error: mapping values are not allowed in this context"
        );
        // Unclosed flow sequence: the message keeps the parser's context.
        let errors = parse_str("f.yaml", "a: [1, 2\nb: 3\n", &Limits::default()).unwrap_err();
        assert!(
            errors[0].to_string().starts_with("f.yaml:2:"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn type_error_has_field_path_and_position() {
        // Top-level document: the exact position of the bad value.
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n  - port: abc\n",
            service("a", 80)
        );
        let errors = parse_str("t.yaml", &text, &Limits::default()).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "t.yaml:16:11: Service default/web: spec.ports[1].port: invalid type: string \"abc\", expected i32"
        );
        // Inside a List: the List's first line, the item and the path.
        let text = "# list\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: ok}\n  spec: {ports: [{port: 1}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: shop}\n  spec:\n    ports:\n    - port: [80]\n";
        let errors = parse_str("l.yaml", text, &Limits::default()).unwrap_err();
        assert_eq!(
            messages(&errors),
            vec!["l.yaml:2: Service shop/web (items[1]): spec.ports[0].port: invalid type: sequence, expected i32"]
        );
        // Unknown name.
        let errors = parse_str(
            "n.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: 7\n",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .starts_with("n.yaml:3:11: Pod (no name): metadata: invalid type"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn json_files_parse_and_report_positions() {
        let json = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}, "spec": {"ports": [{"port": 80}]}}
  ]
}"#;
        let objects = parse_str("x.json", json, &Limits::default()).unwrap();
        assert_eq!(names(&objects), vec!["Service default/j"]);
        let errors = parse_str(
            "x.json",
            "{\n  \"kind\": \"Service\",\n}",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .starts_with("x.json:3:1: syntax error:"),
            "{}",
            errors[0]
        );
        let errors = parse_str(
            "y.json",
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"s\"},\n \"spec\": {\"ports\": [{\"port\": \"x\"}]}}",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            errors[0].to_string().starts_with("y.json:2:")
                && errors[0].to_string().contains("spec.ports[0].port"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn semantic_errors_carry_file_line_object_and_field() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - {{name: a, port: 80}}\n  - {{name: b, port: 70000, protocol: SCTP}}\n",
            service("ok", 80)
        );
        let errors = parse_str("web.yaml", &text, &Limits::default()).unwrap_err();
        assert_eq!(
            messages(&errors),
            vec![
                "web.yaml:9: Service default/web: spec.ports[1].protocol: SCTP is not supported by ringvip: no kernel socket or smoltcp support",
                "web.yaml:9: Service default/web: spec.ports[1].port: 70000 is out of range 1..65535",
            ]
        );
        let errors = parse_str(
            "s.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n",
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            messages(&errors),
            vec!["s.yaml:1: EndpointSlice default/s: metadata.labels[kubernetes.io/service-name]: required: it names the Service this slice belongs to"]
        );
    }

    #[test]
    fn unknown_kinds_are_ignored_and_wrong_versions_are_errors() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: notanumber}\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\n";
        assert_eq!(
            parse_str("k.yaml", text, &Limits::default()).unwrap(),
            vec![]
        );

        let text = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n---\nkind: Service\nmetadata: {name: x}\n---\napiVersion: v1\nmetadata: {name: y}\n---\n- just\n- a list\n---\napiVersion: v1\nkind: List\nitems: {}\n";
        let errors = parse_str("v.yaml", text, &Limits::default()).unwrap_err();
        assert_eq!(
            messages(&errors),
            vec![
                "v.yaml:1: unsupported apiVersion discovery.k8s.io/v1beta1 for EndpointSlice (expected discovery.k8s.io/v1)",
                "v.yaml:5: Service object has no apiVersion",
                "v.yaml:8: object has no kind",
                "v.yaml:11: expected a Kubernetes object (a mapping with apiVersion and kind), found a sequence",
                "v.yaml:14: items must be a list",
            ]
        );
    }

    #[test]
    fn duplicates_are_reported_naming_both_places() {
        let text = format!("{}---\n{}", service("web", 80), service("web", 81));
        let errors = parse_str("d.yaml", &text, &Limits::default()).unwrap_err();
        assert_eq!(
            messages(&errors),
            vec!["d.yaml:9: duplicate Service default/web: already defined at d.yaml:1"]
        );

        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        fs::write(&a, service("web", 80)).unwrap();
        fs::write(
            &b,
            format!("{}---\n{}", service("other", 1), service("web", 81)),
        )
        .unwrap();
        let (objects, errors) = load(&[dir.path().to_path_buf()], &Limits::default());
        assert_eq!(
            names(&objects),
            vec!["Service default/web", "Service default/other"]
        );
        let Object::Service(web) = &objects[0] else {
            panic!()
        };
        assert_eq!(web.ports[0].port, 80, "the first file wins");
        assert_eq!(
            messages(&errors),
            vec![format!(
                "{}:9: duplicate Service default/web: already defined at {}:1",
                b.display(),
                a.display()
            )]
        );
    }

    #[test]
    fn directories_are_recursive_sorted_and_skip_hidden_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        fs::create_dir_all(d.join(".git")).unwrap();
        fs::write(d.join("b.yaml"), service("b", 1)).unwrap();
        fs::write(d.join("a.yml"), service("a", 1)).unwrap();
        fs::write(d.join("c.json"), r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c"},"spec":{"ports":[{"port":1}]}}"#).unwrap();
        fs::write(d.join("sub/deeper/z.yaml"), service("z", 1)).unwrap();
        fs::write(d.join("sub/0.yaml"), service("zero", 1)).unwrap();
        fs::write(d.join(".hidden.yaml"), service("hidden", 1)).unwrap();
        fs::write(d.join(".git/x.yaml"), service("git", 1)).unwrap();
        fs::write(d.join("notes.txt"), "not: yaml: at: all").unwrap();
        fs::write(d.join("README.md"), "# hi").unwrap();
        // An explicitly named file is loaded whatever its name, and only once.
        let extra = d.join("notes.conf");
        fs::write(&extra, service("extra", 1)).unwrap();
        let (objects, errors) = load(
            &[d.to_path_buf(), extra.clone(), d.join("a.yml")],
            &Limits::default(),
        );
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(
            names(&objects),
            vec![
                "Service default/a",
                "Service default/b",
                "Service default/c",
                "Service default/zero",
                "Service default/z",
                "Service default/extra",
            ]
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let (objects, errors) = load(std::slice::from_ref(&missing), &Limits::default());
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0]
            .to_string()
            .starts_with(&format!("{}: ", missing.display())));
        assert!(matches!(errors[0], ManifestError::Io { .. }));
    }

    #[test]
    fn bad_edit_keeps_last_good_objects_of_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        fs::write(&a, service("a", 80)).unwrap();
        fs::write(&b, service("b", 80)).unwrap();
        let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
        let (objects, errors) = src.reload();
        assert!(errors.is_empty());
        assert_eq!(
            names(&objects),
            vec!["Service default/a", "Service default/b"]
        );

        // A half-saved a.yaml (syntax) and a semantically bad b.yaml: both keep their
        // last good objects, and both are reported.
        fs::write(
            &a,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n spec: [\n",
        )
        .unwrap();
        fs::write(&b, service("b", 70000)).unwrap();
        let (objects2, errors) = src.reload();
        assert_eq!(objects2, objects);
        assert_eq!(errors.len(), 2, "{:?}", messages(&errors));

        // Fixed: the new content serves.
        fs::write(&a, service("a", 81)).unwrap();
        let (objects3, errors) = src.reload();
        assert_eq!(errors.len(), 1);
        let Object::Service(sa) = &objects3[0] else {
            panic!()
        };
        assert_eq!(sa.ports[0].port, 81);

        // A file that never loaded cleanly serves nothing.
        let c = dir.path().join("c.yaml");
        fs::write(&c, service("c", 0)).unwrap();
        let (objects4, _) = src.reload();
        assert_eq!(
            names(&objects4),
            vec!["Service default/a", "Service default/b"]
        );
    }

    #[test]
    fn deleted_file_drops_objects_and_new_file_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        fs::write(&a, service("a", 80)).unwrap();
        fs::write(&b, service("b", 80)).unwrap();
        let mut src = FileSource::new(vec![dir.path().to_path_buf(), a.clone()], Limits::default());
        assert_eq!(
            names(&src.reload().0),
            vec!["Service default/a", "Service default/b"]
        );
        fs::remove_file(&b).unwrap();
        let (objects, errors) = src.reload();
        assert!(errors.is_empty());
        assert_eq!(names(&objects), vec!["Service default/a"]);
        // An explicitly named file that is deleted drops its objects too (and says so).
        fs::remove_file(&a).unwrap();
        let (objects, errors) = src.reload();
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        fs::write(dir.path().join("c.yaml"), service("c", 80)).unwrap();
        assert_eq!(names(&src.reload().0), vec!["Service default/c"]);
    }

    #[test]
    fn selector_example_gives_endpoints_from_ready_pods() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples/selector.yaml");
        let (objects, errors) = load(&[path], &Limits::default());
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        let mut store = crate::state::Store::new();
        store.apply(super::super::Update::Reset(objects));
        let slices = store.selector_slices();
        let eps: Vec<(String, String, bool, Option<u16>)> = slices
            .iter()
            .flat_map(|s| {
                s.endpoints.iter().map(move |e| {
                    (
                        s.service_name.clone(),
                        e.ip.to_string(),
                        e.ready,
                        s.ports[0].port,
                    )
                })
            })
            .collect();
        assert_eq!(
            eps,
            vec![
                ("api".into(), "127.0.0.11".into(), true, Some(8080)),
                ("api".into(), "127.0.0.12".into(), false, Some(8080)),
                ("api-public".into(), "127.0.0.11".into(), true, Some(8080)),
                ("api-public".into(), "127.0.0.12".into(), false, Some(8080)),
            ]
        );
        assert_eq!(slices[0].endpoints[0].hostname.as_deref(), Some("api-0"));
        assert_eq!(slices[1].endpoints[0].hostname, None, "subdomain is api");
    }

    #[test]
    fn examples_load_without_errors() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let (objects, errors) = load(
            &[dir.join("web.yaml"), dir.join("dns-udp.yaml")],
            &Limits::default(),
        );
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(
            names(&objects),
            vec![
                "Service default/web",
                "EndpointSlice default/web-abc12",
                "Service kube-system/dns",
                "EndpointSlice kube-system/dns-x7k2p",
            ]
        );
        let Object::Service(web) = &objects[0] else {
            panic!()
        };
        assert_eq!(web.service_type, ServiceType::NodePort);
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(web.ports[0].target_port, TargetPort::Number(8080));
        let Object::EndpointSlice(slice) = &objects[1] else {
            panic!()
        };
        assert_eq!(slice.endpoints.len(), 3);
        assert!(slice
            .endpoints
            .iter()
            .all(|e| e.zone_hints.is_none() && e.node_name.as_deref() == Some("node-a")));
        let Object::Service(dns) = &objects[2] else {
            panic!()
        };
        assert_eq!(dns.ports[0].protocol, Protocol::Udp);
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let (tx, _rx) = mpsc::channel(1);
        let fut = FileSource::new(vec![], Limits::default()).run(tx, Arc::new(Notify::new()));
        assert_send(&fut);
    }

    async fn next_reset(rx: &mut mpsc::Receiver<Batch>) -> Vec<Object> {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(b)) => match <[Update; 1]>::try_from(b.updates) {
                Ok([Update::Reset(objects)]) => objects,
                other => panic!("expected one Reset, got {other:?}"),
            },
            other => panic!("expected a batch within 5 s, got {other:?}"),
        }
    }

    /// Waits (at most 5 s) for a Reset with exactly these objects.
    async fn wait_for(rx: &mut mpsc::Receiver<Batch>, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(b)) => {
                    if let [Update::Reset(objects)] = b.updates.as_slice() {
                        if names(objects) == want {
                            return;
                        }
                    }
                }
                other => panic!("no Reset with {want:?} within 5 s: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn run_sends_a_new_reset_when_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        fs::write(&a, service("a", 80)).unwrap();
        // One file named explicitly, one directory.
        let sub = dir.path().join("more");
        fs::create_dir(&sub).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let reload_now = Arc::new(Notify::new());
        let task = tokio::spawn(
            FileSource::new(vec![a.clone(), sub.clone()], Limits::default())
                .run(tx, reload_now.clone()),
        );

        assert_eq!(names(&next_reset(&mut rx).await), vec!["Service default/a"]);

        // Rewritten in place.
        fs::write(&a, service("a", 81)).unwrap();
        let objects = next_reset(&mut rx).await;
        let Object::Service(s) = &objects[0] else {
            panic!()
        };
        assert_eq!(s.ports[0].port, 81);

        // Replaced by rename, as editors do.
        let tmp = dir.path().join(".a.yaml.swp");
        fs::write(&tmp, service("a", 82)).unwrap();
        fs::rename(&tmp, &a).unwrap();
        let objects = next_reset(&mut rx).await;
        let Object::Service(s) = &objects[0] else {
            panic!()
        };
        assert_eq!(s.ports[0].port, 82);

        // A new file in the watched directory.
        fs::write(sub.join("b.yaml"), service("b", 1)).unwrap();
        assert_eq!(
            names(&next_reset(&mut rx).await),
            vec!["Service default/a", "Service default/b"]
        );

        // A bad edit: no new Reset (nothing good changed); the fix brings one.
        fs::write(sub.join("b.yaml"), "kind: [").unwrap();
        reload_now.notify_one();
        assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err());
        fs::write(sub.join("b.yaml"), service("b", 2)).unwrap();
        let objects = next_reset(&mut rx).await;
        let Object::Service(b) = &objects[1] else {
            panic!()
        };
        assert_eq!(b.ports[0].port, 2);

        // The watched directory deleted and re-created: watched again.
        fs::remove_dir_all(&sub).unwrap();
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("c.yaml"), service("c", 1)).unwrap();
        wait_for(&mut rx, &["Service default/a", "Service default/c"]).await;
        fs::write(sub.join("d.yaml"), service("d", 1)).unwrap();
        wait_for(
            &mut rx,
            &[
                "Service default/a",
                "Service default/c",
                "Service default/d",
            ],
        )
        .await;

        // Closing the channel ends the task.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
