//! TLS on the listeners: rustls with the aws-lc-rs provider reqwest already links, HTTP/2 or
//! HTTP/1.1 as the client offers (ALPN), and certificates that can be renewed while serving. And
//! the private CA certificates the upstream client trusts besides the system's
//! ([`upstream_roots`], `upstream.ca_file`).
//!
//! [`Tls`] answers every handshake with its current certificate ([`ResolvesServerCert`]). The
//! certificate and key are secret references re-resolved every `reload_seconds`; a changed pair
//! replaces the current one for the next handshakes, and connections already open keep the one
//! they started with. A pair that cannot be used (unreadable, not PEM, a key that is not the
//! certificate's) keeps the previous one serving and is logged once until it is fixed.
//!
//! ```
//! use gateway_bin::tls::Tls;
//! use gateway_policy::CertificatePair;
//! use gateway_core::secret::Secret;
//!
//! let not_pem = CertificatePair { certificate: Secret::new("hello"), private_key: Secret::new("x") };
//! let error = Tls::new(&not_pem).unwrap_err();
//! assert!(error.contains("no PEM certificate"), "{error}");
//! assert!(!error.contains("hello"));
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use gateway_policy::secret::SecretSource;
use gateway_policy::{CertificatePair, Policy};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, version};
use tower::ServiceExt;

/// A client that opened a connection has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's TLS configuration and its current certificate. See the [module docs](self).
#[derive(Debug)]
pub struct Tls {
    resolver: Arc<CurrentCert>,
    config: Arc<ServerConfig>,
}

struct CurrentCert {
    key: RwLock<Arc<CertifiedKey>>,
    /// The pair behind `key`: a reload that reads the same one changes nothing.
    pem: RwLock<CertificatePair>,
}

// === impl Tls ===

impl Tls {
    /// A configuration serving `pair`, offering HTTP/2 and HTTP/1.1. The error names what is
    /// wrong, never a secret.
    pub fn new(pair: &CertificatePair) -> Result<Self, String> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let key = certified_key(pair, &provider)?;
        let resolver = Arc::new(CurrentCert {
            key: RwLock::new(Arc::new(key)),
            pem: RwLock::new(pair.clone()),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            resolver,
            config: Arc::new(config),
        })
    }

    /// Serves `pair` to the next handshakes, if it differs from the current one. Returns whether
    /// it changed.
    pub fn update(&self, pair: &CertificatePair) -> Result<bool, String> {
        if *read(&self.resolver.pem) == *pair {
            return Ok(false);
        }
        let key = certified_key(pair, &self.config.crypto_provider().clone())?;
        *write(&self.resolver.key) = Arc::new(key);
        *write(&self.resolver.pem) = pair.clone();
        Ok(true)
    }

    /// Re-resolves the certificate every `every` with `resolve`, and serves what changed. Failures
    /// keep the current certificate; they are logged once per outage, as `what` (e.g.
    /// `gateway.tls`).
    pub fn reload_every<F>(self: &Arc<Self>, what: &'static str, every: Duration, resolve: F)
    where
        F: Fn() -> Result<CertificatePair, String> + Send + 'static,
    {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tick.tick().await;
                // The listener is gone: so is the need to reload.
                let Some(tls) = tls.upgrade() else { return };
                match resolve().and_then(|pair| tls.update(&pair)) {
                    Ok(changed) => {
                        if changed {
                            tracing::info!(what, "TLS certificate renewed: new connections get it");
                        } else if failing {
                            tracing::info!(what, "TLS certificate readable again");
                        }
                        failing = false;
                    }
                    Err(err) => {
                        if !failing {
                            tracing::warn!(
                                what,
                                "cannot reload the TLS certificate; the current one keeps serving: {err}"
                            );
                        }
                        failing = true;
                    }
                }
            }
        });
    }

    /// The rustls configuration (ALPN `h2`, `http/1.1`).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

fn certified_key(
    pair: &CertificatePair,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_slice_iter(pair.certificate.expose().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "the certificate is not valid PEM".to_owned())?;
    if certs.is_empty() {
        return Err("the certificate holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(pair.private_key.expose().as_bytes())
        .map_err(|_| "the private key holds no PEM private key".to_owned())?;
    CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| format!("the private key does not fit the certificate: {e}"))
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Each value is replaced whole: a panic elsewhere cannot leave one half-written.
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: `Tls` is Debug, and the private key must not reach a log.
        f.debug_struct("CurrentCert").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(read(&self.key).clone())
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then stops accepting and
/// waits for the open connections to finish (the caller bounds that wait). HTTP/2 when the client
/// offers it, else HTTP/1.1; TCP_NODELAY on every socket; the peer's address in each request's
/// extensions (`ConnectInfo`), as the plain listener gives it.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<Tls>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.config());
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY the last small write of a stream waits for the client's delayed ACK
        // (see serve.rs).
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move {
                    let res = router.oneshot(req.map(axum::body::Body::new)).await;
                    Ok::<_, Infallible>(res.unwrap_or_else(|never| match never {}))
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(err) = watcher.watch(conn).await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// `gateway.tls` and `admin.tls`, loaded.
#[derive(Debug, Default)]
pub struct ListenerTls {
    /// For the main listener.
    pub gateway: Option<Arc<Tls>>,
    /// For the admin listener (`admin.listen`).
    pub admin: Option<Arc<Tls>>,
}

/// Resolves and loads the policy's certificates through `src`. The error names the policy
/// location and what is wrong, never a secret.
pub fn load(policy: &Policy, src: &dyn SecretSource) -> Result<ListenerTls, String> {
    let pairs = policy.resolve_tls(src, None).map_err(|e| e.to_string())?;
    let load = |what: &str, pair: Option<CertificatePair>| {
        pair.map(|pair| {
            Tls::new(&pair)
                .map(Arc::new)
                .map_err(|e| format!("{}: {what}: {e}", policy.source.name()))
        })
        .transpose()
    };
    Ok(ListenerTls {
        gateway: load("gateway.tls", pairs.gateway)?,
        admin: load("admin.tls", pairs.admin)?,
    })
}

/// Re-resolves the policy's certificates through `src` every `reload_seconds`, so a renewed
/// certificate is served without a restart (see [`Tls::reload_every`]).
pub fn keep_renewed(tls: &ListenerTls, policy: &Policy, src: Arc<dyn SecretSource + Send + Sync>) {
    let listeners = [
        ("gateway.tls", &tls.gateway, &policy.gateway.tls),
        ("admin.tls", &tls.admin, &policy.admin.tls),
    ];
    for (what, tls, settings) in listeners {
        let (Some(tls), Some(settings)) = (tls, settings) else {
            continue;
        };
        let policy = policy.clone();
        let src = src.clone();
        let admin = what == "admin.tls";
        tls.reload_every(
            what,
            Duration::from_secs(settings.reload_seconds),
            move || {
                let pairs = policy.resolve_tls(&*src, None).map_err(|e| e.to_string())?;
                let pair = if admin { pairs.admin } else { pairs.gateway };
                pair.ok_or_else(|| format!("{what} is gone from the policy"))
            },
        );
    }
}

/// The certificates in `upstream.ca_file`, for the upstream client to trust besides the system's
/// roots (none when the setting is absent). Each must parse as a trust anchor. The error names the
/// setting and the file.
pub fn upstream_roots(policy: &Policy) -> Result<Vec<reqwest::Certificate>, String> {
    let Some(path) = policy.upstream_ca_file() else {
        return Ok(Vec::new());
    };
    let at = |problem: String| format!("upstream.ca_file: {}: {problem}", path.display());
    let pem = std::fs::read(&path).map_err(|e| at(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| at(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(at(
            "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".into(),
        ));
    }
    // reqwest would only find a bad one when it builds the client, with a vaguer message.
    let mut anchors = RootCertStore::empty();
    certs
        .into_iter()
        .enumerate()
        .map(|(i, der)| {
            let certificate = reqwest::Certificate::from_der(&der)
                .map_err(|e| at(format!("certificate {}: {e}", i + 1)))?;
            anchors
                .add(der)
                .map_err(|e| at(format!("certificate {} cannot be trusted: {e}", i + 1)))?;
            Ok(certificate)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gateway_core::secret::Secret;

    /// A throwaway self-signed certificate and its key, made for the tests.
    const PEM: &str = include_str!("../../../tests/fixtures/sp-cert.pem");

    /// The base64 lines of every PEM block: what a leaked certificate or key would show.
    fn pem_lines() -> Vec<&'static str> {
        PEM.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 8)
            .collect()
    }

    #[test]
    fn debug_shows_neither_the_key_nor_the_certificate() {
        let pair = CertificatePair {
            certificate: Secret::new(PEM),
            private_key: Secret::new(PEM),
        };
        let tls = Arc::new(Tls::new(&pair).unwrap());
        let listeners = ListenerTls {
            gateway: Some(tls.clone()),
            admin: Some(tls.clone()),
        };
        let shown = format!("{tls:?} {:?} {listeners:?} {pair:?}", tls.config());
        assert!(shown.contains("CurrentCert"), "{shown}");
        for line in pem_lines() {
            assert!(!shown.contains(line), "{line} in {shown}");
        }
    }

    fn policy_with_ca(path: &std::path::Path) -> Policy {
        let text = format!(
            "[upstream]\nca_file = \"{}\"\n\n[[deployments]]\nname = \"d\"\n\n[[backends]]\nname = \"b\"\nregion = \"r\"\nendpoint = \"https://b.example\"\napi_key = \"env:K\"\ndeployments = {{ d = \"d\" }}\n",
            path.display()
        );
        Policy::from_toml_str(&text, "p.toml").unwrap()
    }

    #[test]
    fn upstream_roots_name_the_setting_and_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("gw-upstream-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };

        // The fixture's certificate (with its key in the same file: only certificates count).
        let ok = write("ok.pem", PEM);
        assert_eq!(upstream_roots(&policy_with_ca(&ok)).unwrap().len(), 1);

        let missing = dir.join("missing.pem");
        let error = upstream_roots(&policy_with_ca(&missing)).unwrap_err();
        assert!(
            error.starts_with(&format!(
                "upstream.ca_file: {}: cannot read it:",
                missing.display()
            )),
            "{error}"
        );

        let empty = write("empty.pem", "not a certificate\n");
        let error = upstream_roots(&policy_with_ca(&empty)).unwrap_err();
        assert!(error.contains("holds no PEM certificate"), "{error}");

        let garbage = write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let error = upstream_roots(&policy_with_ca(&garbage)).unwrap_err();
        assert!(error.starts_with("upstream.ca_file: "), "{error}");
        assert!(error.contains("certificate 1 cannot be trusted"), "{error}");

        let none = Policy::from_toml_str(
            "[[deployments]]\nname = \"d\"\n\n[[backends]]\nname = \"b\"\nregion = \"r\"\nendpoint = \"https://b.example\"\napi_key = \"env:K\"\ndeployments = { d = \"d\" }\n",
            "p.toml",
        )
        .unwrap();
        assert!(upstream_roots(&none).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
