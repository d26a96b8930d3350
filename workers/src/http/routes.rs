//! The route table: every endpoint a worker process can serve, each with
//! its method, its path template (axum's `{param}` syntax is OpenAPI's, so
//! the template is also the metrics' `route` label and the key of
//! docs/openapi.yaml) and its handler. [`Apis`] says which APIs a process
//! mounts: `seckill-worker command` the grab endpoint and, unless
//! `--no-query`, the query endpoints; `seckill-worker query` the query
//! endpoints; `seckill up` both; every process the probes and `/metrics`.

use std::sync::Arc;

use axum::handler::{Handler, HandlerService};
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;

use crate::command::sold_out_lane::SoldOutLane;
use crate::command::{self, CommandApi};
use crate::http::health::{self, HealthApi};
use crate::http::layers::{Admitted, Endpoint, Layered, Layers};
use crate::http::ServerLimits;
use crate::query::{self, QueryApi};

/// The grab endpoint's path template (also what the sold-out lane
/// matches before routing).
pub const GRAB_ROUTE: &str = "/api/v1/promotions/{namespace}/{name}/grab";

/// What a server serves ([`crate::http::serve`]): its router and, when it
/// mounts the grab endpoint, the [`SoldOutLane`] in front of it.
#[derive(Clone)]
pub struct App {
    pub router: Router,
    pub sold_out: Option<Arc<SoldOutLane>>,
}

impl From<Router> for App {
    fn from(router: Router) -> Self {
        Self {
            router,
            sold_out: None,
        }
    }
}

/// The APIs one server mounts.
pub struct Apis {
    /// `POST /api/v1/promotions/{namespace}/{name}/grab`.
    pub command: Option<CommandApi>,
    /// The read endpoints under `/api/v1/promotions` and `/api/v1/customers`.
    pub query: Option<QueryApi>,
    /// `/healthz`, `/readyz` and `/metrics`, always mounted.
    pub health: HealthApi,
}

/// One line of the table: a method, a path template, and how to build
/// the endpoint in the server's layers (known once the whole table is, as
/// the metrics are kept per template).
struct Route {
    method: Method,
    template: &'static str,
    endpoint: Box<dyn FnOnce(&Layers) -> MethodRouter>,
}

impl Route {
    /// `GET template` of a probe (or `/metrics`), answered by `handler`
    /// with `state`, never shed.
    fn probe<H, T, S>(template: &'static str, handler: H, state: &Arc<S>) -> Self
    where
        H: Handler<T, Arc<S>>,
        T: 'static,
        S: Send + Sync + 'static,
        Layered<HandlerService<H, T, Arc<S>>>: Endpoint,
    {
        let state = state.clone();
        Self {
            method: Method::GET,
            template,
            endpoint: Box::new(move |layers| {
                layers.endpoint(MethodFilter::GET, handler.with_state(state))
            }),
        }
    }

    /// `GET template` of the query API, answered by `handler` with `state`
    /// behind the in-flight limit.
    fn query<H, T, S>(template: &'static str, handler: H, state: &Arc<S>) -> Self
    where
        H: Handler<T, Arc<S>>,
        T: 'static,
        S: Send + Sync + 'static,
        Layered<Admitted<HandlerService<H, T, Arc<S>>>>: Endpoint,
    {
        let state = state.clone();
        Self {
            method: Method::GET,
            template,
            endpoint: Box::new(move |layers| {
                layers.api_endpoint(MethodFilter::GET, handler.with_state(state))
            }),
        }
    }
}

impl Apis {
    /// Only the probes and `/metrics` (the operator, the projector).
    pub fn health(health: HealthApi) -> Self {
        Self {
            command: None,
            query: None,
            health,
        }
    }

    /// Every route these APIs serve: (method, path template).
    pub fn routes(self) -> Vec<(Method, &'static str)> {
        let Apis {
            command,
            query,
            health,
        } = self;
        table(command.map(Arc::new), query, health)
            .into_iter()
            .map(|r| (r.method, r.template))
            .collect()
    }

    /// The router of these APIs, every endpoint in the [`Layers`] of
    /// `limits`, with the sold-out lane in front of it when the grab
    /// endpoint is mounted.
    pub fn router(self, limits: &ServerLimits) -> App {
        let Apis {
            command,
            query,
            health,
        } = self;
        let command = command.map(Arc::new);
        let table = table(command.clone(), query, health);
        let templates: Vec<&'static str> = table.iter().map(|r| r.template).collect();
        let layers = Layers::new(&templates, limits);
        let router = table.into_iter().fold(Router::new(), |router, r| {
            router.route(r.template, (r.endpoint)(&layers))
        });
        App {
            router: layers.router(router),
            sold_out: command
                .and_then(|api| SoldOutLane::new(api, &layers))
                .map(Arc::new),
        }
    }
}

/// The table itself: the routes of the APIs a server mounts (the command
/// API shared with the sold-out lane).
fn table(
    command: Option<Arc<CommandApi>>,
    query: Option<QueryApi>,
    health: HealthApi,
) -> Vec<Route> {
    let mut table = Vec::new();
    if let Some(api) = command {
        let limit_by_ip = api.ip_rate_limit();
        let grab = command::grab.with_state(api);
        table.push(Route {
            method: Method::POST,
            template: GRAB_ROUTE,
            endpoint: Box::new(move |layers| match limit_by_ip {
                // Before anything is parsed; a 405 is not counted against it.
                // A client past its rate is refused before taking a permit.
                Some(limit) => {
                    layers.endpoint(MethodFilter::POST, limit.layer(layers.admitted(grab)))
                }
                None => layers.api_endpoint(MethodFilter::POST, grab),
            }),
        });
    }
    if let Some(api) = query {
        let api = Arc::new(api);
        table.extend([
            Route::query("/api/v1/promotions", query::promotions, &api),
            Route::query(
                "/api/v1/promotions/{namespace}/{name}",
                query::promotion,
                &api,
            ),
            Route::query(
                "/api/v1/customers/{customerId}/coupons",
                query::customer_coupons,
                &api,
            ),
        ]);
    }
    let health = Arc::new(health);
    table.extend([
        Route::probe("/healthz", health::healthz, &health),
        Route::probe("/readyz", health::readyz, &health),
        Route::probe("/metrics", health::metrics, &health),
    ]);
    table
}
