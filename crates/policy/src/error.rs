//! Policy errors that name the file, line, column and field path, and the source they point into.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem in a policy file.
///
/// Displays as `FILE:LINE:COL: PATH: MESSAGE`. `PATH: ` is left out for the document root (an empty
/// `path`), and `LINE:COL:` when there is no position (`line == 0`, e.g. the file could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The policy file as given (its path, or the name passed to [`Policy::from_toml_str`]).
    ///
    /// [`Policy::from_toml_str`]: crate::Policy::from_toml_str
    pub file: String,
    /// 1-based line of the offending key or value; 0 when there is no position.
    pub line: usize,
    /// 1-based column, in characters; 0 when there is no position.
    pub column: usize,
    /// Field path such as `backends[1].weight`; empty for the document root.
    pub path: String,
    /// What is wrong, and what was expected.
    pub message: String,
}

/// All problems found in a policy file, in document order. Displays one error per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// Where a [`Policy`](crate::Policy) came from: the file name used in errors, the directory
/// that relative `file:` secrets are resolved against, and the text (kept to locate later errors).
#[derive(Clone)]
pub struct PolicySource {
    name: String,
    dir: Option<PathBuf>,
    text: Arc<str>,
}

// === impl PolicyError ===

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

// === impl PolicyErrors ===

impl PolicyErrors {
    /// The errors, in document order.
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    /// How many errors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (never true for an `Err` returned by this crate).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<PolicyError> for PolicyErrors {
    fn from(error: PolicyError) -> Self {
        Self(vec![error])
    }
}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

// === impl PolicySource ===

impl PolicySource {
    /// A source named `name` (used in errors) with the given text; `dir` is where relative `file:`
    /// secrets live (`None`: the current directory).
    pub fn new(name: impl Into<String>, dir: Option<PathBuf>, text: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            dir,
            text: text.into(),
        }
    }

    /// The name used in errors: the file path, or the name given to `from_toml_str`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory of the policy file, when it was loaded from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The policy text as read.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Default for PolicySource {
    /// An unnamed, empty source, for policies built in code.
    fn default() -> Self {
        Self::new("<policy>", None, "")
    }
}

impl fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySource")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(line: usize, path: &str) -> PolicyError {
        PolicyError {
            file: "p.toml".into(),
            line,
            column: if line > 0 { 7 } else { 0 },
            path: path.into(),
            message: "bad".into(),
        }
    }

    #[test]
    fn display_leaves_out_empty_parts() {
        assert_eq!(error(3, "a.b").to_string(), "p.toml:3:7: a.b: bad");
        assert_eq!(error(3, "").to_string(), "p.toml:3:7: bad");
        assert_eq!(error(0, "").to_string(), "p.toml: bad");
        let all = PolicyErrors(vec![error(1, "x"), error(2, "y")]);
        assert_eq!(all.to_string(), "p.toml:1:7: x: bad\np.toml:2:7: y: bad");
    }
}
