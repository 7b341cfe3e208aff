//! Reading a policy: TOML syntax and type errors with their position and field path.

use std::path::Path;

use serde_path_to_error::Segment;

use super::locate;
use super::{Policy, PolicyError, PolicyErrors, PolicySource};

// === impl Policy ===

impl Policy {
    /// Parses and validates a policy. `source` names it in errors (usually its path); relative
    /// `file:` secrets resolve against the current directory unless [`Policy::resolve_secrets`] is
    /// given one.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Policy, PolicyErrors> {
        Self::from_source(PolicySource::new(source, None, text))
    }

    /// Reads, parses and validates the policy file at `path`. Relative `file:` secrets resolve
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError {
            file: name.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read policy file: {error}"),
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        };
        Self::from_source(PolicySource::new(name, Some(dir), text))
    }

    /// Parses and validates a policy from `source`. [`Policy::warnings`] are logged (`WARN`).
    pub fn from_source(source: PolicySource) -> Result<Policy, PolicyErrors> {
        let mut policy = parse(&source)?;
        policy.source = source;
        policy.validate()?;
        for warning in policy.warnings() {
            tracing::warn!(%warning, "suspicious policy");
        }
        Ok(policy)
    }
}

/// Deserialises the text; the first syntax or type error is reported (serde stops there).
fn parse(source: &PolicySource) -> Result<Policy, PolicyError> {
    let text = source.text();
    let deserializer = toml::Deserializer::parse(text).map_err(|error| {
        let mut message = format!("invalid TOML: {}", error.message());
        if let Some(span) = error.span().filter(|span| !span.is_empty()) {
            if error.message() == "duplicate key" {
                message = format!("invalid TOML: duplicate key `{}`", &text[span]);
            }
        }
        locate::error_at(source, error.span(), "", message)
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let mut path = String::new();
        for segment in error.path().iter() {
            path = match segment {
                Segment::Seq { index } => locate::index(&path, *index),
                Segment::Map { key } | Segment::Enum { variant: key } => locate::field(&path, key),
                Segment::Unknown => locate::field(&path, "?"),
            };
        }
        let error = error.into_inner();
        locate::error_at(source, error.span(), &path, error.message())
    })
}
