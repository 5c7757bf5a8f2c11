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
//!
//! One file per step: [`parse`] (text → objects, every error with file and
//! line), [`walk`] (which files the paths name), [`reload`] (per-file last
//! good objects, duplicates across files) and [`watch`] (file events,
//! debounce, polling fallback, the source's run loop).

mod chunks;
mod locate;
mod parse;
mod reload;
mod walk;
mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::model::{Kind, ObjectKey};

pub use parse::parse_str;
pub use reload::{load, FileSource, Reloaded};

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
