//! Operational routes: health, info, metrics, tokenize, and the adapter lifecycle.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::native::{SimpleToken, TokenizeRequest};
use crate::wire::openai::{LoadLoraRequest, UnloadLoraRequest};

type AppStateRef = State<Arc<AppState>>;

pub async fn health(State(state): AppStateRef) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        return ApiError::unavailable("shutting down").into_response();
    }
    StatusCode::OK.into_response()
}

pub async fn info(State(state): AppStateRef) -> Json<serde_json::Value> {
    let c = &state.config;
    Json(json!({
        "model_id": c.model_id,
        "model_sha": null,
        "model_dtype": c.model_dtype,
        "model_device_type": if state.model.model.device().is_cpu() { "cpu" } else { "cuda" },
        "model_pipeline_tag": "text-generation",
        "quantize": c.quantize,
        "max_concurrent_requests": c.max_concurrent_requests,
        "max_best_of": c.max_best_of,
        "max_stop_sequences": c.max_stop_sequences,
        "max_input_length": c.max_input_length,
        "max_total_tokens": c.max_total_tokens,
        "max_batch_total_tokens": c.max_batch_total_tokens,
        "max_batch_prefill_tokens": c.max_batch_prefill_tokens,
        "max_active_adapters": c.max_active_adapters,
        "adapter_cycle_time_s": c.adapter_cycle.as_secs_f64(),
        "adapter_device_bytes": c.adapter_device_bytes,
        "adapter_host_bytes": c.adapter_host_bytes,
        "adapter_dirs": c.adapter_dirs.len(),
        "waiting_served_ratio": 0.0,
        "max_waiting_tokens": 0,
        "validation_workers": 1,
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
        "uptime_s": state.started.elapsed().as_secs(),
    }))
}

pub async fn metrics(State(state): AppStateRef) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// TGI's `/tokenize`: the prompt's tokens with their byte offsets.
pub async fn tokenize(
    State(state): AppStateRef,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Response {
    match state.model.tokenizer.encode_with_offsets(&req.inputs) {
        Ok(toks) => Json(
            toks.into_iter()
                .map(|(id, (start, stop))| SimpleToken {
                    id,
                    text: req.inputs.get(start..stop).unwrap_or("").to_string(),
                    start,
                    stop,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => ApiError::validation(e.to_string()).into_response(),
    }
}

pub async fn load_lora(
    State(state): AppStateRef,
    JsonBody(req): JsonBody<LoadLoraRequest>,
) -> Response {
    match state
        .store
        .load(&req.lora_name, req.lora_path.as_deref())
        .await
    {
        Ok(a) => Json(json!({
            "lora_name": req.lora_name,
            "bytes": a.bytes(),
            "status": "loaded",
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn unload_lora(
    State(state): AppStateRef,
    JsonBody(req): JsonBody<UnloadLoraRequest>,
) -> Response {
    match state.store.unload(&req.lora_name) {
        Ok(()) => Json(json!({"lora_name": req.lora_name, "status": "unloaded"})).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn list_lora(State(state): AppStateRef) -> Json<serde_json::Value> {
    Json(json!({ "adapters": state.store.list() }))
}
