//! A YAML file as runs of text between its `---` lines, so that a reload
//! parses only the documents that changed: one Pod edited in a file of
//! 1,100 objects costs one document's parse, not the file's (35 ms for
//! ~220 KB with serde_yaml, `benches/manifest.rs`).
//!
//! YAML forbids `---` at the start of a line inside any content, so each
//! run holds whole documents and parses alone as it does in the file;
//! anchors do not reach across documents. Whatever a run's parse reports as
//! an error, the whole file is parsed again instead, so errors keep their
//! file-wide positions.

use std::collections::{HashMap, HashSet};

use super::parse::{marker, parse_located, Located};
use super::reload::Id;
use super::ManifestError;
use crate::config::Limits;
use crate::discovery::{print, Print};

/// One run of a file's text: from a `---` line (or the file's start) to the
/// next `---` line.
struct Run<'a> {
    text: &'a str,
    /// Its first line in the file (1-based).
    line: usize,
}

/// The runs of `text`, in order; empty text gives none.
fn runs(text: &str) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut at = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        let bare = l.strip_suffix('\n').unwrap_or(l);
        if at > start && marker(bare, "---").is_some() {
            out.push(Run {
                text: &text[start..at],
                line: start_line,
            });
            (start, start_line) = (at, i + 1);
        }
        at += l.len();
    }
    if at > start {
        out.push(Run {
            text: &text[start..],
            line: start_line,
        });
    }
    out
}

/// What a file's last clean parse gave per run: the run's print, its first
/// line and how many of the file's objects (in order) came from it.
#[derive(Debug, Default)]
pub(super) struct Runs(Vec<(Print, usize, usize)>);

/// What a parse that kept the unchanged runs changed: the ids of the
/// objects of the runs gone, and of the runs parsed now.
#[derive(Debug)]
pub(super) struct Delta {
    pub(super) dropped: Vec<Id>,
    pub(super) added: Vec<Id>,
}

/// Up to how many new objects are checked against the kept ones by
/// comparison rather than by a set of every id.
const COMPARE_UP_TO: usize = 32;

/// A YAML file's objects and errors (as [`parse_located`] gives them), and
/// its runs when each parsed cleanly alone. With `last` (the file's
/// previous objects and runs), the runs whose text is unchanged keep their
/// objects (moved out of `last`, to their new lines) and only the others
/// are parsed; `last` is left as it was when the file has errors.
pub(super) fn parse_yaml(
    origin: &str,
    text: &str,
    limits: &Limits,
    last: Option<(&mut Vec<Located>, &Runs)>,
) -> (Vec<Located>, Vec<ManifestError>, Runs, Option<Delta>) {
    let (mut none, empty) = (Vec::new(), Runs::default());
    let (old, old_runs) = last.unwrap_or((&mut none, &empty));
    if let Some((objects, kept, delta)) = reuse(origin, &runs(text), limits, old, old_runs) {
        return (objects, Vec::new(), kept, Some(delta));
    }
    // Errors are found and placed by the whole file's parse. A file that
    // parses whole but not run by run (a directive above a `---`) has no
    // runs: it is parsed whole each time.
    let (objects, errors) = parse_located(origin, text, limits);
    (objects, errors, Runs::default(), None)
}

/// Where a run's objects come from.
enum Source {
    /// The old run at this first line, its objects at `old[at..at + count]`.
    Old {
        line: usize,
        at: usize,
        count: usize,
    },
    /// Parsed now.
    New(Vec<Located>),
}

/// The file's objects from the `old` ones of unchanged runs (moved out)
/// and a parse of the others, with what changed; `None`, with `old`
/// untouched, when a parse found an error or the file defines an object
/// twice (the whole file's parse reports those).
fn reuse(
    origin: &str,
    runs: &[Run<'_>],
    limits: &Limits,
    old: &mut Vec<Located>,
    old_runs: &Runs,
) -> Option<(Vec<Located>, Runs, Delta)> {
    if old_runs.0.iter().map(|r| r.2).sum::<usize>() != old.len() {
        return None; // not the runs of these objects
    }
    // Each old run by print (a run repeated keeps each copy).
    let mut by_print: HashMap<Print, Vec<(usize, usize, usize)>> = HashMap::new();
    let mut at = 0;
    for &(p, line, count) in &old_runs.0 {
        by_print.entry(p).or_default().push((line, at, count));
        at += count;
    }
    let mut plan = Vec::with_capacity(runs.len());
    let mut added: HashSet<Id> = HashSet::new();
    for r in runs {
        let p = print(r.text);
        let source = match by_print.get_mut(&p).and_then(Vec::pop) {
            Some((line, at, count)) => Source::Old { line, at, count },
            None => {
                let (mut got, errors) = parse_located(origin, r.text, limits);
                if !errors.is_empty() || !got.iter().all(|o| added.insert(o.object.id())) {
                    return None;
                }
                for o in &mut got {
                    o.line += r.line - 1;
                }
                Source::New(got)
            }
        };
        plan.push((p, r.line, source));
    }
    // The kept objects were unique in the old file; a new one must not be
    // one of them.
    let reused = plan.iter().filter_map(|(_, _, s)| match s {
        Source::Old { at, count, .. } => old.get(*at..*at + *count),
        Source::New(_) => None,
    });
    for o in reused.flatten() {
        let clash = if added.len() <= COMPARE_UP_TO {
            added.iter().any(|id| o.object.has_id(id.0, &id.1))
        } else {
            added.contains(&o.object.id())
        };
        if clash {
            return None;
        }
    }
    let dropped: Vec<Id> = by_print
        .values()
        .flatten()
        .filter_map(|&(_, at, count)| old.get(at..at + count))
        .flatten()
        .map(|o| o.object.id())
        .collect();

    let mut old: Vec<Option<Located>> = std::mem::take(old).into_iter().map(Some).collect();
    let mut objects = Vec::with_capacity(old.len() + added.len());
    let mut kept = Vec::with_capacity(plan.len());
    for (p, line, source) in plan {
        let before = objects.len();
        match source {
            Source::Old {
                line: was,
                at,
                count,
            } => {
                for o in old.get_mut(at..at + count).into_iter().flatten() {
                    if let Some(mut o) = o.take() {
                        o.line = (o.line + line).saturating_sub(was);
                        objects.push(o);
                    }
                }
            }
            Source::New(mut got) => objects.append(&mut got),
        }
        kept.push((p, line, objects.len() - before));
    }
    let added = added.into_iter().collect();
    Some((objects, Runs(kept), Delta { dropped, added }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Object;

    fn svc(name: &str, port: u16) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: {port}\n")
    }

    /// Objects with their lines, for comparing two parses.
    fn seen(objects: &[Located]) -> Vec<(String, usize, String)> {
        objects
            .iter()
            .map(|l| {
                (
                    format!("{:?}", l.object.id()),
                    l.line,
                    format!("{:?}", l.object),
                )
            })
            .collect()
    }

    /// Parses `before`, then `after` reusing it; checks the result is what
    /// a parse of `after` alone gives (objects, lines, errors); returns the
    /// names of the objects reused (marked in the old version).
    fn reparse(before: &str, after: &str) -> Vec<String> {
        let limits = Limits::default();
        let (mut old, errors, runs, _) = parse_yaml("f.yaml", before, &limits, None);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            seen(&old),
            seen(&parse_located("f.yaml", before, &limits).0)
        );
        // A mark that only a reused object can carry (outside its identity).
        for l in &mut old {
            if let Object::Service(s) = &mut l.object {
                s.external_name = Some("kept".to_string());
            }
        }
        let kept_before = old.len();
        let (got, errors, _, _) = parse_yaml("f.yaml", after, &limits, Some((&mut old, &runs)));
        let (want, want_errors) = parse_located("f.yaml", after, &limits);
        let messages = |e: &[ManifestError]| e.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(messages(&errors), messages(&want_errors));
        if !errors.is_empty() {
            assert_eq!(
                old.len(),
                kept_before,
                "the old objects stay when the file has errors"
            );
            return Vec::new();
        }
        const MARK: &str = "external_name: Some(\"kept\")";
        let unmark = |v: &[Located]| {
            seen(v)
                .into_iter()
                .map(|(id, line, o)| (id, line, o.replace(MARK, "external_name: None")))
                .collect::<Vec<_>>()
        };
        assert_eq!(unmark(&got), unmark(&want));
        seen(&got)
            .into_iter()
            .filter(|(_, _, o)| o.contains(MARK))
            .map(|(id, _, _)| id)
            .collect()
    }

    #[test]
    fn runs_split_at_document_markers() {
        let text = "# head\na: 1\n---\nb: 2\n--- # c\nc: 3\n---x: no\n...\n---\n";
        let r = runs(text);
        let got: Vec<(usize, &str)> = r.iter().map(|r| (r.line, r.text)).collect();
        assert_eq!(
            got,
            vec![
                (1, "# head\na: 1\n"),
                (3, "---\nb: 2\n"),
                (5, "--- # c\nc: 3\n---x: no\n...\n"),
                (9, "---\n")
            ]
        );
        assert!(runs("").is_empty());
    }

    /// Only the documents that changed are parsed again; the others keep
    /// their objects, moved to their new lines; the result is always the
    /// whole file's parse.
    #[test]
    fn unchanged_documents_keep_their_objects() {
        let (a, b, c) = (svc("a", 80), svc("b", 81), svc("c", 82));
        let file = format!("{a}---\n{b}---\n{c}");
        // One document changed: the two others kept.
        let kept = reparse(&file, &format!("{a}---\n{}---\n{c}", svc("b", 91)));
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(
            kept[0].contains("\"a\"") && kept[1].contains("\"c\""),
            "{kept:?}"
        );
        // A document inserted above: the ones below kept, lines moved (the
        // first one's run now starts with a marker: parsed again).
        let kept = reparse(&file, &format!("{}---\n{a}---\n{b}---\n{c}", svc("z", 1)));
        assert_eq!(kept.len(), 2, "{kept:?}");
        let kept = reparse(&file, &format!("# note\n\n{a}---\n{b}---\n{c}"));
        assert_eq!(kept.len(), 2, "{kept:?}");
        // Removed, reordered, repeated documents.
        assert_eq!(reparse(&file, &format!("{a}---\n{c}")).len(), 2);
        assert_eq!(reparse(&file, &format!("{c}---\n{b}---\n{a}")).len(), 1);
        assert_eq!(
            reparse(&file, &format!("{a}---\n{b}---\n{b}---\n{c}")).len(),
            0
        );
        // A List document among them.
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            svc("l", 5).trim_end().replace('\n', "\n  ")
        );
        assert_eq!(
            reparse(
                &format!("{list}---\n{a}"),
                &format!("{list}---\n{}", svc("a", 6))
            )
            .len(),
            1
        );
    }

    /// What changed names the ids of the documents parsed and of those
    /// gone, not the ones kept.
    #[test]
    fn the_delta_names_what_was_parsed_and_what_went() {
        let limits = Limits::default();
        let (a, b, c) = (svc("a", 80), svc("b", 81), svc("c", 82));
        let (mut old, _, runs, _) =
            parse_yaml("f.yaml", &format!("{a}---\n{b}---\n{c}"), &limits, None);
        let after = format!("{a}---\n{}---\n{}", svc("b", 91), svc("d", 83));
        let (_, errors, _, delta) = parse_yaml("f.yaml", &after, &limits, Some((&mut old, &runs)));
        assert!(errors.is_empty());
        let names = |ids: &[Id]| {
            let mut n: Vec<String> = ids.iter().map(|id| id.1.name.clone()).collect();
            n.sort();
            n
        };
        let d = delta.expect("runs kept");
        assert_eq!(names(&d.dropped), vec!["b", "c"]);
        assert_eq!(names(&d.added), vec!["b", "d"]);
    }

    /// Errors are the whole file's, with its positions, and leave the old
    /// objects in place; so does an object defined twice across documents.
    #[test]
    fn errors_are_the_whole_files() {
        let (a, b) = (svc("a", 80), svc("b", 81));
        let file = format!("{a}---\n{b}");
        assert!(reparse(&file, &format!("{a}---\nkind: [\n")).is_empty());
        assert!(reparse(&file, &format!("{a}---\n{b}---\n{a}")).is_empty());
        let typed = format!("{a}---\n{}", svc("b", 81).replace("port: 81", "port: x"));
        assert!(reparse(&file, &typed).is_empty());
        // A directive above a marker: parsed whole (its run alone is no
        // YAML), the same objects.
        assert!(reparse(
            &file,
            &format!("{a}---\n{b}...\n%YAML 1.1\n---\n{}", svc("c", 1))
        )
        .is_empty());
    }
}
