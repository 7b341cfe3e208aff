//! Secret references (`env:NAME`, `file:PATH`, `keyvault:URL`) and their resolution into the
//! engine's [`Secret`]s.
//!
//! Policy files never hold a secret literally; they hold a reference resolved once at start-up
//! through a [`SecretSource`]: [`SystemSecrets`] reads the process environment and the file
//! system, [`MapSecrets`] overlays fixed values on another source (for in-process demos and tests,
//! since `std::env::set_var` is unsafe in edition 2024). Reading Key Vault takes HTTP and an Entra
//! ID identity, which this crate does not have: the `gateway` binary fetches the referenced secrets
//! first and answers [`SecretSource::key_vault`] from what it fetched.
//!
//! ```
//! use gateway_policy::secret::{MapSecrets, NoSecrets, SecretRef};
//!
//! let reference: SecretRef = "env:SWEDEN_KEY".parse().unwrap();
//! let source = MapSecrets::with_fallback(NoSecrets).with_env("SWEDEN_KEY", "k-123\n");
//! let secret = reference.resolve(&source, None).unwrap();
//! assert_eq!(secret.expose(), "k-123");
//! assert!("sk-literal-key".parse::<SecretRef>().is_err());
//!
//! let vault: SecretRef = "keyvault:https://my-vault.vault.azure.net/secrets/sweden-key".parse().unwrap();
//! let SecretRef::KeyVault(reference) = vault else { unreachable!() };
//! assert_eq!(reference.url(), "https://my-vault.vault.azure.net/secrets/sweden-key");
//! assert!("keyvault:https://evil.example.com/secrets/k".parse::<SecretRef>().is_err());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

// What references resolve to: engine types, re-exported so a policy user needs one import.
pub use gateway_core::secret::{Credential, Secret};

/// Where a secret comes from, as written in a policy: `env:NAME` or `file:PATH`.
///
/// `Display` prints the reference (never the value), so it is safe to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`: the environment variable `NAME` (`[A-Za-z_][A-Za-z0-9_]*`).
    Env(String),
    /// `file:PATH`: a file's contents; a relative path is relative to the policy file's directory.
    File(PathBuf),
    /// `keyvault:https://VAULT.vault.azure.net/secrets/NAME[/VERSION]`: a Key Vault secret.
    KeyVault(KeyVaultRef),
}

/// A Key Vault secret: `https://VAULT.vault.azure.net/secrets/NAME`, optionally `/VERSION`.
///
/// Only `https://` URLs on a Key Vault host (`*.vault.azure.net` and the sovereign clouds'
/// equivalents) are accepted, so a policy cannot send the gateway's identity token elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVaultRef {
    vault: String,
    name: String,
    version: Option<String>,
}

/// DNS suffixes of Key Vault in Azure's public and sovereign clouds.
const KEY_VAULT_SUFFIXES: &[&str] = &[
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
];

/// Why a reference is malformed or could not be resolved. Never contains a secret value.
#[derive(Debug)]
#[non_exhaustive]
pub enum SecretError {
    /// Not `env:` or `file:` (a literal key, an unknown scheme, or empty).
    NotAReference,
    /// A `keyvault:` reference that is not `https://VAULT.vault.azure.net/secrets/NAME[/VERSION]`.
    InvalidKeyVault(&'static str),
    /// The Key Vault secret could not be read.
    KeyVault {
        /// The secret's URL, as written.
        url: String,
        /// Why (never the value).
        error: String,
    },
    /// `env:` followed by something that is not a variable name.
    InvalidEnvName,
    /// `file:` with no path.
    EmptyFilePath,
    /// The environment variable is not set (or not valid UTF-8).
    EnvNotSet(String),
    /// The environment variable is set but empty (after trimming whitespace).
    EnvEmpty(String),
    /// The file could not be read.
    FileUnreadable {
        /// The path as written after `file:`.
        reference: PathBuf,
        /// The path read (joined to the policy directory).
        path: PathBuf,
        /// Why reading failed.
        error: io::Error,
    },
    /// The file is empty (after trimming whitespace).
    FileEmpty {
        /// The path as written after `file:`.
        reference: PathBuf,
        /// The path read (joined to the policy directory).
        path: PathBuf,
    },
}

/// Reads environment variables and files for secret resolution.
pub trait SecretSource {
    /// The value of environment variable `name`, if set.
    fn env(&self, name: &str) -> Option<String>;
    /// The contents of the file at `path`.
    fn read_file(&self, path: &Path) -> io::Result<String>;
    /// The value of a Key Vault secret, or why it could not be read. A source that cannot reach
    /// Key Vault (the default) says so.
    fn key_vault(&self, reference: &KeyVaultRef) -> Result<String, String> {
        let _ = reference;
        Err("this program cannot read Key Vault".to_owned())
    }
}

/// The real process environment and file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemSecrets;

/// A source where nothing is set and no file exists; a hermetic fallback for [`MapSecrets`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSecrets;

/// Fixed environment variables and files laid over another source (by default the real system).
///
/// Its `Debug` shows names and paths, never values.
#[derive(Clone)]
pub struct MapSecrets<S = SystemSecrets> {
    env: BTreeMap<String, String>,
    files: BTreeMap<PathBuf, String>,
    fallback: S,
}

const ACCEPTED_FORMS: &str = "`env:NAME` (an environment variable), `file:PATH` (a file, relative to the policy file's directory) or `keyvault:https://VAULT.vault.azure.net/secrets/NAME` (a Key Vault secret)";

// === impl SecretRef ===

impl SecretRef {
    /// Parses `env:NAME` or `file:PATH`. Anything else is an error that does not echo the input
    /// (it may be a pasted key).
    pub fn parse(reference: &str) -> Result<Self, SecretError> {
        if let Some(name) = reference.strip_prefix("env:") {
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid {
                Ok(Self::Env(name.to_owned()))
            } else {
                Err(SecretError::InvalidEnvName)
            }
        } else if let Some(path) = reference.strip_prefix("file:") {
            if path.trim().is_empty() {
                Err(SecretError::EmptyFilePath)
            } else {
                Ok(Self::File(PathBuf::from(path)))
            }
        } else if let Some(url) = reference.strip_prefix("keyvault:") {
            KeyVaultRef::parse(url).map(Self::KeyVault)
        } else {
            Err(SecretError::NotAReference)
        }
    }

    /// Reads the secret. A relative `file:` path is joined to `base_dir` (the policy file's
    /// directory) when given. Trailing whitespace and newlines are removed; an empty value is an
    /// error.
    pub fn resolve(
        &self,
        source: &dyn SecretSource,
        base_dir: Option<&Path>,
    ) -> Result<Secret, SecretError> {
        match self {
            Self::Env(name) => {
                let value = source
                    .env(name)
                    .ok_or_else(|| SecretError::EnvNotSet(name.clone()))?;
                let value = value.trim_end();
                if value.is_empty() {
                    return Err(SecretError::EnvEmpty(name.clone()));
                }
                Ok(Secret::new(value))
            }
            Self::File(reference) => {
                let path = match base_dir {
                    Some(dir) if reference.is_relative() => dir.join(reference),
                    _ => reference.clone(),
                };
                let value = match source.read_file(&path) {
                    Ok(value) => value,
                    Err(error) => {
                        return Err(SecretError::FileUnreadable {
                            reference: reference.clone(),
                            path,
                            error,
                        });
                    }
                };
                let value = value.trim_end();
                if value.is_empty() {
                    return Err(SecretError::FileEmpty {
                        reference: reference.clone(),
                        path,
                    });
                }
                Ok(Secret::new(value))
            }
            Self::KeyVault(reference) => {
                let value = source
                    .key_vault(reference)
                    .map_err(|error| SecretError::KeyVault {
                        url: reference.url(),
                        error,
                    })?;
                if value.trim_end().is_empty() {
                    return Err(SecretError::KeyVault {
                        url: reference.url(),
                        error: "the secret is empty".to_owned(),
                    });
                }
                Ok(Secret::new(value.trim_end()))
            }
        }
    }
}

// === impl KeyVaultRef ===

impl KeyVaultRef {
    /// Parses `https://VAULT.vault.azure.net/secrets/NAME[/VERSION]`.
    pub fn parse(url: &str) -> Result<Self, SecretError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or(SecretError::InvalidKeyVault("must start with `https://`"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = host.to_ascii_lowercase();
        let label = KEY_VAULT_SUFFIXES
            .iter()
            .find_map(|suffix| host.strip_suffix(suffix))
            .ok_or(SecretError::InvalidKeyVault(
                "the host must be a Key Vault (`VAULT.vault.azure.net`)",
            ))?;
        if label.is_empty()
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(SecretError::InvalidKeyVault(
                "the vault name must be letters, digits and `-`",
            ));
        }
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 127
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let mut segments = path.trim_end_matches('/').split('/');
        let (Some("secrets"), Some(name)) = (segments.next(), segments.next()) else {
            return Err(SecretError::InvalidKeyVault(
                "the path must be `/secrets/NAME` or `/secrets/NAME/VERSION`",
            ));
        };
        let version = segments.next();
        if !segment_ok(name) || version.is_some_and(|v| !segment_ok(v)) || segments.next().is_some()
        {
            return Err(SecretError::InvalidKeyVault(
                "the path must be `/secrets/NAME` or `/secrets/NAME/VERSION` (letters, digits and `-`)",
            ));
        }
        Ok(Self {
            vault: format!("https://{host}"),
            name: name.to_owned(),
            version: version.map(str::to_owned),
        })
    }

    /// The vault's base URL, `https://VAULT.vault.azure.net`.
    pub fn vault(&self) -> &str {
        &self.vault
    }

    /// The secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pinned version, if any; the latest version otherwise.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The secret's URL as written: `{vault}/secrets/{name}[/{version}]`.
    pub fn url(&self) -> String {
        match &self.version {
            Some(version) => format!("{}/secrets/{}/{version}", self.vault, self.name),
            None => format!("{}/secrets/{}", self.vault, self.name),
        }
    }
}

impl FromStr for SecretRef {
    type Err = SecretError;

    fn from_str(reference: &str) -> Result<Self, Self::Err> {
        Self::parse(reference)
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::KeyVault(reference) => write!(f, "keyvault:{}", reference.url()),
        }
    }
}

// === impl SecretError ===

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAReference => write!(
                f,
                "secrets must be references, not values: expected {ACCEPTED_FORMS}"
            ),
            Self::InvalidKeyVault(why) => write!(
                f,
                "`keyvault:` must be followed by `https://VAULT.vault.azure.net/secrets/NAME[/VERSION]`: {why}"
            ),
            Self::KeyVault { url, error } => {
                write!(f, "cannot read Key Vault secret `{url}`: {error}")
            }
            Self::InvalidEnvName => f.write_str(
                "`env:` must be followed by an environment variable name matching [A-Za-z_][A-Za-z0-9_]*",
            ),
            Self::EmptyFilePath => f.write_str("`file:` must be followed by a path"),
            Self::EnvNotSet(name) => {
                write!(f, "environment variable `{name}` (from `env:{name}`) is not set")
            }
            Self::EnvEmpty(name) => {
                write!(f, "environment variable `{name}` (from `env:{name}`) is empty")
            }
            Self::FileUnreadable {
                reference,
                path,
                error,
            } => write!(
                f,
                "cannot read secret file `{}` (from `file:{}`): {error}",
                path.display(),
                reference.display()
            ),
            Self::FileEmpty { reference, path } => write!(
                f,
                "secret file `{}` (from `file:{}`) is empty",
                path.display(),
                reference.display()
            ),
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::FileUnreadable { error, .. } => Some(error),
            _ => None,
        }
    }
}

// === impl SecretSource ===

impl<T: SecretSource + ?Sized> SecretSource for &T {
    fn env(&self, name: &str) -> Option<String> {
        (**self).env(name)
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        (**self).read_file(path)
    }

    fn key_vault(&self, reference: &KeyVaultRef) -> Result<String, String> {
        (**self).key_vault(reference)
    }
}

impl SecretSource for SystemSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
}

impl SecretSource for NoSecrets {
    fn env(&self, _name: &str) -> Option<String> {
        None
    }

    fn read_file(&self, _path: &Path) -> io::Result<String> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
}

// === impl MapSecrets ===

impl MapSecrets<SystemSecrets> {
    /// An overlay over the real environment and file system.
    pub fn new() -> Self {
        Self::with_fallback(SystemSecrets)
    }
}

impl Default for MapSecrets<SystemSecrets> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> MapSecrets<S> {
    /// An overlay over `fallback`, which answers whatever the overlay does not set.
    pub fn with_fallback(fallback: S) -> Self {
        Self {
            env: BTreeMap::new(),
            files: BTreeMap::new(),
            fallback,
        }
    }

    /// Sets environment variable `name` in the overlay.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets the contents of the file at `path` (matched exactly, after joining to the policy
    /// directory) in the overlay.
    pub fn with_file(mut self, path: impl Into<PathBuf>, contents: impl Into<String>) -> Self {
        self.files.insert(path.into(), contents.into());
        self
    }
}

impl<S: SecretSource> SecretSource for MapSecrets<S> {
    fn env(&self, name: &str) -> Option<String> {
        match self.env.get(name) {
            Some(value) => Some(value.clone()),
            None => self.fallback.env(name),
        }
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        match self.files.get(path) {
            Some(contents) => Ok(contents.clone()),
            None => self.fallback.read_file(path),
        }
    }

    fn key_vault(&self, reference: &KeyVaultRef) -> Result<String, String> {
        self.fallback.key_vault(reference)
    }
}

impl<S: fmt::Debug> fmt::Debug for MapSecrets<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapSecrets")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(reference: &str) -> String {
        match SecretRef::parse(reference) {
            Ok(parsed) => panic!("{reference} parsed as {parsed:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn parses_references() {
        assert_eq!(
            SecretRef::parse("env:_A1").unwrap(),
            SecretRef::Env("_A1".into())
        );
        assert_eq!(
            SecretRef::parse("file:keys/a.txt").unwrap(),
            SecretRef::File("keys/a.txt".into())
        );
        assert_eq!(SecretRef::parse("env:X").unwrap().to_string(), "env:X");
    }

    #[test]
    fn rejects_anything_else_without_echoing_it() {
        let literal = parse_err("0123456789abcdef0123456789abcdef");
        assert!(literal.starts_with("secrets must be references, not values"));
        assert!(literal.contains("`keyvault:https://VAULT.vault.azure.net/secrets/NAME`"));
        assert!(!literal.contains("0123"));
        assert!(parse_err("env:1X").contains("[A-Za-z_][A-Za-z0-9_]*"));
        assert!(parse_err("env:").contains("[A-Za-z_][A-Za-z0-9_]*"));
        assert!(parse_err("env:sk-abc").contains("variable name"));
        assert_eq!(parse_err("file:"), "`file:` must be followed by a path");
        for bad in [
            "keyvault:vault/secret",
            "keyvault:http://v.vault.azure.net/secrets/k",
            "keyvault:https://v.vault.azure.net.evil.com/secrets/k",
            "keyvault:https://127.0.0.1/secrets/k",
            "keyvault:https://v.vault.azure.net/keys/k",
            "keyvault:https://v.vault.azure.net/secrets/",
            "keyvault:https://v.vault.azure.net/secrets/k/v/x",
            "keyvault:https://v.vault.azure.net/secrets/k?x=1",
        ] {
            assert!(
                parse_err(bad).starts_with("`keyvault:` must be followed by"),
                "{bad}"
            );
        }
        let SecretRef::KeyVault(pinned) =
            SecretRef::parse("keyvault:https://My-Vault.vault.azure.net/secrets/k-1/0a1b").unwrap()
        else {
            panic!("not a Key Vault reference")
        };
        assert_eq!(pinned.vault(), "https://my-vault.vault.azure.net");
        assert_eq!((pinned.name(), pinned.version()), ("k-1", Some("0a1b")));
        assert!(parse_err("ENV:X").starts_with("secrets must be references"));
    }

    #[test]
    fn resolves_through_overlay_and_trims() {
        let source = MapSecrets::with_fallback(NoSecrets)
            .with_env("K", "v1\n")
            .with_env("BLANK", " \n")
            .with_file("/etc/gw/key", "file-value\r\n")
            .with_file("/etc/gw/empty", "\n");
        let resolve =
            |r: &str, dir: Option<&Path>| SecretRef::parse(r).unwrap().resolve(&source, dir);
        assert_eq!(resolve("env:K", None).unwrap().expose(), "v1");
        assert_eq!(
            resolve("file:key", Some(Path::new("/etc/gw")))
                .unwrap()
                .expose(),
            "file-value"
        );
        assert_eq!(
            resolve("file:/etc/gw/key", Some(Path::new("/elsewhere")))
                .unwrap()
                .expose(),
            "file-value"
        );
        assert_eq!(
            resolve("env:UNSET", None).unwrap_err().to_string(),
            "environment variable `UNSET` (from `env:UNSET`) is not set"
        );
        assert_eq!(
            resolve("env:BLANK", None).unwrap_err().to_string(),
            "environment variable `BLANK` (from `env:BLANK`) is empty"
        );
        assert_eq!(
            resolve("file:/etc/gw/empty", None).unwrap_err().to_string(),
            "secret file `/etc/gw/empty` (from `file:/etc/gw/empty`) is empty"
        );
        assert!(
            resolve("file:/nope", None)
                .unwrap_err()
                .to_string()
                .starts_with("cannot read secret file `/nope` (from `file:/nope`): ")
        );
    }

    #[test]
    fn debug_never_shows_values() {
        let source = MapSecrets::with_fallback(NoSecrets).with_env("K", "hunter2");
        assert!(!format!("{source:?}").contains("hunter2"));
        assert_eq!(
            format!("{:?}", Credential::ApiKey(Secret::new("hunter2"))),
            "ApiKey(Secret(***))"
        );
        let vault = SecretRef::parse("keyvault:https://v.vault.azure.net/secrets/k").unwrap();
        let error = vault.resolve(&source, None).unwrap_err().to_string();
        assert_eq!(
            error,
            "cannot read Key Vault secret `https://v.vault.azure.net/secrets/k`: this program cannot read Key Vault"
        );
    }
}
