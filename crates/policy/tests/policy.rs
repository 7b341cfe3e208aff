//! Policy parsing, validation, secret resolution and summary, through the public API.

use std::path::{Path, PathBuf};

use gateway_policy::Policy;
use gateway_policy::secret::{Credential, MapSecrets, NoSecrets, SystemSecrets};

const FULL: &str = include_str!("fixtures/full.toml");

/// The smallest valid policy; tests add to it. Lines:
/// 1 `[[deployments]]`, 2 `name`, 4 `[[backends]]`, 5 `name`, 6 `region`, 7 `endpoint`,
/// 8 `api_key`, 9 `deployments`.
const BASE: &str = r#"[[deployments]]
name = "gpt-4o"

[[backends]]
name = "sweden"
region = "Sweden Central"
endpoint = "https://sweden.openai.azure.com"
api_key = "env:SWEDEN_KEY"
deployments = { gpt-4o = "gpt-4o" }
"#;

fn errors(text: &str) -> Vec<String> {
    match Policy::from_toml_str(text, "p.toml") {
        Ok(_) => panic!("policy parsed:\n{text}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn error(text: &str) -> String {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> std::io::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("gateway-core-policy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn write(&self, relative: &str, contents: &str) -> std::io::Result<PathBuf> {
        let path = self.0.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn full_policy_parses() {
    let policy = Policy::from_toml_str(FULL, "full.toml").unwrap();
    assert_eq!(policy.gateway.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(policy.gateway.max_body_bytes, 8 * 1024 * 1024);
    assert_eq!(policy.deployments.len(), 2);
    assert_eq!(policy.deployments[1].model_name(), "text-embedding-3-large");
    let names: Vec<&str> = policy.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["eastus", "sweden", "france"]);
    let sweden = &policy.backends[1];
    assert_eq!((sweden.priority, sweden.weight), (1, 3));
    assert_eq!(
        sweden.normalized_endpoint(),
        "https://sweden.openai.azure.com"
    );
    assert_eq!(sweden.deployment_for("embeddings"), Some("te3-large"));
    assert_eq!((sweden.tpm, sweden.rpm), (Some(300_000), Some(1800)));
    let france = &policy.backends[2];
    assert_eq!((france.priority, france.weight), (1, 1));
    assert_eq!(
        france.normalized_endpoint(),
        "https://france.openai.azure.com/aoai"
    );
    assert_eq!(policy.failover.max_attempts, 4);
    assert_eq!(policy.circuit.base_ejection_seconds, 20);
    assert_eq!(
        policy.consumers[1].deployments.as_deref(),
        Some(&["embeddings".to_owned()][..])
    );
    assert_eq!(policy.source.name(), "full.toml");
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
}

#[test]
fn defaults_apply() {
    let policy = Policy::from_toml_str(BASE, "p.toml").unwrap();
    assert_eq!(policy.gateway.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(
        (policy.backends[0].priority, policy.backends[0].weight),
        (1, 1)
    );
    assert_eq!(policy.failover.on_status, [408, 429, 500, 502, 503, 504]);
    assert!(policy.consumers.is_empty());
}

#[test]
fn unknown_field_points_at_the_key() {
    let text = BASE.replace("api_key =", "weigth = 2\napi_key =");
    assert_eq!(
        error(&text),
        "p.toml:8:1: backends[0].weigth: unknown field `weigth`, expected one of `name`, `region`, \
         `endpoint`, `priority`, `weight`, `api_key`, `bearer_token`, `entra`, `deployments`, `tpm`, `rpm`, \
         `reserved_for`, `headroom`"
    );
    let text = format!("{BASE}\n[failover]\nmax_attempt = 3\n");
    assert_eq!(
        error(&text),
        "p.toml:12:1: failover.max_attempt: unknown field `max_attempt`, expected one of \
         `max_attempts`, `deadline_ms`, `response_header_timeout_ms`, `default_cooldown_ms`, \
         `max_cooldown_ms`, `on_status`, `stream_idle_timeout_ms`, `flex_fallback`, `throttle_wait_ms`"
    );
    let text = format!("listen = \"0.0.0.0:1\"\n{BASE}");
    assert_eq!(
        error(&text),
        "p.toml:1:1: listen: unknown field `listen`, expected one of `gateway`, `backends`, \
         `deployments`, `failover`, `circuit`, `circuit_breaker`, `consumers`, `headers`, `rate_limit`, `telemetry`, `admin`, `key_vault`, `upstream`"
    );
}

#[test]
fn wrong_type_points_at_the_value() {
    let text = BASE.replace("api_key =", "weight = \"heavy\"\napi_key =");
    assert_eq!(
        error(&text),
        "p.toml:8:10: backends[0].weight: invalid type: string \"heavy\", expected u32"
    );
    let text = format!("{BASE}\n[failover]\non_status = [429, \"503\"]\n");
    assert_eq!(
        error(&text),
        "p.toml:12:19: failover.on_status[1]: invalid type: string \"503\", expected u16"
    );
    let text = format!("[gateway]\nlisten = \"localhost\"\n{BASE}");
    assert_eq!(
        error(&text),
        "p.toml:2:10: gateway.listen: invalid socket address syntax"
    );
    let text = BASE.replace("api_key =", "weight = -1\napi_key =");
    assert_eq!(
        error(&text),
        "p.toml:8:10: backends[0].weight: invalid value: integer `-1`, expected u32"
    );
}

#[test]
fn missing_field_points_at_the_table() {
    let text = BASE.replace("region = \"Sweden Central\"\n", "");
    assert_eq!(
        error(&text),
        "p.toml:4:1: backends[0]: missing field `region`"
    );
    assert_eq!(
        error("[[deployments]]\nname = \"gpt-4o\"\n"),
        "p.toml:1:1: missing field `backends`"
    );
}

#[test]
fn syntax_errors() {
    let text = BASE.replace("name = \"sweden\"", "name = sweden");
    assert_eq!(
        error(&text),
        "p.toml:5:8: invalid TOML: string values must be quoted, expected literal string"
    );
    let text = BASE.replace("api_key =", "name = \"again\"\napi_key =");
    assert_eq!(
        error(&text),
        "p.toml:8:1: invalid TOML: duplicate key `name`"
    );
}

#[test]
fn duplicate_names() {
    let text = format!(
        "{BASE}\n[[backends]]\nname = \"sweden\"\nregion = \"Sweden Central\"\nendpoint = \"https://sweden2.openai.azure.com\"\napi_key = \"env:SWEDEN2_KEY\"\ndeployments = {{ gpt-4o = \"gpt-4o\" }}\n"
    );
    assert_eq!(
        error(&text),
        "p.toml:12:8: backends[1].name: duplicate backend name `sweden` (first defined at backends[0].name, line 5)"
    );
    let text = BASE.replace(
        "\n[[backends]]",
        "\n[[deployments]]\nname = \"gpt-4o\"\n\n[[backends]]",
    );
    assert_eq!(
        error(&text),
        "p.toml:5:8: deployments[1].name: duplicate deployment name `gpt-4o` (first defined at deployments[0].name, line 2)"
    );
    let text = format!(
        "{BASE}\n[[consumers]]\nname = \"app\"\nkeys = [\"env:A\"]\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:B\"]\n"
    );
    assert_eq!(
        error(&text),
        "p.toml:16:8: consumers[1].name: duplicate consumer name `app` (first defined at consumers[0].name, line 12)"
    );
}

#[test]
fn unknown_deployment_references() {
    let text = BASE.replace(
        "{ gpt-4o = \"gpt-4o\" }",
        "{ gpt-4o = \"gpt-4o\", \"gpt-4.1\" = \"gpt-41\" }",
    );
    assert_eq!(
        error(&text),
        "p.toml:9:36: backends[0].deployments.\"gpt-4.1\": unknown deployment `gpt-4.1`: not declared in `[[deployments]]` (declared: `gpt-4o`)"
    );
    let text = format!(
        "{BASE}\n[[consumers]]\nname = \"app\"\nkeys = [\"env:A\"]\ndeployments = [\"gpt-4o\", \"gpt-5\"]\n"
    );
    assert_eq!(
        error(&text),
        "p.toml:14:26: consumers[0].deployments[1]: unknown deployment `gpt-5`: not declared in `[[deployments]]`"
    );
}

#[test]
fn empty_pool_and_empty_lists() {
    let text = BASE.replace(
        "\n[[backends]]",
        "\n[[deployments]]\nname = \"o3\"\n\n[[backends]]",
    );
    assert_eq!(
        error(&text),
        "p.toml:5:8: deployments[1].name: empty pool: no backend serves deployment `o3`; map it in some backend's `deployments`"
    );
    assert_eq!(
        errors("backends = []\ndeployments = []\n"),
        [
            "p.toml:1:12: backends: at least one `[[backends]]` entry is required",
            "p.toml:2:15: deployments: at least one `[[deployments]]` entry is required",
        ]
    );
    let text = BASE.replace("{ gpt-4o = \"gpt-4o\" }", "{}");
    assert_eq!(
        errors(&text),
        [
            "p.toml:2:8: deployments[0].name: empty pool: no backend serves deployment `gpt-4o`; map it in some backend's `deployments`",
            "p.toml:9:15: backends[0].deployments: maps no deployments; add e.g. `deployments = { gpt-4o = \"my-gpt-4o\" }`",
        ]
    );
}

#[test]
fn bad_endpoints() {
    let bad = |endpoint: &str| error(&BASE.replace("https://sweden.openai.azure.com", endpoint));
    assert_eq!(
        bad("sweden.openai.azure.com"),
        "p.toml:7:12: backends[0].endpoint: must be an absolute http:// or https:// URL such as `https://my-aoai.openai.azure.com`"
    );
    assert_eq!(
        bad("https://sweden.openai.azure.com/?api-version=2024-10-21"),
        "p.toml:7:12: backends[0].endpoint: must not have a query or fragment (the gateway adds `api-version` itself)"
    );
    assert_eq!(
        bad("https:///openai"),
        "p.toml:7:12: backends[0].endpoint: has no host"
    );
}

#[test]
fn out_of_range_numbers() {
    let text = BASE.replace("api_key =", "weight = 0\npriority = 101\napi_key =");
    assert_eq!(
        errors(&text),
        [
            "p.toml:8:10: backends[0].weight: must be between 1 and 1000, found 0",
            "p.toml:9:12: backends[0].priority: must be between 1 and 100, found 101",
        ]
    );
    let text = format!("[gateway]\nmax_body_bytes = 512\n\n{BASE}");
    assert_eq!(
        error(&text),
        "p.toml:2:18: gateway.max_body_bytes: must be between 1024 (1 KiB) and 104857600 (100 MiB), found 512"
    );
    let text = format!(
        "{BASE}\n[failover]\nmax_attempts = 51\ndeadline_ms = 0\ndefault_cooldown_ms = 90000000\nmax_cooldown_ms = 90000000\n\n[circuit]\nrequest_volume = 0\nbase_ejection_seconds = 0\nmax_ejection_percent = 0\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.toml:12:16: failover.max_attempts: must be between 1 and 50, found 51",
            "p.toml:13:15: failover.deadline_ms: must be greater than 0",
            "p.toml:15:19: failover.max_cooldown_ms: must be at most 86400000 (24 hours), found 90000000",
            "p.toml:18:18: circuit.request_volume: must be at least 1",
            "p.toml:19:25: circuit.base_ejection_seconds: must be greater than 0",
            "p.toml:20:24: circuit.max_ejection_percent: must be between 1 and 100, found 0",
        ]
    );
    let text =
        format!("{BASE}\n[failover]\ndefault_cooldown_ms = 60000\nmax_cooldown_ms = 30000\n");
    assert_eq!(
        error(&text),
        "p.toml:12:23: failover.default_cooldown_ms: 60000 must not exceed failover.max_cooldown_ms (30000)"
    );
}

#[test]
fn the_old_circuit_breaker_section_gets_a_migration_hint() {
    let text = format!(
        "{BASE}
[circuit_breaker]
failures = 5
trip_seconds = 30
"
    );
    let message = error(&text);
    assert!(
        message.starts_with(
            "p.toml:11:2: circuit_breaker: `[circuit_breaker]` was replaced by `[circuit]`"
        ),
        "{message}"
    );
    for hint in [
        "`consecutive_failures`",
        "`base_ejection_seconds`",
        "`failure_percentage`",
    ] {
        assert!(message.contains(hint), "{message}");
    }
    let text = format!(
        "{BASE}
[circuit]
base_ejection_seconds = 60
max_ejection_seconds = 30
failure_percentage = 101
"
    );
    assert_eq!(
        errors(&text),
        [
            "p.toml:13:24: circuit.max_ejection_seconds: 30 must not be less than circuit.base_ejection_seconds (60)",
            "p.toml:14:22: circuit.failure_percentage: must be between 0 and 100, found 101",
        ]
    );
}

#[test]
fn failover_statuses_explain_themselves() {
    let text = format!("{BASE}\n[failover]\non_status = [429, 400, 404, 302]\n");
    assert_eq!(
        errors(&text),
        [
            "p.toml:12:19: failover.on_status[1]: 400 is a client error (an invalid request, or `content_filter`): it fails the same way on every backend and is never failed over",
            "p.toml:12:24: failover.on_status[2]: 404 means the deployment or path does not exist (`DeploymentNotFound`): fix the backend's `deployments` mapping instead of failing over",
            "p.toml:12:29: failover.on_status[3]: status 302 is not an HTTP error status; expected 400..=599",
        ]
    );
}

#[test]
fn credentials() {
    let text = BASE.replace("\"env:SWEDEN_KEY\"", "\"0123456789abcdef0123456789abcdef\"");
    assert_eq!(
        error(&text),
        "p.toml:8:11: backends[0].api_key: secrets must be references, not values: expected `env:NAME` \
         (an environment variable), `file:PATH` (a file, relative to the policy file's directory) \
         or `keyvault:https://VAULT.vault.azure.net/secrets/NAME` (a Key Vault secret)"
    );
    assert!(!error(&text).contains("0123456789"));
    let text = BASE.replace("\"env:SWEDEN_KEY\"", "\"env:SWEDEN-KEY\"");
    assert_eq!(
        error(&text),
        "p.toml:8:11: backends[0].api_key: `env:` must be followed by an environment variable name matching [A-Za-z_][A-Za-z0-9_]*"
    );
    let text = BASE.replace("api_key =", "bearer_token = \"env:TOKEN\"\napi_key =");
    assert_eq!(
        error(&text),
        "p.toml:8:1: backends[0].bearer_token: set exactly one of `api_key`, `bearer_token` or `[backends.entra]`, not two (Azure rejects requests carrying both)"
    );
    let text = BASE.replace("api_key = \"env:SWEDEN_KEY\"\n", "");
    assert_eq!(
        error(&text),
        "p.toml:4:1: backends[0]: missing credential: set exactly one of `api_key`, `bearer_token` or `[backends.entra]`"
    );
}

#[test]
fn entra_and_key_vault_credentials() {
    let entra = BASE.replace("api_key = \"env:SWEDEN_KEY\"\n", "entra = {}\n");
    let policy = Policy::from_toml_str(&entra, "p.toml").unwrap();
    let spec = policy.backends[0].entra.as_ref().unwrap();
    assert_eq!(spec.scope(), "https://cognitiveservices.azure.com/.default");
    assert_eq!(policy.key_vault.refresh_seconds, 300);
    assert!(
        policy
            .summary()
            .contains("Entra ID token for https://cognitiveservices.azure.com/.default")
    );
    // One credential per backend, with its own scope; the token is fetched by the binary.
    let resolved = policy.resolve_secrets(&NoSecrets, None).unwrap();
    assert_eq!(resolved.entra.len(), 1);
    assert_eq!(
        resolved.backends[0],
        Credential::Live(resolved.entra[0].1.clone())
    );
    assert!(resolved.backends[0].current().is_none());

    let scoped = BASE.replace(
        "api_key = \"env:SWEDEN_KEY\"\n",
        "entra = { scope = \"https://ai.azure.com/.default\" }\n",
    );
    let policy = Policy::from_toml_str(&scoped, "p.toml").unwrap();
    assert_eq!(
        policy.backends[0].entra.as_ref().unwrap().scope(),
        "https://ai.azure.com/.default"
    );
    let bad_scope = BASE.replace(
        "api_key = \"env:SWEDEN_KEY\"\n",
        "entra = { scope = \"https://ai.azure.com\" }\n",
    );
    assert!(
        error(&bad_scope).contains("backends[0].entra.scope: must be a scope such as `https://cognitiveservices.azure.com/.default`"),
        "{}",
        error(&bad_scope)
    );
    let both = BASE.replace("api_key =", "entra = {}\napi_key =");
    assert!(error(&both).contains("backends[0].entra: set exactly one of `api_key`, `bearer_token` or `[backends.entra]`, not two"));

    let vault = BASE.replace(
        "\"env:SWEDEN_KEY\"",
        "\"keyvault:https://kv.vault.azure.net/secrets/sweden\"",
    );
    let policy = Policy::from_toml_str(&vault, "p.toml").unwrap();
    // Without a Key Vault client (the binary brings one) the reference cannot be read.
    let unresolved = policy
        .resolve_secrets(&NoSecrets, None)
        .unwrap_err()
        .to_string();
    assert!(unresolved.contains("p.toml:8:11: backends[0].api_key: cannot read Key Vault secret `https://kv.vault.azure.net/secrets/sweden`"), "{unresolved}");
    let far = BASE.replace(
        "\"env:SWEDEN_KEY\"",
        "\"keyvault:https://kv.example.com/secrets/sweden\"",
    );
    assert!(error(&far).contains("the host must be a Key Vault"));
    let refresh = format!("{BASE}\n[key_vault]\nrefresh_seconds = 0\n");
    assert!(
        error(&refresh).contains("key_vault.refresh_seconds: must be between 1 and 86400, found 0")
    );
}

#[test]
fn consumer_keys() {
    let text = format!(
        "{BASE}\n[[consumers]]\nname = \"app\"\nkeys = []\n\n[[consumers]]\nname = \"other\"\nkeys = [\"env:OK\", \"keyvault:vault/app\"]\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.toml:13:8: consumers[0].keys: a consumer needs at least one key reference, e.g. `keys = [\"env:APP_KEY\"]`, or Entra ID `entra_app_ids`/`entra_object_ids`",
            "p.toml:17:19: consumers[1].keys[1]: `keyvault:` must be followed by `https://VAULT.vault.azure.net/secrets/NAME[/VERSION]`: must start with `https://`",
        ]
    );
}

#[test]
fn entra_settings_and_consumer_ids() {
    let app = "aaaaaaaa-1111-4111-8111-000000000001";
    let entra = "[gateway.entra]\ntenant = \"72f988bf-86f1-41af-91ab-2d7cd011db47\"\naudiences = [\"api://gw\"]\n";
    // A consumer known only by its token ids needs no key.
    let ok = format!("{entra}{BASE}\n[[consumers]]\nname = \"app\"\nentra_app_ids = [\"{app}\"]\n");
    let policy = Policy::from_toml_str(&ok, "p.toml").unwrap();
    let summary = policy.summary();
    assert!(summary.contains("entra id tokens: tenant 72f988bf-86f1-41af-91ab-2d7cd011db47, audiences api://gw, keys from https://login.microsoftonline.com, clock skew 300 s"), "{summary}");
    assert!(
        summary.contains("  app: 0 keys, 1 Entra ID app, deployments: all"),
        "{summary}"
    );
    let settings = policy.gateway.entra.as_ref().unwrap();
    assert_eq!(settings.authority, "https://login.microsoftonline.com");
    assert_eq!(
        (
            settings.clock_skew_seconds,
            settings.key_refresh_min_seconds
        ),
        (300, 300)
    );
    assert_eq!(
        settings.accepted_issuers(),
        [
            "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
        ]
    );

    let bad = format!(
        "[gateway.entra]\ntenant = \"contoso.onmicrosoft.com\"\naudiences = []\n{BASE}\n\
         [[consumers]]\nname = \"a\"\nentra_app_ids = [\"{app}\", \"not-a-guid\"]\n\
         [[consumers]]\nname = \"b\"\nentra_app_ids = [\"{}\"]\n",
        app.to_uppercase()
    );
    let all = errors(&bad);
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(
        all[0].starts_with("p.toml:2:10: gateway.entra.tenant: must be the tenant id, a GUID"),
        "{}",
        all[0]
    );
    assert!(
        all[1].starts_with("p.toml:3:13: gateway.entra.audiences: needs at least one"),
        "{}",
        all[1]
    );
    assert!(all[2].starts_with("p.toml:16:"), "{}", all[2]);
    assert!(
        all[2].contains("consumers[0].entra_app_ids[1]: must be a GUID"),
        "{}",
        all[2]
    );
    assert!(all[3].contains("consumers[1].entra_app_ids[0]: `AAAAAAAA-1111-4111-8111-000000000001` is already mapped at consumers[0].entra_app_ids[0]"), "{}", all[3]);

    // Token ids without `[gateway.entra]` could never match.
    let no_entra = format!("{BASE}\n[[consumers]]\nname = \"a\"\nentra_object_ids = [\"{app}\"]\n");
    assert!(error(&no_entra).contains("consumers[0].entra_object_ids: needs `[gateway.entra]`"));
}

#[test]
fn tls_settings() {
    let text = format!(
        "[gateway.tls]\ncertificate = \"env:CERT\"\nprivate_key = \"s3cret-pem\"\n\n[admin.tls]\ncertificate = \"env:A\"\nprivate_key = \"env:B\"\n\n{BASE}"
    );
    let all = errors(&text);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(
        all[0].starts_with("p.toml:3:15: gateway.tls.private_key: secrets must be references"),
        "{}",
        all[0]
    );
    assert!(!all[0].contains("s3cret-pem"));
    assert!(
        all[1].contains("admin.tls: needs `admin.listen`"),
        "{}",
        all[1]
    );

    let ok =
        format!("[gateway.tls]\ncertificate = \"env:CERT\"\nprivate_key = \"env:KEY\"\n\n{BASE}");
    let policy = Policy::from_toml_str(&ok, "p.toml").unwrap();
    assert_eq!(policy.gateway.tls.as_ref().unwrap().reload_seconds, 60);
    assert!(policy.summary().contains("gateway tls: HTTP/2 and HTTP/1.1, certificate from env:CERT, key from env:KEY, re-read every 60 s"));
    let missing = policy
        .resolve_tls(
            &MapSecrets::with_fallback(NoSecrets).with_env("CERT", "c"),
            None,
        )
        .unwrap_err();
    assert!(
        missing
            .to_string()
            .starts_with("p.toml:3:15: gateway.tls.private_key: "),
        "{missing}"
    );
    let src = MapSecrets::with_fallback(NoSecrets)
        .with_env("CERT", "c")
        .with_env("KEY", "k");
    let tls = policy.resolve_tls(&src, None).unwrap();
    assert_eq!(tls.gateway.unwrap().private_key.expose(), "k");
}

#[test]
fn every_error_is_reported_in_document_order() {
    let text = r#"[gateway]
max_body_bytes = 0

[[deployments]]
name = "gpt-4o"

[[deployments]]
name = "gpt-4o"

[[backends]]
name = "a"
region = "Sweden Central"
endpoint = "ftp://a"
weight = 5000
api_key = "hunter2"
deployments = { gpt-4o = "gpt-4o", gpt-5 = "gpt-5" }

[failover]
on_status = [401]

[[consumers]]
name = "app"
keys = ["env:APP_KEY"]
deployments = ["o3"]
"#;
    let all = errors(text);
    let positions: Vec<&str> = all
        .iter()
        .map(|e| e.split(": ").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        positions,
        [
            "gateway.max_body_bytes",
            "deployments[1].name",
            "backends[0].endpoint",
            "backends[0].weight",
            "backends[0].api_key",
            "backends[0].deployments.gpt-5",
            "failover.on_status[0]",
            "consumers[0].deployments[0]",
        ],
        "{all:#?}"
    );
    assert!(all.iter().all(|e| e.starts_with("p.toml:")));
    assert!(all.iter().all(|e| !e.contains("hunter2")));
    assert!(
        all[6].contains("401 is an authentication failure"),
        "{}",
        all[6]
    );
}

#[test]
fn repeated_secret_references_are_warnings() {
    let text = format!("{BASE}\n[[consumers]]\nname = \"app\"\nkeys = [\"env:SWEDEN_KEY\"]\n");
    let policy = Policy::from_toml_str(&text, "p.toml").unwrap();
    let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "p.toml:13:9: consumers[0].keys[0]: secret reference `env:SWEDEN_KEY` is also used at backends[0].api_key"
        ]
    );
}

#[test]
fn resolves_secrets_from_env_and_files_relative_to_the_policy() {
    let dir = TempDir::new("resolve").unwrap();
    let path = dir.write("conf/policy.toml", FULL).unwrap();
    dir.write("conf/secrets/france.token", "france-token\n")
        .unwrap();
    dir.write("conf/secrets/search.key", "search-key  \n")
        .unwrap();
    let policy = Policy::load(&path).unwrap();
    assert_eq!(policy.source.dir(), Some(dir.0.join("conf").as_path()));

    // The overlay answers env and `/run/secrets`; the relative files come from the real disk.
    let secrets = MapSecrets::with_fallback(SystemSecrets)
        .with_env("SWEDEN_KEY", "sweden-key")
        .with_env("CHAT_APP_KEY", "chat-1")
        .with_env("CHAT_APP_KEY_NEXT", "chat-2")
        .with_file("/run/secrets/eastus", "eastus-key\n");
    let resolved = policy.resolve_secrets(&secrets, None).unwrap();
    let backends: Vec<(&str, &str)> = resolved
        .backends
        .iter()
        .map(|c| match c {
            Credential::ApiKey(s) => ("api-key", s.expose()),
            Credential::Bearer(s) => ("bearer", s.expose()),
            Credential::Live(_) => ("live", ""),
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("api-key", "eastus-key"),
            ("api-key", "sweden-key"),
            ("bearer", "france-token")
        ]
    );
    let consumers: Vec<Vec<&str>> = resolved
        .consumers
        .iter()
        .map(|keys| keys.iter().map(|k| k.expose()).collect())
        .collect();
    assert_eq!(consumers, [vec!["chat-1", "chat-2"], vec!["search-key"]]);

    // An explicit directory wins over the file's own.
    let elsewhere = TempDir::new("elsewhere").unwrap();
    elsewhere
        .write("secrets/france.token", "other-token")
        .unwrap();
    elsewhere.write("secrets/search.key", "other-key").unwrap();
    let resolved = policy
        .resolve_secrets(&secrets, Some(&elsewhere.0))
        .unwrap();
    assert_eq!(
        resolved.backends[2].current().unwrap().expose(),
        "other-token"
    );
}

#[test]
fn unresolvable_secrets_name_the_reference_and_position() {
    let policy = Policy::from_toml_str(FULL, "full.toml").unwrap();
    let secrets = MapSecrets::with_fallback(NoSecrets)
        .with_env("SWEDEN_KEY", "k")
        .with_env("CHAT_APP_KEY", "")
        .with_file("/run/secrets/eastus", "k")
        .with_file("/etc/gw/secrets/france.token", "k")
        .with_file("/etc/gw/secrets/search.key", "\n");
    let errors = policy
        .resolve_secrets(&secrets, Some(Path::new("/etc/gw")))
        .unwrap_err();
    assert_eq!(
        errors.to_string(),
        "full.toml:56:9: consumers[0].keys[0]: environment variable `CHAT_APP_KEY` (from `env:CHAT_APP_KEY`) is empty\n\
         full.toml:56:29: consumers[0].keys[1]: environment variable `CHAT_APP_KEY_NEXT` (from `env:CHAT_APP_KEY_NEXT`) is not set\n\
         full.toml:60:9: consumers[1].keys[0]: secret file `/etc/gw/secrets/search.key` (from `file:secrets/search.key`) is empty"
    );
    let dir = TempDir::new("missing").unwrap();
    let secrets = MapSecrets::with_fallback(SystemSecrets)
        .with_env("SWEDEN_KEY", "k")
        .with_env("CHAT_APP_KEY", "k")
        .with_env("CHAT_APP_KEY_NEXT", "k");
    let errors = policy.resolve_secrets(&secrets, Some(&dir.0)).unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        lines[1],
        format!(
            "full.toml:38:16: backends[2].bearer_token: cannot read secret file `{}` (from `file:secrets/france.token`): No such file or directory (os error 2)",
            dir.0.join("secrets/france.token").display()
        )
    );
}

#[test]
fn upstream_ca_file_is_a_path_relative_to_the_policy() {
    let dir = TempDir::new("upstream-ca").unwrap();
    let path = dir
        .write(
            "gw/policy.toml",
            &format!("[upstream]\nca_file = \"certs/ca.pem\"\n\n{BASE}"),
        )
        .unwrap();
    let policy = Policy::load(&path).unwrap();
    assert_eq!(
        policy.upstream_ca_file().unwrap(),
        dir.0.join("gw/certs/ca.pem")
    );
    assert!(
        policy.summary().contains(
            "upstream tls: trusts the CA certificates in certs/ca.pem besides the system's"
        ),
        "{}",
        policy.summary()
    );
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());

    let absolute = dir
        .write(
            "gw/absolute.toml",
            &format!("[upstream]\nca_file = \"/etc/gw/ca.pem\"\n\n{BASE}"),
        )
        .unwrap();
    let policy = Policy::load(&absolute).unwrap();
    assert_eq!(
        policy.upstream_ca_file().unwrap(),
        Path::new("/etc/gw/ca.pem")
    );

    let none = Policy::from_toml_str(BASE, "p.toml").unwrap();
    assert!(none.upstream_ca_file().is_none());
    assert!(!none.summary().contains("upstream tls"));
}

#[test]
fn upstream_ca_file_must_be_a_path() {
    assert_eq!(
        error(&format!(
            "[upstream]\nca_file = \"file:/etc/ca.pem\"\n\n{BASE}"
        )),
        "p.toml:2:11: upstream.ca_file: expected a path (e.g. `/etc/gateway/proxy-ca.pem`), not a secret reference: CA certificates are not secret"
    );
    assert_eq!(
        error(&format!("[upstream]\nca_file = \" \"\n\n{BASE}")),
        "p.toml:2:11: upstream.ca_file: must be the path of a PEM file of CA certificates"
    );
    assert!(
        error(&format!("[upstream]\nca = \"x.pem\"\n\n{BASE}"))
            .contains("upstream.ca: unknown field `ca`, expected `ca_file`")
    );
    // Certificates for backends that are all plain HTTP are never used.
    let plain = format!(
        "[upstream]\nca_file = \"ca.pem\"\n\n{}",
        BASE.replace("https://sweden", "http://sweden")
    );
    let policy = Policy::from_toml_str(&plain, "p.toml").unwrap();
    let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "p.toml:2:11: upstream.ca_file: no backend is called over https://, so these certificates are never used"
        ]
    );
}

#[test]
fn load_reports_unreadable_files() {
    let error = Policy::load(Path::new("/nonexistent/policy.toml")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "/nonexistent/policy.toml: cannot read policy file: No such file or directory (os error 2)"
    );
}

#[test]
fn summary_lists_groups_in_priority_order() {
    let policy = Policy::from_toml_str(FULL, "full.toml").unwrap();
    let summary = policy.summary();
    let expected = "\
policy full.toml
gateway: listen 0.0.0.0:8080, max body 8 MiB, shutdown grace 20 s
deployments (2):
  gpt-4o (model gpt-4o-2024-08-06)
  embeddings (model text-embedding-3-large)
backends (3) in 2 priority groups, lower priority first:
  priority 1: 2 backends, total weight 4
    sweden (Sweden Central) https://sweden.openai.azure.com
      weight 3, api-key from env:SWEDEN_KEY, tpm 300000, rpm 1800
      deployments: embeddings -> te3-large, gpt-4o
    france (France Central) https://france.openai.azure.com/aoai
      weight 1, bearer token from file:secrets/france.token
      deployments: gpt-4o -> gpt4o-fr
  priority 2: 1 backend, total weight 1
    eastus (East US) https://eastus.openai.azure.com
      weight 1, api-key from file:/run/secrets/eastus
      deployments: embeddings, gpt-4o
failover: up to 4 attempts, deadline 60000 ms, response headers within 20000 ms, cooldown 5000 ms (max 120000 ms), on status 408, 429, 500, 502, 503, 504
circuit: ejects a backend at 50% failures over 20+ attempts within 10 s or 3 connection failures in a row, for 20 s growing to 300 s, at most 50% of a priority group
consumers (2):
  chat-app: 2 keys, deployments: all
  search: 1 key, deployments: embeddings
";
    assert_eq!(summary, expected);
}

#[test]
fn header_rules_are_checked() {
    let text = format!(
        "{BASE}\n[headers]\nforward = [\"traceparent\", \"api-key\", \"bad header\"]\nreturn = [\"x-ratelimit-*\"]\n\n[[headers.request]]\nname = \"x-gateway-name\"\n\n[[headers.response]]\nname = \"x-ok\"\naction = \"delete\"\n"
    );
    let all = errors(&text);
    assert_eq!(
        all,
        [
            "p.toml:12:27: headers.forward[1]: `api-key` is a client credential and is never forwarded upstream: the gateway sends each backend's own credential",
            "p.toml:12:38: headers.forward[2]: `bad header` is not a header name (expected e.g. `x-request-id` or the prefix `x-ratelimit-*`)",
            "p.toml:15:1: headers.request[0]: missing field `value` (needed unless action = \"delete\")",
        ]
    );
    let ok = format!(
        "{BASE}\n[headers]\nforward = [\"x-team-*\"]\n\n[[headers.response]]\nname = \"cache-control\"\nvalue = \"no-store\"\naction = \"skip\"\n"
    );
    let policy = Policy::from_toml_str(&ok, "p.toml").unwrap();
    assert_eq!(
        policy.headers.response[0].value.as_deref(),
        Some("no-store")
    );
    let bad_action = format!(
        "{BASE}\n[[headers.response]]\nname = \"x\"\nvalue = \"v\"\naction = \"replace\"\n"
    );
    let err = error(&bad_action);
    assert!(
        err.starts_with("p.toml:14:10: headers.response[0].action: unknown variant `replace`"),
        "{err}"
    );
}

#[test]
fn consumer_limits_and_rate_limit_settings_are_checked() {
    let text = format!(
        "{BASE}\n[rate_limit]\nstore = \"redis\"\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:APP_KEY\"]\ndeployments = [\"gpt-4o\"]\n[consumers.limits]\ntokens_per_minute = 0\ntoken_quota = 100\n[consumers.deployment_limits.o3]\nrequests_per_minute = 5\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.toml:12:1: rate_limit.store: store = \"redis\" needs `redis_url` (e.g. `redis://127.0.0.1:6379` or `env:REDIS_URL`)",
            "p.toml:19:21: consumers[0].limits.tokens_per_minute: must be at least 1 (leave it out for no limit)",
            "p.toml:20:1: consumers[0].limits.token_quota: `token_quota` needs `token_quota_period` (hourly, daily, weekly or monthly)",
            "p.toml:21:30: consumers[0].deployment_limits.o3: unknown deployment `o3`: not declared in `[[deployments]]`",
        ]
    );
    let url_with_password = format!(
        "{BASE}\n[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:pw@127.0.0.1:6379\"\n"
    );
    assert!(error(&url_with_password).contains("holds credentials"));

    let ok = format!(
        "{BASE}\n[rate_limit]\nstore = \"redis\"\nredis_url = \"env:REDIS_URL\"\non_store_error = \"fail-closed\"\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:APP_KEY\"]\n[consumers.limits]\ntokens_per_minute = 1000\ntoken_quota = 50000\ntoken_quota_period = \"daily\"\n[consumers.deployment_limits.gpt-4o]\nrequests_per_minute = 5\n"
    );
    let policy = Policy::from_toml_str(&ok, "p.toml").unwrap();
    let secrets = MapSecrets::with_fallback(NoSecrets)
        .with_env("SWEDEN_KEY", "k")
        .with_env("APP_KEY", "a")
        .with_env("REDIS_URL", "redis://127.0.0.1:1");
    let resolved = policy.resolve_secrets(&secrets, None).unwrap();
    assert_eq!(resolved.redis_url.unwrap().expose(), "redis://127.0.0.1:1");
    assert_eq!(
        policy.consumers[0].deployment_limits["gpt-4o"].requests_per_minute,
        Some(5)
    );
}
