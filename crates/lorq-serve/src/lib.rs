//! The multi-adapter HTTP server: LoRAX/TGI routes (`/`, `/generate`, `/generate_stream`),
//! OpenAI routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`), operations
//! (`/health`, `/info`, `/metrics`, `/tokenize`, adapter load/unload/list), a continuous-batching
//! engine with mixed adapters per batch, a two-tier adapter cache, and Prometheus metrics.

pub mod adapter_path;
pub mod adapters;
mod auth;
pub mod body;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod request;
pub mod routes;
pub mod scheduler;
pub mod state;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use lorq_model::LoadedModel;

pub use config::ServeConfig;
use engine::Engine;
use error::ApiError;
use metrics::Metrics;
use scheduler::Budgets;
use state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid server settings: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("preloading adapter {id:?}: {message}")]
    Preload { id: String, message: String },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the router over `state` (used by [`serve`] and by tests that bind their own socket).
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/", post(routes::native::compat_generate))
        .route("/generate", post(routes::native::generate))
        .route("/generate_stream", post(routes::native::generate_stream))
        .route("/v1/completions", post(routes::openai::completions))
        .route(
            "/v1/chat/completions",
            post(routes::openai::chat_completions),
        )
        .route("/v1/models", get(routes::openai::models))
        .route("/health", get(routes::admin::health))
        .route("/info", get(routes::admin::info))
        .route("/metrics", get(routes::admin::metrics))
        .route("/tokenize", post(routes::admin::tokenize))
        .route("/v1/load_lora_adapter", post(routes::admin::load_lora))
        .route("/v1/unload_lora_adapter", post(routes::admin::unload_lora))
        .route("/v1/lora_adapters", get(routes::admin::list_lora))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::not_found(format!("no route {}", uri.path()))
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        // The JSON extractor enforces --max-body-bytes itself, so it can answer 413 in JSON.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::Extension(body::BodyLimit(max_body)))
        .with_state(state)
}

/// A running server's shared state and its engine thread, before it listens.
pub struct Server {
    pub state: Arc<AppState>,
    engine: std::thread::JoinHandle<()>,
}

impl Server {
    /// Starts the engine thread and preloads `config.preload`.
    pub async fn start(config: ServeConfig, model: LoadedModel) -> Result<Self, ServeError> {
        config.validate().map_err(ServeError::Config)?;
        let model = Arc::new(model);
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let budgets = Budgets {
            max_batch_total_tokens: config.max_batch_total_tokens,
            max_batch_prefill_tokens: config.max_batch_prefill_tokens,
            max_active_adapters: config.max_active_adapters,
            adapter_cycle: config.adapter_cycle,
        };
        let engine = Engine::new(model.clone(), budgets, metrics.clone());
        let engine = std::thread::Builder::new()
            .name("lorq-engine".into())
            .spawn(move || engine.run(rx))?;
        let state = Arc::new(AppState::new(config, model, metrics, tx));
        for id in state.config.preload.clone() {
            state
                .store
                .get(&id)
                .await
                .map_err(|e| ServeError::Preload {
                    id: id.clone(),
                    message: e.message,
                })?;
        }
        Ok(Self { state, engine })
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests finish for up to `--shutdown-timeout`, and returns.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let state = self.state.clone();
        let app = router(state.clone());
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let graceful_state = state.clone();
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!(
                "shutdown requested: no new requests; finishing {} in flight",
                graceful_state.in_flight()
            );
            graceful_state.close();
            let _ = signalled_tx.send(());
        });
        let timeout = state.config.shutdown_timeout;
        tokio::select! {
            r = server => r?,
            _ = async {
                if signalled_rx.await.is_ok() {
                    tokio::time::sleep(timeout).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(
                    "shutdown deadline ({:.0} s) passed with {} requests still in flight; stopping",
                    timeout.as_secs_f64(),
                    state.in_flight()
                );
                return Ok(());
            }
        }
        state.close();
        drop(state);
        // The engine ends once its queue is closed and the running sequences are done.
        let _ = tokio::task::spawn_blocking(move || self.engine.join()).await;
        Ok(())
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Binds `config.hostname:config.port`.
pub async fn bind(config: &ServeConfig) -> Result<tokio::net::TcpListener, ServeError> {
    let addr = format!("{}:{}", config.hostname, config.port);
    tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}
