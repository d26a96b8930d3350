//! Leader election of the operator (issue 4): two replicas never reconcile
//! at once, and a standby takes over within the lease duration.
//!
//! No kube-apiserver runs here, so — as kube-rs' controller-rs does — the
//! Kubernetes API is a `tower_test::mock` service per replica. Unlike a
//! scripted mock, every replica's requests are answered by one shared,
//! in-memory model of the `coordination.k8s.io/v1` Lease endpoints that
//! kube-lease-manager uses: GET, POST, and PATCH as server-side apply or
//! strategic merge, with the field ownership rules that make the apply a
//! lock (a non-forced apply that changes a field owned by another field
//! manager answers 409 Conflict). Every request is checked against what the
//! real API server accepts (method, path, query, content type, body); any
//! other request is recorded as a violation and fails the test.
//!
//! Real time, lease duration 3 s (so the holder renews every 2 s). The
//! tests wait for events (a replica reconciling, a renewal), never for a
//! fixed time that something must have happened within; how long a takeover
//! takes is printed (`[leader]` lines) and held to its bound by `make bench`
//! (scripts/bench-leader.sh), not here.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};
use kube::client::Body;
use kube::Client;
use seckill_operator::leader::{run_as_leader, LeaseConfig};
use seckill_operator::Error;
use seckill_testkit::eventually;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_test::mock::Handle;

const NAMESPACE: &str = "seckill-system";
const LEASE: &str = "seckill-operator";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/seckill-system/leases";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/seckill-system/leases/seckill-operator";
const API_VERSION: &str = "coordination.k8s.io/v1";

/// `--lease-duration-secs` of every replica.
const DURATION_SECS: u64 = 3;
const DURATION: Duration = Duration::from_secs(DURATION_SECS);
/// The renew grace `LeaseConfig::params` derives from it (a third, at
/// least 1 s): the holder renews `DURATION - GRACE` after its last renewal.
const GRACE: Duration = Duration::from_secs(1);
/// Round trip of one request (network + etcd). It also puts the replicas
/// in lockstep, so that both read an orphaned Lease before either locks it.
const LATENCY: Duration = Duration::from_millis(10);
/// How often the tests look at who is reconciling.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Bounds every wait for something that must happen (a hang guard).
const WITHIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The in-memory Lease API server.
// ---------------------------------------------------------------------------

/// A field manager as server-side apply keys it: the same name applying and
/// updating counts as two managers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FieldManager {
    name: String,
    operation: Operation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Apply,
    Update,
}

impl FieldManager {
    fn new(name: &str, operation: Operation) -> Self {
        Self {
            name: name.to_owned(),
            operation,
        }
    }
}

/// The one Lease the server stores.
#[derive(Debug)]
struct StoredLease {
    uid: String,
    created: String,
    resource_version: u64,
    spec: Map<String, Value>,
    /// Owners of each `spec` field (`metadata.managedFields`).
    owners: BTreeMap<String, BTreeSet<FieldManager>>,
}

impl StoredLease {
    fn to_json(&self) -> Value {
        let mut managers: BTreeMap<&FieldManager, Map<String, Value>> = BTreeMap::new();
        for (field, owners) in &self.owners {
            for owner in owners {
                managers
                    .entry(owner)
                    .or_default()
                    .insert(format!("f:{field}"), json!({}));
            }
        }
        let managed_fields: Vec<Value> = managers
            .into_iter()
            .map(|(manager, fields)| {
                json!({
                    "manager": manager.name,
                    "operation": format!("{:?}", manager.operation),
                    "apiVersion": API_VERSION,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": fields},
                })
            })
            .collect();
        json!({
            "apiVersion": API_VERSION,
            "kind": "Lease",
            "metadata": {
                "name": LEASE,
                "namespace": NAMESPACE,
                "uid": self.uid,
                "resourceVersion": self.resource_version.to_string(),
                "creationTimestamp": self.created,
                "managedFields": managed_fields,
            },
            "spec": self.spec,
        })
    }

    fn holder(&self) -> Option<String> {
        self.spec
            .get("holderIdentity")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// What kind of request the server answered, for the tests' assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Create,
    Apply,
    StrategicMerge,
    Unexpected,
}

/// One answered request.
#[derive(Debug, Clone)]
struct Served {
    connection: String,
    verb: Verb,
    field_manager: Option<String>,
    /// The `spec` of a PATCH.
    patch: Option<Map<String, Value>>,
    status: u16,
    reason: String,
}

#[derive(Debug, Default)]
struct ApiState {
    lease: Option<StoredLease>,
    last_resource_version: u64,
    /// Connections cut off (their replica crashed): requests are dropped.
    crashed: BTreeSet<String>,
    /// Connections whose next apply is held back at the server's door.
    held_apply: BTreeMap<String, ApplyGate>,
    /// Requests the real API server would not accept, or that
    /// kube-lease-manager should not send. Every test asserts none.
    violations: Vec<String>,
    served: Vec<Served>,
}

type Reply = (StatusCode, Value);

/// Holds one apply of a connection: says when it arrived, and lets it reach
/// the server only once released (a replica paused, by GC, CPU throttling
/// or a slow network path, between reading the Lease and writing its lock).
#[derive(Debug)]
struct ApplyGate {
    arrived: Option<oneshot::Sender<()>>,
    release: oneshot::Receiver<()>,
}

fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Reply {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    (code, body)
}

fn not_found() -> Reply {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("leases.coordination.k8s.io \"{LEASE}\" not found"),
        json!({"name": LEASE, "group": "coordination.k8s.io", "kind": "leases"}),
    )
}

/// Now, as a `MicroTime` (what kube-lease-manager sends).
fn now_micro() -> Value {
    serde_json::to_value(MicroTime(Timestamp::now())).unwrap()
}

/// Decodes an `application/x-www-form-urlencoded` query into its pairs.
fn query_pairs(query: Option<&str>) -> Result<BTreeMap<String, String>, String> {
    fn decode(s: &str) -> Result<String, String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
    let mut pairs = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if pairs.insert(decode(key)?, decode(value)?).is_some() {
            return Err(format!("query parameter {key} given twice"));
        }
    }
    Ok(pairs)
}

/// Checks a `spec` sent by the client against the Lease schema; `null`
/// (remove the field) is only meaningful in a strategic merge patch.
fn check_spec(spec: &Map<String, Value>, nulls_allowed: bool) -> Result<(), String> {
    for (field, value) in spec {
        if value.is_null() {
            if nulls_allowed {
                continue;
            }
            return Err(format!("spec.{field}: null in an apply configuration"));
        }
        let ok = match field.as_str() {
            "holderIdentity" | "preferredHolder" | "strategy" => value.is_string(),
            "acquireTime" | "renewTime" => value
                .as_str()
                .is_some_and(|t| t.parse::<Timestamp>().is_ok()),
            "leaseDurationSeconds" => value.as_i64().is_some_and(|d| d > 0),
            "leaseTransitions" => value.as_i64().is_some_and(|t| t >= 0),
            _ => return Err(format!("spec.{field}: not a field of LeaseSpec")),
        };
        if !ok {
            return Err(format!("spec.{field}: invalid value {value}"));
        }
    }
    Ok(())
}

/// The `spec` of a PATCH body, whose `apiVersion`/`kind` must name a Lease
/// (required for an apply, optional for a strategic merge patch).
fn patch_spec(body: &Value, apply: bool) -> Result<Map<String, Value>, String> {
    let object = body.as_object().ok_or("the patch is not an object")?;
    for (key, value) in object {
        match key.as_str() {
            "apiVersion" if value == API_VERSION => {}
            "kind" if value == "Lease" => {}
            "metadata" if value.get("name").is_none_or(|n| n == LEASE) => {}
            "spec" => {}
            _ => return Err(format!("unexpected {key}: {value} in the patch")),
        }
    }
    if apply && (!object.contains_key("apiVersion") || !object.contains_key("kind")) {
        return Err("an apply configuration needs apiVersion and kind".into());
    }
    let spec = match object.get("spec") {
        None => Map::new(),
        Some(Value::Object(spec)) => spec.clone(),
        Some(other) => return Err(format!("spec is not an object: {other}")),
    };
    check_spec(&spec, !apply)?;
    Ok(spec)
}

impl ApiState {
    fn next_resource_version(&mut self) -> u64 {
        self.last_resource_version += 1;
        self.last_resource_version
    }

    fn new_lease(&mut self, spec: Map<String, Value>) -> StoredLease {
        StoredLease {
            uid: "1ea5e000-0000-4000-8000-000000000001".into(),
            created: Timestamp::now().round(Unit::Second).unwrap().to_string(),
            resource_version: self.next_resource_version(),
            spec,
            owners: BTreeMap::new(),
        }
    }

    /// Answers one request, recording it (and any violation).
    fn serve(&mut self, connection: &str, request: &http::request::Parts, body: &[u8]) -> Reply {
        let mut served = Served {
            connection: connection.to_owned(),
            verb: Verb::Unexpected,
            field_manager: None,
            patch: None,
            status: 0,
            reason: String::new(),
        };
        let reply = match self.route(request, body, &mut served) {
            Ok(reply) => reply,
            Err(violation) => {
                served.verb = Verb::Unexpected;
                let line = format!(
                    "{connection}: {} {} ({:?}): {violation}",
                    request.method,
                    request.uri,
                    request.headers.get(http::header::CONTENT_TYPE)
                );
                self.violations.push(line.clone());
                status(StatusCode::BAD_REQUEST, "BadRequest", line, json!({}))
            }
        };
        served.status = reply.0.as_u16();
        served.reason = reply.1["reason"].as_str().unwrap_or("").to_owned();
        tracing::debug!(
            %connection,
            method = %request.method,
            uri = %request.uri,
            content_type = ?request.headers.get(http::header::CONTENT_TYPE),
            status = served.status,
            reason = %served.reason,
            "lease api served"
        );
        self.served.push(served);
        reply
    }

    /// `Err` for a request the real server would reject as malformed, or
    /// one kube-lease-manager has no business sending.
    fn route(
        &mut self,
        request: &http::request::Parts,
        body: &[u8],
        served: &mut Served,
    ) -> Result<Reply, String> {
        let path = request.uri.path();
        let query = query_pairs(request.uri.query())?;
        let content_type = request
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("<not ascii>").to_owned());
        match (&request.method, path) {
            (&Method::GET, LEASE_PATH) => {
                if !query.is_empty() || !body.is_empty() {
                    return Err(format!("a get with query {query:?} or a body"));
                }
                served.verb = Verb::Get;
                Ok(match &self.lease {
                    Some(lease) => (StatusCode::OK, lease.to_json()),
                    None => not_found(),
                })
            }
            (&Method::POST, LEASES_PATH) => {
                if !query.is_empty() {
                    return Err(format!("unexpected query {query:?} on create"));
                }
                if content_type.as_deref() != Some("application/json") {
                    return Err("create needs content type application/json".into());
                }
                let lease: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
                if lease["apiVersion"] != API_VERSION || lease["kind"] != "Lease" {
                    return Err("the body is not a coordination.k8s.io/v1 Lease".into());
                }
                if lease["metadata"]["name"] != LEASE {
                    return Err(format!("creates lease {}", lease["metadata"]["name"]));
                }
                if !lease["metadata"]["namespace"].is_null()
                    && lease["metadata"]["namespace"] != NAMESPACE
                {
                    return Err("the namespace of the body differs from the path".into());
                }
                let spec = match &lease["spec"] {
                    Value::Null => Map::new(),
                    Value::Object(spec) => spec.clone(),
                    other => return Err(format!("spec is not an object: {other}")),
                };
                check_spec(&spec, false)?;
                served.verb = Verb::Create;
                if self.lease.is_some() {
                    return Ok(status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("leases.coordination.k8s.io \"{LEASE}\" already exists"),
                        json!({"name": LEASE, "group": "coordination.k8s.io", "kind": "leases"}),
                    ));
                }
                let created = self.new_lease(spec);
                let json = created.to_json();
                self.lease = Some(created);
                Ok((StatusCode::CREATED, json))
            }
            (&Method::PATCH, LEASE_PATH) => {
                let field_manager = match query.get("fieldManager") {
                    Some(m) if !m.is_empty() && m.len() <= 128 => m.clone(),
                    _ => return Err("a patch without fieldManager".into()),
                };
                let force = match query.get("force").map(String::as_str) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => return Err(format!("force={other}")),
                };
                if let Some(other) = query.keys().find(|k| *k != "fieldManager" && *k != "force") {
                    return Err(format!("unexpected query parameter {other}"));
                }
                let body: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
                served.field_manager = Some(field_manager.clone());
                match content_type.as_deref() {
                    Some("application/apply-patch+yaml") => {
                        let spec = patch_spec(&body, true)?;
                        served.verb = Verb::Apply;
                        served.patch = Some(spec.clone());
                        Ok(self.apply(&field_manager, spec, force))
                    }
                    Some("application/strategic-merge-patch+json") => {
                        if force {
                            return Err("force is only valid for apply".into());
                        }
                        let spec = patch_spec(&body, false)?;
                        served.verb = Verb::StrategicMerge;
                        served.patch = Some(spec.clone());
                        Ok(self.strategic_merge(&field_manager, spec))
                    }
                    other => Err(format!("unexpected patch content type {other:?}")),
                }
            }
            _ => Err("no such endpoint for a Lease client".into()),
        }
    }

    /// Server-side apply of `spec` by `manager`: it conflicts, unless
    /// forced, when it changes a field another manager owns; it then owns
    /// exactly the fields it applied (a field it stops applying that no one
    /// else owns is removed).
    fn apply(&mut self, manager: &str, spec: Map<String, Value>, force: bool) -> Reply {
        let me = FieldManager::new(manager, Operation::Apply);
        let (mut lease, code) = match self.lease.take() {
            Some(lease) => (lease, StatusCode::OK),
            None => (self.new_lease(Map::new()), StatusCode::CREATED),
        };
        let mut conflicts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (field, value) in &spec {
            if lease.spec.get(field) == Some(value) {
                continue;
            }
            for owner in lease.owners.get(field).into_iter().flatten() {
                if *owner != me {
                    conflicts
                        .entry(owner.name.clone())
                        .or_default()
                        .push(format!(".spec.{field}"));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            if code == StatusCode::OK {
                self.lease = Some(lease);
            }
            let count: usize = conflicts.values().map(Vec::len).sum();
            let mut message = format!("Apply failed with {count} conflict(s):");
            let mut causes = Vec::new();
            for (owner, fields) in &conflicts {
                for field in fields {
                    message.push_str(&format!(" conflict with \"{owner}\": {field};"));
                    causes.push(json!({
                        "reason": "FieldManagerConflict",
                        "message": format!("conflict with \"{owner}\""),
                        "field": field,
                    }));
                }
            }
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                message,
                json!({"causes": causes}),
            );
        }
        let before = (lease.spec.clone(), lease.owners.clone());
        for (field, value) in spec.iter() {
            let owners = lease.owners.entry(field.clone()).or_default();
            if lease.spec.get(field) != Some(value) {
                // Forced (or unowned): the others lose the field.
                owners.clear();
            }
            owners.insert(me.clone());
            lease.spec.insert(field.clone(), value.clone());
        }
        let dropped: Vec<String> = lease
            .owners
            .iter_mut()
            .filter(|(field, _)| !spec.contains_key(*field))
            .filter_map(|(field, owners)| {
                (owners.remove(&me) && owners.is_empty()).then(|| field.clone())
            })
            .collect();
        for field in dropped {
            lease.owners.remove(&field);
            lease.spec.remove(&field);
        }
        if (lease.spec.clone(), lease.owners.clone()) != before || code == StatusCode::CREATED {
            lease.resource_version = self.next_resource_version();
        }
        let json = lease.to_json();
        self.lease = Some(lease);
        (code, json)
    }

    /// A strategic merge patch (an update): `null` removes a field (from
    /// every owner), a changed or added field becomes the updater's alone.
    fn strategic_merge(&mut self, manager: &str, spec: Map<String, Value>) -> Reply {
        let me = FieldManager::new(manager, Operation::Update);
        let Some(lease) = self.lease.as_mut() else {
            return not_found();
        };
        let mut changed = false;
        for (field, value) in spec {
            if value.is_null() {
                if lease.spec.remove(&field).is_some() {
                    lease.owners.remove(&field);
                    changed = true;
                }
            } else if lease.spec.get(&field) != Some(&value) {
                lease.spec.insert(field.clone(), value);
                lease.owners.insert(field, BTreeSet::from([me.clone()]));
                changed = true;
            }
        }
        if changed {
            self.last_resource_version += 1;
            lease.resource_version = self.last_resource_version;
        }
        (StatusCode::OK, lease.to_json())
    }
}

/// The shared API server; one mock connection per replica.
#[derive(Clone, Default)]
struct LeaseApi {
    state: Arc<Mutex<ApiState>>,
}

impl LeaseApi {
    /// A client whose requests this server answers, as `connection`.
    fn connect(&self, connection: &str) -> (Client, JoinHandle<()>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(self.clone().serve(connection.to_owned(), handle));
        (Client::new(service, "default"), server)
    }

    async fn serve(self, connection: String, mut handle: Handle<Request<Body>, Response<Body>>) {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = match body.collect_bytes().await {
                Ok(bytes) => bytes.to_vec(),
                Err(e) => {
                    let mut state = self.state.lock().unwrap();
                    state
                        .violations
                        .push(format!("{connection}: unreadable body: {e}"));
                    continue;
                }
            };
            let is_apply = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|t| t == "application/apply-patch+yaml");
            let gate = is_apply
                .then(|| self.state.lock().unwrap().held_apply.remove(&connection))
                .flatten();
            if let Some(gate) = gate {
                if let Some(arrived) = gate.arrived {
                    let _ = arrived.send(());
                }
                let _ = gate.release.await;
            }
            let (code, json) = {
                let mut state = self.state.lock().unwrap();
                if state.crashed.contains(&connection) {
                    // The process is gone: the request never arrives.
                    return;
                }
                state.serve(&connection, &parts, &body)
            };
            tokio::time::sleep(LATENCY).await;
            let response = Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&json).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    }

    /// Cuts `connection` off: from now on its requests are dropped unanswered.
    fn crash(&self, connection: &str) {
        self.state
            .lock()
            .unwrap()
            .crashed
            .insert(connection.to_owned());
    }

    /// Holds the next apply of `connection` until `release` fires (or is
    /// dropped); `arrived` fires when it reaches the door.
    fn hold_next_apply(
        &self,
        connection: &str,
        arrived: Option<oneshot::Sender<()>>,
        release: oneshot::Receiver<()>,
    ) {
        self.state
            .lock()
            .unwrap()
            .held_apply
            .insert(connection.to_owned(), ApplyGate { arrived, release });
    }

    /// An empty Lease, as a replica that started earlier would have created.
    fn create_empty_lease(&self) {
        let mut state = self.state.lock().unwrap();
        let lease = state.new_lease(Map::new());
        state.lease = Some(lease);
    }

    fn holder(&self) -> Option<String> {
        self.state.lock().unwrap().lease.as_ref()?.holder()
    }

    /// The stored `spec.renewTime`.
    fn renew_time(&self) -> Option<Timestamp> {
        let state = self.state.lock().unwrap();
        state
            .lease
            .as_ref()?
            .spec
            .get("renewTime")?
            .as_str()?
            .parse()
            .ok()
    }

    /// What another replica could do with `force=true`: apply itself as
    /// the holder, taking the fields from their owners.
    fn force_holder(&self, identity: &str) {
        let spec = json!({
            "acquireTime": now_micro(),
            "renewTime": now_micro(),
            "holderIdentity": identity,
            "leaseDurationSeconds": DURATION_SECS,
        });
        let Value::Object(spec) = spec else {
            unreachable!()
        };
        let mut state = self.state.lock().unwrap();
        let (code, body) = state.apply(&format!("{identity}-field-manager"), spec, true);
        assert_eq!(code, StatusCode::OK, "forced apply failed: {body}");
    }

    /// That replica renewing its Lease (a strategic merge of renewTime).
    fn renew_as(&self, identity: &str) {
        let Value::Object(spec) = json!({"renewTime": now_micro()}) else {
            unreachable!()
        };
        let mut state = self.state.lock().unwrap();
        let (code, body) = state.strategic_merge(&format!("{identity}-field-manager"), spec);
        assert_eq!(code, StatusCode::OK, "renewal failed: {body}");
    }

    /// Successful strategic merge patches by `field_manager` whose `spec`
    /// satisfies `matches`.
    fn strategic_merges(
        &self,
        field_manager: &str,
        matches: impl Fn(&Map<String, Value>) -> bool,
    ) -> usize {
        self.served()
            .iter()
            .filter(|s| {
                s.verb == Verb::StrategicMerge
                    && s.status == 200
                    && s.field_manager.as_deref() == Some(field_manager)
                    && s.patch.as_ref().is_some_and(&matches)
            })
            .count()
    }

    /// Renewals (a new renewTime) sent by `field_manager`.
    fn renewals(&self, field_manager: &str) -> usize {
        self.strategic_merges(field_manager, |p| {
            p.get("renewTime").is_some_and(|r| !r.is_null())
        })
    }

    /// Releases (holderIdentity removed) sent by `field_manager`.
    fn releases(&self, field_manager: &str) -> usize {
        self.strategic_merges(field_manager, |p| {
            p.get("holderIdentity") == Some(&Value::Null)
        })
    }

    fn served(&self) -> Vec<Served> {
        self.state.lock().unwrap().served.clone()
    }

    fn assert_no_violations(&self) {
        let state = self.state.lock().unwrap();
        assert!(
            state.violations.is_empty(),
            "requests the API server would not expect: {:#?}",
            state.violations
        );
        assert!(
            state.served.iter().all(|s| s.verb != Verb::Unexpected),
            "unexpected requests were served"
        );
    }
}

// ---------------------------------------------------------------------------
// Replicas running a stand-in controller.
// ---------------------------------------------------------------------------

/// Who is reconciling, and since when.
#[derive(Default)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Default)]
struct ActivityState {
    active: BTreeSet<String>,
    /// Each start of a controller: (replica, when).
    starts: Vec<(String, Instant)>,
    stops: Vec<(String, Instant)>,
    /// Most controllers active at once, checked at every start.
    max_concurrent: usize,
}

/// Marks a controller active until dropped (when `run_as_leader` stops it).
struct ActiveGuard {
    activity: Arc<Activity>,
    identity: String,
}

impl Activity {
    fn enter(self: &Arc<Self>, identity: &str) -> ActiveGuard {
        let mut state = self.state.lock().unwrap();
        assert!(
            state.active.insert(identity.to_owned()),
            "{identity} started twice"
        );
        state.max_concurrent = state.max_concurrent.max(state.active.len());
        state.starts.push((identity.to_owned(), Instant::now()));
        ActiveGuard {
            activity: self.clone(),
            identity: identity.to_owned(),
        }
    }

    fn active(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().active.clone()
    }

    fn starts(&self) -> Vec<(String, Instant)> {
        self.state.lock().unwrap().starts.clone()
    }

    fn stops(&self) -> Vec<(String, Instant)> {
        self.state.lock().unwrap().stops.clone()
    }

    /// Waits until `done(active set)`, returning when it was first seen to
    /// hold.
    async fn wait_until(&self, what: &str, done: impl Fn(&BTreeSet<String>) -> bool) -> Instant {
        eventually(WITHIN, || {
            let active = self.active();
            let held = done(&active);
            async move {
                if held {
                    Ok(Instant::now())
                } else {
                    Err(format!("{what}: active {active:?}"))
                }
            }
        })
        .await
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut state = self.activity.state.lock().unwrap();
        state.active.remove(&self.identity);
        state.stops.push((self.identity.clone(), Instant::now()));
    }
}

/// One run of the stand-in controller.
type ControllerRun = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// The controller `run_as_leader` runs: active until dropped, never returns.
fn stand_in_controller(activity: Arc<Activity>, identity: String) -> impl FnMut() -> ControllerRun {
    move || {
        let guard = activity.enter(&identity);
        Box::pin(async move {
            let _active = guard;
            std::future::pending::<()>().await;
            Ok(())
        })
    }
}

/// One operator replica: `run_as_leader` with its own identity and API
/// connection.
struct Replica {
    identity: String,
    task: JoinHandle<Result<(), Error>>,
    /// Resolves the replica's shutdown future when sent (or dropped).
    shutdown: Option<oneshot::Sender<()>>,
}

impl Replica {
    fn start(api: &LeaseApi, activity: &Arc<Activity>, identity: &str) -> Self {
        let (client, _server) = api.connect(identity);
        let config = LeaseConfig {
            name: LEASE.into(),
            namespace: NAMESPACE.into(),
            identity: identity.into(),
            duration_secs: DURATION_SECS,
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let work = stand_in_controller(activity.clone(), identity.to_owned());
        let task = tokio::spawn(run_as_leader(client, config, work, async move {
            let _ = stop.await;
        }));
        Self {
            identity: identity.to_owned(),
            task,
            shutdown: Some(shutdown),
        }
    }

    fn field_manager(&self) -> String {
        format!("kube-lease-manager-{}", self.identity)
    }
}

/// Counts, every [`SAMPLE_EVERY`], how many controllers are active.
struct Sampler {
    task: JoinHandle<(usize, usize)>,
    stop: oneshot::Sender<()>,
}

impl Sampler {
    fn start(activity: Arc<Activity>) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut samples, mut both_active) = (0, 0);
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        samples += 1;
                        if activity.active().len() > 1 {
                            both_active += 1;
                        }
                    }
                    _ = &mut stopped => return (samples, both_active),
                }
            }
        });
        Self { task, stop }
    }

    /// (samples taken, samples with more than one controller active).
    async fn finish(self) -> (usize, usize) {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// Each test's start: tracing to the test's output (filtered by RUST_LOG),
/// and a fresh mock API server with no Lease.
fn traced_lease_api() -> LeaseApi {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    LeaseApi::default()
}

/// Starts replicas a and b and waits until one reconciles:
/// (holder, standby).
async fn elect(api: &LeaseApi, activity: &Arc<Activity>) -> (Replica, Replica) {
    let a = Replica::start(api, activity, "replica-a");
    let b = Replica::start(api, activity, "replica-b");
    activity
        .wait_until("a replica acquires the lease", |a| !a.is_empty())
        .await;
    if activity.active().contains("replica-a") {
        (a, b)
    } else {
        (b, a)
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_never_reconcile_at_once_and_exactly_one_leads() {
    let api = traced_lease_api();
    // Both replicas find it orphaned and race to lock it: replica-a's lock
    // waits at the server's door until replica-b's lock has arrived too, and
    // replica-b's lock goes in only after replica-a locked the Lease,
    // confirmed it and started reconciling: the lost-update window that only
    // the API server's apply conflict closes.
    api.create_empty_lease();
    let (b_arrived, b_at_door) = oneshot::channel();
    let (release_a, a_released) = oneshot::channel();
    let (release_b, b_released) = oneshot::channel();
    api.hold_next_apply("replica-a", None, a_released);
    api.hold_next_apply("replica-b", Some(b_arrived), b_released);
    let activity = Arc::new(Activity::default());
    let sampler = Sampler::start(activity.clone());
    let a = Replica::start(&api, &activity, "replica-a");
    let b = Replica::start(&api, &activity, "replica-b");
    b_at_door.await.expect("replica-b sends its lock");
    let _ = release_a.send(());
    activity
        .wait_until("replica-a reconciles", |a| a.contains("replica-a"))
        .await;
    let _ = release_b.send(());

    // Watched over three renewals of the leader (six seconds and more).
    eventually(WITHIN, || {
        let renewals = api.renewals(&a.field_manager());
        async move { (renewals >= 3).then_some(()).ok_or(renewals) }
    })
    .await;
    let (samples, both_active) = sampler.finish().await;

    assert!(samples > 0, "the sampler never looked");
    assert_eq!(
        both_active, 0,
        "both reconciled in {both_active} of {samples} samples"
    );
    assert_eq!(activity.state.lock().unwrap().max_concurrent, 1);
    let starts = activity.starts();
    assert_eq!(starts.len(), 1, "exactly one controller start: {starts:?}");
    let leader = &starts[0].0;
    assert!(activity.stops().is_empty(), "the leader never stopped");
    assert_eq!(api.holder().as_ref(), Some(leader));

    let served = api.served();
    let conflicts: Vec<&Served> = served
        .iter()
        .filter(|s| s.verb == Verb::Apply && s.status == 409)
        .collect();
    assert_eq!(leader, &a.identity, "replica-b's lock was held back");
    let (winner, loser) = (&a, &b);
    // Both found the Lease orphaned and applied; the server's conflict
    // (not luck in timing) kept replica-b out.
    assert_eq!(conflicts.len(), 1, "the replicas raced for the lock once");
    assert!(
        conflicts
            .iter()
            .all(|s| s.reason == "Conflict" && s.connection == loser.identity),
        "only the loser's apply conflicts: {conflicts:?}"
    );
    let renewals = api.renewals(&winner.field_manager());
    eprintln!(
        "leader {leader}; {samples} samples, none with both active; \
         {} lock conflict(s) answered to {}; {renewals} renewals; {} requests",
        conflicts.len(),
        loser.identity,
        served.len()
    );
    api.assert_no_violations();
}

#[tokio::test]
async fn standby_takes_over_promptly_when_the_holder_shuts_down() {
    let api = traced_lease_api();
    let activity = Arc::new(Activity::default());
    // No Lease yet: both replicas create it (one is told it already exists).
    let (mut holder, standby) = elect(&api, &activity).await;
    // Shut down halfway through a lease period.
    tokio::time::sleep(DURATION / 2).await;

    let stopped_at = Instant::now();
    let _ = holder.shutdown.take().unwrap().send(());
    let result = tokio::time::timeout(WITHIN, &mut holder.task)
        .await
        .expect("the holder stops")
        .unwrap();
    assert!(result.is_ok(), "run_as_leader returned {result:?}");
    let returned = stopped_at.elapsed();
    assert!(!activity.active().contains(&holder.identity));
    assert_ne!(
        api.holder(),
        Some(holder.identity.clone()),
        "the lease was released"
    );
    assert_eq!(
        api.releases(&holder.field_manager()),
        1,
        "the holder released the lease"
    );

    let took_over = activity
        .wait_until("the standby takes over", |a| a.contains(&standby.identity))
        .await;
    let takeover = took_over - stopped_at;
    assert_eq!(api.holder(), Some(standby.identity.clone()));
    let starts = activity.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let creates: Vec<u16> = api
        .served()
        .iter()
        .filter(|s| s.verb == Verb::Create)
        .map(|s| s.status)
        .collect();
    assert_eq!(
        creates.iter().filter(|c| **c == 201).count(),
        1,
        "{creates:?}"
    );
    eprintln!(
        "[leader] graceful shutdown: standby reconciling {:.3} s after it (lease duration {} s); \
         holder returned after {returned:?}; creates answered {creates:?}",
        takeover.as_secs_f64(),
        DURATION_SECS
    );
    api.assert_no_violations();
}

#[tokio::test]
async fn standby_takes_over_within_the_lease_duration_when_the_holder_crashes() {
    let api = traced_lease_api();
    api.create_empty_lease();
    let activity = Arc::new(Activity::default());
    let (holder, standby) = elect(&api, &activity).await;
    // Just after its first renewal: the standby has to wait almost a full
    // lease duration.
    eventually(WITHIN, || {
        let renewals = api.renewals(&holder.field_manager());
        async move {
            (renewals >= 1)
                .then_some(())
                .ok_or("the holder has not renewed")
        }
    })
    .await;

    // kill -9: the replica's requests stop reaching the server, its tasks end.
    api.crash(&holder.identity);
    holder.task.abort();
    let crashed_at = Instant::now();
    let expiry = api.renew_time().unwrap() + SignedDuration::try_from(DURATION).unwrap();
    let expires_in = Timestamp::now().duration_until(expiry);

    let took_over = activity
        .wait_until("the standby takes over", |a| a.contains(&standby.identity))
        .await;
    let takeover = took_over - crashed_at;
    let taken_at = Timestamp::now();
    assert!(
        taken_at >= expiry,
        "the standby took the lease before it expired"
    );
    assert_eq!(api.holder(), Some(standby.identity.clone()));
    eprintln!(
        "[leader] crash: standby reconciling {:.3} s after the holder's kill (lease duration {} s); \
         the lease expired {expires_in:?} after it",
        takeover.as_secs_f64(),
        DURATION_SECS
    );
    assert_eq!(
        api.releases(&holder.field_manager()),
        0,
        "a crashed holder released"
    );
    api.assert_no_violations();
}

#[tokio::test]
async fn a_holder_that_loses_the_lease_stops_reconciling_promptly() {
    let api = traced_lease_api();
    let activity = Arc::new(Activity::default());
    let replica = Replica::start(&api, &activity, "replica-a");
    activity
        .wait_until("the replica acquires the lease", |a| {
            a.contains("replica-a")
        })
        .await;

    // An intruder forces itself in and renews every half second; each
    // renewal's time is noted just before it is made.
    let renewed: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(vec![Instant::now()]));
    api.force_holder("intruder");
    let lost_at = Instant::now();
    let intruder = {
        let (api, renewed) = (api.clone(), renewed.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                renewed.lock().unwrap().push(Instant::now());
                api.renew_as("intruder");
            }
        })
    };
    let stopped = activity
        .wait_until("the replica stops reconciling", |a| a.is_empty())
        .await;
    let took = stopped - lost_at;

    // While the intruder renews, the replica stays a standby: it may only
    // start again where the intruder left its lease unrenewed for a whole
    // lease duration (a stall of this machine), never earlier.
    tokio::time::sleep(DURATION).await;
    let window_end = Instant::now();
    let renewals = renewed.lock().unwrap().clone();
    for (_, started) in activity.starts().iter().filter(|(_, t)| *t > stopped) {
        let last = renewals.iter().filter(|r| *r <= started).max().unwrap();
        assert!(
            *started - *last >= DURATION,
            "the replica took the lease {:?} after the intruder renewed it",
            *started - *last
        );
    }
    let renewed_in_time = renewals.windows(2).all(|w| w[1] - w[0] < DURATION - GRACE)
        && window_end - *renewals.last().unwrap() < DURATION - GRACE;
    if renewed_in_time {
        assert!(activity.active().is_empty());
        assert_eq!(api.holder().as_deref(), Some("intruder"));
    }

    // Once it stops renewing, the replica leads (and reconciles) again.
    intruder.abort();
    let abandoned_at = Instant::now();
    let regained = activity
        .wait_until("the replica regains the lease", |a| a.contains("replica-a"))
        .await;
    assert!(activity.starts().len() >= 2);
    assert_eq!(api.holder().as_deref(), Some("replica-a"));
    assert!(!replica.task.is_finished());
    eprintln!(
        "[leader] lease lost: controller stopped {:.3} s after the forced takeover (renew interval {} s); \
         regained {:?} after the intruder stopped renewing",
        took.as_secs_f64(),
        (DURATION - GRACE).as_secs(),
        regained - abandoned_at
    );
    api.assert_no_violations();
}

/// The fake's own rules, through a real kube client: the apply conflicts
/// the election relies on (and only those), and that requests the API
/// server would not expect are caught.
#[tokio::test]
async fn the_fake_lease_api_answers_like_the_api_server() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, DeleteParams, Patch, PatchParams};

    let api = traced_lease_api();
    let (client, _server) = api.connect("probe");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let code = |r: Result<Lease, kube::Error>| match r {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => panic!("{e}"),
    };
    let lock = |holder: &str| {
        Patch::Apply(json!({
            "apiVersion": API_VERSION, "kind": "Lease",
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": DURATION_SECS},
        }))
    };
    let by = |manager: &str| PatchParams::apply(manager);

    assert_eq!(code(leases.get(LEASE).await), 404);
    // An apply creates the Lease; another manager changing the holder
    // conflicts, unless forced; agreeing on the value does not.
    assert_eq!(code(leases.patch(LEASE, &by("m1"), &lock("x")).await), 200);
    let conflict = leases.patch(LEASE, &by("m2"), &lock("y")).await;
    assert!(
        matches!(&conflict, Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict"),
        "{conflict:?}"
    );
    assert_eq!(api.holder().as_deref(), Some("x"));
    assert_eq!(code(leases.patch(LEASE, &by("m2"), &lock("x")).await), 200);
    // A strategic merge patch takes the fields it changes; the former
    // owners' applies then conflict.
    let handover = Patch::Strategic(json!({"spec": {"holderIdentity": "z"}}));
    let update = PatchParams {
        field_manager: Some("m3".into()),
        ..Default::default()
    };
    assert_eq!(code(leases.patch(LEASE, &update, &handover).await), 200);
    assert_eq!(code(leases.patch(LEASE, &by("m1"), &lock("x")).await), 409);
    assert_eq!(
        code(leases.patch(LEASE, &by("m1").force(), &lock("x")).await),
        200
    );
    assert_eq!(api.holder().as_deref(), Some("x"));
    // null removes a field (and its ownership): the apply is free again.
    let release = Patch::Strategic(json!({"spec": {"holderIdentity": null}}));
    assert_eq!(code(leases.patch(LEASE, &update, &release).await), 200);
    assert_eq!(api.holder(), None);
    assert_eq!(code(leases.patch(LEASE, &by("m2"), &lock("y")).await), 200);
    api.assert_no_violations();

    // Requests a Lease client has no business sending are violations.
    let merge = Patch::Merge(json!({"spec": {"holderIdentity": "q"}}));
    assert_eq!(code(leases.patch(LEASE, &update, &merge).await), 400);
    assert_eq!(code(leases.get("another-lease").await), 400);
    let typo =
        Patch::Apply(json!({"apiVersion": API_VERSION, "kind": "Lease", "spec": {"holder": "q"}}));
    assert_eq!(code(leases.patch(LEASE, &by("m1"), &typo).await), 400);
    assert!(leases
        .delete(LEASE, &DeleteParams::default())
        .await
        .is_err());
    let violations = api.state.lock().unwrap().violations.len();
    assert_eq!(violations, 4);
    assert_eq!(api.holder().as_deref(), Some("y"));
}
