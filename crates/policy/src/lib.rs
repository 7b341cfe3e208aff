//! The gateway's policy file: what it serves, to whom, and how it fails over.
//!
//! This crate is the configuration language and nothing else: the file model ([`Policy`]), its TOML
//! parsing with located errors, semantic validation ([`Policy::validate`]), warnings, the summary
//! `gateway check` prints, and secret references ([`secret`]) resolved at start-up into the
//! engine's [`Credential`](secret::Credential)s and [`Secret`](secret::Secret)s. It turns nothing
//! into layers: the `gateway` binary's `app` module translates a policy into `gateway-core` engine
//! values and `gateway-layers` arguments, in one place. Engine and layers never see these types.
//!
//! A policy is TOML. Unknown fields are rejected; every error names the file, line, column and field
//! path, and all semantic errors are reported at once.
//!
//! No Cargo features. It uses `gateway-core` without its default features, for three plain types
//! (`QuotaPeriod`, `Secret`, `Credential`), so a policy reader compiles no Redis client.
//!
//! ```
//! use gateway_policy::Policy;
//! use gateway_policy::secret::{MapSecrets, NoSecrets};
//!
//! let text = r#"
//! [[deployments]]
//! name = "gpt-4o"
//!
//! [[backends]]
//! name = "sweden"
//! region = "Sweden Central"
//! endpoint = "https://sweden.openai.azure.com/"
//! api_key = "env:SWEDEN_KEY"
//! deployments = { gpt-4o = "gpt-4o-2024-08-06" }
//! "#;
//! let policy = Policy::from_toml_str(text, "policy.toml").unwrap();
//! assert_eq!(policy.backends[0].normalized_endpoint(), "https://sweden.openai.azure.com");
//!
//! let secrets = MapSecrets::with_fallback(NoSecrets).with_env("SWEDEN_KEY", "k");
//! let resolved = policy.resolve_secrets(&secrets, None).unwrap();
//! assert_eq!(resolved.backends[0].current().unwrap().expose(), "k");
//!
//! let errors = Policy::from_toml_str(&text.replace("api_key", "apikey"), "policy.toml").unwrap_err();
//! assert_eq!(
//!     errors.to_string(),
//!     "policy.toml:9:1: backends[0].apikey: unknown field `apikey`, expected one of \
//!      `name`, `region`, `endpoint`, `priority`, `weight`, `api_key`, `bearer_token`, `entra`, `deployments`, `tpm`, `rpm`, `reserved_for`, `headroom`"
//! );
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

mod error;
mod locate;
mod parse;
mod resolve;
mod routing;
mod summary;
mod tls;
mod validate;

pub mod secret;

pub use error::{PolicyError, PolicyErrors, PolicySource};
// One definition of the quota calendar: the engine counts in it, the policy names it.
pub use gateway_core::limits::QuotaPeriod;
pub use resolve::ResolvedSecrets;
pub use routing::{FlexFallbackSpec, HeadroomSpec, TierSpec};
pub use tls::{CertificatePair, TlsSecrets};

/// A whole policy file, as written. Secrets are still references here (see [`crate::secret`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Listener and request limits.
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// The Azure OpenAI deployments (regions) the gateway sends traffic to.
    pub backends: Vec<BackendSpec>,
    /// Logical deployments that clients may call.
    pub deployments: Vec<DeploymentSpec>,
    /// How attempts fail over between backends.
    #[serde(default)]
    pub failover: FailoverSettings,
    /// When a backend's circuit opens (it is ejected), and for how long.
    #[serde(default)]
    pub circuit: CircuitBreakerSettings,
    /// The section `[circuit]` replaced: accepted by the parser only to be refused with a
    /// migration hint by [`Policy::validate`].
    #[serde(default)]
    pub circuit_breaker: Option<serde::de::IgnoredAny>,
    /// Applications allowed to call the gateway.
    #[serde(default)]
    pub consumers: Vec<ConsumerSpec>,
    /// Which headers cross the gateway, and rules that set, append or delete them.
    #[serde(default)]
    pub headers: HeaderSettings,
    /// Where consumer limits are counted and how they are reported.
    #[serde(default)]
    pub rate_limit: RateLimitSettings,
    /// Traces, access log and metric labels.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The operator endpoints: `/metrics`, `/admin/status`, `/admin`.
    #[serde(default)]
    pub admin: AdminSettings,
    /// How often `keyvault:` references are read again.
    #[serde(default)]
    pub key_vault: KeyVaultSettings,
    /// The HTTP client that calls the backends: which CA certificates it trusts.
    #[serde(default)]
    pub upstream: UpstreamSettings,
    /// Where the policy was read from: names the file in errors found after loading, and is the
    /// base for relative `file:` secrets. Not part of the TOML.
    #[serde(skip)]
    pub source: PolicySource,
}

/// `[gateway]`: the listener and request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long in-flight requests (streams included) may run after SIGTERM/SIGINT.
    pub shutdown_grace_seconds: u64,
    /// `[gateway.entra]`: accept Entra ID access tokens from clients; keys only when absent.
    pub entra: Option<EntraSettings>,
    /// `[gateway.tls]`: serve HTTPS (HTTP/1.1 and HTTP/2) instead of plain HTTP.
    pub tls: Option<TlsSettings>,
    /// On SIGTERM/SIGINT, how long new connections are still accepted while `/readyz` answers 503,
    /// so load balancers see the drain before the listener closes.
    pub drain_seconds: u64,
    /// Longest wait for a request's head once its first byte arrived (or, on a new connection,
    /// for the first request), in milliseconds; then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest silence inside a request body, in milliseconds; then 408 and the connection closes.
    pub body_timeout_ms: u64,
    /// How long a keep-alive connection may stay idle between requests, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once; beyond it a connection is answered 503 and closed.
    pub max_connections: usize,
    /// Most requests to `/openai/` being served at once; beyond it they are answered 503.
    pub max_in_flight: usize,
}

/// `[gateway.entra]`: which Entra ID access tokens clients may present, as API Management's
/// `validate-azure-ad-token`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraSettings {
    /// The tenant id (a GUID) whose tokens are accepted; tokens of other tenants are refused.
    pub tenant: String,
    /// Accepted `aud` values, e.g. `api://my-gateway` or the gateway's application id.
    pub audiences: Vec<String>,
    /// Where OpenID discovery is read: `{authority}/{tenant}/v2.0/.well-known/openid-configuration`.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Accepted `iss` values; by default the tenant's v1 (`https://sts.windows.net/{tenant}/`) and
    /// v2 (`https://login.microsoftonline.com/{tenant}/v2.0`) issuers.
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// Least time between two signing-key refreshes caused by an unknown `kid`, in seconds.
    #[serde(default = "default_key_refresh")]
    pub key_refresh_min_seconds: u64,
}

/// `[gateway.tls]` / `[admin.tls]`: a certificate and its private key, both PEM, from secret
/// references, re-read periodically so a renewed certificate is served without a restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Secret reference to the PEM certificate chain (leaf first).
    pub certificate: String,
    /// Secret reference to the PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: String,
    /// How often the references are re-read, in seconds; a changed certificate is served to new
    /// connections.
    #[serde(default = "default_tls_reload")]
    pub reload_seconds: u64,
}

/// `[upstream]`: the HTTP client every backend is called with (one client for all backends).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// Path to a PEM bundle of CA certificates trusted for the backends' TLS certificates, besides
    /// the system's roots: a TLS-inspecting proxy's or an API Management front's private CA. A
    /// relative path is relative to the policy file's directory. Read at start-up and on every
    /// reload; a file that cannot be read or holds no usable certificate stops either.
    pub ca_file: Option<String>,
}

/// `[[backends]]`: one Azure OpenAI resource in one region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Unique name, shown in `x-served-by`.
    pub name: String,
    /// Azure region, e.g. `Sweden Central`.
    pub region: String,
    /// Base URL of the resource, e.g. `https://my-aoai.openai.azure.com`.
    pub endpoint: String,
    /// Priority group: lower numbers are tried first.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Relative share of traffic inside the priority group.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Secret reference for an `api-key` credential.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Secret reference for an `Authorization: Bearer` token.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// `[backends.entra]`: authenticate with the gateway's Entra ID identity instead of a key.
    #[serde(default)]
    pub entra: Option<EntraSpec>,
    /// Logical deployment name -> this backend's own deployment name.
    pub deployments: BTreeMap<String, String>,
    /// Known tokens-per-minute limit of this backend, if any.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Known requests-per-minute limit of this backend, if any.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// The consumers this backend is reserved for (a workload's own PTU); shared by all when
    /// absent. Other consumers never reach it.
    #[serde(default)]
    pub reserved_for: Option<Vec<String>>,
    /// Capacity this backend keeps for higher tiers; none when absent.
    #[serde(default)]
    pub headroom: Option<HeadroomSpec>,
}

/// `[backends.entra]`: the backend is called with an Entra ID access token of the gateway's own
/// identity (workload identity, managed identity or service principal; see the README).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraSpec {
    /// The token's scope; [`EntraSpec::DEFAULT_SCOPE`] when absent.
    #[serde(default)]
    pub scope: Option<String>,
}

/// `[key_vault]`: how `keyvault:` references are kept fresh.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyVaultSettings {
    /// Seconds between two reads of each referenced secret (1 to 86400; default 300).
    pub refresh_seconds: u64,
}

/// `[[deployments]]`: a logical deployment clients call by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// The name clients use in the path or in `model`.
    pub name: String,
    /// The model behind it (used to choose a tokenizer); defaults to the name.
    #[serde(default)]
    pub model: Option<String>,
}

/// `[failover]`: how attempts move between backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSettings {
    /// Most attempts for one client request, across all backends.
    pub max_attempts: u32,
    /// Overall deadline for one client request until its response headers, in milliseconds.
    pub deadline_ms: u64,
    /// How long to wait for one backend's response headers, in milliseconds.
    pub response_header_timeout_ms: u64,
    /// Cooldown when a throttled backend gives no usable hint, in milliseconds.
    pub default_cooldown_ms: u64,
    /// Longest cooldown honoured from a backend's hint, in milliseconds.
    pub max_cooldown_ms: u64,
    /// Upstream statuses that fail over to the next backend.
    pub on_status: Vec<u16>,
    /// Longest silence allowed inside a response body (a stream's gap between chunks), in
    /// milliseconds; a longer one breaks the stream and charges the backend.
    pub stream_idle_timeout_ms: u64,
    /// What a `"service_tier": "flex"` request does after a 429.
    pub flex_fallback: FlexFallbackSpec,
    /// Longest wait, in milliseconds, for the first of the resting backends when every backend
    /// left rests after a 429; 0 answers the gateway's 429 at once.
    pub throttle_wait_ms: u64,
}

/// `[circuit]`: when a failing backend is taken out of rotation (ejected), as Envoy's outlier
/// detection does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerSettings {
    /// Share of failed attempts (5xx, timeouts, connection failures), in percent, within
    /// `interval_seconds` that ejects a backend once `request_volume` is reached; 0 turns it off.
    pub failure_percentage: u32,
    /// Least attempts within `interval_seconds` before the failure share is judged.
    pub request_volume: u32,
    /// Connection failures and timeouts in a row that eject a backend; 0 turns it off.
    pub consecutive_failures: u32,
    /// Window in which the failure share is measured.
    pub interval_seconds: u64,
    /// How long the first ejection lasts; the n-th recent one lasts n times as long.
    pub base_ejection_seconds: u64,
    /// Cap on an ejection's length.
    pub max_ejection_seconds: u64,
    /// Largest share of a priority group, in percent, ejected at once (at least one backend).
    pub max_ejection_percent: u32,
}

/// `[[consumers]]`: an application allowed to call the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Secret references for the API keys this consumer may present.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Entra ID application (client) ids whose tokens (`appid` v1, `azp` v2) are this consumer.
    #[serde(default)]
    pub entra_app_ids: Vec<String>,
    /// Entra ID object ids (`oid`: a managed identity, a service principal, a user) that are this
    /// consumer.
    #[serde(default)]
    pub entra_object_ids: Vec<String>,
    /// Logical deployments this consumer may call; all when absent.
    #[serde(default)]
    pub deployments: Option<Vec<String>>,
    /// Limits across all deployments this consumer calls.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
    /// Limits for one logical deployment, counted apart from `limits` (both apply).
    #[serde(default)]
    pub deployment_limits: BTreeMap<String, LimitsSpec>,
    /// Its priority on shared backends that keep headroom; `standard` when absent.
    #[serde(default)]
    pub tier: TierSpec,
}

/// `[consumers.limits]`: tokens and requests per minute, and a token quota per period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Tokens per minute (estimate reserved on arrival, reconciled with real usage).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens per `token_quota_period`; over it the gateway answers 403 until the period resets.
    #[serde(default)]
    pub token_quota: Option<u64>,
    /// The calendar period (UTC) of `token_quota`.
    #[serde(default)]
    pub token_quota_period: Option<QuotaPeriod>,
}

/// `[rate_limit]`: where limits are counted and how they are reported to clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// `memory` (this instance only) or `redis` (shared by every instance using the same Redis).
    pub store: StoreKind,
    /// Redis URL (`redis://host:port/db`) or a secret reference to one; required for `redis`.
    pub redis_url: Option<String>,
    /// What to do when the store cannot be reached.
    pub on_store_error: StoreFailure,
    /// Completion tokens reserved when a request names no `max_tokens`.
    pub default_completion_tokens: u64,
    /// Prefix of every Redis key (versioned below it by the gateway).
    pub key_prefix: String,
    /// Header with the consumer's tokens left in the current minute.
    pub remaining_tokens_header: String,
    /// Header with the consumer's requests left in the current minute.
    pub remaining_requests_header: String,
    /// Header with the consumer's tokens-per-minute limit.
    pub limit_tokens_header: String,
    /// Header with the consumer's requests-per-minute limit.
    pub limit_requests_header: String,
    /// Header with the consumer's quota tokens left in the period.
    pub remaining_quota_header: String,
    /// Header with the tokens this request consumed (known when usage is in the response body,
    /// so sent as a trailer-free estimate on streams).
    pub tokens_consumed_header: String,
}

/// Where limits are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process: right for a single instance.
    #[default]
    Memory,
    /// In Redis: one limit across every gateway instance.
    Redis,
}

/// Behaviour when the limit store is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreFailure {
    /// Admit requests unchecked (logged and counted).
    #[default]
    FailOpen,
    /// Refuse requests with 503 until the store is back.
    FailClosed,
}

/// `[headers]`: which headers cross the gateway in each direction.
///
/// Client credentials (`api-key`, `Authorization`) and hop-by-hop headers are never forwarded,
/// whatever `forward` says.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderSettings {
    /// Client headers sent upstream (`name` or `prefix*`); the built-in list when absent.
    pub forward: Option<Vec<String>>,
    /// Upstream headers returned to the client (`name` or `prefix*`); the built-in list when absent.
    #[serde(rename = "return")]
    pub return_headers: Option<Vec<String>>,
    /// Rules applied to every upstream request, in order.
    pub request: Vec<HeaderRuleSpec>,
    /// Rules applied to every response to the client, in order.
    pub response: Vec<HeaderRuleSpec>,
}

/// `[[headers.request]]` / `[[headers.response]]`: one set-header rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRuleSpec {
    /// The header name.
    pub name: String,
    /// The value to set or append (not needed for `delete`).
    #[serde(default)]
    pub value: Option<String>,
    /// What to do if the header exists, as API Management's `exists-action`.
    #[serde(default)]
    pub action: HeaderAction,
}

/// API Management's `exists-action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderAction {
    /// Replace any existing value.
    #[default]
    Override,
    /// Set only when absent.
    Skip,
    /// Add another value.
    Append,
    /// Remove the header.
    Delete,
}

/// `[telemetry]`: traces over OTLP, the access log, metric labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `service.name` of exported spans; `OTEL_SERVICE_NAME` overrides it.
    pub service_name: String,
    /// OTLP/HTTP endpoint for traces, e.g. `http://otel-collector:4318`;
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` are used when absent.
    /// No endpoint anywhere: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// Record prompt and completion content on spans (off: content never leaves the gateway).
    pub record_content: bool,
    /// Write one JSON line per request to stdout.
    pub access_log: bool,
    /// Label metrics by consumer (switch off when consumers are many).
    pub consumer_label: bool,
}

/// `[admin]`: where `/metrics`, `/admin/status` and `/admin` are served, and who may see them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// A separate listener for the admin endpoints; on the main listener when absent.
    pub listen: Option<SocketAddr>,
    /// Secret reference for a key protecting `/admin` and `/admin/status` (sent as `api-key`,
    /// `Authorization: Bearer`, or `?key=` for the page); unprotected when absent.
    pub key: Option<String>,
    /// `[admin.tls]`: a certificate of its own for the admin listener (needs `listen`).
    pub tls: Option<TlsSettings>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            service_name: "aoai-gateway".into(),
            otlp_endpoint: None,
            record_content: false,
            access_log: true,
            consumer_label: true,
        }
    }
}

// === impl RateLimitSettings ===

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            redis_url: None,
            on_store_error: StoreFailure::FailOpen,
            default_completion_tokens: 16,
            key_prefix: "aoai-gw".into(),
            remaining_tokens_header: "x-ratelimit-remaining-tokens".into(),
            remaining_requests_header: "x-ratelimit-remaining-requests".into(),
            limit_tokens_header: "x-ratelimit-limit-tokens".into(),
            limit_requests_header: "x-ratelimit-limit-requests".into(),
            remaining_quota_header: "x-ratelimit-remaining-quota-tokens".into(),
            tokens_consumed_header: "x-gateway-tokens-consumed".into(),
        }
    }
}

fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}

fn default_clock_skew() -> u64 {
    300
}

fn default_key_refresh() -> u64 {
    300
}

fn default_tls_reload() -> u64 {
    60
}

fn default_priority() -> u32 {
    1
}

fn default_weight() -> u32 {
    1
}

// === impl Policy ===

impl Policy {
    /// `upstream.ca_file` as a path to read: a relative one joined to the policy file's directory
    /// (as `file:` references are), or taken as it is when the policy was not read from a file.
    ///
    /// ```
    /// use gateway_policy::Policy;
    ///
    /// let text = r#"
    /// [upstream]
    /// ca_file = "certs/proxy-ca.pem"
    ///
    /// [[deployments]]
    /// name = "gpt-4o"
    ///
    /// [[backends]]
    /// name = "sweden"
    /// region = "Sweden Central"
    /// endpoint = "https://sweden.openai.azure.com"
    /// api_key = "env:SWEDEN_KEY"
    /// deployments = { gpt-4o = "gpt-4o" }
    /// "#;
    /// let policy = Policy::from_toml_str(text, "p.toml").unwrap();
    /// assert_eq!(policy.upstream_ca_file().unwrap(), std::path::Path::new("certs/proxy-ca.pem"));
    /// ```
    pub fn upstream_ca_file(&self) -> Option<std::path::PathBuf> {
        let file = std::path::Path::new(self.upstream.ca_file.as_deref()?);
        Some(match self.source.dir() {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        })
    }
}

// === impl BackendSpec ===

impl BackendSpec {
    /// The endpoint without trailing slashes, ready for `{endpoint}/openai/...`.
    pub fn normalized_endpoint(&self) -> &str {
        self.endpoint.trim_end_matches('/')
    }

    /// The backend's deployment name for logical deployment `logical`, if it serves it.
    pub fn deployment_for(&self, logical: &str) -> Option<&str> {
        self.deployments.get(logical).map(String::as_str)
    }
}

// === impl EntraSpec ===

impl EntraSpec {
    /// Azure OpenAI's scope, used when `scope` is absent.
    pub const DEFAULT_SCOPE: &'static str = "https://cognitiveservices.azure.com/.default";

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        self.scope.as_deref().unwrap_or(Self::DEFAULT_SCOPE)
    }
}

// === impl KeyVaultSettings ===

impl Default for KeyVaultSettings {
    fn default() -> Self {
        Self {
            refresh_seconds: 300,
        }
    }
}

// === impl EntraSettings ===

impl EntraSettings {
    /// The accepted issuers: `issuers`, or the tenant's v1 and v2 issuers.
    pub fn accepted_issuers(&self) -> Vec<String> {
        self.issuers.clone().unwrap_or_else(|| {
            vec![
                format!("https://sts.windows.net/{}/", self.tenant),
                format!("https://login.microsoftonline.com/{}/v2.0", self.tenant),
            ]
        })
    }
}

// === impl DeploymentSpec ===

impl DeploymentSpec {
    /// The model behind the deployment: `model`, or the name when absent.
    pub fn model_name(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }
}

// === impl GatewaySettings ===

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace_seconds: 30,
            entra: None,
            tls: None,
            drain_seconds: 5,
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 15_000,
            idle_timeout_ms: 120_000,
            max_connections: 8_192,
            max_in_flight: 4_096,
        }
    }
}

// === impl FailoverSettings ===

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            deadline_ms: 120_000,
            response_header_timeout_ms: 30_000,
            default_cooldown_ms: 10_000,
            max_cooldown_ms: 300_000,
            on_status: vec![408, 429, 500, 502, 503, 504],
            stream_idle_timeout_ms: 120_000,
            flex_fallback: FlexFallbackSpec::default(),
            throttle_wait_ms: 0,
        }
    }
}

// === impl CircuitBreakerSettings ===

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        Self {
            failure_percentage: 50,
            request_volume: 20,
            consecutive_failures: 5,
            interval_seconds: 10,
            base_ejection_seconds: 30,
            max_ejection_seconds: 300,
            max_ejection_percent: 50,
        }
    }
}
