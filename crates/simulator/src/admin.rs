//! The admin API under `/sim/` (no authentication):
//!
//! | route | effect |
//! |---|---|
//! | `POST /sim/faults` | body: one fault or an array; replaces the active faults |
//! | `GET /sim/faults` | the active faults, with remaining counts |
//! | `DELETE /sim/faults` | removes every fault |
//! | `GET /sim/stats` | request count, per-deployment window usage, active faults |
//! | `POST /sim/reset` | empties every deployment's rate-limit windows |

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::faults::Fault;
use crate::state::Shared;

pub(crate) async fn set_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_faults(&body) {
        Ok(faults) => {
            tracing::info!(region = %shared.region, ?faults, "faults set");
            shared.faults.set(faults);
            Json(json!({"faults": shared.faults.list()})).into_response()
        }
        Err(message) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadRequest", "message": message}})),
        )
            .into_response(),
    }
}

pub(crate) async fn list_faults(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({"faults": shared.faults.list()})).into_response()
}

pub(crate) async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.faults.set(Vec::new());
    StatusCode::NO_CONTENT
}

pub(crate) async fn stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.stats())
}

pub(crate) async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.reset_limits();
    StatusCode::NO_CONTENT
}

/// One fault or an array of faults, validated.
pub(crate) fn parse_faults(body: &[u8]) -> Result<Vec<Fault>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let faults = match value {
        Value::Array(_) => serde_json::from_value::<Vec<Fault>>(value),
        _ => serde_json::from_value::<Fault>(value).map(|f| vec![f]),
    }
    .map_err(|e| format!("invalid fault: {e}"))?;
    for fault in &faults {
        fault.validate()?;
    }
    Ok(faults)
}
