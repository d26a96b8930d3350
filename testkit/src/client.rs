//! The one HTTP client of the tests: HTTP/1.1 over hyper to `127.0.0.1:port`,
//! one request on a fresh connection ([`call`]) or many on a keep-alive one
//! ([`connect`] then [`send`]), answers read whole into a [`Reply`]; and the
//! shapes of the seckill API the tests send (the grab path and body) and read
//! (a Prometheus exposition).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub const JSON: &str = "application/json";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A keep-alive HTTP/1.1 connection.
pub type Connection = SendRequest<Full<Bytes>>;

/// An HTTP answer: status, headers, the body as JSON (`Null` when it is
/// not) and as text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// The `error` code of an error envelope ("" when there is none).
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }

    /// The `Retry-After` header, in seconds.
    pub fn retry_after(&self) -> u64 {
        self.headers["retry-after"]
            .to_str()
            .expect("Retry-After is text")
            .parse()
            .expect("Retry-After is whole seconds")
    }

    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 connection to `127.0.0.1:port`, with Nagle's algorithm off
/// when `nodelay`.
pub async fn connect(port: u16, nodelay: bool) -> Result<Connection, BoxError> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    if nodelay {
        let _ = stream.set_nodelay(true);
    }
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on `sender`, a keep-alive connection to `port`.
pub async fn send(
    sender: &mut Connection,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, BoxError> {
    sender.ready().await?;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// One request on a fresh connection.
pub async fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, BoxError> {
    let mut sender = connect(port, false).await?;
    send(&mut sender, port, method, path, headers, body).await
}

/// `GET path` on a fresh connection.
pub async fn get(port: u16, path: &str) -> Result<Reply, BoxError> {
    call(port, "GET", path, &[], Vec::new()).await
}

/// `POST /api/v1/promotions/{ns}/{name}/grab` as `customer`, JSON body.
pub async fn grab(port: u16, ns: &str, name: &str, customer: &str) -> Result<Reply, BoxError> {
    call(
        port,
        "POST",
        &grab_path(ns, name),
        &[("content-type", JSON)],
        body(customer),
    )
    .await
}

pub fn grab_path(ns: &str, name: &str) -> String {
    format!("/api/v1/promotions/{ns}/{name}/grab")
}

/// A grab request body.
pub fn body(customer: &str) -> Vec<u8> {
    format!(r#"{{"customerId":"{customer}"}}"#).into_bytes()
}

/// The Prometheus exposition served on `port`.
pub async fn metrics_of(port: u16) -> String {
    get(port, "/metrics").await.expect("metrics answer").text
}

/// The value of the first sample of `name` in a Prometheus exposition (0
/// when there is none).
pub fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_its_exact_name_labels_included() {
        let text = "a_total 3\na_total_other 9\nb{kind=\"x\"} 2.5\n";
        assert_eq!(metric_value(text, "a_total"), 3.0);
        assert_eq!(metric_value(text, "b"), 2.5);
        assert_eq!(metric_value(text, r#"b{kind="x"}"#), 2.5);
        assert_eq!(metric_value(text, "c"), 0.0);
    }
}
