//! The console API's edge: its one error type (a status and a JSON `{"error": ...}`
//! naming what was wrong), JSON bodies and query strings parsed into typed values
//! with errors that name the field, and the admin credential every state change
//! may carry. Nothing past this module sees unchecked input.

use std::collections::BTreeMap;

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// An API failure: the status and a message for the person at the console.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// A cluster call's failure, by its gRPC code: the caller's mistake is a 4xx, a
/// cluster that cannot answer is a 503 (the console itself is fine).
impl From<raftmq_client::Error> for ApiError {
    fn from(e: raftmq_client::Error) -> ApiError {
        use tonic::Code;
        let status = match e.code() {
            Some(Code::InvalidArgument | Code::OutOfRange) => StatusCode::BAD_REQUEST,
            Some(Code::NotFound) => StatusCode::NOT_FOUND,
            Some(Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted) => StatusCode::CONFLICT,
            Some(Code::Unauthenticated) => StatusCode::UNAUTHORIZED,
            Some(Code::PermissionDenied) => StatusCode::FORBIDDEN,
            Some(Code::ResourceExhausted) => StatusCode::TOO_MANY_REQUESTS,
            Some(Code::Unimplemented) => StatusCode::NOT_IMPLEMENTED,
            _ => match e {
                raftmq_client::Error::UnknownGroup { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

/// The name checks the brokers apply, run here first so a typo is answered at
/// once, by the same words, without a round trip.
impl From<raftmq_broker::ApiError> for ApiError {
    fn from(e: raftmq_broker::ApiError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

/// An admin credential (access key and secret). Carried by every state-changing
/// call so ACL (#13/#20) can check it; `Debug` never shows the secret.
#[derive(Clone)]
pub struct Credential {
    pub access_key: String,
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("access_key", &self.access_key)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// The `access_key` and `secret` fields every POST/DELETE body may carry: both or
/// neither (empty strings count as absent, which is what an empty form sends).
pub fn credential(access_key: Option<String>, secret: Option<String>) -> Result<Option<Credential>, ApiError> {
    let access_key = access_key.filter(|s| !s.is_empty());
    let secret = secret.filter(|s| !s.is_empty());
    match (access_key, secret) {
        (None, None) => Ok(None),
        (Some(access_key), Some(secret)) => {
            if access_key.len() > 255 || access_key.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "access_key must be at most 255 characters without control characters",
                ));
            }
            if secret.len() > 1024 {
                return Err(ApiError::bad_request("secret must be at most 1024 bytes"));
            }
            Ok(Some(Credential { access_key, secret }))
        }
        (Some(_), None) => Err(ApiError::bad_request("access_key is given without a secret")),
        (None, Some(_)) => Err(ApiError::bad_request("secret is given without an access_key")),
    }
}

/// A state-changing call's JSON body. It must be sent as `application/json`:
/// a browser sends that type cross-origin only after a CORS preflight, which
/// this server never grants, so another site's page cannot change the cluster
/// through a console open on this machine. An empty body reads as `{}`.
pub fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_json = content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "the request body must be sent as Content-Type: application/json (got {:?})",
                content_type
            ),
        });
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(format!("request body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("request body field {path}: {}", e.inner()))
        }
    })
}

/// A query string's parameters, each at most once, none but the allowed ones.
#[derive(Debug)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut out = BTreeMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}; expected one of {}",
                    allowed.join(", ")
                )));
            }
            if out.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad_request(format!("query parameter {k} is given twice")));
            }
        }
        Ok(Params(out))
    }

    /// A parameter that must be present and not empty.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        match self.0.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::bad_request(format!("query parameter {name} is required"))),
        }
    }

    pub fn optional(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// A whole number within `range`, `default` when absent.
    pub fn number(&self, name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, ApiError> {
        let Some(v) = self.optional(name) else {
            return Ok(default);
        };
        let n: u64 = v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("query parameter {name}={v:?} is not a whole number")))?;
        if !range.contains(&n) {
            return Err(ApiError::bad_request(format!(
                "query parameter {name}={n} is out of range {}..={}",
                range.start(),
                range.end()
            )));
        }
        Ok(n)
    }
}

/// `application/x-www-form-urlencoded` decoding of one key or value.
fn decode(s: &str) -> Result<String, ApiError> {
    let plus_as_space = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request(format!("query string part {s:?} is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json; charset=utf-8".parse().unwrap());
        h
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        #[serde(default)]
        queues: Option<u32>,
    }

    #[test]
    fn console_json_body_errors_name_the_field() {
        let e = json_body::<Body>(&json_headers(), br#"{"name":"a","queues":"x"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("queues"), "{}", e.message);
        let e = json_body::<Body>(&json_headers(), br#"{"name":"a","queue":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `queue`"), "{}", e.message);
        let e = json_body::<Body>(&json_headers(), b"").unwrap_err();
        assert!(e.message.contains("missing field `name`"), "{}", e.message);
        let e = json_body::<Body>(&json_headers(), b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = json_body::<Body>(&HeaderMap::new(), br#"{"name":"a"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(json_body::<Body>(&json_headers(), br#"{"name":"a"}"#).is_ok());
    }

    #[test]
    fn console_query_parameters_are_decoded_checked_and_bounded() {
        let p = Params::parse(Some("topic=%25DLQ%25g&key=a+b&count=5"), &["topic", "key", "count"]).unwrap();
        assert_eq!(p.required("topic").unwrap(), "%DLQ%g");
        assert_eq!(p.required("key").unwrap(), "a b");
        assert_eq!(p.number("count", 1, 1..=10).unwrap(), 5);
        assert!(
            p.number("count", 1, 1..=4)
                .unwrap_err()
                .message
                .contains("out of range")
        );
        assert!(
            Params::parse(Some("x=1"), &["topic"])
                .unwrap_err()
                .message
                .contains("\"x\"")
        );
        assert!(
            Params::parse(Some("a=1&a=2"), &["a"])
                .unwrap_err()
                .message
                .contains("twice")
        );
        let p = Params::parse(Some("count=ten"), &["count"]).unwrap();
        assert!(
            p.number("count", 1, 1..=10)
                .unwrap_err()
                .message
                .contains("not a whole number")
        );
        assert!(p.required("topic").is_err());
    }

    #[test]
    fn console_credential_is_both_fields_or_neither() {
        assert!(credential(None, None).unwrap().is_none());
        assert!(credential(Some(String::new()), Some(String::new())).unwrap().is_none());
        assert!(credential(Some("ak".into()), None).is_err());
        assert!(credential(None, Some("s".into())).is_err());
        let c = credential(Some("ak".into()), Some("s3cret".into())).unwrap().unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
