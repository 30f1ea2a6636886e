//! Request bodies: size-limited, parsed as JSON with the path of a wrongly typed field in the
//! error, and every failure answered as the JSON error the clients parse.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body of type `T`; see the module doc.
pub struct JsonBody<T>(pub T);

/// The most bytes read (and thrown away) from an oversized body so the client, which is
/// usually still sending, gets the 413 answer instead of a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;

/// The `--max-body-bytes` limit, set as a request extension by the router.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(2 << 20);
        let mut stream = req.into_body().into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            })?;
            seen += chunk.len();
            if seen <= limit {
                buf.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                crate::error::ErrorType::Validation,
                format!(
                    "request body is too large: {} bytes, the limit is {limit} (--max-body-bytes)",
                    if seen > DRAIN_LIMIT {
                        format!("over {DRAIN_LIMIT}")
                    } else {
                        seen.to_string()
                    }
                ),
            ));
        }
        parse_json(&buf).map(JsonBody)
    }
}

/// Parses `bytes` as `T`: a syntax error is a 400, a well-formed body of the wrong shape a 422
/// naming the field (`parameters.max_new_tokens: invalid type: string "x", expected u32`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::validation(format!("invalid request: {inner}"))
        } else {
            ApiError::validation(format!("invalid request: `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct P {
        max_new_tokens: Option<u32>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct R {
        inputs: String,
        parameters: P,
    }

    #[test]
    fn syntax_error_is_400_and_type_error_names_the_field() {
        let e = parse_json::<R>(b"{\"inputs\": ").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_json::<R>(br#"{"inputs": "a", "parameters": {"max_new_tokens": "x"}}"#)
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(
            e.message.contains("parameters.max_new_tokens"),
            "{}",
            e.message
        );
        let e = parse_json::<R>(br#"{"parameters": {}}"#).unwrap_err();
        assert!(e.message.contains("inputs"), "{}", e.message);
    }
}
