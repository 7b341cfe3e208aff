//! The policy's words for application priority on shared backends (a consumer's `tier`, and the
//! `[backends.headroom]` a backend keeps for higher tiers) and for Azure's service tiers
//! (`[failover] flex_fallback`).

use serde::Deserialize;

/// `tier` of a `[[consumers]]` entry: who sees latency rise first when a shared backend fills up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierSpec {
    /// Mission-critical: spills last.
    Critical,
    /// The default.
    #[default]
    Standard,
    /// Spills first.
    Low,
}

/// `[backends.headroom]`: per tier, the share of the backend's capacity (0 to 1) below which that
/// tier's requests go elsewhere, e.g. `low = 0.30, standard = 0.10`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadroomSpec {
    /// Share below which critical requests go elsewhere (rarely set).
    #[serde(default)]
    pub critical: Option<f64>,
    /// Share below which standard-tier requests go elsewhere.
    #[serde(default)]
    pub standard: Option<f64>,
    /// Share below which low-tier requests go elsewhere.
    #[serde(default)]
    pub low: Option<f64>,
}

impl TierSpec {
    /// The name used in the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Low => "low",
        }
    }
}

impl HeadroomSpec {
    /// Each tier with its share, where one is set.
    pub fn shares(&self) -> impl Iterator<Item = (TierSpec, f64)> + '_ {
        [
            (TierSpec::Critical, self.critical),
            (TierSpec::Standard, self.standard),
            (TierSpec::Low, self.low),
        ]
        .into_iter()
        .filter_map(|(tier, share)| share.map(|s| (tier, s)))
    }
}

/// `[failover] flex_fallback`: what a request sent with `"service_tier": "flex"` does after a 429
/// (Flex does not fall back by itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlexFallbackSpec {
    /// Retry the same deployment at once at the default tier.
    #[default]
    DefaultTier,
    /// Go on to the next backend, still at Flex.
    NextBackend,
}
