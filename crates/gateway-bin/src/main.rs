//! The `gateway` binary. See `gateway --help`.

use std::process::ExitCode;

use gateway_bin::cli::{self, Command};
use gateway_bin::{app, identity, reload, serve, telemetry};
use gateway_policy::Policy;
use gateway_policy::secret::SystemSecrets;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// jemalloc's background thread purges dirty pages on its decay schedule even when the process is
// idle, so what a burst of streams took goes back to the OS (docs/benchmarks.md, "Memory").
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("error: {msg}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check {
            policy,
            skip_secrets,
        } => check(&policy, skip_secrets),
        Command::Serve {
            policy,
            listen,
            watch_policy,
        } => run(async move { serve_policy(&policy, listen, watch_policy).await }),
        Command::Demo { listen } => demo(listen),
    }
}

#[cfg(feature = "demo")]
fn demo(listen: std::net::SocketAddr) -> ExitCode {
    // The demo exports traces too when the standard OTEL_EXPORTER_OTLP_* variables say where.
    run(async move {
        let telemetry = telemetry::init(&gateway_policy::TelemetrySettings::default())?;
        let result = gateway_bin::demo::run(listen).await;
        telemetry.shutdown().await;
        result
    })
}

#[cfg(not(feature = "demo"))]
fn demo(_listen: std::net::SocketAddr) -> ExitCode {
    eprintln!(
        "error: this gateway was built without the demo (Cargo feature `demo`); \
         `cargo run -p gateway-bin -- demo` from a checkout has it"
    );
    ExitCode::from(2)
}

fn run(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, skip_secrets: bool) -> ExitCode {
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    if !skip_secrets {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        // `keyvault:` references are read with the gateway's identity, as `serve` reads them.
        let secrets = match rt.block_on(identity::resolve_secrets(&policy, &SystemSecrets)) {
            Ok((secrets, _)) => secrets,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "(use --skip-secrets to check a policy on a machine without its secrets)"
                );
                return ExitCode::FAILURE;
            }
        };
        // Build what `serve` builds, so `check` refuses what `serve` would (a Redis URL the client
        // cannot use, a credential that cannot be a header value...). Nothing is served or
        // connected to: stores connect lazily.
        let built = rt.block_on(async {
            app::build(&policy, &secrets)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        if let Err(msg) = built {
            eprintln!("{}: {msg}", path.display());
            return ExitCode::FAILURE;
        }
        // The certificates `serve` would load: readable, PEM, the key fitting the certificate.
        let tls_source = identity::tls_source(&secrets, std::sync::Arc::new(SystemSecrets));
        if let Err(msg) = gateway_bin::tls::load(&policy, &*tls_source) {
            eprintln!("{msg}");
            return ExitCode::FAILURE;
        }
    }
    print!("{}", policy.summary());
    println!("policy OK: {}", path.display());
    ExitCode::SUCCESS
}

async fn serve_policy(
    path: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
    watch_policy: bool,
) -> Result<(), String> {
    let policy = Policy::load(path).map_err(|e| format!("invalid policy\n{e}"))?;
    // Logging starts here: its trace export is configured by the policy.
    let telemetry = telemetry::init(&policy.telemetry)?;
    let result = serve_loaded(path, &policy, listen, watch_policy).await;
    // The last requests' access-log lines (streams cut at shutdown among them) reach stdout
    // before the process ends.
    let _ = tokio::task::spawn_blocking(|| {
        gateway_bin::observe::flush_access_log(std::time::Duration::from_secs(2))
    })
    .await;
    // After the drain, so the last requests' spans leave too.
    telemetry.shutdown().await;
    result
}

async fn serve_loaded(
    path: &std::path::Path,
    policy: &Policy,
    listen: Option<std::net::SocketAddr>,
    watch_policy: bool,
) -> Result<(), String> {
    // Before anything is served: SIGHUP's default action ends the process.
    #[cfg(unix)]
    let hangup = reload::hangup().map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    let (secrets, identity) = identity::resolve_secrets(policy, &SystemSecrets)
        .await
        .map_err(|e| format!("cannot resolve secrets\n{e}"))?;
    // Kept for the whole run: they also keep the listeners' Key Vault certificates fresh, which a
    // reload does not replace.
    let _refreshers = match &identity {
        Some(identity) => {
            let refresh = std::time::Duration::from_secs(policy.key_vault.refresh_seconds);
            Some(identity::keep_fresh(identity, &secrets, refresh).await?)
        }
        None => None,
    };
    let mut gateway = app::build(policy, &secrets).map_err(|e| format!("invalid policy: {e}"))?;
    // Certificates from Key Vault are read from the values the identity keeps fresh.
    let tls_source = identity::tls_source(&secrets, std::sync::Arc::new(SystemSecrets));
    let tls = gateway_bin::tls::load(policy, &*tls_source)
        .map_err(|e| format!("cannot load TLS certificates\n{e}"))?;
    gateway_bin::tls::keep_renewed(&tls, policy, tls_source);
    gateway.tls = tls.gateway;
    if let Some(admin) = &mut gateway.admin {
        admin.tls = tls.admin;
    }
    let addr = listen.unwrap_or(gateway.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, backends = gateway.pool.backends().len(), https = gateway.tls.is_some(), "gateway listening");
    let grace = gateway.shutdown_grace;
    let (reloader, current) = reload::Reloader::new(path, gateway);
    #[cfg(unix)]
    tokio::spawn(reloader.run(
        hangup,
        watch_policy,
        _refreshers.as_ref().map(identity::Refreshers::rotated),
    ));
    #[cfg(not(unix))]
    let _ = (reloader, watch_policy);
    serve::serve_current(listener, current, serve::shutdown_signal(), grace)
        .await
        .map_err(|e| format!("server error: {e}"))
}
