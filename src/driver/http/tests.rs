use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, Ordering},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A raw HTTP/1.1 server on loopback that answers each request with the next of `answers`
/// (status line, extra headers, body) written byte for byte, so reason phrases and headers are
/// exactly what a test says. Returns its base URL, the request count and the requests' heads.
async fn raw_server(
    answers: Vec<(&'static str, &'static str, &'static str)>,
) -> (String, Arc<AtomicU32>, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU32::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (c, h) = (Arc::clone(&count), Arc::clone(&heads));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head and as much body as Content-Length says.
            while let Ok(n) = tcp.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let n = c.fetch_add(1, Ordering::SeqCst) as usize;
            h.lock().unwrap().push(String::from_utf8_lossy(&buf).to_string());
            let (status, headers, body) = answers.get(n).or(answers.last()).copied().unwrap();
            let answer = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
            let _ = tcp.shutdown().await;
        }
    });
    (format!("http://{addr}"), count, heads)
}

fn fast() -> Retry {
    Retry {
        attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
        max_retry_after: Duration::from_secs(1),
    }
}

fn client() -> Client {
    Client::new(Settings::new(Trust::PublicRoots).retry(fast())).unwrap()
}

#[test]
fn plain_http_is_allowed_only_to_loopback_addresses_unless_opted_in() {
    for ok in [
        "http://127.0.0.1:8006",
        "http://127.9.9.9/api2/json",
        "http://127.1:5000/v3",
        "http://localhost:8006",
        "http://LOCALHOST./x",
        "http://[::1]:8006",
        "http://[::ffff:127.0.0.1]/",
        "https://pve.example:8006",
        "https://203.0.113.7/v3",
    ] {
        assert!(check_url(ok, false).is_ok(), "{ok} should pass");
    }
    for refused in [
        "http://127.0.0.1.example.com",
        "http://localhost.example.com:8006",
        "http://127.0.0.1@evil.example/",
        "http://10.0.0.5:5000/v3",
        "http://[::2]/",
        "http://pve.example:8006",
    ] {
        assert!(check_url(refused, false).is_err(), "{refused} should be refused");
    }
    assert!(
        matches!(check_url("http://keystone.example:5000/v3", false), Err(UrlError::PlainHttp { host }) if host == "keystone.example")
    );
    assert!(check_url("http://keystone.example:5000/v3", true).is_ok());
    assert_eq!(check_url("ftp://x.example/", true), Err(UrlError::Scheme("ftp".into())));
    assert_eq!(check_url("https://root:pw@pve.example/", true), Err(UrlError::Credentials));
    assert!(matches!(check_url("pve.example:8006", false), Err(UrlError::Scheme(_) | UrlError::Invalid(_))));
}

#[tokio::test]
async fn a_remote_plain_http_request_is_refused_before_anything_is_sent() {
    let e = client().get("http://localhost.example.com:9/x").send().await.unwrap_err();
    assert!(matches!(e, Error::Url { source: UrlError::PlainHttp { .. }, .. }), "{e:?}");
    assert!(matches!(classify(&e), driver::Error::InvalidRequest(_)));
}

#[tokio::test]
async fn an_error_only_in_the_status_line_is_kept() {
    // PVE before libpve-http-server-perl 5.2: the message only in the reason phrase.
    let (url, _, _) =
        raw_server(vec![("500 unable to create VM 100: config file already exists", "", r#"{"data":null}"#)]).await;
    let e = client().post(format!("{url}/api2/json/nodes/pve1/qemu/9000/clone")).send().await.unwrap_err();
    assert_eq!(e.status(), Some(500));
    assert_eq!(e.message(), "unable to create VM 100: config file already exists");
    assert!(e.to_string().contains("POST /api2/json/nodes/pve1/qemu/9000/clone answered 500"), "{e}");
}

#[tokio::test]
async fn a_json_message_and_a_different_reason_phrase_are_both_kept() {
    let (url, _, _) = raw_server(vec![
        ("500 Internal Server Error", "", r#"{"data":null,"message":"VM 100 not running\n"}"#),
        ("500 got timeout", "", r#"{"data":null,"message":"cannot stop VM 100"}"#),
        ("404 Not Found", "", ""),
    ])
    .await;
    let c = client();
    let e = c.post(format!("{url}/a")).send().await.unwrap_err();
    assert_eq!(e.message(), "VM 100 not running", "a canonical reason phrase adds nothing");
    let e = c.post(format!("{url}/b")).send().await.unwrap_err();
    assert_eq!(e.message(), "cannot stop VM 100 (got timeout)");
    let e = c.post(format!("{url}/c")).send().await.unwrap_err();
    assert_eq!(e.message(), "Not Found");
}

#[tokio::test]
async fn idempotent_calls_are_retried_on_transient_failures_and_others_are_not() {
    let answers =
        vec![("503 Service Unavailable", "", "{}"), ("502 Bad Gateway", "", "{}"), ("200 OK", "", r#"{"ok":1}"#)];
    let (url, count, _) = raw_server(answers.clone()).await;
    let v: Value = client().get(format!("{url}/list")).idempotent().send().await.unwrap().json().unwrap();
    assert_eq!(v["ok"], 1);
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // A create is sent once, whatever happens.
    let (url, count, _) = raw_server(answers.clone()).await;
    let e = client().post(format!("{url}/servers")).send().await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Out of tries: the last error is passed on.
    let (url, count, _) = raw_server(vec![("503 Service Unavailable", "", "{}")]).await;
    let e = client().get(format!("{url}/list")).idempotent().send().await.unwrap_err();
    assert!(matches!(classify(&e), driver::Error::Unavailable(_)));
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // A per-call override fails fast.
    let (url, count, _) = raw_server(vec![("503 Service Unavailable", "", "{}")]).await;
    client().get(format!("{url}/list")).idempotent().retry(Retry::NONE).send().await.unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_credentials_and_invalid_requests_are_never_retried() {
    for status in ["401 Unauthorized", "403 Forbidden", "400 Bad Request", "404 Not Found", "409 Conflict"] {
        let (url, count, _) = raw_server(vec![(status, "", r#"{"message":"no"}"#)]).await;
        client().get(format!("{url}/x")).idempotent().send().await.unwrap_err();
        assert_eq!(count.load(Ordering::SeqCst), 1, "{status}");
    }
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_the_policys_limit() {
    // Asked to wait 0 s: retried at once.
    let (url, count, _) =
        raw_server(vec![("429 Too Many Requests", "Retry-After: 0\r\n", "{}"), ("200 OK", "", "{}")]).await;
    client().get(format!("{url}/x")).idempotent().send().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // Asked to wait longer than the policy allows: the caller gets the error and the delay.
    let (url, count, _) = raw_server(vec![("503 Service Unavailable", "Retry-After: 120\r\n", "{}")]).await;
    let e = client().get(format!("{url}/x")).idempotent().send().await.unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(matches!(e, Error::Status { retry_after: Some(d), .. } if d == Duration::from_secs(120)));
    let (url, _, _) = raw_server(vec![("429 Too Many Requests", "Retry-After: 120\r\n", "{}")]).await;
    let e = client().get(format!("{url}/x")).idempotent().send().await.unwrap_err();
    assert!(
        matches!(classify(&e), driver::Error::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(120))
    );
}

#[test]
fn retry_after_may_be_an_http_date() {
    let mut headers = HeaderMap::new();
    let later = SystemTime::now() + Duration::from_secs(90);
    headers.insert("Retry-After", httpdate::fmt_http_date(later).parse().unwrap());
    let d = retry_after(&headers).unwrap();
    assert!(d > Duration::from_secs(80) && d <= Duration::from_secs(90), "{d:?}");
    headers.insert("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
    assert_eq!(retry_after(&headers), Some(Duration::ZERO));
}

#[test]
fn backoff_grows_exponentially_with_jitter_and_is_capped() {
    let r = Retry {
        attempts: 10,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_retry_after: Duration::ZERO,
    };
    for _ in 0..50 {
        let first = r.backoff(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        let third = r.backoff(3);
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
        assert!(r.backoff(9) <= Duration::from_secs(1));
    }
}

#[tokio::test]
async fn secrets_never_reach_error_messages() {
    let c = client();
    // A refused connection: reqwest's own message names the URL, with its query.
    let e = c
        .get("http://127.0.0.1:1/servers?token=s3cret-in-query")
        .header("X-Auth-Token", "s3cret-token")
        .json(&serde_json::json!({"password": "s3cret-body"}))
        .send()
        .await
        .unwrap_err();
    let text = format!("{e} {e:?} {}", classify(&e));
    assert!(matches!(e, Error::Transport { connect: true, .. }), "{e:?}");
    assert!(!text.contains("s3cret"), "{text}");
    // An answered call is named by method and path only.
    let (url, _, heads) = raw_server(vec![("401 Unauthorized", "", r#"{"message":"authentication failure"}"#)]).await;
    let e = c
        .post(format!("{url}/access/ticket?token=s3cret-in-query"))
        .header("Authorization", "PVEAPIToken=u@pve!t=s3cret-token")
        .form(&[("password", "s3cret-body")])
        .send()
        .await
        .unwrap_err();
    let text = format!("{e} {e:?} {}", classify(&e));
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("POST /access/ticket answered 401: authentication failure"), "{text}");
    // ... although the request did carry them.
    let head = heads.lock().unwrap()[0].clone();
    assert!(head.contains("s3cret-token") && head.contains("password=s3cret-body"), "{head}");
    // A header value HTTP cannot carry is refused without echoing it.
    let e = c.get(format!("{url}/x")).header("X-Auth-Token", "bad\nvalue-s3cret").send().await.unwrap_err();
    assert!(matches!(e, Error::Header { .. }) && !e.to_string().contains("s3cret"), "{e}");
}

#[test]
fn the_common_status_table() {
    let status = |status: u16| Error::Status {
        what: "GET /x".into(),
        status,
        message: "m".into(),
        retry_after: None,
        body: Bytes::new(),
    };
    let kind = |e: Error| classify(&e).kind();
    assert_eq!(kind(status(401)), "unauthorized");
    assert_eq!(kind(status(403)), "unauthorized");
    assert_eq!(kind(status(404)), "not_found");
    assert_eq!(kind(status(400)), "invalid_request");
    assert_eq!(kind(status(409)), "invalid_request");
    assert_eq!(kind(status(422)), "invalid_request");
    assert_eq!(kind(status(429)), "rate_limited");
    assert_eq!(kind(status(500)), "unavailable");
    assert_eq!(kind(status(503)), "unavailable");
    assert_eq!(kind(status(418)), "other");
    assert_eq!(kind(Error::Timeout { what: "x".into(), limit: Duration::from_secs(1) }), "timeout");
    assert_eq!(kind(Error::Transport { what: "x".into(), detail: "refused".into(), connect: true }), "unavailable");
    assert!(status(504).may_have_acted());
    assert!(!status(400).may_have_acted());
    assert!(!Error::Transport { what: "x".into(), detail: "refused".into(), connect: true }.may_have_acted());
}

#[test]
fn error_bodies_of_the_common_shapes_are_read() {
    let m = |s: &str| json_error_message(s.as_bytes());
    assert_eq!(m(r#"{"data":null,"message":"VM 100 not running\n"}"#).as_deref(), Some("VM 100 not running"));
    assert_eq!(m(r#"{"badRequest":{"code":400,"message":"Invalid flavorRef"}}"#).as_deref(), Some("Invalid flavorRef"));
    assert_eq!(
        m(r#"{"error":{"code":401,"message":"requires authentication"}}"#).as_deref(),
        Some("requires authentication")
    );
    assert_eq!(m(r#"{"error":"quota exceeded"}"#).as_deref(), Some("quota exceeded"));
    assert_eq!(m(r#"{"data":null}"#), None);
    assert_eq!(m("<html>Bad Gateway</html>").as_deref(), Some("<html>Bad Gateway</html>"));
    assert_eq!(m(""), None);
    let long = "x".repeat(1000);
    assert_eq!(status_message(StatusCode::BAD_GATEWAY, Some(long), None).chars().count(), MAX_MESSAGE_CHARS + 3);
}
