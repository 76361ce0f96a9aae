//! Integration tests against a real `docker-registry` on 127.0.0.1, with
//! in-test proxies for mirrors, auth gates and faults.

mod common;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use strata_registry::{
    Client, ClientConfig, Credentials, Digest, DockerConfig, Error, Manifest, ParallelOptions,
    Platform, Reference, RetryPolicy, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
use tokio::io::AsyncReadExt;

use common::*;

fn fast_retry() -> RetryPolicy {
    let mut r = RetryPolicy::default();
    r.max_attempts = 4;
    r.initial_backoff = Duration::from_millis(10);
    r.max_backoff = Duration::from_millis(100);
    r.stall_timeout = Duration::from_secs(5);
    r
}

fn config() -> ClientConfig {
    let mut c = ClientConfig::default();
    c.docker_config = DockerConfig::Disabled;
    c.retry = fast_retry();
    c.request_timeout = Duration::from_secs(20);
    c
}

fn client() -> Client {
    Client::new(config()).unwrap()
}

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn digest(s: &str) -> Digest {
    Digest::from_str(s).unwrap()
}

async fn read_all(s: strata_registry::BlobStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.into_reader().read_to_end(&mut out).await?;
    Ok(out)
}

async fn collect(mut s: strata_registry::BlobStream) -> strata_registry::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_by_tag_and_digest() {
    bounded(60, async {
        let reg = Registry::start().await;
        let up = reg.uploader();
        let img = up
            .image(
                "app/one",
                Some("v1"),
                &ImageSpec::new("amd64", vec![random_bytes(1000, 1), random_bytes(5000, 2)]),
            )
            .await;
        let mut dspec = ImageSpec::new("amd64", vec![random_bytes(700, 3)]);
        dspec.docker = true;
        let dimg = up.image("app/one", Some("docker"), &dspec).await;
        let c = client();
        let amd64 = Platform::new("linux", "amd64", None);

        let r = reference(&format!("{}/app/one:v1", reg.addr()));
        let res = c.resolve(&r, &amd64).await.unwrap();
        assert!(res.index.is_none());
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        assert_eq!(res.target_digest().to_string(), img.manifest_digest);
        assert_eq!(&res.manifest.bytes[..], &img.manifest_bytes[..]);
        assert_eq!(res.manifest.media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(res.config.digest.to_string(), img.config_digest);
        assert_eq!(&res.config.bytes[..], &img.config_bytes[..]);
        assert_eq!(res.config.value.architecture().to_string(), "amd64");
        let layers: Vec<String> = res
            .layers()
            .iter()
            .map(|d| d.digest().to_string())
            .collect();
        assert_eq!(layers, img.layers);

        // The same by digest.
        let rd = reference(&format!("{}/app/one@{}", reg.addr(), img.manifest_digest));
        let res = c.resolve(&rd, &amd64).await.unwrap();
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        assert_eq!(&res.config.bytes[..], &img.config_bytes[..]);

        // Docker schema 2.
        let r = reference(&format!("{}/app/one:docker", reg.addr()));
        let res = c.resolve(&r, &amd64).await.unwrap();
        assert_eq!(res.manifest.media_type, MEDIA_TYPE_DOCKER_MANIFEST);
        assert_eq!(res.manifest.digest.to_string(), dimg.manifest_digest);
        match c.fetch_manifest(&r).await.unwrap().value {
            Manifest::Image(m) => assert_eq!(m.layers().len(), 1),
            Manifest::Index(_) => panic!("expected an image manifest"),
        }

        // Missing tag and repository: NotFound naming the host and object.
        for missing in ["app/one:nope", "app/none:v1"] {
            let r = reference(&format!("{}/{missing}", reg.addr()));
            let err = c.resolve(&r, &amd64).await.unwrap_err();
            assert!(err.is_not_found(), "{err}");
            assert_eq!(err.status(), Some(404));
            let msg = err.to_string();
            assert!(
                msg.contains(&reg.addr()) && msg.contains("HTTP 404"),
                "{msg}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_selects_platform() {
    bounded(60, async {
        let reg = Registry::start().await;
        let up = reg.uploader();
        let amd = up
            .image(
                "multi",
                None,
                &ImageSpec::new("amd64", vec![random_bytes(300, 10)]),
            )
            .await;
        let mut arm_spec = ImageSpec::new("arm64", vec![random_bytes(400, 11)]);
        arm_spec.variant = Some("v8".into());
        let arm = up.image("multi", None, &arm_spec).await;
        let (oci_index, oci_bytes) = up.index("multi", "oci", &[&amd, &arm], false).await;

        let mut damd_spec = ImageSpec::new("amd64", vec![random_bytes(500, 12)]);
        damd_spec.docker = true;
        let damd = up.image("multi", None, &damd_spec).await;
        let mut darm_spec = ImageSpec::new("arm64", vec![random_bytes(600, 13)]);
        darm_spec.docker = true;
        darm_spec.variant = Some("v8".into());
        let darm = up.image("multi", None, &darm_spec).await;
        let (list, _) = up.index("multi", "list", &[&damd, &darm], true).await;

        let c = client();
        let r = reference(&format!("{}/multi:oci", reg.addr()));
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let res = c.resolve(&r, &arm64).await.unwrap();
        let index = res.index.as_ref().expect("an index");
        assert_eq!(index.digest.to_string(), oci_index);
        assert_eq!(index.media_type, MEDIA_TYPE_OCI_INDEX);
        assert_eq!(&index.bytes[..], &oci_bytes[..]);
        assert_eq!(res.target_digest().to_string(), oci_index);
        assert_eq!(res.manifest.digest.to_string(), arm.manifest_digest);
        assert_eq!(res.config.value.architecture().to_string(), "arm64");
        assert_eq!(res.layers()[0].digest().to_string(), arm.layers[0]);

        let res = c
            .resolve(&r, &"linux/amd64".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(res.manifest.digest.to_string(), amd.manifest_digest);

        // The host's own platform (linux/amd64 or linux/arm64 here).
        let host = Platform::host();
        if host.architecture == "amd64" || host.architecture == "arm64" {
            let res = c.resolve(&r, &host).await.unwrap();
            assert_eq!(
                res.config.value.architecture().to_string(),
                host.architecture
            );
        }

        let err = c
            .resolve(&r, &"windows/amd64".parse().unwrap())
            .await
            .unwrap_err();
        match &err {
            Error::PlatformNotFound { available, .. } => {
                assert!(available.contains("linux/arm64/v8"), "{err}")
            }
            other => panic!("{other}"),
        }

        // A Docker manifest list.
        let r = reference(&format!("{}/multi:list", reg.addr()));
        let res = c.resolve(&r, &arm64).await.unwrap();
        assert_eq!(
            res.index.as_ref().unwrap().media_type,
            MEDIA_TYPE_DOCKER_LIST
        );
        assert_eq!(res.target_digest().to_string(), list);
        assert_eq!(res.manifest.digest.to_string(), darm.manifest_digest);
        assert_eq!(res.manifest.media_type, MEDIA_TYPE_DOCKER_MANIFEST);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_stream_verifies_digest() {
    bounded(60, async {
        let reg = Registry::start().await;
        let up = reg.uploader();
        let data = random_bytes((3 << 20) + 123, 7);
        let d = up.blob("blobs/x", &data).await;
        let c = client();
        let r = reference(&format!("{}/blobs/x:any", reg.addr()));

        // As AsyncRead, with the size.
        let s = c
            .fetch_blob(&r, &digest(&d), Some(data.len() as u64))
            .await
            .unwrap();
        assert_eq!(s.size(), Some(data.len() as u64));
        assert!(read_all(s).await.unwrap() == data);
        // As a Stream, without the size (the server's Content-Length tells it).
        let s = c.fetch_blob(&r, &digest(&d), None).await.unwrap();
        assert_eq!(s.size(), Some(data.len() as u64));
        assert!(collect(s).await.unwrap() == data);
        assert!(c.fetch_blob_bytes(&r, &digest(&d), None).await.unwrap() == data);

        // A wrong expected size is refused before any byte.
        let err = c.fetch_blob(&r, &digest(&d), Some(10)).await.unwrap_err();
        assert!(
            matches!(err, Error::SizeMismatch { expected: 10, .. }),
            "{err}"
        );

        // An unknown digest.
        let unknown = digest_of(b"not uploaded");
        let err = c.fetch_blob(&r, &digest(&unknown), None).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains(&unknown), "{err}");

        // Corrupt the stored bytes: same size, one byte flipped. Every read
        // path must refuse them.
        let bad = random_bytes((2 << 20) + 5, 8);
        let bd = up.blob("blobs/x", &bad).await;
        reg.corrupt(&bd, 1_000_000, 0xff);
        let s = c
            .fetch_blob(&r, &digest(&bd), Some(bad.len() as u64))
            .await
            .unwrap();
        match collect(s).await {
            Err(Error::DigestMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected.to_string(), bd);
                assert_ne!(actual, bd);
            }
            other => panic!(
                "expected a digest mismatch, got {:?}",
                other.map(|v| v.len())
            ),
        }
        let s = c.fetch_blob(&r, &digest(&bd), None).await.unwrap();
        let err = read_all(s).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let s = c
            .fetch_blob_parallel(&r, &digest(&bd), None, &ParallelOptions::new(256 << 10, 3))
            .await
            .unwrap();
        assert!(matches!(
            collect(s).await,
            Err(Error::DigestMismatch { .. })
        ));
        assert!(matches!(
            c.fetch_blob_bytes(&r, &digest(&bd), None).await,
            Err(Error::DigestMismatch { .. })
        ));

        // A corrupted manifest: refused by digest and by tag (the
        // registry's Docker-Content-Digest no longer matches).
        let img = up
            .image(
                "blobs/x",
                Some("v1"),
                &ImageSpec::new("amd64", vec![random_bytes(100, 9)]),
            )
            .await;
        let at = img
            .manifest_bytes
            .windows(3)
            .position(|w| w == b"\n  ")
            .unwrap()
            + 1;
        reg.corrupt(&img.manifest_digest, at, 0x29); // a space becomes a tab: still JSON
        let amd64 = Platform::new("linux", "amd64", None);
        for r in [
            format!("{}/blobs/x@{}", reg.addr(), img.manifest_digest),
            format!("{}/blobs/x:v1", reg.addr()),
        ] {
            let err = c.resolve(&reference(&r), &amd64).await.unwrap_err();
            assert!(matches!(err, Error::DigestMismatch { .. }), "{r}: {err}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads() {
    bounded(60, async {
        let reg = Registry::start().await;
        let data = random_bytes((2 << 20) + 17, 21);
        let d = reg.uploader().blob("ranges/r", &data).await;
        let c = client();
        // Direct, and through a proxy that drops Range (a server without
        // range support answers 200 with the whole blob).
        let strip = Proxy::start(Some(reg.addr().parse().unwrap()), |_| {
            Action::Forward(Fault::StripRange)
        })
        .await;
        for host in [reg.addr(), strip.authority()] {
            let r = reference(&format!("{host}/ranges/r:x"));
            let n = data.len() as u64;
            for (off, len) in [
                (0u64, 1u64),
                (0, 100),
                (12345, 65536),
                (n - 10, 10),
                (1 << 20, 1 << 20),
                (0, n),
            ] {
                let got = c.fetch_range(&r, &digest(&d), off, len).await.unwrap();
                assert!(
                    got[..] == data[off as usize..(off + len) as usize],
                    "{host}: range {off}+{len}"
                );
            }
            assert!(c
                .fetch_range(&r, &digest(&d), 5, 0)
                .await
                .unwrap()
                .is_empty());
        }
        // Past the end: the registry answers 416.
        let r = reference(&format!("{}/ranges/r:x", reg.addr()));
        let err = c
            .fetch_range(&r, &digest(&d), data.len() as u64 + 10, 5)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(416), "{err}");
        // Starting inside the blob but ending past it: refused at once.
        let err = c
            .fetch_range(&r, &digest(&d), data.len() as u64 - 10, 20)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(strip.seen().iter().all(|s| s.header("range").is_some()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_reader_large_blob() {
    bounded(120, async {
        let reg = Registry::start().await;
        let data = random_bytes(40 << 20, 31);
        let d = reg.uploader().blob("big/blob", &data).await;
        let c = client();
        let upstream = reg.addr().parse().unwrap();
        let k = 4;
        let opts = ParallelOptions::new(1 << 20, k);

        // 40 ranges of 1 MiB, 4 in flight.
        let proxy = Proxy::start(Some(upstream), |_| Action::Forward(Fault::None)).await;
        let r = reference(&format!("{}/big/blob:x", proxy.authority()));
        let s = c
            .fetch_blob_parallel(&r, &digest(&d), Some(data.len() as u64), &opts)
            .await
            .unwrap();
        assert_eq!(s.size(), Some(40 << 20));
        let got = read_all(s).await.unwrap();
        assert!(got == data, "parallel read differs");
        let seen = proxy.seen();
        let ranged: Vec<_> = seen
            .iter()
            .filter(|s| s.header("range").is_some())
            .collect();
        assert_eq!(ranged.len(), 40, "one request per range");
        let max = proxy.in_flight_max.load(Ordering::SeqCst);
        // The proxy counts a request as done when it has forwarded the last
        // byte, a moment after the client may already have started the
        // next range: one more than K can overlap there.
        assert!(
            (2..=k + 1).contains(&max),
            "in flight at most {k} (+1 in the proxy's accounting), and parallel: {max}"
        );

        // Bounded read-ahead: with a consumer that does not read, at most
        // K ranges (plus the one handed out) are fetched.
        let proxy = Proxy::start(Some(upstream), |_| Action::Forward(Fault::None)).await;
        let r = reference(&format!("{}/big/blob:x", proxy.authority()));
        let mut s = c
            .fetch_blob_parallel(&r, &digest(&d), None, &opts)
            .await
            .unwrap();
        assert_eq!(s.size(), Some(40 << 20), "size from Content-Range");
        let first = s.next().await.unwrap().unwrap();
        assert!(first[..] == data[..first.len()]);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let fetched = proxy.seen().len();
        assert!(
            fetched <= k + 1,
            "read ahead of {fetched} ranges exceeds {}",
            k + 1
        );
        // The rest, without the size given.
        let mut rest = first.to_vec();
        while let Some(chunk) = s.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert!(rest == data);

        // No range support: one plain GET.
        let strip = Proxy::start(Some(upstream), |_| Action::Forward(Fault::StripRange)).await;
        let r = reference(&format!("{}/big/blob:x", strip.authority()));
        let s = c
            .fetch_blob_parallel(&r, &digest(&d), Some(data.len() as u64), &opts)
            .await
            .unwrap();
        assert!(read_all(s).await.unwrap() == data);
        assert_eq!(strip.seen().len(), 1, "fell back to one GET");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_toml_mirrors_in_order() {
    bounded(60, async {
        let reg = Registry::start().await;
        let img = reg
            .uploader()
            .image(
                "mirror/app",
                Some("v1"),
                &ImageSpec::new("amd64", vec![random_bytes(200_000, 41)]),
            )
            .await;
        let down = closed_port();
        let m404 = Proxy::start(None, |_| respond(404, "nope")).await;
        let m500 = Proxy::start(None, |_| respond(500, "broken")).await;
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join(reg.addr());
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                r#"server = "{server}"

[host."http://127.0.0.1:{down}"]
  capabilities = ["pull", "resolve"]

[host."{m404}"]
  capabilities = ["pull", "resolve"]

[host."{m500}"]
  capabilities = ["pull"]
  [host."{m500}".header]
    x-strata-test = "mirror-500"
"#,
                server = reg.url(),
                m404 = m404.url(),
                m500 = m500.url(),
            ),
        )
        .unwrap();
        let mut cfg = config();
        cfg.config_path = Some(dir.path().to_path_buf());
        let c = Client::new(cfg).unwrap();
        let r = reference(&format!("{}/mirror/app:v1", reg.addr()));
        let res = c
            .resolve(&r, &Platform::new("linux", "amd64", None))
            .await
            .unwrap();
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        let layer = &img.layers[0];
        let got = read_all(c.fetch_blob(&r, &digest(layer), None).await.unwrap())
            .await
            .unwrap();
        assert_eq!(digest_of(&got), *layer);

        // `ns` is query-encoded, as containerd's url.Values does.
        let ns = format!("ns={}", reg.addr().replace(':', "%3A"));
        let s404 = m404.seen();
        let s500 = m500.seen();
        // The tag was resolved through the resolve-capable mirror only.
        assert!(s404
            .iter()
            .any(|s| s.target == format!("/v2/mirror/app/manifests/v1?{ns}")));
        assert!(s500.iter().all(|s| !s.target.contains("/manifests/v1")));
        // Blobs: the 404 mirror, then the 500 mirror (once: mirrors are not
        // retried), then the server.
        let blob_gets = |seen: &[Seen]| -> Vec<Seen> {
            seen.iter()
                .filter(|s| s.target.contains("/blobs/"))
                .cloned()
                .collect()
        };
        let (b404, b500) = (blob_gets(&s404), blob_gets(&s500));
        assert_eq!(b404.len(), 2, "config and layer: {b404:?}");
        assert_eq!(b500.len(), 2, "config and layer: {b500:?}");
        for (a, b) in b404.iter().zip(&b500) {
            assert!(a.seq < b.seq, "404 mirror before 500 mirror");
            assert_eq!(a.target, b.target);
            assert!(a.target.ends_with(&ns));
            assert_eq!(b.header("x-strata-test"), Some("mirror-500"));
            assert_eq!(a.header("x-strata-test"), None);
        }

        // A parallel read asks the failing mirrors once (the probe); its
        // ranges then go straight to the host that served it.
        let s = c
            .fetch_blob_parallel(&r, &digest(layer), None, &ParallelOptions::new(32 << 10, 3))
            .await
            .unwrap();
        assert_eq!(digest_of(&read_all(s).await.unwrap()), *layer);
        assert_eq!(blob_gets(&m404.seen()).len(), 3);
        assert_eq!(blob_gets(&m500.seen()).len(), 3);

        // When every host fails, the error names each with what it did.
        let dead = closed_port();
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            format!(
                "server = \"http://127.0.0.1:{dead}\"\n[host.\"{}\"]\n",
                m404.url()
            ),
        )
        .unwrap();
        let err = c
            .resolve(&reference("nothere.test:5000/x/y:z"), &Platform::host())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Fetch { .. }), "{msg}");
        assert!(
            msg.contains(&format!("{}: HTTP 404", m404.authority())),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("127.0.0.1:{dead}: connect failed")),
            "{msg}"
        );
        assert!(msg.contains("(4 attempts)"), "{msg}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_htpasswd_registry() {
    bounded(60, async {
        let reg = Registry::start_with(Some(("alice", "s3cret"))).await;
        let img = reg
            .uploader()
            .image(
                "private/app",
                Some("v1"),
                &ImageSpec::new("amd64", vec![random_bytes(50_000, 51)]),
            )
            .await;
        let r = reference(&format!("{}/private/app:v1", reg.addr()));
        let amd64 = Platform::new("linux", "amd64", None);

        // Explicit user:pass.
        let mut cfg = config();
        cfg.credentials = Some(Credentials::parse("alice:s3cret").unwrap());
        let c = Client::new(cfg).unwrap();
        let res = c.resolve(&r, &amd64).await.unwrap();
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        let layer = read_all(
            c.fetch_blob(&r, &digest(&img.layers[0]), None)
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(digest_of(&layer), img.layers[0]);

        // docker config.json: "auth" (base64) and username/password forms.
        let dir = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        for entry in [
            format!(r#"{{"auth": "{b64}"}}"#),
            r#"{"username": "alice", "password": "s3cret"}"#.to_string(),
        ] {
            let path = dir.path().join("config.json");
            std::fs::write(
                &path,
                format!(r#"{{"auths": {{"http://{}": {entry}}}}}"#, reg.addr()),
            )
            .unwrap();
            let mut cfg = config();
            cfg.docker_config = DockerConfig::Path(path);
            let c = Client::new(cfg).unwrap();
            let res = c.resolve(&r, &amd64).await.unwrap();
            assert_eq!(res.config.digest.to_string(), img.config_digest);
        }

        // No credentials, and wrong ones.
        let err = client().resolve(&r, &amd64).await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        assert!(err.to_string().contains("no credentials"), "{err}");
        let mut cfg = config();
        cfg.credentials = Some(Credentials::new("alice", "wrong"));
        let err = Client::new(cfg)
            .unwrap()
            .resolve(&r, &amd64)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "no secrets in errors: {err}"
        );
    })
    .await;
}

/// A Bearer-token gate in front of the registry: `/v2/*` needs
/// `Bearer <current token>`, `/token` hands it out (to anyone, or only with
/// the right Basic credentials).
struct Gate {
    proxy: Proxy,
    token: Arc<Mutex<String>>,
    token_requests: Arc<AtomicUsize>,
    scopes: Arc<Mutex<Vec<String>>>,
}

async fn start_gate(upstream: &Registry, repo: &'static str, require_basic: Option<&str>) -> Gate {
    let token = Arc::new(Mutex::new("tok-1".to_string()));
    let token_requests = Arc::new(AtomicUsize::new(0));
    let scopes = Arc::new(Mutex::new(Vec::new()));
    let realm = Arc::new(Mutex::new(String::new()));
    let require = require_basic.map(|up| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(up)
        )
    });
    let (t, n, sc, re) = (
        token.clone(),
        token_requests.clone(),
        scopes.clone(),
        realm.clone(),
    );
    let proxy = Proxy::start(Some(upstream.addr().parse().unwrap()), move |s| {
        let current = t.lock().unwrap().clone();
        if s.target.starts_with("/token") {
            n.fetch_add(1, Ordering::SeqCst);
            sc.lock().unwrap().push(s.target.clone());
            if let Some(req) = &require {
                if s.header("authorization") != Some(req.as_str()) {
                    return respond(401, "bad credentials");
                }
            }
            return respond(
                200,
                &format!(r#"{{"token": "{current}", "expires_in": 300}}"#),
            );
        }
        if s.header("authorization") == Some(format!("Bearer {current}").as_str()) {
            return Action::Forward(Fault::None);
        }
        Action::Respond {
            status: 401,
            headers: vec![(
                "WWW-Authenticate".into(),
                format!(
                    r#"Bearer realm="{}",service="strata-test",scope="repository:{repo}:pull""#,
                    re.lock().unwrap()
                ),
            )],
            body: b"{}".to_vec(),
        }
    })
    .await;
    *realm.lock().unwrap() = format!("{}/token", proxy.url());
    Gate {
        proxy,
        token,
        token_requests,
        scopes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow() {
    bounded(60, async {
        let reg = Registry::start().await;
        let up = reg.uploader();
        let img = up
            .image(
                "gated/app",
                Some("v1"),
                &ImageSpec::new(
                    "amd64",
                    vec![random_bytes(3 << 20, 61), random_bytes(1000, 62)],
                ),
            )
            .await;
        let amd64 = Platform::new("linux", "amd64", None);

        // Anonymous tokens.
        let gate = start_gate(&reg, "gated/app", None).await;
        let r = reference(&format!("{}/gated/app:v1", gate.proxy.authority()));
        let c = client();
        let res = c.resolve(&r, &amd64).await.unwrap();
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        let big = digest(&img.layers[0]);
        let s = c
            .fetch_blob_parallel(&r, &big, None, &ParallelOptions::new(512 << 10, 4))
            .await
            .unwrap();
        assert_eq!(digest_of(&read_all(s).await.unwrap()), img.layers[0]);
        // One token served everything (cached per host and scope).
        assert_eq!(gate.token_requests.load(Ordering::SeqCst), 1);
        let scope = gate.scopes.lock().unwrap()[0].clone();
        assert!(scope.contains("service=strata-test"), "{scope}");
        assert!(
            scope.contains("scope=repository%3Agated%2Fapp%3Apull"),
            "{scope}"
        );
        assert!(
            gate.proxy.seen()[0].header("authorization").is_none(),
            "first try is anonymous"
        );

        // The registry rotates its token: the client refetches once.
        *gate.token.lock().unwrap() = "tok-2".into();
        let got = c
            .fetch_blob_bytes(&r, &digest(&img.layers[1]), None)
            .await
            .unwrap();
        assert_eq!(digest_of(&got), img.layers[1]);
        assert_eq!(gate.token_requests.load(Ordering::SeqCst), 2);

        // Tokens that need credentials: from docker's config.json.
        let gate = start_gate(&reg, "gated/app", Some("alice:s3cret")).await;
        let r = reference(&format!("{}/gated/app:v1", gate.proxy.authority()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"{}": {{"auth": "{b64}"}}}}}}"#,
                gate.proxy.authority()
            ),
        )
        .unwrap();
        let mut cfg = config();
        cfg.docker_config = DockerConfig::Path(path);
        let res = Client::new(cfg).unwrap().resolve(&r, &amd64).await.unwrap();
        assert_eq!(res.config.digest.to_string(), img.config_digest);

        let err = client().resolve(&r, &amd64).await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        assert!(err.to_string().contains("token endpoint"), "{err}");
        assert!(
            !err.to_string().contains("tok-"),
            "no tokens in errors: {err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived_byte_exact() {
    bounded(120, async {
        let reg = Registry::start().await;
        let layers = vec![
            random_bytes(1024, 71),
            random_bytes(3 << 20, 72),
            random_bytes(12 << 20, 73),
        ];
        let img = reg
            .uploader()
            .image(
                "faulty/app",
                Some("v1"),
                &ImageSpec::new("amd64", layers.clone()),
            )
            .await;

        // The first try of every distinct request (method, path, range) gets
        // a fault, in turn: 503, reset mid-body, stall mid-body, none.
        let attempts = Arc::new(Attempts::default());
        let counter = Arc::new(AtomicUsize::new(0));
        let faults = Arc::new(Mutex::new([0usize; 4]));
        let (a, n, f) = (attempts.clone(), counter.clone(), faults.clone());
        let proxy = Proxy::start(Some(reg.addr().parse().unwrap()), move |s| {
            let key = format!(
                "{} {} {}",
                s.method,
                s.target,
                s.header("range").unwrap_or("")
            );
            if a.bump(&key) > 0 {
                return Action::Forward(Fault::None);
            }
            let i = n.fetch_add(1, Ordering::SeqCst) % 4;
            f.lock().unwrap()[i] += 1;
            match i {
                0 => respond(503, "try later"),
                1 => Action::Forward(Fault::ResetAfter(64 << 10)),
                // Longer than the whole test may take: only stall detection gets past it.
                2 => Action::Forward(Fault::StallAfter(64 << 10, Duration::from_secs(600))),
                _ => Action::Forward(Fault::None),
            }
        })
        .await;

        let mut cfg = config();
        cfg.retry.max_attempts = 6;
        cfg.retry.stall_timeout = Duration::from_millis(300);
        let c = Client::new(cfg).unwrap();
        let r = reference(&format!("{}/faulty/app:v1", proxy.authority()));
        let res = c
            .resolve(&r, &Platform::new("linux", "amd64", None))
            .await
            .unwrap();
        assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        assert_eq!(&res.config.bytes[..], &img.config_bytes[..]);

        for (d, data) in img.layers.iter().zip(&layers) {
            let s = c
                .fetch_blob(&r, &digest(d), Some(data.len() as u64))
                .await
                .unwrap();
            assert!(read_all(s).await.unwrap() == *data, "whole blob {d}");
        }
        let big = (&img.layers[2], &layers[2]);
        let s = c
            .fetch_blob_parallel(&r, &digest(big.0), None, &ParallelOptions::new(1 << 20, 4))
            .await
            .unwrap();
        assert!(collect(s).await.unwrap() == *big.1, "parallel");
        for (off, len) in [(5usize << 20, 2usize << 20), (123, 456_789)] {
            let got = c
                .fetch_range(&r, &digest(big.0), off as u64, len as u64)
                .await
                .unwrap();
            assert!(got[..] == big.1[off..off + len], "range {off}+{len}");
        }
        let injected = *faults.lock().unwrap();
        assert!(
            injected[..3].iter().all(|&x| x > 0),
            "each fault kind injected: {injected:?}"
        );
        // Broken whole-blob bodies were resumed from where they broke.
        let resumed = proxy
            .seen()
            .iter()
            .filter_map(|s| s.header("range").map(str::to_string))
            .filter(|r| r.ends_with('-') && r != "bytes=0-")
            .count();
        assert!(resumed > 0, "no resumed reads");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_failures_give_up_with_clear_errors() {
    bounded(60, async {
        let reg = Registry::start().await;
        let up = reg.uploader();
        let data = random_bytes(200_000, 81);
        let d = up.blob("broken/app", &data).await;
        let upstream = reg.addr().parse().unwrap();
        let mut cfg = config();
        cfg.retry.max_attempts = 3;
        cfg.retry.max_resumes = 5;
        cfg.retry.stall_timeout = Duration::from_millis(200);
        let c = Client::new(cfg).unwrap();

        // Always 503.
        let p = Proxy::start(Some(upstream), |_| respond(503, "down")).await;
        let r = reference(&format!("{}/broken/app:x", p.authority()));
        let err = c.fetch_blob(&r, &digest(&d), None).await.unwrap_err();
        assert_eq!(err.status(), Some(503));
        let msg = err.to_string();
        for part in [
            d.as_str(),
            &p.authority(),
            "HTTP 503 Service Unavailable",
            "(3 attempts)",
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg}");
        }
        assert_eq!(p.seen().len(), 3, "bounded attempts");

        // Always stalls right after the headers: no progress, gives up.
        let p = Proxy::start(Some(upstream), |_| {
            Action::Forward(Fault::StallAfter(0, Duration::from_secs(2)))
        })
        .await;
        let r = reference(&format!("{}/broken/app:x", p.authority()));
        let s = c.fetch_blob(&r, &digest(&d), None).await.unwrap();
        let err = collect(s).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("stalled") && msg.contains("gave up"), "{msg}");
        assert!(msg.contains(&d), "{msg}");

        // Resets after a little progress each time: bounded by max_resumes.
        let p = Proxy::start(Some(upstream), |_| Action::Forward(Fault::ResetAfter(1000))).await;
        let r = reference(&format!("{}/broken/app:x", p.authority()));
        let s = c.fetch_blob(&r, &digest(&d), None).await.unwrap();
        let err = collect(s).await.unwrap_err();
        assert!(
            err.to_string().contains("gave up after 6 broken responses"),
            "{err}"
        );
        assert_eq!(p.seen().len(), 6);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verification_skip_verify_and_ca() {
    bounded(60, async {
        let reg = Registry::start().await;
        let img = reg
            .uploader()
            .image(
                "tls/app",
                Some("v1"),
                &ImageSpec::new("amd64", vec![random_bytes(10_000, 91)]),
            )
            .await;
        let front = TlsFront::start(reg.addr().parse().unwrap()).await;
        let ns = format!("127.0.0.1:{}", front.port);
        let r = reference(&format!("{ns}/tls/app:v1"));
        let amd64 = Platform::new("linux", "amd64", None);
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join(&ns);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("ca.pem"), &front.ca_pem).unwrap();
        let hosts = |extra: &str| {
            std::fs::write(
                host_dir.join("hosts.toml"),
                format!("server = \"https://{ns}\"\n{extra}\n"),
            )
            .unwrap()
        };
        let client_with = |global_skip: bool| {
            let mut cfg = config();
            cfg.config_path = Some(dir.path().to_path_buf());
            cfg.skip_verify = global_skip;
            Client::new(cfg).unwrap()
        };

        // An unknown CA is refused.
        hosts("");
        let err = client_with(false).resolve(&r, &amd64).await.unwrap_err();
        assert!(matches!(err, Error::Fetch { .. }), "{err}");
        assert!(err.to_string().contains(&ns), "{err}");
        // Per-host skip_verify, a per-host CA (relative to the host dir),
        // and the global switch all get through.
        for (extra, global) in [
            ("skip_verify = true", false),
            ("ca = \"ca.pem\"", false),
            ("", true),
        ] {
            hosts(extra);
            let res = client_with(global)
                .resolve(&r, &amd64)
                .await
                .unwrap_or_else(|e| panic!("{extra:?} global={global}: {e}"));
            assert_eq!(res.manifest.digest.to_string(), img.manifest_digest);
        }
        // A host's explicit skip_verify = false beats the global switch.
        hosts("skip_verify = false");
        assert!(client_with(true).resolve(&r, &amd64).await.is_err());
    })
    .await;
}
