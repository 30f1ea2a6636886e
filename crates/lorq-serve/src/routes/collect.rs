//! Turning a request's engine events into a finished result, or into a stream.

use lorq_model::generation::StepToken;

use crate::engine::{Event, Finished};
use crate::error::ApiError;
use crate::state::Submitted;

/// Everything one request produced.
pub struct Collected {
    pub prefill: Vec<(u32, Option<f32>)>,
    pub tokens: Vec<StepToken>,
    pub finished: Finished,
}

/// Waits for the request to finish.
pub async fn collect(mut sub: Submitted) -> Result<Collected, ApiError> {
    let mut prefill = Vec::new();
    let mut tokens = Vec::new();
    while let Some(ev) = sub.events.recv().await {
        match ev {
            Event::Prefill(p) => prefill = p,
            Event::Token(t) => tokens.push(t),
            Event::Finished(finished) => {
                return Ok(Collected {
                    prefill,
                    tokens,
                    finished,
                })
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        crate::error::ErrorType::IncompleteGeneration,
        "the generation engine stopped before the request finished",
    ))
}

/// Waits for several requests (best_of, n) together.
pub async fn collect_all(subs: Vec<Submitted>) -> Result<Vec<Collected>, ApiError> {
    let results = futures_util::future::join_all(subs.into_iter().map(collect)).await;
    results.into_iter().collect()
}

/// The sum of the generated tokens' log-probabilities (how best_of ranks candidates).
pub fn total_logprob(c: &Collected) -> f32 {
    c.tokens.iter().map(|t| t.sampled.logprob).sum()
}
