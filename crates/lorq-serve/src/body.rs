//! Request bodies: size-limited, parsed as JSON with the path of a wrongly typed field in the
//! error, and every failure answered as the JSON error the clients parse.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body of type `T`; see the module doc.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    crate::error::ErrorType::Validation,
                    format!("request body is too large: {e} (limit set by --max-body-bytes)"),
                )
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
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
