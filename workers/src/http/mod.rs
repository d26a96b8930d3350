//! The HTTP layer every worker API is served by, on axum and tower-http:
//! the command endpoint, the query endpoints, the probes and `/metrics`,
//! alone or all together in `seckill up`.
//!
//! | module | holds |
//! |---|---|
//! | [`routes`] | the one route table, [`Apis`]: which APIs a server mounts, and [`App`]: the router with the sold-out lane in front |
//! | [`layers`] | the 404/405 fallbacks, the body limit and deadline, metrics |
//! | [`server`] | the accept loop: header timeout and size, connection cap, drain |
//! | [`error`] | [`ApiError`], the `{"error","message"}` envelope, as a response |
//! | [`extract`] | the promotion of a path, the bounded body |
//! | [`customer_header`] | `--customer-id-header` and the rule for reading it |
//! | [`health`] | `/healthz`, `/readyz`, `/metrics` |
//!
//! A server is `Apis { .. }.router(&limits)` handed to [`serve`].

pub mod customer_header;
pub mod error;
pub mod extract;
pub mod health;
pub mod layers;
pub mod routes;
pub mod server;
#[cfg(test)]
mod test_server;

pub use error::{json, json_response, ApiError, Outcome, JSON, MAX_BODY_BYTES};
pub use health::HealthApi;
pub use routes::{Apis, App};
pub use server::{
    bind, http1_builder, serve, shutdown_on_signal, termination_signal, HttpError, ServerLimitArgs,
    ServerLimits, MAX_HEADER_BYTES,
};
