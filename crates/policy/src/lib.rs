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
//! assert_eq!(resolved.backends[0].secret().expose(), "k");
//!
//! let errors = Policy::from_toml_str(&text.replace("api_key", "apikey"), "policy.toml").unwrap_err();
//! assert_eq!(
//!     errors.to_string(),
//!     "policy.toml:9:1: backends[0].apikey: unknown field `apikey`, expected one of \
//!      `name`, `region`, `endpoint`, `priority`, `weight`, `api_key`, `bearer_token`, `deployments`, `tpm`, `rpm`, `reserved_for`, `headroom`"
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
mod validate;

pub mod secret;

pub use error::{PolicyError, PolicyErrors, PolicySource};
// One definition of the quota calendar: the engine counts in it, the policy names it.
pub use gateway_core::limits::QuotaPeriod;
pub use resolve::ResolvedSecrets;
pub use routing::{FlexFallbackSpec, HeadroomSpec, TierSpec};

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
    /// When a backend's circuit opens.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSettings,
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
}

/// `[circuit_breaker]`: when a failing backend is taken out of rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerSettings {
    /// Failures within `interval_seconds` that open the circuit.
    pub failures: u32,
    /// Window in which failures are counted.
    pub interval_seconds: u64,
    /// How long an open circuit stays open before a probe is let through.
    pub trip_seconds: u64,
}

/// `[[consumers]]`: an application allowed to call the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Secret references for the API keys this consumer may present.
    pub keys: Vec<String>,
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

fn default_priority() -> u32 {
    1
}

fn default_weight() -> u32 {
    1
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
        }
    }
}

// === impl CircuitBreakerSettings ===

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            interval_seconds: 10,
            trip_seconds: 30,
        }
    }
}
