//! The floor of the sold-out path: hyper alone answering every request with
//! the worker's 410 body, with the worker's HTTP/1 settings
//! ([`http1_builder`], with [`ServerLimitArgs`]' defaults), its allocator
//! and its runtime ([`runtime`]; tokio's single-threaded one when pinned to
//! one CPU). No router, no layers, no handler: what a
//! sold-out answer would cost if everything above hyper were free.
//! `bench/sold-out-builds.sh` measures it beside the builds and nginx
//! (docs/BENCHMARKS.md, "The sold-out target and the machine").
//!
//! The request body is read (collected) before the answer, as the worker
//! must read it to tell a holder from the rest; `HYPER_FLOOR_BODY=skip`
//! leaves it to hyper.
//!
//! Usage: `hyper_floor --listen ADDR` (the worker's flag, so that
//! `bench/callgrind.sh` can count it too).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use seckill_workers::http::{http1_builder, ServerLimitArgs};
use seckill_workers::runtime::runtime;

#[global_allocator]
static ALLOCATOR: seckill_workers::allocator::Mimalloc = seckill_workers::allocator::Mimalloc;

/// The body the worker answers a late customer of `bench/sold-out`.
const SOLD_OUT: &str = r#"{"error":"sold_out","message":"promotion bench/sold-out is sold out; coupons you already hold are listed under GET /api/v1/customers/{customerId}/coupons"}"#;

async fn answer(
    request: Request<Incoming>,
    read_body: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if read_body {
        // A body that fails to arrive is answered the same: the floor
        // measures the answer, not the refusal.
        let body = request.into_body().collect().await.map(|b| b.to_bytes());
        std::hint::black_box(body.ok());
    }
    let mut response = Response::new(Full::new(Bytes::from_static(SOLD_OUT.as_bytes())));
    *response.status_mut() = StatusCode::GONE;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .ok_or("usage: hyper_floor --listen ADDR")?
        .clone();
    let read_body = std::env::var("HYPER_FLOOR_BODY").as_deref() != Ok("skip");
    let limits = ServerLimitArgs::from_env_or_defaults()?.limits(Duration::ZERO, None);
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let http1 = http1_builder(&limits);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let http1 = http1.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| answer(r, read_body));
                let _ = http1.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}
