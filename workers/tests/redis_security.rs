//! Redis security: every component reaches Redis through `RedisArgs`, so
//! these prove password, ACL user and TLS (`rediss://` with the CA the test
//! generates) for all of them; a wrong secret or an unknown CA is refused.

use std::path::Path;
use std::process::Command;

use chrono::{Duration, Utc};
use seckill_testkit::redis::{RedisServer, RedisServerOptions, TlsFiles};
use seckill_workers::projector::{self, Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{self, CustomerId, GrabOutcome, PromotionId, PromotionSpec};
use seckill_workers::read_model;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

fn spec() -> PromotionSpec {
    PromotionSpec {
        discount: 0.5,
        number_of_coupons: 3,
        publish_time: Utc::now() - Duration::seconds(1),
        finish_time: Utc::now() + Duration::minutes(5),
    }
}

async fn grab_once(args: &RedisArgs) -> Result<GrabOutcome, String> {
    let mut con = args.connect().map_err(|e| e.to_string())?;
    let id = PromotionId::parse("sec/sale").map_err(|e| e.to_string())?;
    protocol::schedule(&mut con, &id, &spec())
        .await
        .map_err(|e| e.to_string())?;
    protocol::grab(&mut con, &id, &CustomerId::parse("alice").unwrap())
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn password_is_required_and_accepted_from_the_flag() {
    let server = RedisServer::start(RedisServerOptions {
        extra: vec![("requirepass".into(), "s3cret".into())],
        ..Default::default()
    })
    .unwrap();
    let plain = format!("redis://127.0.0.1:{}/", server.port());

    let without = RedisArgs::for_url(&plain);
    assert!(grab_once(&without).await.is_err(), "no password must fail");

    let wrong = RedisArgs {
        redis_password: Some("wrong".into()),
        ..RedisArgs::for_url(&plain)
    };
    assert!(grab_once(&wrong).await.is_err(), "wrong password must fail");

    let right = RedisArgs {
        redis_password: Some("s3cret".into()),
        ..RedisArgs::for_url(&plain)
    };
    assert!(matches!(
        grab_once(&right).await,
        Ok(GrabOutcome::Granted { .. })
    ));
    // The password in the URL works too.
    assert!(matches!(
        grab_once(&RedisArgs::for_url(server.url())).await,
        Ok(GrabOutcome::AlreadyGranted { .. })
    ));
}

/// Writes a read-model key no event explains (a ghost customer's coupons),
/// rebuilds the read models (with `scratch` to build aside) and checks the
/// ghost is gone.
async fn rebuild_without_ghost(
    con: &mut RedisConnection,
    models: &mut RedisConnection,
    scratch: &mut RedisConnection,
) -> projector::RebuildReport {
    let ghost = protocol::read_model::customer_coupons(&CustomerId::parse("ghost").unwrap());
    let _: () = redis::cmd("HSET")
        .arg(&ghost)
        .arg("sec/sale")
        .arg("{}")
        .query_async(&mut *models)
        .await
        .unwrap();
    let report = projector::rebuild(
        con,
        models,
        Some(scratch),
        &ProjectorMetrics::unregistered(),
        100,
    )
    .await
    .unwrap();
    let ghost_left: bool = redis::cmd("EXISTS")
        .arg(&ghost)
        .query_async(models)
        .await
        .unwrap();
    assert!(!ghost_left, "{report:?}");
    report
}

#[tokio::test]
async fn acl_user_limited_to_seckill_keys_can_run_every_script() {
    let server = RedisServer::start(RedisServerOptions::default()).unwrap();
    let admin = redis::Client::open(server.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "seckill",
            "on",
            ">worker-pw",
            "~seckill:*",
            "&*",
            "+@all",
            "-@dangerous",
            "+info",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://127.0.0.1:{}/", server.port());
    let user = RedisArgs {
        redis_username: Some("seckill".into()),
        redis_password: Some("worker-pw".into()),
        ..RedisArgs::for_url(&url)
    };
    assert!(matches!(
        grab_once(&user).await,
        Ok(GrabOutcome::Granted { .. })
    ));
    let mut con = user.connect().unwrap();
    let id = PromotionId::parse("sec/sale").unwrap();
    let snap = protocol::finish(&mut con, &id, protocol::FinishReason::Deleted)
        .await
        .unwrap();
    assert!(snap.is_finished());

    let other = RedisArgs {
        redis_username: Some("seckill".into()),
        redis_password: Some("nope".into()),
        ..RedisArgs::for_url(&url)
    };
    assert!(grab_once(&other).await.is_err());

    // The projector and a rebuild work for this user too, although it may
    // not run FLUSHDB (-@dangerous): the rebuild then drops the read models
    // key by key.
    let _: () = redis::cmd("SADD")
        .arg(protocol::PROMOTION_INDEX_KEY)
        .arg(id.to_string())
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut models = user.connect_read_models().unwrap();
    let mut projector = Projector::new(
        con.clone(),
        models.clone(),
        ProjectorOptions::new("acl"),
        ProjectorMetrics::unregistered(),
    );
    assert_eq!(projector.run_until_idle().await.unwrap().applied, 3);
    let refused: redis::RedisResult<()> = redis::cmd("FLUSHDB").query_async(&mut models).await;
    assert!(refused.is_err(), "the ACL must refuse FLUSHDB here");
    // SWAPDB is refused too: the rebuild falls back to rebuilding in place.
    let mut scratch = user.connect_database(2).unwrap().unwrap();
    let report = rebuild_without_ghost(&mut con, &mut models, &mut scratch).await;
    assert!(!report.swapped);
    // The promotion, alice's bucket, the ghost's, the progress, the layout marker.
    assert_eq!((report.applied, report.keys_dropped), (3, 5));
    // Allowed SWAPDB: built aside and swapped in, the ghost (written again)
    // gone with the old read models.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "seckill", "+swapdb", "+flushdb"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let report = rebuild_without_ghost(&mut con, &mut models, &mut scratch).await;
    assert!(report.swapped);
    // The promotion, alice's bucket, the ghost's, the layout marker.
    assert_eq!((report.applied, report.keys_dropped), (3, 4));
    let held = read_model::customer_coupons(&mut models, &CustomerId::parse("alice").unwrap())
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) -> TlsFiles {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=seckill test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "ext.cnf",
        ],
    );
    TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        ca: dir.join("ca.crt"),
    }
}

#[tokio::test]
async fn tls_with_the_generated_ca_works_and_an_unknown_ca_is_refused() {
    let certs_dir = tempfile::tempdir().unwrap();
    let tls = certificates(certs_dir.path());
    let server = RedisServer::start(RedisServerOptions {
        tls: Some(tls.clone()),
        extra: vec![("requirepass".into(), "tls-pw".into())],
        ..Default::default()
    })
    .unwrap();
    assert!(server.url().starts_with("rediss://"));

    let trusted = RedisArgs {
        redis_ca_cert: Some(tls.ca.clone()),
        ..RedisArgs::for_url(server.url())
    };
    assert!(matches!(
        grab_once(&trusted).await,
        Ok(GrabOutcome::Granted { .. })
    ));

    // The system trust store does not know the test CA.
    let untrusted = RedisArgs::for_url(server.url());
    assert!(grab_once(&untrusted).await.is_err());

    // Plain text to the TLS port gets nowhere either.
    let plain = RedisArgs::for_url(format!("redis://:tls-pw@127.0.0.1:{}/", server.port()));
    assert!(grab_once(&plain).await.is_err());
}
