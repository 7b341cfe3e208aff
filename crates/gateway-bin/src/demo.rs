//! `gateway demo`: three simulated regions behind a gateway, with no Azure account.

use std::net::SocketAddr;
use std::time::Duration;

use gateway_policy::Policy;
use gateway_policy::secret::{MapSecrets, NoSecrets};
use simulator::{DeploymentConfig, RegionConfig, RunningRegion};

use crate::{app, serve};

/// The policy the demo runs, compiled in so the demo works from any directory.
pub const DEMO_POLICY: &str = include_str!("../../../policies/demo.toml");

/// The key clients use against the demo gateway.
pub const DEMO_CLIENT_KEY: &str = "demo-key";

/// The key of the demo's rate-limited consumer (3 requests per minute).
pub const DEMO_LIMITED_KEY: &str = "demo-key-limited";

/// The key of the demo's low-tier batch consumer, which spills from the PTU pool first.
pub const DEMO_BATCH_KEY: &str = "demo-key-batch";

/// A running demo: the simulated regions and the gateway in front of them.
pub struct Demo {
    /// The simulated regions, in the policy's backend order.
    pub regions: Vec<RunningRegion>,
    /// The gateway, ready to serve; its backends' endpoints point at `regions`.
    pub gateway: app::Gateway,
}

/// Starts the simulated regions and builds the gateway (without serving it).
pub async fn start() -> Result<Demo, String> {
    let mut policy = Policy::from_toml_str(DEMO_POLICY, "policies/demo.toml")
        .map_err(|e| format!("demo policy is invalid\n{e}"))?;
    let secrets = MapSecrets::with_fallback(NoSecrets)
        .with_env("GATEWAY_DEMO_KEY", DEMO_CLIENT_KEY)
        .with_env("GATEWAY_DEMO_LIMITED_KEY", DEMO_LIMITED_KEY)
        .with_env("GATEWAY_DEMO_BATCH_KEY", DEMO_BATCH_KEY)
        .with_env("DEMO_SWEDEN_KEY", "sim-key-sweden")
        .with_env("DEMO_FRANCE_KEY", "sim-key-france")
        .with_env("DEMO_EASTUS2_KEY", "sim-key-eastus2");
    let resolved = policy
        .resolve_secrets(&secrets, None)
        .map_err(|e| format!("demo secrets\n{e}"))?;

    let mut regions = Vec::new();
    for (backend, credential) in policy.backends.iter_mut().zip(&resolved.backends) {
        let key = credential.current();
        let key = key.as_ref().map_or("", |s| s.expose());
        let mut config = RegionConfig::new(backend.region.clone(), key);
        // Slow enough to watch a stream arrive token by token.
        config.token_delay = Duration::from_millis(30);
        for own_name in backend.deployments.values() {
            let deployment = if own_name.contains("embedding") {
                DeploymentConfig::embeddings(own_name.clone(), 1_000_000)
            } else {
                DeploymentConfig::chat(own_name.clone(), backend.tpm.unwrap_or(100_000))
            };
            config = config.deployment(deployment);
        }
        let wanted = backend
            .endpoint
            .trim_start_matches("http://")
            .parse::<SocketAddr>()
            .map_err(|e| format!("demo endpoint {}: {e}", backend.endpoint))?;
        let region = match simulator::spawn(config.clone(), wanted).await {
            Ok(r) => r,
            // The fixed port is taken: any free one will do, the gateway is told below.
            Err(_) => simulator::spawn(config, SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("cannot start simulated region: {e}"))?,
        };
        backend.endpoint = region.url();
        regions.push(region);
    }
    let gateway = app::build(&policy, &resolved).map_err(|e| format!("demo policy: {e}"))?;
    Ok(Demo { regions, gateway })
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), String> {
    let demo = start().await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e} (try --listen 127.0.0.1:8081)"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listen address: {e}"))?;
    println!("{}", banner(&demo, addr));
    let grace = demo.gateway.shutdown_grace;
    let result = serve::serve(listener, demo.gateway, serve::shutdown_signal(), grace)
        .await
        .map_err(|e| format!("server error: {e}"));
    for region in demo.regions {
        region.shutdown().await;
    }
    result
}

/// What the demo prints: the regions and copy-paste `curl` lines.
pub fn banner(demo: &Demo, addr: SocketAddr) -> String {
    let mut out = String::from("\nAzure OpenAI gateway demo\n\nSimulated regions:\n");
    for b in demo.gateway.pool.backends() {
        let names: Vec<_> = b
            .deployments
            .iter()
            .map(|(l, o)| format!("{l} -> {o}"))
            .collect();
        out.push_str(&format!(
            "  priority {}  {:<18} {:<15} {}  [{}]\n",
            b.priority,
            b.name,
            b.region,
            b.endpoint,
            names.join(", ")
        ));
    }
    let base = format!("http://{addr}");
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    out.push_str(&format!(
        "\nGateway listening on {base} (client key: {DEMO_CLIENT_KEY}).\n\
Status page: {base}/admin (watch the regions while you run the calls below; metrics: {base}/metrics)\n\n\
Try:\n\n\
# chat\n\
curl -si '{chat}' -H 'api-key: {DEMO_CLIENT_KEY}' -H 'content-type: application/json' \\\n  -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":50}}'\n\n\
# streaming (ends with data: [DONE])\n\
curl -sN '{chat}' -H 'api-key: {DEMO_CLIENT_KEY}' -H 'content-type: application/json' \\\n  -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Tell me a story\"}}],\"max_tokens\":40,\"stream\":true}}'\n\n\
# embeddings\n\
curl -si '{base}/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21' -H 'api-key: {DEMO_CLIENT_KEY}' \\\n  -H 'content-type: application/json' -d '{{\"input\":\"The quick brown fox\"}}'\n\n\
# failover: the priority-1 region takes 3 calls per 10 s; watch x-served-by move, then come back\n\
for i in $(seq 1 8); do curl -s -o /dev/null -D - '{chat}' -H 'api-key: {DEMO_CLIENT_KEY}' \\\n  -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":100}}' | grep -i x-served-by; done\n\n\
# consumer limits: '{DEMO_LIMITED_KEY}' may make 3 calls a minute; the 4th gets the gateway's own 429\n\
for i in $(seq 1 4); do curl -s -o /dev/null -D - '{chat}' -H 'api-key: {DEMO_LIMITED_KEY}' \\\n  -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":20}}' | grep -iE '^(HTTP/|x-ratelimit-remaining-requests|x-gateway-limit|retry-after:)'; done\n\n\
# tiers: the low-tier batch key leaves the shared PTU pool for Standard once 40 % of it is used;\n\
# the critical demo-app key stays on PTU (Sweden, its own, then the pool)\n\
for i in $(seq 1 5); do for k in {DEMO_BATCH_KEY} {DEMO_CLIENT_KEY}; do printf '%-15s ' $k; curl -s -o /dev/null -D - '{chat}' -H \"api-key: $k\" \\\n  -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":400}}' | grep -i x-served-by; done; done\n\n\
Press Ctrl-C to stop.\n"
    ));
    out
}
