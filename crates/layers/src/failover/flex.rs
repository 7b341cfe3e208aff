//! Azure's Flex service tier does not fall back by itself: a Flex request that meets a 429 is
//! answered 429, although the same deployment may well serve it at the default tier. The failover
//! layer decides instead, as [`FlexFallback`] says.
//!
//! A Flex 429 says Flex capacity is short, not the deployment's quota: nothing is rested for it,
//! and the default-tier traffic keeps the deployment.

/// What a request sent with `"service_tier": "flex"` does after a 429.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlexFallback {
    /// Retry the same backend's deployment at once with `"service_tier": "default"` (full price,
    /// same latency class as everyone's); later attempts keep the default tier.
    #[default]
    DefaultTier,
    /// Move on to the next backend, still at Flex.
    NextBackend,
}

/// `service_tier` value that marks a Flex request.
pub(super) const FLEX: &str = "flex";

/// What a Flex request falls back to at [`FlexFallback::DefaultTier`].
pub(super) const DEFAULT_TIER: &str = "default";
