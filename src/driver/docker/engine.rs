//! The seam to the Docker Engine API: a bollard client connected on first use (so Flotilla
//! starts, and reports the engine unreachable, while the engine is down), and the one table
//! that turns engine errors into [`driver::Error`]s.

use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker, errors::Error as EngineError};
use tokio::sync::OnceCell;

use super::settings::Host;
use crate::driver;

/// One engine, connected lazily.
#[derive(Debug)]
pub struct Engine {
    host: Host,
    timeout: Duration,
    /// Set once the engine answered a version negotiation; never reset (bollard reconnects per
    /// request, so a restarted engine needs no new client).
    client: OnceCell<Docker>,
}

impl Engine {
    pub fn new(host: Host, timeout: Duration) -> Engine {
        Engine { host, timeout, client: OnceCell::new() }
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The client, connecting and negotiating the API version on first use.
    pub async fn client(&self) -> driver::Result<&Docker> {
        self.client
            .get_or_try_init(|| async {
                let connect = |host: &Host| -> Result<Docker, EngineError> {
                    let secs = self.timeout.as_secs().max(1);
                    match host {
                        Host::Unix(path) => {
                            Docker::connect_with_unix(&path.to_string_lossy(), secs, API_DEFAULT_VERSION)
                        }
                        Host::Tcp { addr, tls: None } => Docker::connect_with_http(addr, secs, API_DEFAULT_VERSION),
                        Host::Tcp { addr, tls: Some(tls) } => Docker::connect_with_ssl(
                            addr,
                            &tls.key_file,
                            &tls.cert_file,
                            &tls.ca_file,
                            secs,
                            API_DEFAULT_VERSION,
                        ),
                    }
                };
                let docker = connect(&self.host).map_err(|e| self.error("connect", e))?;
                // Older engines refuse requests for a newer API version than theirs.
                docker.negotiate_version().await.map_err(|e| self.error("negotiate the API version", e))
            })
            .await
    }

    /// Classifies a failed engine call; `what` names it ("create container x").
    pub fn error(&self, what: &str, e: EngineError) -> driver::Error {
        classify(&format!("docker engine {}: cannot {what}", self.host), e)
    }
}

/// The status code of an engine answer, if the engine answered.
pub fn status(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own message for an error answer, or the whole error chain otherwise.
pub fn message(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } => message.trim().to_owned(),
        other => chain(other),
    }
}

/// An error and its causes, `outer: inner: innermost` (bollard's connection errors say little
/// at the top: "client error (Connect)").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// | engine error | driver error |
/// |---|---|
/// | no socket, connection refused or reset, TLS failure | Unavailable |
/// | request timed out | Timeout |
/// | 400 | InvalidRequest |
/// | 401, 403 | Unauthorized |
/// | 404 | NotFound (callers turn a missing image into InvalidRequest) |
/// | 409 | InvalidRequest (callers handle the conflicts they expect first) |
/// | 429 | RateLimited |
/// | 502, 503, 504 | Unavailable |
/// | other 5xx, anything else | Other |
fn classify(context: &str, e: EngineError) -> driver::Error {
    let text = format!("{context}: {}", message(&e));
    match &e {
        EngineError::DockerResponseServerError { status_code, .. } => match status_code {
            400 | 409 => driver::Error::InvalidRequest(text),
            401 | 403 => driver::Error::Unauthorized(text),
            404 => driver::Error::NotFound(text),
            429 => driver::Error::RateLimited { message: text, retry_after: None },
            502..=504 => driver::Error::Unavailable(text),
            _ => driver::Error::Other(text),
        },
        EngineError::RequestTimeoutError => driver::Error::Timeout(text),
        EngineError::SocketNotFoundError(_)
        | EngineError::HyperLegacyError { .. }
        | EngineError::IOError { .. }
        | EngineError::HyperResponseError { .. }
        | EngineError::HttpClientError { .. } => driver::Error::Unavailable(text),
        EngineError::CertPathError { .. }
        | EngineError::CertMultipleKeys { .. }
        | EngineError::CertParseError { .. }
        | EngineError::NoNativeCertsError { .. } => driver::Error::InvalidRequest(text),
        _ => driver::Error::Other(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status_code: u16, message: &str) -> EngineError {
        EngineError::DockerResponseServerError { status_code, message: message.into() }
    }

    #[test]
    fn engine_answers_are_classified_by_status() {
        let c = |e| classify("ctx", e);
        assert!(
            matches!(c(answer(404, "No such image: x")), driver::Error::NotFound(m) if m == "ctx: No such image: x")
        );
        assert!(matches!(c(answer(400, "bad")), driver::Error::InvalidRequest(_)));
        assert!(matches!(c(answer(403, "denied")), driver::Error::Unauthorized(_)));
        assert!(matches!(c(answer(429, "slow down")), driver::Error::RateLimited { .. }));
        assert!(matches!(c(answer(503, "busy")), driver::Error::Unavailable(_)));
        assert!(matches!(c(answer(500, "oci runtime error")), driver::Error::Other(_)));
        assert!(matches!(c(EngineError::RequestTimeoutError), driver::Error::Timeout(_)));
        assert!(matches!(c(EngineError::SocketNotFoundError("/x.sock".into())), driver::Error::Unavailable(_)));
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable_and_names_the_host() {
        let engine = Engine::new(Host::Unix("/nonexistent/flotilla.sock".into()), Duration::from_secs(5));
        let e = engine.client().await.unwrap_err();
        assert!(matches!(e, driver::Error::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("unix:///nonexistent/flotilla.sock"), "{e}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_unavailable_with_the_os_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        // Bound and closed: the file stays, nothing accepts.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let engine = Engine::new(Host::Unix(path), Duration::from_secs(5));
        let e = engine.client().await.unwrap_err();
        assert!(matches!(e, driver::Error::Unavailable(_)), "{e:?}");
        assert!(e.to_string().to_lowercase().contains("connection refused"), "{e}");
    }
}
