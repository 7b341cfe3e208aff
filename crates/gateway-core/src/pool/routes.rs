//! Per-workload routes: a backend reserved for named consumers is invisible to every other one.
//!
//! The recommended Azure OpenAI architecture gives a workload its own PTU deployment, which that
//! workload alone uses; it then fails over to the shared enterprise pool and Standard like anyone
//! else. A reservation is a filter applied while selecting, so a backend another consumer may not
//! use is never tried, never counted in an [`Exhausted`](super::Exhausted) and never gives a retry
//! hint to them: nothing about it reaches their answers.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Instant;
//! use gateway_core::pool::{Backend, BackendPool, PoolSettings, Route, Selection};
//!
//! let backend = |name: &str, priority| Backend {
//!     name: name.to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: format!("https://{name}.openai.azure.com"),
//!     priority,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![backend("claims-ptu", 1), backend("pool", 2)], PoolSettings::default())
//!     .reserve("claims-ptu", ["claims-bot"]);
//! let now = Instant::now();
//! let pick = |route| match pool.select_routed("gpt-4o", &[], None, route, now) {
//!     Selection::Backend(id) => pool.get(id).name.clone(),
//!     Selection::Exhausted(e) => panic!("{e:?}"),
//! };
//! assert_eq!(pick(Route::consumer("claims-bot")), "claims-ptu");
//! assert_eq!(pick(Route::consumer("hr-assistant")), "pool");
//! // Without a consumer (no authentication in front), reserved backends are never used.
//! assert_eq!(pick(Route::default()), "pool");
//! ```

use super::{BackendId, BackendPool};

/// Who a selection is for: the filter [`BackendPool::select_routed`] applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Route<'a> {
    consumer: Option<&'a str>,
}

/// The consumers a backend is reserved for, if it is.
pub(super) type Reservation = Option<Box<[Box<str>]>>;

// === impl Route ===

impl<'a> Route<'a> {
    /// A selection for the consumer named `name`.
    pub fn consumer(name: &'a str) -> Self {
        Self {
            consumer: Some(name),
        }
    }

    /// A selection for `consumer`, when one is known.
    pub fn for_consumer(consumer: Option<&'a str>) -> Self {
        Self { consumer }
    }

    /// The consumer, if known.
    pub(super) fn consumer_name(&self) -> Option<&'a str> {
        self.consumer
    }
}

// === impl BackendPool ===

impl BackendPool {
    /// Reserves the backend named `backend` for `consumers`: no other consumer's request is sent
    /// there. An unknown backend name changes nothing.
    pub fn reserve<S: Into<Box<str>>>(
        mut self,
        backend: &str,
        consumers: impl IntoIterator<Item = S>,
    ) -> Self {
        if let Some(id) = self.id_of(backend) {
            self.reserved[id.0] = Some(consumers.into_iter().map(Into::into).collect());
        }
        self
    }

    /// The consumers backend `id` is reserved for; `None` when it is shared.
    pub fn reserved_for(&self, id: BackendId) -> Option<&[Box<str>]> {
        self.reserved.get(id.0).and_then(Option::as_deref)
    }

    /// Whether `route` may use backend `id` (a valid id).
    pub(super) fn admits(&self, id: BackendId, route: Route<'_>) -> bool {
        match &self.reserved[id.0] {
            None => true,
            Some(consumers) => route
                .consumer
                .is_some_and(|c| consumers.iter().any(|r| &**r == c)),
        }
    }
}
