//! Line and column of the value at a field path in a manifest's text.
//!
//! A type error is found on a `Value` (which has no positions), with the path
//! of the bad field. To show where that field is, the document is read again
//! from the text by a walker that follows the path and fails on arrival: the
//! YAML and JSON deserializers stamp an error with the position of the value
//! being read. The walker knows nothing of Kubernetes types, so this costs one
//! small instantiation per text format instead of re-deserializing every
//! Kubernetes type with positions (which compiled the whole k8s-openapi
//! deserialization twice more into ringvip: BENCHMARKS.md, clean release build).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_path_to_error::{Path, Segment};

use super::Position;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The steps of `path`, or `None` when it holds a step the walker cannot
/// follow (an enum variant or an unknown segment).
fn steps(path: &Path) -> Option<Vec<Step>> {
    path.iter()
        .map(|s| match s {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Position of the value at `path` in YAML document `index` of `text`.
pub(super) fn in_yaml(text: &str, index: usize, path: &Path) -> Option<Position> {
    let steps = steps(path)?;
    let doc = serde_yaml::Deserializer::from_str(text).nth(index)?;
    let e = Seek(&steps).deserialize(doc).err()?;
    if !arrived(&e) {
        return None;
    }
    let l = e.location()?;
    Some(Position {
        line: l.line(),
        column: Some(l.column()),
    })
}

/// Position of the value at `path` in the JSON `text`.
pub(super) fn in_json(text: &str, path: &Path) -> Option<Position> {
    let steps = steps(path)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let e = Seek(&steps).deserialize(&mut de).err()?;
    if !arrived(&e) || e.line() == 0 {
        return None;
    }
    Some(Position {
        line: e.line(),
        column: Some(e.column()),
    })
}

/// The message the walker fails with when it reaches the value.
const ARRIVED: &str = "ringvip: located";

/// Whether `e` is the walker's arrival, not a syntax error on the way
/// (serde_yaml puts the path before the message).
fn arrived(e: &impl fmt::Display) -> bool {
    e.to_string().contains(ARRIVED)
}

/// Follows the remaining steps into the value it is given.
struct Seek<'s>(&'s [Step]);

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Walk(self.0))
    }
}

/// Visits one value: with no steps left, fails (so the deserializer stamps
/// this value's position on the error); else descends into the map entry or
/// sequence element named by the next step, skipping the others.
struct Walk<'s>(&'s [Step]);

impl Walk<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(ARRIVED))
        } else {
            // A scalar where the path goes deeper: not found.
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Step::Key(want), rest)) = self.0.split_first() else {
            return self.here();
        };
        while let Some(key) = map.next_key::<KeyText>()? {
            if key.0.as_deref() == Some(want.as_str()) {
                return map.next_value_seed(Seek(rest));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Index(want), rest)) = self.0.split_first() else {
            return self.here();
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Seek(rest)).map(|_| ())
    }
}

/// A map key as text; `None` for keys that are not strings (YAML allows them).
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(s.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path serde_path_to_error reports for a bad value in `text`.
    fn path_of_error(text: &str) -> Path {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Port {
            port: i32,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Spec {
            ports: Vec<Port>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Doc {
            spec: Spec,
        }
        let doc = serde_yaml::Deserializer::from_str(text).next().unwrap();
        serde_path_to_error::deserialize::<_, Doc>(doc)
            .err()
            .unwrap()
            .path()
            .clone()
    }

    #[test]
    fn finds_the_bad_value_in_yaml_and_json() {
        let yaml = "a: 1\nspec:\n  other: [1, 2]\n  ports:\n  - port: 1\n  - port: abc\n";
        let path = path_of_error(yaml);
        assert_eq!(path.to_string(), "spec.ports[1].port");
        let at = in_yaml(yaml, 0, &path).unwrap();
        assert_eq!((at.line, at.column), (6, Some(11)));

        let json = "{\"a\": 1,\n \"spec\": {\"ports\": [{\"port\": 1},\n   {\"port\": \"abc\"}]}}";
        let at = in_json(json, &path).unwrap();
        assert_eq!(at.line, 3);
    }

    #[test]
    fn finds_a_value_in_a_later_document() {
        let yaml = "spec:\n  ports: []\n---\nx: 1\nspec:\n  ports:\n  - port: abc\n";
        let path = path_of_error("spec:\n  ports:\n  - port: abc\n");
        let at = in_yaml(yaml, 1, &path).unwrap();
        assert_eq!(at.line, 7);
    }

    #[test]
    fn a_path_that_is_not_in_the_text_is_not_located() {
        let path = path_of_error("spec:\n  ports:\n  - port: abc\n");
        assert_eq!(in_yaml("spec:\n  ports: []\n", 0, &path), None);
        assert_eq!(in_yaml("spec: 3\n", 0, &path), None);
        assert_eq!(in_json("{\"spec\": {}}", &path), None);
        assert_eq!(in_yaml("spec:\n  ports:\n  - port: abc\n", 5, &path), None);
    }
}
