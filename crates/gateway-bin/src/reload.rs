//! Reloading the policy without dropping a request.
//!
//! On SIGHUP, or when the watched policy file changes, [`Reloader::reload`] loads the file again the
//! way `serve` and `check` do (parse, validate, resolve its secrets, build the stack). If any step
//! fails, the gateway keeps serving the policy it has and logs why, once. Otherwise the new gateway,
//! built with [`app::build_from`](crate::app::build_from) so it takes over backend health and
//! consumer counters, is swapped in at once.
//!
//! The swap is a [`watch`] channel of [`Gateway`]s. [`Current`], the service the listener serves,
//! reads it once per request: a request runs to its end (a stream to its last event) on the stack it
//! started on, and the next request, on the same keep-alive connection too, sees the new policy. A
//! revoked key is refused from the next request on.
//!
//! ```
//! use gateway_bin::app;
//! use gateway_bin::reload::Current;
//! use gateway_policy::Policy;
//! use gateway_policy::secret::{MapSecrets, NoSecrets};
//! use tokio::sync::watch;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let build = |keys: &str| {
//!     let text = format!(
//!         "[[deployments]]\nname = \"gpt-4o\"\n\n[[backends]]\nname = \"swc\"\nregion = \"r\"\n\
//!          endpoint = \"http://127.0.0.1:9\"\napi_key = \"env:BACKEND\"\ndeployments = {{ gpt-4o = \"g\" }}\n\n\
//!          [[consumers]]\nname = \"app\"\nkeys = [{keys}]\n"
//!     );
//!     let policy = Policy::from_toml_str(&text, "p.toml").unwrap();
//!     let env = MapSecrets::with_fallback(NoSecrets)
//!         .with_env("BACKEND", "backend-key")
//!         .with_env("OLD", "old-key")
//!         .with_env("NEW", "new-key");
//!     app::build(&policy, &policy.resolve_secrets(&env, None).unwrap()).unwrap()
//! };
//! let (swap, current) = watch::channel(build(r#""env:OLD", "env:NEW""#));
//! let before = current.borrow().version.sha256.clone();
//! let call = |key: &str| {
//!     http::Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!         .header("api-key", key)
//!         .body(axum::body::Body::from("{}"))
//!         .unwrap()
//! };
//!
//! // The old key is revoked: from the next request on, it is refused.
//! swap.send_replace(build(r#""env:NEW""#));
//! let res = Current::main(current.clone()).oneshot(call("old-key")).await.unwrap();
//! assert_eq!(res.status(), 401);
//! assert_ne!(current.borrow().version.sha256, before);
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use gateway_policy::Policy;
use gateway_policy::secret::SystemSecrets;
use tokio::sync::watch;
use tower::Service;
use tower::util::Oneshot;

use crate::app::{self, Gateway, PolicyVersion, sha256_hex};

/// Policy reloads, by `outcome` (`ok`, `error`).
pub const RELOADS: &str = "gateway_reloads_total";

/// How often a watched policy file is read and compared with the last one loaded or tried.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The service a listener serves: each request goes to the router of the gateway current when it
/// arrives. Cheap: a read lock and an `Arc` clone per request.
#[derive(Clone)]
pub struct Current {
    gateways: watch::Receiver<Gateway>,
    admin: bool,
}

/// Reloads the policy from its file into the [`watch`] channel [`Current`] reads.
pub struct Reloader {
    path: PathBuf,
    gateways: watch::Sender<Gateway>,
    /// The SHA-256 of the file as last loaded or tried, so a watched file that stays invalid is
    /// reported once, not at every look.
    last_tried: String,
}

// === impl Current ===

impl Current {
    /// Serves the current gateway's main router.
    pub fn main(gateways: watch::Receiver<Gateway>) -> Self {
        Self {
            gateways,
            admin: false,
        }
    }

    /// Serves the current gateway's admin router (its own listener, `admin.listen`). Should a
    /// reloaded policy drop `admin.listen`, the admin routes are on the main router, which is
    /// served there instead.
    pub fn admin(gateways: watch::Receiver<Gateway>) -> Self {
        Self {
            gateways,
            admin: true,
        }
    }

    fn router(&self) -> Router {
        let gateway = self.gateways.borrow();
        match (&gateway.admin, self.admin) {
            (Some(admin), true) => admin.router.clone(),
            _ => gateway.router.clone(),
        }
    }
}

impl Service<Request> for Current {
    type Response = Response;
    type Error = Infallible;
    type Future = Oneshot<Router, Request>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A router is always ready (axum's `Route::poll_ready`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        Oneshot::new(self.router(), req)
    }
}

// === impl Reloader ===

impl Reloader {
    /// A reloader of the policy at `path`, which `gateway` was built from; returns it and the
    /// receiver to serve ([`Current`]).
    pub fn new(path: &Path, gateway: Gateway) -> (Self, watch::Receiver<Gateway>) {
        let last_tried = gateway.version.sha256.clone();
        let (gateways, current) = watch::channel(gateway);
        let reloader = Self {
            path: path.to_owned(),
            gateways,
            last_tried,
        };
        (reloader, current)
    }

    /// Loads, validates and builds the policy file again, and swaps it in if all went well;
    /// otherwise the current policy stays. Counted in [`RELOADS`] and logged either way, `trigger`
    /// (`SIGHUP`, `watch`) saying why.
    pub async fn reload(&mut self, trigger: &str) -> Result<PolicyVersion, String> {
        self.last_tried = self.fingerprint();
        let result = self.try_reload().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(RELOADS, "outcome" => outcome).increment(1);
        match &result {
            Ok(version) => tracing::info!(
                trigger,
                policy = %self.path.display(),
                sha256 = %version.sha256,
                "policy reloaded"
            ),
            Err(error) => tracing::error!(
                trigger,
                policy = %self.path.display(),
                %error,
                "policy reload failed; still serving the previous policy"
            ),
        }
        result
    }

    async fn try_reload(&mut self) -> Result<PolicyVersion, String> {
        let policy = Policy::load(&self.path).map_err(|e| format!("invalid policy\n{e}"))?;
        // As at start-up: `keyvault:` references read with the gateway's identity, Entra ID tokens
        // fetched before the policy is swapped in.
        let (secrets, identity) = crate::identity::resolve_secrets(&policy, &SystemSecrets)
            .await
            .map_err(|e| format!("cannot resolve secrets\n{e}"))?;
        let refreshers = match &identity {
            Some(identity) => {
                let refresh = std::time::Duration::from_secs(policy.key_vault.refresh_seconds);
                Some(crate::identity::keep_fresh(identity, &secrets, refresh).await?)
            }
            None => None,
        };
        let previous = self.gateways.borrow().clone();
        let admin_before = previous.admin.as_ref().map(|a| a.listen);
        if policy.admin.listen != admin_before {
            return Err(format!(
                "admin.listen changed ({} to {}): restart the gateway to apply it",
                show(admin_before),
                show(policy.admin.listen)
            ));
        }
        if policy.gateway.listen != previous.listen {
            tracing::warn!(
                from = %previous.listen,
                to = %policy.gateway.listen,
                "gateway.listen changed: it applies at the next restart"
            );
        }
        let mut gateway = app::build_from(&policy, &secrets, Some(&previous))
            .map_err(|e| format!("invalid policy: {e}"))?;
        gateway.refreshers = refreshers.map(Arc::new);
        // The listeners keep their certificates (`[gateway.tls]` applies at the next restart).
        gateway.tls = previous.tls.clone();
        if let (Some(admin), Some(before)) = (&mut gateway.admin, &previous.admin) {
            admin.tls = before.tls.clone();
        }
        let version = gateway.version.clone();
        // The old gateway lives on in the requests still running on it, and ends with the last.
        self.gateways.send_replace(gateway);
        Ok(version)
    }

    /// The SHA-256 of the file's bytes, or a mark for a file that cannot be read (its reload says
    /// why).
    fn fingerprint(&self) -> String {
        std::fs::read(&self.path).map_or_else(|_| "unreadable".to_owned(), |b| sha256_hex(&b))
    }

    /// Reloads on every `hangup` (SIGHUP), every [`WATCH_EVERY`] when `watch` is set and the file
    /// changed, and when `key_vault` says a Key Vault value resolved once (a consumer key, the
    /// admin key, the Redis URL) rotated, until the process ends.
    pub async fn run(
        mut self,
        mut hangup: impl Signal,
        watch: bool,
        key_vault: Option<Arc<tokio::sync::Notify>>,
    ) {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = hangup.next() => {
                    let _ = self.reload("SIGHUP").await;
                }
                _ = every.tick(), if watch => {
                    if self.fingerprint() != self.last_tried {
                        let _ = self.reload("watch").await;
                    }
                }
                () = async { if let Some(n) = &key_vault { n.notified().await } }, if key_vault.is_some() => {
                    let _ = self.reload("key_vault").await;
                }
            }
        }
    }
}

/// A stream of signal deliveries: SIGHUP in production, anything in tests.
pub trait Signal: Send {
    /// Resolves at the next delivery.
    fn next(&mut self) -> impl Future<Output = ()> + Send;
}

#[cfg(unix)]
impl Signal for tokio::signal::unix::Signal {
    async fn next(&mut self) {
        if self.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// Listens for SIGHUP. Call it before serving: from then on SIGHUP no longer ends the process (its
/// default action), it reloads.
#[cfg(unix)]
pub fn hangup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

fn show(listen: Option<std::net::SocketAddr>) -> String {
    listen.map_or_else(|| "none".to_owned(), |a| a.to_string())
}
