//! A small blocking HTTP client of a running sidecar, used by the CLI
//! subcommands (and handy in tests).

use std::time::Duration;

/// Where the sidecar is, and the key to present.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    key: Option<String>,
}

/// A raw answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The error code of an error-contract body.
    pub fn error_code(&self) -> Option<String> {
        self.json()["error"]["code"].as_str().map(str::to_owned)
    }
}

impl Client {
    /// A client of the sidecar at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, key: Option<String>) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: base.trim_end_matches('/').to_owned(),
            key,
        }
    }

    /// Sends a request with an optional body and content type.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let url = format!("{}{}", self.base, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(key) = &self.key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(body.unwrap_or_default()).map_err(|e| format!("bad request {url}: {e}"))?;
        let mut resp =
            self.agent.run(req).map_err(|e| format!("cannot reach prefsd at {}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| format!("reading the answer from {url}: {e}"))?;
        Ok(Answer { status, content_type, body })
    }

    /// Sends JSON (or nothing) and returns the JSON answer; an error answer
    /// becomes `Err` with the server's code and message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let answer = match body {
            Some(b) => self.send(method, path, Some("application/json"), Some(b.to_string().into_bytes()))?,
            None => self.send(method, path, None, None)?,
        };
        let value = answer.json();
        if answer.status >= 400 {
            let code = value["error"]["code"].as_str().unwrap_or("error");
            let message = value["error"]["message"].as_str().unwrap_or("(no message)");
            return Err(format!("{} {code}: {message}", answer.status));
        }
        Ok(value)
    }
}

/// Percent-encodes one path segment or query value.
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
