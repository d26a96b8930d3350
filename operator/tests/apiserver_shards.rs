//! `spec.shards` as a real Kubernetes API server (envtest style: kube-apiserver
//! v1.26 from `SECKILL_KUBE_APISERVER` with Debian's `etcd`) enforces the
//! generated CRD: the server defaults it to 1, refuses 0, 1025 and more
//! shards than coupons (the CEL rule), and prints a Shards column in
//! `-o wide` only. Skipped, with a message saying why, like
//! `apiserver_fleet.rs`, when the server, etcd or openssl is missing.

use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client};
use seckill_operator::promotion::Promotion;
use serde_json::{json, Value};

mod kube_apiserver;

use kube_apiserver::{on_path, ControlPlane};

fn manifest(name: &str, coupons: u64, shards: Option<i64>) -> DynamicObject {
    let mut spec = json!({
        "publishTime": "2030-01-01T10:00:00Z",
        "finishTime": "2030-01-01T11:00:00Z",
        "numberOfCoupons": coupons,
        "discount": 0.2,
    });
    if let Some(s) = shards {
        spec["shards"] = json!(s);
    }
    serde_json::from_value(json!({
        "apiVersion": "seckill.io/v1",
        "kind": "Promotion",
        "metadata": { "name": name, "namespace": "default" },
        "spec": spec,
    }))
    .unwrap()
}

/// The API server's answer to creating `object`: the stored spec, or the
/// refusal's code and message.
async fn create(api: &Api<DynamicObject>, object: &DynamicObject) -> Result<Value, (u16, String)> {
    match api.create(&PostParams::default(), object).await {
        Ok(created) => Ok(created.data["spec"].clone()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message.clone())),
        Err(other) => panic!("creating {:?}: {other}", object.metadata.name),
    }
}

/// The `kubectl get`-style table of Promotions (`as=Table`): column names
/// with their priority, and each row's cells.
async fn table(client: &Client) -> (Vec<(String, i64)>, Vec<Vec<Value>>) {
    let request = http::Request::get("/apis/seckill.io/v1/namespaces/default/promotions")
        .header(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .unwrap();
    let text = client.request_text(request).await.unwrap();
    let t: Value = serde_json::from_str(&text).unwrap();
    let columns = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let rows = t["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cells"].as_array().unwrap().clone())
        .collect();
    (columns, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_defaults_shards_to_one_refuses_0_1025_and_more_than_coupons_and_shows_the_column_in_wide(
) {
    let Some((plane, client)) = ControlPlane::with_crd().await else {
        return;
    };
    let typed: Api<Promotion> = Api::namespaced(client.clone(), "default");
    let resource = ApiResource::erase::<Promotion>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);

    // Omitted: stored as 1 by the server's default (raw JSON, not serde's).
    let plain = create(&api, &manifest("plain", 10, None)).await.unwrap();
    assert_eq!(plain["shards"], json!(1), "{plain}");
    let three = create(&api, &manifest("three", 10, Some(3))).await.unwrap();
    assert_eq!(three["shards"], json!(3));
    let edge = create(&api, &manifest("edge", 1024, Some(1024)))
        .await
        .unwrap();
    assert_eq!(edge["shards"], json!(1024));

    for (name, coupons, shards) in [
        ("zero", 10, 0),
        ("too-many", 2000, 1025),
        ("beyond-coupons", 3, 4),
    ] {
        let (code, message) = create(&api, &manifest(name, coupons, Some(shards)))
            .await
            .expect_err(name);
        assert_eq!(code, 422, "{name}: {message}");
        assert!(message.contains("shards"), "{name}: {message}");
    }
    assert_eq!(
        typed
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );

    // The column: priority 1, i.e. `-o wide` only.
    let (columns, rows) = table(&client).await;
    let shards = columns
        .iter()
        .position(|(n, _)| n == "Shards")
        .expect("a Shards column");
    assert_eq!(columns[shards].1, 1, "{columns:?}");
    let mut cells: Vec<Value> = rows.iter().map(|r| r[shards].clone()).collect();
    cells.sort_by_key(|v| v.as_i64());
    assert_eq!(cells, [json!(1), json!(3), json!(1024)]);

    let kubectl = if on_path("kubectl") {
        Some(std::path::PathBuf::from("kubectl"))
    } else {
        let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/kubectl");
        tools.is_file().then_some(tools)
    };
    let Some(kubectl) = kubectl else {
        println!("kubectl not found: the -o wide output was checked through the Table API only");
        return;
    };
    let get = |wide: bool| {
        let mut cmd = std::process::Command::new(&kubectl);
        cmd.arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args(["get", "promo", "-n", "default"]);
        if wide {
            cmd.args(["-o", "wide"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let narrow = get(false);
    let wide = get(true);
    assert!(
        !narrow.lines().next().unwrap().contains("SHARDS"),
        "{narrow}"
    );
    let header = wide.lines().next().unwrap();
    assert!(header.contains("SHARDS"), "{wide}");
    let three_line = wide.lines().find(|l| l.starts_with("three ")).unwrap();
    let column = header.find("SHARDS").unwrap();
    assert_eq!(
        three_line[column..].split_whitespace().next(),
        Some("3"),
        "{wide}"
    );
}
