//! Simulated regions and the policy TOML that puts them behind a gateway, for in-process gateways
//! (this crate) and `gateway` processes (the binary's own tests) alike. Each region has its own
//! backend key, [`backend_key`]; a policy names it `env:`[`env_name`], which an in-process gateway
//! resolves from a map and a process from [`backend_env`].

use simulator::{DeploymentConfig, RegionConfig, RunningRegion};

/// Starts a simulated region whose backend key is [`backend_key`]`(name)`, with `(deployment, tpm)`
/// pairs: a name containing `embedding` is an embeddings deployment, any other a chat deployment.
pub async fn region(name: &str, deployments: &[(&str, u64)]) -> RunningRegion {
    region_with(name, deployments, |c| c).await
}

/// Like [`region`], with a chance to adjust the config (token delay, faults).
pub async fn region_with(
    name: &str,
    deployments: &[(&str, u64)],
    adjust: impl FnOnce(RegionConfig) -> RegionConfig,
) -> RunningRegion {
    let mut config = RegionConfig::new(name, backend_key(name));
    for (d, tpm) in deployments {
        config = config.deployment(if d.contains("embedding") {
            DeploymentConfig::embeddings(*d, *tpm)
        } else {
            DeploymentConfig::chat(*d, *tpm)
        });
    }
    simulator::spawn(adjust(config), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The backend key a simulated region accepts.
pub fn backend_key(region: &str) -> String {
    format!("key-{}", region.to_lowercase().replace(' ', "-"))
}

/// The env var name a policy uses for a region's backend key.
pub fn env_name(region: &str) -> String {
    format!("KEY_{}", region.to_uppercase().replace(' ', "_"))
}

/// A `[[backends]]` table for a simulated region.
pub fn backend_toml(
    name: &str,
    sim: &RunningRegion,
    region: &str,
    priority: u32,
    weight: u32,
    map: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "[[backends]]\nname = \"{name}\"\nregion = \"{region}\"\nendpoint = \"{}\"\npriority = {priority}\nweight = {weight}\napi_key = \"env:{}\"\n[backends.deployments]\n",
        sim.url(),
        env_name(region)
    );
    for (logical, own) in map {
        s.push_str(&format!("\"{logical}\" = \"{own}\"\n"));
    }
    s
}

/// The deployment `gpt-4o` served by `regions` in priority order: its `[[deployments]]` table and a
/// `[[backends]]` table per region, named `r0`, `r1`.., each mapping `gpt-4o` to the region's
/// deployment `m`.
pub fn ranked_backends(regions: &[&RunningRegion]) -> String {
    let mut text = String::from("[[deployments]]\nname = \"gpt-4o\"\n\n");
    for (i, sim) in regions.iter().enumerate() {
        let priority = u32::try_from(i + 1).unwrap();
        text.push_str(&backend_toml(
            &format!("r{i}"),
            sim,
            sim.handle().region(),
            priority,
            1,
            &[("gpt-4o", "m")],
        ));
        text.push('\n');
    }
    text
}

/// The environment a `gateway` process needs to resolve the backend keys of `regions`.
pub fn backend_env(regions: &[&RunningRegion]) -> Vec<(String, String)> {
    regions
        .iter()
        .map(|sim| {
            let region = sim.handle().region().to_owned();
            (env_name(&region), backend_key(&region))
        })
        .collect()
}
