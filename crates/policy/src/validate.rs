//! Semantic validation: everything the types alone do not rule out, all errors collected at once.

use std::collections::{BTreeMap, BTreeSet};

use super::locate::{Locator, field, index};
use super::{BackendSpec, Policy, PolicyError, PolicyErrors};
use crate::secret::SecretRef;

mod routes;

/// Limits checked here, also quoted in the messages.
const MAX_BODY_BYTES: std::ops::RangeInclusive<usize> = 1024..=100 * 1024 * 1024;
const WEIGHT: std::ops::RangeInclusive<u32> = 1..=1000;
const PRIORITY: std::ops::RangeInclusive<u32> = 1..=100;
const MAX_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=50;
const MAX_COOLDOWN_MS: u64 = 86_400_000;

/// Collects errors for one policy.
struct Checker<'a> {
    locator: Locator<'a>,
    errors: Vec<PolicyError>,
}

// === impl Policy ===

impl Policy {
    /// Checks everything the types do not: names, references between sections, ranges, URLs and
    /// secret reference syntax. Returns every problem found, each located in the source text.
    ///
    /// [`Policy::from_toml_str`] and [`Policy::load`] call this; call it yourself only for a
    /// policy built in code (its errors then have no line and column).
    pub fn validate(&self) -> Result<(), PolicyErrors> {
        let mut check = Checker {
            locator: Locator::new(&self.source),
            errors: Vec::new(),
        };
        check.gateway(self);
        check.deployments(self);
        check.backends(self);
        check.failover(self);
        check.circuit_breaker(self);
        check.consumers(self);
        check.headers(self);
        check.rate_limit(self);
        check.telemetry(self);
        check.key_vault(self);
        check.entra(self);
        check.tls(self);
        check.upstream(self);
        check.routes(self);
        if check.errors.is_empty() {
            return Ok(());
        }
        let mut errors = check.errors;
        errors.sort_by_key(|error| (error.line, error.column));
        Err(PolicyErrors(errors))
    }

    /// Things that are allowed but probably unintended, located like errors: a secret reference
    /// used twice (two consumers sharing a key cannot be told apart; a consumer key that is also a
    /// backend credential hands out the backend's key), or a response header timeout longer than
    /// the whole deadline.
    pub fn warnings(&self) -> Vec<PolicyError> {
        let locator = Locator::new(&self.source);
        let mut warnings = Vec::new();
        let mut references: Vec<(&str, String)> = Vec::new();
        for (i, backend) in self.backends.iter().enumerate() {
            let path = index("backends", i);
            if let Some(reference) = &backend.api_key {
                references.push((reference, field(&path, "api_key")));
            }
            if let Some(reference) = &backend.bearer_token {
                references.push((reference, field(&path, "bearer_token")));
            }
        }
        for (i, consumer) in self.consumers.iter().enumerate() {
            let keys = field(&index("consumers", i), "keys");
            for (j, reference) in consumer.keys.iter().enumerate() {
                references.push((reference, index(&keys, j)));
            }
        }
        let mut first: BTreeMap<&str, &str> = BTreeMap::new();
        for (reference, path) in &references {
            match first.get(reference) {
                Some(first_path) => warnings.push(locator.at_value(
                    path,
                    format!("secret reference `{reference}` is also used at {first_path}"),
                )),
                None => {
                    first.insert(reference, path);
                }
            }
        }
        let failover = &self.failover;
        if failover.response_header_timeout_ms > failover.deadline_ms {
            warnings.push(locator.at_value(
                "failover.response_header_timeout_ms",
                format!(
                    "{} ms is longer than failover.deadline_ms ({} ms), so the deadline always fires first",
                    failover.response_header_timeout_ms, failover.deadline_ms
                ),
            ));
        }
        if self.upstream.ca_file.is_some()
            && !self
                .backends
                .iter()
                .any(|b| b.endpoint.to_ascii_lowercase().starts_with("https://"))
        {
            warnings.push(locator.at_value(
                "upstream.ca_file",
                "no backend is called over https://, so these certificates are never used",
            ));
        }
        routes::warnings(self, &locator, &mut warnings);
        warnings.sort_by_key(|warning| (warning.line, warning.column));
        warnings
    }
}

/// An absolute `http://` or `https://` URL with a host, optionally a port and a path, and no
/// user info, query or fragment. Returns why not.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    const SHAPE: &str =
        "must be an absolute http:// or https:// URL such as `https://my-aoai.openai.azure.com`";
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .ok_or(SHAPE)?;
    if endpoint
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("must not contain whitespace");
    }
    if endpoint.contains('?') || endpoint.contains('#') {
        return Err("must not have a query or fragment (the gateway adds `api-version` itself)");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not contain user info; put credentials in `api_key` or `bearer_token`");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            // `[::1]:8080`; anything but `:PORT` after the bracket is an invalid port.
            Some((host, "")) => (host, None),
            Some((host, rest)) => (host, Some(rest.strip_prefix(':').unwrap_or(""))),
            None => return Err("has an unclosed `[` in its host"),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host");
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |port| port == 0) {
            return Err("has an invalid port (expected 1-65535)");
        }
    }
    Ok(())
}

/// Azure deployment names: letters, digits, `-`, `_` and `.` (they go into a URL path).
/// An HTTP header name: RFC 9110 token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_deployment_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Why `status` may not be listed in `failover.on_status`, if it may not.
fn forbidden_status(status: u16) -> Option<String> {
    let why = match status {
        400 => {
            "400 is a client error (an invalid request, or `content_filter`): it fails the same way on every backend and is never failed over"
        }
        401 => {
            "401 is an authentication failure, not a transient one: failing over on it would hide a wrong credential"
        }
        403 => {
            "403 is an authorization or quota refusal, not a transient one: failing over on it would hide a misconfiguration"
        }
        404 => {
            "404 means the deployment or path does not exist (`DeploymentNotFound`): fix the backend's `deployments` mapping instead of failing over"
        }
        402 | 405..=599 => return None,
        _ => {
            return Some(format!(
                "status {status} is not an HTTP error status; expected 400..=599"
            ));
        }
    };
    Some(why.to_owned())
}

fn range_message<T: std::fmt::Display>(value: T, low: T, high: T) -> String {
    format!("must be between {low} and {high}, found {value}")
}

// === impl Checker ===

impl Checker<'_> {
    fn at_value(&mut self, path: &str, message: impl Into<String>) {
        let error = self.locator.at_value(path, message);
        self.errors.push(error);
    }

    fn at_key(&mut self, path: &str, message: impl Into<String>) {
        let error = self.locator.at_key(path, message);
        self.errors.push(error);
    }

    fn secret_ref(&mut self, path: &str, reference: &str) {
        if let Err(error) = SecretRef::parse(reference) {
            self.at_value(path, error.to_string());
        }
    }

    /// Reports every repeated name; `names` yields (path of the name, name).
    fn unique_names<'n>(&mut self, what: &str, names: impl Iterator<Item = (String, &'n str)>) {
        let mut first: BTreeMap<&str, String> = BTreeMap::new();
        for (path, name) in names {
            match first.get(name) {
                Some(first_path) => {
                    let line = self.locator.line_of(first_path);
                    let message = if line > 0 {
                        format!(
                            "duplicate {what} name `{name}` (first defined at {first_path}, line {line})"
                        )
                    } else {
                        format!("duplicate {what} name `{name}` (first defined at {first_path})")
                    };
                    self.at_value(&path, message);
                }
                None => {
                    first.insert(name, path);
                }
            }
        }
    }

    fn gateway(&mut self, policy: &Policy) {
        let max_body = policy.gateway.max_body_bytes;
        if !MAX_BODY_BYTES.contains(&max_body) {
            self.at_value(
                "gateway.max_body_bytes",
                format!(
                    "must be between {} (1 KiB) and {} (100 MiB), found {max_body}",
                    MAX_BODY_BYTES.start(),
                    MAX_BODY_BYTES.end()
                ),
            );
        }
        let g = &policy.gateway;
        for (name, value) in [
            ("header_read_timeout_ms", g.header_read_timeout_ms),
            ("body_timeout_ms", g.body_timeout_ms),
            ("idle_timeout_ms", g.idle_timeout_ms),
            ("max_connections", g.max_connections as u64),
            ("max_in_flight", g.max_in_flight as u64),
        ] {
            if value == 0 {
                self.at_value(&field("gateway", name), "must be greater than 0");
            }
        }
    }

    fn deployments(&mut self, policy: &Policy) {
        if policy.deployments.is_empty() {
            self.at_value(
                "deployments",
                "at least one `[[deployments]]` entry is required",
            );
        }
        let served: BTreeSet<&str> = policy
            .backends
            .iter()
            .flat_map(|backend| backend.deployments.keys().map(String::as_str))
            .collect();
        for (i, deployment) in policy.deployments.iter().enumerate() {
            let path = index("deployments", i);
            let name = &deployment.name;
            if !is_deployment_name(name) {
                self.at_value(
                    &field(&path, "name"),
                    "must be a non-empty deployment name of letters, digits, `-`, `_` and `.`",
                );
            } else if !policy.backends.is_empty() && !served.contains(name.as_str()) {
                self.at_value(
                    &field(&path, "name"),
                    format!("empty pool: no backend serves deployment `{name}`; map it in some backend's `deployments`"),
                );
            }
            if deployment.model.as_deref().is_some_and(str::is_empty) {
                self.at_value(
                    &field(&path, "model"),
                    "must not be empty (leave it out to use the name)",
                );
            }
        }
        self.unique_names(
            "deployment",
            policy
                .deployments
                .iter()
                .enumerate()
                .map(|(i, d)| (field(&index("deployments", i), "name"), d.name.as_str())),
        );
    }

    fn backends(&mut self, policy: &Policy) {
        if policy.backends.is_empty() {
            self.at_value("backends", "at least one `[[backends]]` entry is required");
        }
        let declared: BTreeSet<&str> = policy.deployments.iter().map(|d| d.name.as_str()).collect();
        for (i, backend) in policy.backends.iter().enumerate() {
            self.backend(&index("backends", i), backend, &declared);
        }
        self.unique_names(
            "backend",
            policy
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (field(&index("backends", i), "name"), b.name.as_str())),
        );
    }

    fn backend(&mut self, path: &str, backend: &BackendSpec, declared: &BTreeSet<&str>) {
        if backend.name.trim().is_empty() {
            self.at_value(&field(path, "name"), "must not be empty");
        }
        if let Err(why) = check_endpoint(&backend.endpoint) {
            self.at_value(&field(path, "endpoint"), why);
        }
        if !PRIORITY.contains(&backend.priority) {
            let message = range_message(backend.priority, *PRIORITY.start(), *PRIORITY.end());
            self.at_value(&field(path, "priority"), message);
        }
        if !WEIGHT.contains(&backend.weight) {
            let message = range_message(backend.weight, *WEIGHT.start(), *WEIGHT.end());
            self.at_value(&field(path, "weight"), message);
        }
        match (&backend.api_key, &backend.bearer_token, &backend.entra) {
            (Some(api_key), None, None) => self.secret_ref(&field(path, "api_key"), api_key),
            (None, Some(token), None) => self.secret_ref(&field(path, "bearer_token"), token),
            (None, None, Some(entra)) => {
                if !valid_scope(entra.scope()) {
                    self.at_value(
                        &field(&field(path, "entra"), "scope"),
                        "must be a scope such as `https://cognitiveservices.azure.com/.default` (a URL ending in `/.default`)",
                    );
                }
            }
            (None, None, None) => self.at_value(
                path,
                "missing credential: set exactly one of `api_key`, `bearer_token` or `[backends.entra]`",
            ),
            (_, _, entra) => self.at_key(
                &field(path, if entra.is_some() { "entra" } else { "bearer_token" }),
                "set exactly one of `api_key`, `bearer_token` or `[backends.entra]`, not two (Azure rejects requests carrying both)",
            ),
        }
        let mapping = field(path, "deployments");
        if backend.deployments.is_empty() {
            self.at_value(
                &mapping,
                "maps no deployments; add e.g. `deployments = { gpt-4o = \"my-gpt-4o\" }`",
            );
        }
        for (logical, own) in &backend.deployments {
            let entry = field(&mapping, logical);
            if !declared.contains(logical.as_str()) {
                let known = declared
                    .iter()
                    .map(|d| format!("`{d}`"))
                    .collect::<Vec<_>>();
                let known = if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                };
                self.at_key(
                    &entry,
                    format!("unknown deployment `{logical}`: not declared in `[[deployments]]` (declared: {known})"),
                );
            }
            if !is_deployment_name(own) {
                self.at_value(
                    &entry,
                    "must be this backend's deployment name: letters, digits, `-`, `_` and `.`",
                );
            }
        }
        for (name, limit) in [("tpm", backend.tpm), ("rpm", backend.rpm)] {
            if limit == Some(0) {
                self.at_value(
                    &field(path, name),
                    "must be greater than 0 when set (leave it out if unknown)",
                );
            }
        }
    }

    fn failover(&mut self, policy: &Policy) {
        let failover = &policy.failover;
        if !MAX_ATTEMPTS.contains(&failover.max_attempts) {
            let message = range_message(
                failover.max_attempts,
                *MAX_ATTEMPTS.start(),
                *MAX_ATTEMPTS.end(),
            );
            self.at_value("failover.max_attempts", message);
        }
        for (name, value) in [
            ("deadline_ms", failover.deadline_ms),
            (
                "response_header_timeout_ms",
                failover.response_header_timeout_ms,
            ),
            ("stream_idle_timeout_ms", failover.stream_idle_timeout_ms),
        ] {
            if value == 0 {
                self.at_value(&field("failover", name), "must be greater than 0");
            }
        }
        if failover.max_cooldown_ms > MAX_COOLDOWN_MS {
            self.at_value(
                "failover.max_cooldown_ms",
                format!(
                    "must be at most {MAX_COOLDOWN_MS} (24 hours), found {}",
                    failover.max_cooldown_ms
                ),
            );
        }
        if failover.default_cooldown_ms > failover.max_cooldown_ms {
            self.at_value(
                "failover.default_cooldown_ms",
                format!(
                    "{} must not exceed failover.max_cooldown_ms ({})",
                    failover.default_cooldown_ms, failover.max_cooldown_ms
                ),
            );
        }
        for (i, status) in failover.on_status.iter().enumerate() {
            if let Some(why) = forbidden_status(*status) {
                self.at_value(&index("failover.on_status", i), why);
            }
        }
    }

    fn circuit_breaker(&mut self, policy: &Policy) {
        if policy.circuit_breaker.is_some() {
            self.at_key(
                "circuit_breaker",
                "`[circuit_breaker]` was replaced by `[circuit]`, which ejects a backend on a failure \
                 share, not a failure count: `failures` becomes `consecutive_failures` (connection \
                 failures and timeouts in a row only; 5xx count through `failure_percentage` over \
                 `request_volume`), `trip_seconds` becomes `base_ejection_seconds`, \
                 `interval_seconds` stays; see the README for the defaults",
            );
        }
        let circuit = &policy.circuit;
        for (name, value) in [
            ("failure_percentage", circuit.failure_percentage),
            ("max_ejection_percent", circuit.max_ejection_percent),
        ] {
            let low = u32::from(name == "max_ejection_percent");
            if !(low..=100).contains(&value) {
                self.at_value(&field("circuit", name), range_message(value, low, 100));
            }
        }
        if circuit.request_volume == 0 {
            self.at_value("circuit.request_volume", "must be at least 1");
        }
        for (name, value) in [
            ("interval_seconds", circuit.interval_seconds),
            ("base_ejection_seconds", circuit.base_ejection_seconds),
        ] {
            if value == 0 {
                self.at_value(&field("circuit", name), "must be greater than 0");
            }
        }
        if circuit.max_ejection_seconds < circuit.base_ejection_seconds {
            self.at_value(
                "circuit.max_ejection_seconds",
                format!(
                    "{} must not be less than circuit.base_ejection_seconds ({})",
                    circuit.max_ejection_seconds, circuit.base_ejection_seconds
                ),
            );
        }
    }

    fn headers(&mut self, policy: &Policy) {
        let h = &policy.headers;
        let lists = [("forward", &h.forward), ("return", &h.return_headers)];
        for (key, list) in lists {
            let Some(list) = list else { continue };
            let path = field("headers", key);
            for (i, pattern) in list.iter().enumerate() {
                let item = index(&path, i);
                let name = pattern.strip_suffix('*').unwrap_or(pattern);
                if !is_header_name(name) {
                    self.at_value(
                        &item,
                        format!("`{pattern}` is not a header name (expected e.g. `x-request-id` or the prefix `x-ratelimit-*`)"),
                    );
                } else if key == "forward"
                    && ["api-key", "authorization"].contains(&name.to_ascii_lowercase().as_str())
                {
                    self.at_value(
                        &item,
                        format!("`{pattern}` is a client credential and is never forwarded upstream: the gateway sends each backend's own credential"),
                    );
                }
            }
        }
        for (key, rules) in [("request", &h.request), ("response", &h.response)] {
            for (i, rule) in rules.iter().enumerate() {
                let path = index(&field("headers", key), i);
                if !is_header_name(&rule.name) {
                    self.at_value(
                        &field(&path, "name"),
                        format!("`{}` is not a header name", rule.name),
                    );
                }
                match (&rule.value, rule.action) {
                    (None, action) if action != super::HeaderAction::Delete => self.at_key(
                        &path,
                        "missing field `value` (needed unless action = \"delete\")",
                    ),
                    (Some(v), _) if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') => self
                        .at_value(
                            &field(&path, "value"),
                            "header values cannot contain control characters",
                        ),
                    _ => {}
                }
            }
        }
    }

    fn limits(&mut self, path: &str, limits: &super::LimitsSpec) {
        for (key, value) in [
            ("tokens_per_minute", limits.tokens_per_minute),
            ("requests_per_minute", limits.requests_per_minute),
            ("token_quota", limits.token_quota),
        ] {
            if value == Some(0) {
                self.at_value(
                    &field(path, key),
                    "must be at least 1 (leave it out for no limit)",
                );
            }
        }
        match (limits.token_quota, limits.token_quota_period) {
            (Some(_), None) => self.at_key(
                &field(path, "token_quota"),
                "`token_quota` needs `token_quota_period` (hourly, daily, weekly or monthly)",
            ),
            (None, Some(_)) => self.at_key(
                &field(path, "token_quota_period"),
                "`token_quota_period` without `token_quota`",
            ),
            _ => {}
        }
    }

    fn rate_limit(&mut self, policy: &Policy) {
        let r = &policy.rate_limit;
        let path = "rate_limit";
        match (&r.redis_url, r.store) {
            (None, super::StoreKind::Redis) => self.at_key(
                &field(path, "store"),
                "store = \"redis\" needs `redis_url` (e.g. `redis://127.0.0.1:6379` or `env:REDIS_URL`)",
            ),
            (Some(url), _) => {
                let at = field(path, "redis_url");
                if url.starts_with("env:") || url.starts_with("file:") || url.starts_with("keyvault:")
                {
                    self.secret_ref(&at, url);
                } else if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    self.at_value(
                        &at,
                        "expected a `redis://` or `rediss://` URL, or a secret reference (`env:NAME`, `file:PATH`) when it holds a password",
                    );
                } else if url.contains('@') {
                    self.at_value(
                        &at,
                        "this URL holds credentials: put it in a secret and reference it (`env:NAME` or `file:PATH`)",
                    );
                }
            }
            (None, _) => {}
        }
        if r.default_completion_tokens > 1_000_000 {
            self.at_value(
                &field(path, "default_completion_tokens"),
                range_message(r.default_completion_tokens, 0, 1_000_000),
            );
        }
        if r.key_prefix.is_empty()
            || r.key_prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            self.at_value(
                &field(path, "key_prefix"),
                "must be non-empty, without spaces",
            );
        }
        for (key, name) in [
            ("remaining_tokens_header", &r.remaining_tokens_header),
            ("remaining_requests_header", &r.remaining_requests_header),
            ("limit_tokens_header", &r.limit_tokens_header),
            ("limit_requests_header", &r.limit_requests_header),
            ("remaining_quota_header", &r.remaining_quota_header),
            ("tokens_consumed_header", &r.tokens_consumed_header),
        ] {
            if !is_header_name(name) {
                self.at_value(&field(path, key), format!("`{name}` is not a header name"));
            }
        }
    }

    fn key_vault(&mut self, policy: &Policy) {
        let refresh = policy.key_vault.refresh_seconds;
        if !(1..=86_400).contains(&refresh) {
            let message = range_message(refresh, 1, 86_400);
            self.at_value("key_vault.refresh_seconds", message);
        }
    }

    fn telemetry(&mut self, policy: &Policy) {
        let t = &policy.telemetry;
        if t.service_name.trim().is_empty() {
            self.at_value("telemetry.service_name", "must not be empty");
        }
        if let Some(endpoint) = &t.otlp_endpoint {
            if let Err(problem) = check_endpoint(endpoint) {
                self.at_value("telemetry.otlp_endpoint", problem);
            }
        }
        if let Some(key) = &policy.admin.key {
            self.secret_ref("admin.key", key);
        }
        if let Some(admin) = policy.admin.listen {
            if admin == policy.gateway.listen {
                self.at_value(
                    "admin.listen",
                    "is the gateway's own listen address: leave it out to serve admin endpoints there",
                );
            }
        }
    }

    fn consumers(&mut self, policy: &Policy) {
        let declared: BTreeSet<&str> = policy.deployments.iter().map(|d| d.name.as_str()).collect();
        for (i, consumer) in policy.consumers.iter().enumerate() {
            let path = index("consumers", i);
            if consumer.name.trim().is_empty() {
                self.at_value(&field(&path, "name"), "must not be empty");
            }
            let keys = field(&path, "keys");
            let tokens = consumer.entra_app_ids.len() + consumer.entra_object_ids.len();
            if consumer.keys.is_empty() && tokens == 0 {
                self.at_value(
                    &keys,
                    "a consumer needs at least one key reference, e.g. `keys = [\"env:APP_KEY\"]`, or Entra ID `entra_app_ids`/`entra_object_ids`",
                );
            }
            for (j, key) in consumer.keys.iter().enumerate() {
                self.secret_ref(&index(&keys, j), key);
            }
            if let Some(limits) = &consumer.limits {
                self.limits(&field(&path, "limits"), limits);
            }
            let per_deployment = field(&path, "deployment_limits");
            for (deployment, limits) in &consumer.deployment_limits {
                let at = field(&per_deployment, deployment);
                if !declared.contains(deployment.as_str()) {
                    self.at_key(
                        &at,
                        format!(
                            "unknown deployment `{deployment}`: not declared in `[[deployments]]`"
                        ),
                    );
                } else if consumer
                    .deployments
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(deployment))
                {
                    self.at_key(
                        &at,
                        format!(
                            "consumer `{}` may not call `{deployment}` (see its `deployments`)",
                            consumer.name
                        ),
                    );
                }
                self.limits(&at, limits);
            }
            for (j, deployment) in consumer.deployments.iter().flatten().enumerate() {
                if !declared.contains(deployment.as_str()) {
                    self.at_value(
                        &index(&field(&path, "deployments"), j),
                        format!(
                            "unknown deployment `{deployment}`: not declared in `[[deployments]]`"
                        ),
                    );
                }
            }
        }
        self.unique_names(
            "consumer",
            policy
                .consumers
                .iter()
                .enumerate()
                .map(|(i, c)| (field(&index("consumers", i), "name"), c.name.as_str())),
        );
    }
}

/// An Entra ID scope for the client credentials flow: `https://...` or `api://...`, ending in
/// `/.default`.
fn valid_scope(scope: &str) -> bool {
    (scope.starts_with("https://") || scope.starts_with("api://"))
        && scope.len() > "https:///.default".len()
        && scope.ends_with("/.default")
        && !scope
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

/// Entra ID checks: the settings, and every consumer's ids (GUIDs, each mapped to one consumer).
impl Checker<'_> {
    fn entra(&mut self, policy: &Policy) {
        if let Some(entra) = &policy.gateway.entra {
            if !is_guid(&entra.tenant) {
                self.at_value(
                    "gateway.entra.tenant",
                    "must be the tenant id, a GUID such as `72f988bf-86f1-41af-91ab-2d7cd011db47` (a domain name, `common` or `organizations` cannot be checked against a token's `tid`)",
                );
            }
            if entra.audiences.is_empty() || entra.audiences.iter().any(|a| a.trim().is_empty()) {
                self.at_value(
                    "gateway.entra.audiences",
                    "needs at least one non-empty audience, e.g. `[\"api://my-gateway\"]`",
                );
            }
            if let Err(problem) = check_endpoint(&entra.authority) {
                self.at_value("gateway.entra.authority", problem);
            }
            if entra.issuers.as_ref().is_some_and(|i| i.is_empty()) {
                self.at_value(
                    "gateway.entra.issuers",
                    "must not be empty: leave it out for the tenant's v1 and v2 issuers",
                );
            }
            if entra.clock_skew_seconds > 3_600 {
                self.at_value(
                    "gateway.entra.clock_skew_seconds",
                    format!("must be at most 3600, found {}", entra.clock_skew_seconds),
                );
            }
        }
        let mut first: BTreeMap<(&str, String), String> = BTreeMap::new();
        for (i, consumer) in policy.consumers.iter().enumerate() {
            let path = index("consumers", i);
            for (what, ids) in [
                ("entra_app_ids", &consumer.entra_app_ids),
                ("entra_object_ids", &consumer.entra_object_ids),
            ] {
                let list = field(&path, what);
                if !ids.is_empty() && policy.gateway.entra.is_none() {
                    self.at_value(
                        &list,
                        "needs `[gateway.entra]` (the tenant and audiences of accepted tokens)",
                    );
                }
                for (j, id) in ids.iter().enumerate() {
                    let at = index(&list, j);
                    if !is_guid(id) {
                        self.at_value(
                            &at,
                            "must be a GUID such as `11111111-2222-3333-4444-555555555555`",
                        );
                        continue;
                    }
                    match first.get(&(what, id.to_ascii_lowercase())) {
                        Some(first_path) => {
                            let message = format!(
                                "`{id}` is already mapped at {first_path}: a token must identify one consumer"
                            );
                            self.at_value(&at, message);
                        }
                        None => {
                            first.insert((what, id.to_ascii_lowercase()), at);
                        }
                    }
                }
            }
        }
    }

    fn tls(&mut self, policy: &Policy) {
        for (path, tls) in [
            ("gateway.tls", &policy.gateway.tls),
            ("admin.tls", &policy.admin.tls),
        ] {
            let Some(tls) = tls else { continue };
            self.secret_ref(&field(path, "certificate"), &tls.certificate);
            self.secret_ref(&field(path, "private_key"), &tls.private_key);
            if tls.reload_seconds == 0 {
                self.at_value(&field(path, "reload_seconds"), "must be at least 1");
            }
        }
        if policy.admin.tls.is_some() && policy.admin.listen.is_none() {
            self.at_key(
                "admin.tls",
                "needs `admin.listen`: without it the admin endpoints are served on the gateway's listener, with `gateway.tls`",
            );
        }
    }
}

impl Checker<'_> {
    fn upstream(&mut self, policy: &Policy) {
        let Some(ca_file) = &policy.upstream.ca_file else {
            return;
        };
        if ca_file.trim().is_empty() {
            self.at_value(
                "upstream.ca_file",
                "must be the path of a PEM file of CA certificates",
            );
        } else if ["env:", "file:", "keyvault:"]
            .iter()
            .any(|prefix| ca_file.starts_with(prefix))
        {
            // CA certificates are public: they are read from a path, not through a secret.
            self.at_value(
                "upstream.ca_file",
                "expected a path (e.g. `/etc/gateway/proxy-ca.pem`), not a secret reference: CA certificates are not secret",
            );
        }
    }
}

/// `8-4-4-4-12` hexadecimal digits, as Entra ID writes tenant, application and object ids.
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "https://a.openai.azure.com",
            "https://a.openai.azure.com/",
            "http://127.0.0.1:9001/prefix/",
            "http://[::1]:8080",
            "http://[::1]",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("a.openai.azure.com", "must be an absolute"),
            ("ftp://a", "must be an absolute"),
            ("https://", "has no host"),
            ("https:///x", "has no host"),
            ("https://a?x=1", "must not have a query"),
            ("https://a/#f", "must not have a query"),
            ("https://u:p@a", "must not contain user info"),
            ("https://a:99999", "invalid port"),
            ("https://a:", "invalid port"),
            ("http://[::1", "unclosed"),
            ("http://[::1]x", "invalid port"),
            ("https://a b", "whitespace"),
        ] {
            let error = check_endpoint(bad).err().unwrap_or_default();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn guids() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(is_guid("72F988BF-86F1-41AF-91AB-2D7CD011DB47"));
        for bad in [
            "common",
            "contoso.onmicrosoft.com",
            "72f988bf86f141af91ab2d7cd011db47",
            "72f988bf-86f1-41af-91ab-2d7cd011db4g",
            "",
        ] {
            assert!(!is_guid(bad), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(forbidden_status(429), None);
        assert_eq!(forbidden_status(599), None);
        for status in [400, 401, 403, 404, 200, 600, 0] {
            assert!(forbidden_status(status).is_some(), "{status}");
        }
    }
}
