//! The command line: `gateway serve|check|demo`.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Usage text printed by `gateway --help`.
pub const USAGE: &str = "\
gateway: a failover gateway for Azure OpenAI

USAGE:
    gateway serve --policy FILE [--listen ADDR] [--watch-policy]
                                                  serve the policy's backends; SIGHUP reloads the
                                                  policy, and so does a change to FILE when watched
    gateway check --policy FILE [--skip-secrets]  validate a policy and print a summary
    gateway demo [--listen ADDR]                  three simulated regions behind a gateway on 127.0.0.1:8080
    gateway --help | --version

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change the level.
";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve a policy.
    Serve {
        /// The policy file.
        policy: PathBuf,
        /// Overrides the policy's listen address.
        listen: Option<SocketAddr>,
        /// Reload the policy when the file changes, as on SIGHUP.
        watch_policy: bool,
    },
    /// Validate a policy.
    Check {
        /// The policy file.
        policy: PathBuf,
        /// Do not resolve secret references (for machines that lack the secrets).
        skip_secrets: bool,
    },
    /// Run the demo.
    Demo {
        /// Where the demo gateway listens.
        listen: SocketAddr,
    },
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let Some(cmd) = args.next() else {
        return Ok(Command::Help);
    };
    let mut policy = None;
    let mut listen = None;
    let mut skip_secrets = false;
    let mut watch_policy = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--policy" => policy = Some(PathBuf::from(value(&mut args, "--policy")?)),
            "--listen" => {
                let v = value(&mut args, "--listen")?;
                listen =
                    Some(v.parse::<SocketAddr>().map_err(|e| {
                        format!("--listen {v}: {e} (expected e.g. 127.0.0.1:8080)")
                    })?);
            }
            "--skip-secrets" => skip_secrets = true,
            "--watch-policy" => watch_policy = true,
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    let need_policy = |p: Option<PathBuf>| p.ok_or_else(|| format!("'{cmd}' needs --policy FILE"));
    match cmd.as_str() {
        "serve" => Ok(Command::Serve {
            policy: need_policy(policy)?,
            listen,
            watch_policy,
        }),
        "check" => Ok(Command::Check {
            policy: need_policy(policy)?,
            skip_secrets,
        }),
        "demo" => Ok(Command::Demo {
            listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
        }),
        "-h" | "--help" | "help" => Ok(Command::Help),
        "-V" | "--version" => Ok(Command::Version),
        other => Err(format!("unknown command '{other}'")),
    }
}

fn value(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    args.next().ok_or_else(|| format!("{flag} needs a value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            p(&["serve", "--policy", "a.toml"]).unwrap(),
            Command::Serve {
                policy: "a.toml".into(),
                listen: None,
                watch_policy: false,
            }
        );
        assert_eq!(
            p(&["serve", "--watch-policy", "--policy", "a.toml"]).unwrap(),
            Command::Serve {
                policy: "a.toml".into(),
                listen: None,
                watch_policy: true,
            }
        );
        assert_eq!(
            p(&["demo", "--listen", "127.0.0.1:9"]).unwrap(),
            Command::Demo {
                listen: "127.0.0.1:9".parse().unwrap()
            }
        );
        assert_eq!(p(&[]).unwrap(), Command::Help);
        assert!(p(&["serve"]).unwrap_err().contains("--policy"));
        assert!(
            p(&["demo", "--listen", "nope"])
                .unwrap_err()
                .contains("--listen nope")
        );
        assert!(p(&["bogus"]).is_err());
    }
}
