//! Tests of the in-process S3 test server (`S3TestServer`) through the real
//! `object_store` S3 client.

use std::path::Path;
use std::time::Duration;

use atmorep_testkit::{S3TestServer, TEST_SECRET_KEY};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

const BUCKET: &str = "test-bucket";

/// Deterministic, non-repeating-looking payload.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 7) % 251) as u8).collect()
}

/// A client that gives up at once instead of retrying for minutes.
fn no_retry(builder: AmazonS3Builder) -> AmazonS3 {
    builder
        .with_retry(RetryConfig {
            max_retries: 0,
            retry_timeout: Duration::from_secs(5),
            ..RetryConfig::default()
        })
        .build()
        .expect("valid S3 config")
}

async fn started(dir: &Path) -> S3TestServer {
    let server = S3TestServer::start(dir).await.expect("server starts");
    server.create_bucket(BUCKET).expect("bucket created");
    server
}

async fn list_all(store: &AmazonS3, prefix: Option<&ObjectPath>) -> Vec<(String, u64)> {
    let mut listed: Vec<(String, u64)> = store
        .list(prefix)
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await
        .expect("list succeeds");
    listed.sort();
    listed
}

#[tokio::test]
async fn put_list_get_and_ranged_get_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let server = started(dir.path()).await;
    assert!(server.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(server.region(), "us-east-1");

    let store = server.object_store(BUCKET);
    let data = payload(10_000);
    let key = ObjectPath::from("a/b/chunk.bin");
    store
        .put(&key, PutPayload::from(data.clone()))
        .await
        .expect("put succeeds");

    // The object is a plain file in the bucket folder.
    let on_disk = std::fs::read(server.bucket_dir(BUCKET).join("a/b/chunk.bin")).unwrap();
    assert_eq!(on_disk, data);

    assert_eq!(
        list_all(&store, None).await,
        vec![("a/b/chunk.bin".to_owned(), 10_000)]
    );
    assert_eq!(
        list_all(&store, Some(&ObjectPath::from("a"))).await.len(),
        1
    );
    assert!(
        list_all(&store, Some(&ObjectPath::from("zzz")))
            .await
            .is_empty()
    );

    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from(data.clone()));

    let head = store.head(&key).await.unwrap();
    assert_eq!(head.size, 10_000);
    assert!(head.e_tag.is_some());

    let range = store.get_range(&key, 1234..5678).await.unwrap();
    assert_eq!(range, Bytes::copy_from_slice(&data[1234..5678]));

    let ranges = store
        .get_ranges(&key, &[0..1, 9_990..10_000])
        .await
        .unwrap();
    assert_eq!(ranges[0], Bytes::copy_from_slice(&data[0..1]));
    assert_eq!(ranges[1], Bytes::copy_from_slice(&data[9_990..10_000]));

    let suffix = store
        .get_opts(
            &key,
            GetOptions {
                range: Some(GetRange::Suffix(100)),
                ..GetOptions::default()
            },
        )
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(suffix, Bytes::copy_from_slice(&data[9_900..]));

    // s3s-fs keeps its sidecar files in the root, never in bucket folders.
    let in_bucket: Vec<_> = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(in_bucket, vec!["a".to_owned()]);

    store.delete(&key).await.unwrap();
    assert!(list_all(&store, None).await.is_empty());
}

#[tokio::test]
async fn wrong_credentials_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = started(dir.path()).await;
    let key = ObjectPath::from("secret.bin");
    server
        .object_store(BUCKET)
        .put(&key, PutPayload::from_static(b"hello"))
        .await
        .unwrap();

    let bad_secret = no_retry(
        server
            .object_store_builder(BUCKET)
            .with_secret_access_key(format!("{TEST_SECRET_KEY}-wrong")),
    );
    let err = bad_secret
        .get(&key)
        .await
        .expect_err("wrong secret must fail");
    // s3s answers 403 SignatureDoesNotMatch.
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "unexpected error kind: {err:?}"
    );
    bad_secret
        .head(&key)
        .await
        .expect_err("wrong secret must fail HEAD");
    bad_secret
        .put(&key, PutPayload::from_static(b"overwritten"))
        .await
        .expect_err("wrong secret must fail PUT");
    let listed: Result<Vec<_>, _> = bad_secret.list(None).try_collect().await;
    listed.expect_err("wrong secret must fail LIST");

    let bad_access = no_retry(
        server
            .object_store_builder(BUCKET)
            .with_access_key_id("nobody"),
    );
    bad_access
        .get(&key)
        .await
        .expect_err("unknown access key must fail");

    let anonymous = no_retry(
        server
            .object_store_builder(BUCKET)
            .with_skip_signature(true),
    );
    anonymous
        .get(&key)
        .await
        .expect_err("unsigned request must fail");

    // The failed PUT did not overwrite the object.
    let got = server.object_store(BUCKET).get(&key).await.unwrap();
    assert_eq!(got.bytes().await.unwrap(), Bytes::from_static(b"hello"));
}

#[tokio::test]
async fn missing_key_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let server = started(dir.path()).await;
    let store = server.object_store(BUCKET);
    let key = ObjectPath::from("does/not/exist.bin");

    let err = store.get(&key).await.expect_err("missing object");
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "GET: {err:?}"
    );
    let err = store.head(&key).await.expect_err("missing object");
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "HEAD: {err:?}"
    );
    let err = store
        .get_range(&key, 0..10)
        .await
        .expect_err("missing object");
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "ranged GET: {err:?}"
    );
}

#[tokio::test]
async fn uploaded_dir_is_served_without_sidecar_files() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("store.zarr/t2m/c/0")).unwrap();
    let meta = br#"{"zarr_format":3}"#;
    let chunk = payload(4096);
    std::fs::write(src.path().join("store.zarr/zarr.json"), meta).unwrap();
    std::fs::write(src.path().join("store.zarr/t2m/zarr.json"), meta).unwrap();
    std::fs::write(src.path().join("store.zarr/t2m/c/0/0"), &chunk).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start(dir.path()).await.unwrap();
    // The bucket is created on demand; a nested prefix with stray slashes works.
    let copied = server.upload_dir(src.path(), "era5", "/data/v1/").unwrap();
    assert_eq!(copied, 3);

    // No s3s-fs sidecar file exists for these objects.
    let root_entries: Vec<_> = std::fs::read_dir(server.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(root_entries, vec!["era5".to_owned()]);

    let store = server.object_store("era5");
    assert_eq!(
        list_all(&store, Some(&ObjectPath::from("data/v1"))).await,
        vec![
            ("data/v1/store.zarr/t2m/c/0/0".to_owned(), 4096),
            (
                "data/v1/store.zarr/t2m/zarr.json".to_owned(),
                meta.len() as u64
            ),
            ("data/v1/store.zarr/zarr.json".to_owned(), meta.len() as u64),
        ]
    );

    let delimited = store
        .list_with_delimiter(Some(&ObjectPath::from("data/v1/store.zarr")))
        .await
        .unwrap();
    assert_eq!(
        delimited.common_prefixes,
        vec![ObjectPath::from("data/v1/store.zarr/t2m")]
    );
    assert_eq!(delimited.objects.len(), 1);
    assert_eq!(
        delimited.objects[0].location.as_ref(),
        "data/v1/store.zarr/zarr.json"
    );

    let key = ObjectPath::from("data/v1/store.zarr/t2m/c/0/0");
    let head = store.head(&key).await.unwrap();
    assert_eq!(head.size, 4096);
    assert!(head.e_tag.is_some(), "ETag derived from the file's MD5");
    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from(chunk.clone()));
    let range = store.get_range(&key, 100..200).await.unwrap();
    assert_eq!(range, Bytes::copy_from_slice(&chunk[100..200]));
    let meta_got = store
        .get(&ObjectPath::from("data/v1/store.zarr/zarr.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(meta_got, Bytes::from_static(meta));
}

/// `s3_env()` must be understood by `AmazonS3Builder::from_env()`. Setting the
/// process environment is `unsafe` (edition 2024), so this replays exactly what
/// `from_env` does: lower-case each `AWS_*` name and parse it as a config key.
#[tokio::test]
async fn s3_env_configures_object_store_like_from_env() {
    let dir = tempfile::tempdir().unwrap();
    let server = started(dir.path()).await;
    let key = ObjectPath::from("via-env.txt");
    server
        .object_store(BUCKET)
        .put(&key, PutPayload::from_static(b"env works"))
        .await
        .unwrap();

    let env = server.s3_env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for required in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ALLOW_HTTP",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    ] {
        assert!(names.contains(&required), "missing {required}");
    }

    let mut builder = AmazonS3Builder::new();
    for (name, value) in &env {
        assert!(name.starts_with("AWS_"));
        let config_key = name
            .to_ascii_lowercase()
            .parse()
            .unwrap_or_else(|e| panic!("{name} is not an object_store key: {e}"));
        builder = builder.with_config(config_key, value);
    }
    let store = no_retry(builder.with_bucket_name(BUCKET));
    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from_static(b"env works"));

    // configure_command sets the same variables on a subprocess.
    let mut cmd = std::process::Command::new("true");
    server.configure_command(&mut cmd);
    let set: Vec<(String, String)> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
        .collect();
    for pair in &env {
        assert!(set.contains(pair), "{pair:?} not set on the command");
    }
}

#[test]
fn works_without_an_ambient_runtime_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start_blocking(dir.path()).unwrap();
    server.create_bucket(BUCKET).unwrap();
    assert!(server.create_bucket("Not_A_Bucket").is_err());
    let endpoint = server.endpoint();
    let store = no_retry(server.object_store_builder(BUCKET));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = ObjectPath::from("x");
    runtime.block_on(async {
        store
            .put(&key, PutPayload::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(store.head(&key).await.unwrap().size, 1);
    });

    server.shutdown();
    // Nothing listens on the port any more (the client's pooled connection
    // was closed by the graceful shutdown).
    let addr = endpoint.trim_start_matches("http://");
    assert!(std::net::TcpStream::connect(addr).is_err());
    runtime.block_on(async {
        store.head(&key).await.expect_err("server is stopped");
    });
}
