//! Finding the line and column of a field path (`backends[1].deployments.gpt-4o`) in the policy text.
//!
//! The model carries no spans: errors found after deserialisation re-parse the text into toml's
//! spanned document and look the path up here.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable};

use super::{PolicyError, PolicySource};

/// Turns field paths into positions in one policy source.
pub(crate) struct Locator<'a> {
    source: &'a PolicySource,
    root: Option<Spanned<DeTable<'a>>>,
}

/// One step of a field path.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `parent.key`, quoting `key` as TOML would when it is not a bare key (e.g. `"gpt-4.1"`).
pub(crate) fn field(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let key = if bare {
        key.to_owned()
    } else {
        let mut quoted = String::from("\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        quoted
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(crate) fn index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// An error at byte `span` of `source` (no position when `span` is `None`).
pub(crate) fn error_at(
    source: &PolicySource,
    span: Option<Range<usize>>,
    path: &str,
    message: impl Into<String>,
) -> PolicyError {
    let (line, column) = match span {
        Some(span) => line_column(source.text(), span.start),
        None => (0, 0),
    };
    PolicyError {
        file: source.name().to_owned(),
        line,
        column,
        path: path.to_owned(),
        message: message.into(),
    }
}

fn parse_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut chars = path.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '.' => {
                chars.next();
            }
            '[' => {
                chars.next();
                let digits: String = chars.by_ref().take_while(|c| *c != ']').collect();
                segments.push(Segment::Index(digits.parse().unwrap_or(usize::MAX)));
            }
            '"' => {
                chars.next();
                let mut key = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => key.extend(chars.next()),
                        '"' => break,
                        c => key.push(c),
                    }
                }
                segments.push(Segment::Key(key));
            }
            _ => {
                let mut key = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '[' {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                segments.push(Segment::Key(key));
            }
        }
    }
    segments
}

// === impl Locator ===

impl<'a> Locator<'a> {
    /// Parses the source text; when it does not parse (a policy built in code), every position is 0.
    pub(crate) fn new(source: &'a PolicySource) -> Self {
        let root = if source.text().is_empty() {
            None
        } else {
            DeTable::parse(source.text()).ok()
        };
        Self { source, root }
    }

    /// An error at the value of `path` (or, when the path is not in the file, at its nearest
    /// ancestor that is).
    pub(crate) fn at_value(&self, path: &str, message: impl Into<String>) -> PolicyError {
        let span = self.find(path).map(|(_, value)| value);
        self.error(span, path, message.into())
    }

    /// An error at the key of `path` (its value for array elements).
    pub(crate) fn at_key(&self, path: &str, message: impl Into<String>) -> PolicyError {
        let span = self.find(path).map(|(key, value)| key.unwrap_or(value));
        self.error(span, path, message.into())
    }

    /// The 1-based line of the value at `path`, 0 if unknown.
    pub(crate) fn line_of(&self, path: &str) -> usize {
        self.find(path).map_or(0, |(_, value)| {
            line_column(self.source.text(), value.start).0
        })
    }

    fn error(&self, span: Option<Range<usize>>, path: &str, message: String) -> PolicyError {
        error_at(self.source, span, path, message)
    }

    /// The key and value spans of `path`, or of its deepest ancestor present in the document.
    fn find(&self, path: &str) -> Option<(Option<Range<usize>>, Range<usize>)> {
        let root = self.root.as_ref()?;
        let mut found = (None, root.span());
        let mut table: Option<&DeTable<'a>> = Some(root.get_ref());
        let mut array: Option<&DeArray<'a>> = None;
        for segment in parse_path(path) {
            let next = match segment {
                Segment::Key(key) => table
                    .and_then(|table| table.get_key_value(key.as_str()))
                    .map(|(key, value)| (Some(key.span()), value)),
                Segment::Index(i) => array
                    .and_then(|array| array.get(i))
                    .map(|value| (None, value)),
            };
            let Some((key_span, next)) = next else { break };
            found = (key_span, next.span());
            table = next.get_ref().as_table();
            array = next.get_ref().as_array();
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_through_quoting() {
        let path = index(&field(&field("", "backends"), "deployments"), 2);
        assert_eq!(path, "backends.deployments[2]");
        let path = field(&index("backends", 1), "gpt-4.1");
        assert_eq!(path, "backends[1].\"gpt-4.1\"");
        assert_eq!(
            parse_path(&path),
            vec![
                Segment::Key("backends".into()),
                Segment::Index(1),
                Segment::Key("gpt-4.1".into()),
            ]
        );
        assert_eq!(parse_path(""), vec![]);
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('"').unwrap_or(0)), (2, 6));
        assert_eq!(line_column("", 0), (1, 1));
    }

    #[test]
    fn finds_keys_values_and_nearest_ancestor() {
        let text = "[[backends]]\nname = \"a\"\n\n[[backends]]\nname = \"b\"\n[backends.deployments]\n\"gpt-4.1\" = \"x\"\n";
        let source = PolicySource::new("p.toml", None, text);
        let locator = Locator::new(&source);
        let at = |e: PolicyError| (e.line, e.column);
        assert_eq!(at(locator.at_value("backends[1].name", "")), (5, 8));
        assert_eq!(at(locator.at_key("backends[1].name", "")), (5, 1));
        assert_eq!(
            at(locator.at_key("backends[1].deployments.\"gpt-4.1\"", "")),
            (7, 1)
        );
        assert_eq!(at(locator.at_value("backends[1].weight", "")), (4, 1));
        assert_eq!(at(locator.at_value("failover.max_attempts", "")), (1, 1));
    }
}
