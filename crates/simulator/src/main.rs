//! `aoai-sim`: serve one simulated Azure OpenAI region until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use simulator::{DeploymentConfig, DoneEnding, Fault, RegionConfig, ResetFormat, ServerTls};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
aoai-sim: a simulated Azure OpenAI resource in one region

USAGE:
    aoai-sim [OPTIONS]

OPTIONS:
    --listen ADDR            address to bind [default: 127.0.0.1:9001]
    --region NAME            region name sent in x-ms-region [default: Sweden Central]
    --deployment NAME=TPM[:MODEL]
                             add a deployment (repeatable); a name containing \"embedding\" is an
                             embeddings deployment, anything else a chat deployment
                             [default: gpt-4o=30000 text-embedding-3-small=100000]
    --api-key KEY            accepted API key (repeatable) [default: sim-key]
    --token-delay-ms N       delay before each streamed token [default: 0]
    --seed N                 seed for fault percentages and generated text [default: 0]
    --fault JSON             start-up fault (repeatable), e.g. '{\"kind\":\"status\",\"status\":503,\"percent\":10}'
    --ptu NAME               mark deployment NAME as provisioned (repeatable): every answer
                             carries azure-openai-deployment-utilization, e.g. `87%`
    --reasoning NAME         make deployment NAME a reasoning model (repeatable): it reports as
                             many reasoning tokens as it writes, in completion_tokens_details
    --tls-cert FILE          serve HTTPS (HTTP/1.1) with this PEM certificate chain, leaf first
                             (needs --tls-key)
    --tls-key FILE           the PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)
    -h, --help               print this help

VARIANTS (how real backends differ from Azure's documented answers; all off by default):
    --spaced-json            JSON with a space after every `:` and `,` (Python's json.dumps), in
                             answers, stream chunks and error bodies
    --seconds-only-429       no retry-after-ms anywhere: a 429 says when to come back only in
                             retry-after (whole seconds) and x-ratelimit-reset-*
    --reset-format FORMAT    x-ratelimit-reset-* as `seconds` (`6`) or `duration` (`250ms`,
                             `1.5s`, `1m30s`) [default: seconds]
    --ignore-include-usage   streams carry no usage chunk, even with stream_options.include_usage
    --no-stream-content-type streams are sent without a content-type header
    --done-ending ENDING     how the final `data: [DONE]` ends: `blank-line` (`\\n\\n`),
                             `newline` (`\\n`) or `bare` (nothing) [default: blank-line]
    --priority-as-default    requests for service_tier `priority` are served, and answered, at
                             `default` (Azure's silent downgrade when priority traffic ramps)
    --prompt-cache           prompts of 1,024 tokens or more seen before report cached_tokens
                             (the prompt rounded down to 128), as Azure's prompt caching does
    --flex-429               Flex capacity is out: requests with service_tier `flex` get a 429

BENCHMARKS:
    --approximate-tokens     count prompts as a token per four bytes instead of with tiktoken
                             (a 1 MB prompt costs ~70 ms of CPU to count exactly)

x-ratelimit-remaining-requests counts the 10-second request window down to 0 on the last request
it admits; the next one gets a 429.

ADMIN API (no auth):
    POST /sim/faults (one fault or an array; replaces)   DELETE /sim/faults
    GET /sim/faults   GET /sim/stats   POST /sim/reset (empties rate-limit windows)

Logs go to stderr; set RUST_LOG (default: info).";

struct Args {
    listen: SocketAddr,
    config: RegionConfig,
    /// `--tls-cert` and `--tls-key`.
    tls: Option<TlsFiles>,
}

struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("aoai-sim: {message}\n\nRun `aoai-sim --help` for usage.");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let tls = match args.tls.as_ref().map(load_tls).transpose() {
        Ok(tls) => tls,
        Err(message) => {
            eprintln!("aoai-sim: {message}");
            return ExitCode::FAILURE;
        }
    };
    let config = args.config;
    let summary: Vec<String> = config
        .deployments
        .iter()
        .map(|d| format!("{}={} ({:?}, {})", d.name, d.tpm, d.kind, d.model))
        .collect();
    let keys = config.api_keys.join(", ");
    let spawned = match tls {
        Some(tls) => simulator::spawn_tls(config, args.listen, tls).await,
        None => simulator::spawn(config, args.listen).await,
    };
    let region = match spawned {
        Ok(region) => region,
        Err(error) => {
            eprintln!("aoai-sim: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let handle = region.handle();
    println!("aoai-sim: region {:?} on {}", handle.region(), region.url());
    println!("aoai-sim: api keys: {keys}");
    println!("aoai-sim: deployments: {}", summary.join(", "));
    tracing::info!(url = %region.url(), "serving; Ctrl-C to stop");

    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::error!(%error, "cannot wait for Ctrl-C");
    }
    tracing::info!(requests = handle.request_count(), "shutting down");
    region.shutdown().await;
    ExitCode::SUCCESS
}

/// Reads `--tls-cert` and `--tls-key`; the error names the option at fault.
fn load_tls(files: &TlsFiles) -> Result<ServerTls, String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let cert = read("--tls-cert", &files.cert)?;
    let key = read("--tls-key", &files.key)?;
    ServerTls::from_pem(&cert, &key).map_err(|e| {
        format!(
            "--tls-cert {} / --tls-key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })
}

/// Parses the arguments; `Ok(None)` means `--help`.
fn parse(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 9001).into();
    let mut region = "Sweden Central".to_owned();
    let mut deployments = Vec::new();
    let mut keys = Vec::new();
    let mut token_delay = Duration::ZERO;
    let mut seed = 0;
    let mut faults = Vec::new();
    let mut ptu = Vec::new();
    let mut reasoning = Vec::new();
    let mut variants = simulator::Variants::default();
    let mut tls_cert = None;
    let mut tls_key = None;

    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let switch = || match &inline {
            Some(_) => Err(format!("{flag} takes no value")),
            None => Ok(true),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--region" => region = value()?,
            "--deployment" => deployments.push(parse_deployment(&value()?)?),
            "--api-key" => keys.push(value()?),
            "--token-delay-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|e| format!("--token-delay-ms {v}: {e}"))?;
                token_delay = Duration::from_millis(ms);
            }
            "--seed" => {
                let v = value()?;
                seed = v.parse().map_err(|e| format!("--seed {v}: {e}"))?;
            }
            "--fault" => {
                let v = value()?;
                let fault: Fault =
                    serde_json::from_str(&v).map_err(|e| format!("--fault {v}: {e}"))?;
                fault.validate().map_err(|e| format!("--fault {v}: {e}"))?;
                faults.push(fault);
            }
            "--tls-cert" => tls_cert = Some(PathBuf::from(value()?)),
            "--tls-key" => tls_key = Some(PathBuf::from(value()?)),
            "--ptu" => ptu.push(value()?),
            "--reasoning" => reasoning.push(value()?),
            "--prompt-cache" => variants.prompt_cache = switch()?,
            "--priority-as-default" => variants.priority_as_default = switch()?,
            "--spaced-json" => variants.spaced_json = switch()?,
            "--seconds-only-429" => variants.seconds_only_429 = switch()?,
            "--ignore-include-usage" => variants.ignore_include_usage = switch()?,
            "--no-stream-content-type" => variants.omit_stream_content_type = switch()?,
            "--flex-429" => variants.flex_429 = switch()?,
            "--approximate-tokens" => variants.approximate_tokens = switch()?,
            "--reset-format" => {
                variants.reset_format = match value()?.as_str() {
                    "seconds" => ResetFormat::Seconds,
                    "duration" => ResetFormat::Duration,
                    other => {
                        return Err(format!(
                            "--reset-format {other}: expected `seconds` or `duration`"
                        ));
                    }
                };
            }
            "--done-ending" => {
                variants.done_ending = match value()?.as_str() {
                    "blank-line" => DoneEnding::BlankLine,
                    "newline" => DoneEnding::Newline,
                    "bare" => DoneEnding::Bare,
                    other => {
                        return Err(format!(
                            "--done-ending {other}: expected `blank-line`, `newline` or `bare`"
                        ));
                    }
                };
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }

    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
        (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
    };
    if deployments.is_empty() {
        deployments.push(parse_deployment("gpt-4o=30000")?);
        deployments.push(parse_deployment("text-embedding-3-small=100000")?);
    }
    if keys.is_empty() {
        keys.push("sim-key".to_owned());
    }
    for name in &ptu {
        let deployment = deployments
            .iter_mut()
            .find(|d| &d.name == name)
            .ok_or_else(|| format!("--ptu {name}: no deployment of that name"))?;
        deployment.ptu = true;
    }
    for name in &reasoning {
        let deployment = deployments
            .iter_mut()
            .find(|d| &d.name == name)
            .ok_or_else(|| format!("--reasoning {name}: no deployment of that name"))?;
        deployment.reasoning = true;
    }
    let mut config = RegionConfig::new(region, keys.remove(0))
        .token_delay(token_delay)
        .seed(seed);
    config.api_keys.extend(keys);
    config.deployments = deployments;
    config.faults = faults;
    config.variants = variants;
    Ok(Some(Args {
        listen,
        config,
        tls,
    }))
}

/// `name=tpm` or `name=tpm:model`.
fn parse_deployment(spec: &str) -> Result<DeploymentConfig, String> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| format!("--deployment {spec}: expected NAME=TPM[:MODEL]"))?;
    let (tpm, model) = match rest.split_once(':') {
        Some((tpm, model)) => (tpm, Some(model)),
        None => (rest, None),
    };
    let tpm: u64 = tpm
        .parse()
        .map_err(|e| format!("--deployment {spec}: bad TPM: {e}"))?;
    if name.is_empty() {
        return Err(format!("--deployment {spec}: empty name"));
    }
    let deployment = if name.contains("embedding") {
        DeploymentConfig::embeddings(name, tpm)
    } else {
        DeploymentConfig::chat(name, tpm)
    };
    Ok(match model {
        Some(model) if !model.is_empty() => deployment.model(model),
        _ => deployment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use simulator::DeploymentKind;

    fn args(list: &[&str]) -> Result<Option<Args>, String> {
        parse(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_everything() {
        let parsed = args(&[
            "--listen",
            "127.0.0.1:0",
            "--region=East US",
            "--deployment",
            "gpt-4o=1000:gpt-4o-mini",
            "--deployment",
            "text-embedding-3-large=5000",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--token-delay-ms",
            "20",
            "--seed",
            "7",
            "--fault",
            r#"{"kind":"drop","percent":5}"#,
        ])
        .unwrap()
        .unwrap();
        let c = parsed.config;
        assert_eq!(c.region, "East US");
        assert_eq!(c.api_keys, ["a", "b"]);
        assert_eq!(c.deployments[0].model, "gpt-4o-mini");
        assert_eq!(c.deployments[0].kind, DeploymentKind::Chat);
        assert_eq!(c.deployments[1].kind, DeploymentKind::Embeddings);
        assert_eq!(c.token_delay, Duration::from_millis(20));
        assert_eq!(c.seed, 7);
        assert_eq!(c.faults, vec![Fault::drop_connection().percent(5.0)]);
        assert_eq!(c.variants, simulator::Variants::default());
        assert!(c.deployments.iter().all(|d| !d.ptu));
        assert!(parsed.tls.is_none());
    }

    #[test]
    fn tls_needs_both_files() {
        let parsed = args(&["--tls-cert", "c.pem", "--tls-key=k.pem"])
            .unwrap()
            .unwrap();
        let tls = parsed.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert_eq!(tls.key, PathBuf::from("k.pem"));
        let alone = args(&["--tls-cert", "c.pem"]).err().unwrap();
        assert!(alone.contains("--tls-key"), "{alone}");
        let alone = args(&["--tls-key", "k.pem"]).err().unwrap();
        assert!(alone.contains("--tls-cert"), "{alone}");
    }

    #[test]
    fn unreadable_tls_files_are_named() {
        let files = TlsFiles {
            cert: PathBuf::from("/nonexistent/aoai-sim-cert.pem"),
            key: PathBuf::from("/nonexistent/aoai-sim-key.pem"),
        };
        let error = load_tls(&files).err().unwrap();
        assert!(
            error.starts_with("--tls-cert /nonexistent/aoai-sim-cert.pem:"),
            "{error}"
        );
    }

    #[test]
    fn parses_variants() {
        let c = args(&[
            "--deployment",
            "gpt-4o-ptu=1000",
            "--deployment",
            "gpt-4o=1000",
            "--ptu",
            "gpt-4o-ptu",
            "--spaced-json",
            "--seconds-only-429",
            "--reset-format",
            "duration",
            "--ignore-include-usage",
            "--no-stream-content-type",
            "--done-ending=bare",
            "--reasoning",
            "gpt-4o",
            "--prompt-cache",
            "--priority-as-default",
            "--flex-429",
            "--approximate-tokens",
        ])
        .unwrap()
        .unwrap()
        .config;
        assert!(c.deployments[0].ptu);
        assert!(!c.deployments[1].ptu);
        assert!(!c.deployments[0].reasoning && c.deployments[1].reasoning);
        let v = c.variants;
        assert!(v.prompt_cache && v.priority_as_default);
        assert!(v.approximate_tokens);
        assert!(v.spaced_json && v.seconds_only_429);
        assert!(v.ignore_include_usage && v.omit_stream_content_type);
        assert_eq!(v.reset_format, ResetFormat::Duration);
        assert_eq!(v.done_ending, DoneEnding::Bare);
        assert!(v.flex_429);

        assert!(args(&["--ptu", "nope"]).is_err());
        assert!(args(&["--reasoning", "nope"]).is_err());
        assert!(args(&["--spaced-json=yes"]).is_err());
        assert!(args(&["--reset-format", "hours"]).is_err());
        assert!(args(&["--done-ending", "crlf"]).is_err());
        let newline = args(&["--done-ending", "newline"]).unwrap().unwrap();
        assert_eq!(newline.config.variants.done_ending, DoneEnding::Newline);
    }

    #[test]
    fn defaults_help_and_errors() {
        let c = args(&[]).unwrap().unwrap().config;
        assert_eq!(c.api_keys, ["sim-key"]);
        assert_eq!(c.deployments.len(), 2);
        assert!(args(&["--help"]).unwrap().is_none());
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--deployment", "x"]).is_err());
        assert!(args(&["--fault", r#"{"kind":"status","status":9999}"#]).is_err());
        assert!(args(&["--seed"]).is_err());
    }
}
