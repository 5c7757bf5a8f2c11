//! Where each setting comes from, decided in one place: clap's defaults, then
//! the settings file (`--config FILE`, YAML, keys are the long flag names),
//! then the flags given on the command line.
//!
//! The merge happens on one YAML map of settings: the file's keys, overlaid by
//! the flags the command line actually gave (clap's `ValueSource`, so
//! `--workers 4` wins over the file even when 4 is the default). A flag also
//! drops the file's keys it conflicts with (`--tun NAME` undoes `no-tun: true`,
//! `--kube` undoes `manifests:`), so a flag always means what it says. Each
//! component's options are then read from that map by serde; their defaults are
//! their clap defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::Settings;

/// The settings file or a flag could not be read into [`Settings`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("reading settings file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, or not a map of settings.
    #[error("settings file {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the YAML parser said.
        message: String,
    },
    /// A key that is no setting (typos would otherwise be ignored silently).
    #[error("settings file {}: unknown setting {key:?} (settings are the long flag names of `ringvip run`)", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value of the wrong type, named by its key.
    #[error("{origin}: {message}")]
    Value {
        /// `settings file PATH`, or `flags` when no file was given.
        origin: String,
        /// The key and what is wrong with its value.
        message: String,
    },
    /// The flags could not be written as settings (a bug, not bad input).
    #[error("flags: {0}")]
    Flags(String),
}

/// Every setting's key, in declaration order.
pub fn keys() -> Vec<String> {
    to_map(&Settings::default())
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Defaults, then the settings file at `file` (when given), then the flags in
/// `flags` that `matches` says came from the command line. `flags` is any part
/// of [`Settings`] a subcommand parses (all of it for `run`, [`super::Limits`]
/// for `check` and `env`); the file may hold every setting.
pub fn load<F: Args + Serialize>(
    file: Option<&Path>,
    flags: &F,
    matches: &ArgMatches,
) -> Result<Settings, LoadError> {
    let mut map = match file {
        Some(path) => read(path)?,
        None => Mapping::new(),
    };
    let given = to_map(flags).map_err(LoadError::Flags)?;
    let mut cmd = F::augment_args(clap::Command::new("flags"));
    cmd.build();
    for id in matches.ids() {
        if matches.value_source(id.as_str()) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(value) = given.get(key_of(id.as_str())) else {
            continue; // an argument group, or --config itself
        };
        for other in conflicting(&cmd, id.as_str()) {
            map.remove(key_of(other));
        }
        map.insert(Value::from(key_of(id.as_str())), value.clone());
    }
    let origin = match file {
        Some(path) => format!("settings file {}", path.display()),
        None => "flags".to_string(),
    };
    from_map(&map).map_err(|message| LoadError::Value { origin, message })
}

/// Ids of the arguments in conflict with `id`, declared on either side.
fn conflicting<'a>(cmd: &'a clap::Command, id: &str) -> Vec<&'a str> {
    let names = |a: &clap::Arg| -> Vec<String> {
        cmd.get_arg_conflicts_with(a)
            .iter()
            .map(|c| c.get_id().to_string())
            .collect()
    };
    let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id) else {
        return Vec::new();
    };
    let mine = names(arg);
    cmd.get_arguments()
        .filter(|b| mine.iter().any(|m| m == b.get_id()) || names(b).iter().any(|n| n == id))
        .map(|b| b.get_id().as_str())
        .collect()
}

/// A setting's key from its clap id.
fn key_of(id: &str) -> String {
    id.replace('_', "-")
}

/// Settings from the text of a settings file alone (no flags).
pub fn from_yaml(text: &str) -> Result<Settings, LoadError> {
    let map = parse(text, Path::new("<text>"))?;
    from_map(&map).map_err(|message| LoadError::Value {
        origin: "settings".to_string(),
        message,
    })
}

/// Reads the file as a map of settings.
fn read(path: &Path) -> Result<Mapping, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses a settings file's text and refuses keys that are no setting.
fn parse(text: &str, path: &Path) -> Result<Mapping, LoadError> {
    let syntax = |message: String| LoadError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let map = match serde_yaml::from_str::<Value>(text).map_err(|e| syntax(e.to_string()))? {
        Value::Mapping(m) => m,
        // An empty file (or only comments) sets nothing.
        Value::Null => Mapping::new(),
        other => {
            return Err(syntax(format!(
                "expected a map of settings, found {other:?}"
            )))
        }
    };
    let known: BTreeSet<String> = keys().into_iter().collect();
    for k in map.keys() {
        let key = k.as_str().map_or_else(|| format!("{k:?}"), String::from);
        if !known.contains(&key) {
            return Err(LoadError::UnknownKey {
                path: path.to_path_buf(),
                key,
            });
        }
    }
    Ok(map)
}

fn to_map<T: Serialize>(v: &T) -> Result<Mapping, String> {
    match serde_yaml::to_value(v).map_err(|e| e.to_string())? {
        Value::Mapping(m) => Ok(m),
        other => Err(format!("expected a map, got {other:?}")),
    }
}

/// Each component reads its own keys from the one map; serde's `flatten`
/// would do the same but lose the key in error messages.
fn from_map(map: &Mapping) -> Result<Settings, String> {
    Ok(Settings {
        source: section(map)?,
        node: section(map)?,
        limits: section(map)?,
        dataplane: section(map)?,
        tun: section(map)?,
        dns: section(map)?,
        admin: section(map)?,
        log: section(map)?,
    })
}

fn section<T: DeserializeOwned>(map: &Mapping) -> Result<T, String> {
    serde_path_to_error::deserialize(Value::Mapping(map.clone())).map_err(|e| e.to_string())
}
