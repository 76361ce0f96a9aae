//! Test fixtures: a real `docker-registry` on loopback, image uploads over
//! plain HTTP, and a small HTTP/1.1 proxy that injects faults or plays a
//! token server. Everything listens on 127.0.0.1 only and stops on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::net::{TcpListener, TcpStream};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Deterministic pseudo-random bytes (xorshift), so blobs are incompressible
/// and distinct per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A `docker-registry` process with filesystem storage in a temp dir,
/// killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
    pub basic: Option<(String, String)>,
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with(None).await
    }

    /// With `Some((user, pass))`, the registry requires Basic auth via an
    /// htpasswd file (bcrypt).
    pub async fn start_with(basic: Option<(&str, &str)>) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: apt-get install -y docker-registry"
        );
        let mut last_err = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = closed_port();
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            let mut auth = String::new();
            if let Some((user, pass)) = basic {
                let hash = bcrypt::hash(pass, 5).unwrap();
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
                auth = format!(
                    "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                    htpasswd.display()
                );
            }
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: strata-test-secret\n{auth}",
                data.display()
            );
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            let mut reg = Registry {
                port,
                dir,
                child,
                basic: basic.map(|(u, p)| (u.to_string(), p.to_string())),
            };
            match reg.wait_ready().await {
                Ok(()) => return reg,
                // Dropping `reg` kills the process; try another port.
                Err(e) => last_err = e,
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                return Err(format!("exited with {status}: {log}"));
            }
            if let Ok(r) = http.get(format!("{}/v2/", self.url())).send().await {
                if r.status().as_u16() == 200 || r.status().as_u16() == 401 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("no answer on /v2/ within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps a blob's bytes (filesystem driver layout).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// XORs one byte of a stored blob with `mask` (same size, wrong content).
    pub fn corrupt(&self, digest: &str, at: usize, mask: u8) {
        let p = self.blob_path(digest);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[at] ^= mask;
        std::fs::write(&p, bytes).unwrap();
    }

    pub fn uploader(&self) -> Uploader {
        Uploader {
            base: self.url(),
            http: reqwest::Client::new(),
            basic: self.basic.clone(),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes blobs and manifests with plain HTTP calls.
pub struct Uploader {
    base: String,
    http: reqwest::Client,
    basic: Option<(String, String)>,
}

impl Uploader {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.basic {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// POST an upload, then PUT the bytes with `?digest=`.
    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = digest_of(data);
        let r = self
            .auth(
                self.http
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.base)),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            202,
            "start upload: {:?}",
            r.text().await
        );
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .auth(self.http.put(format!("{loc}{sep}digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "finish upload: {:?}",
            r.text().await
        );
        digest
    }

    /// PUT a manifest under a tag or digest; returns its digest.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let r = self
            .auth(
                self.http
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
            )
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 201, "put manifest: {:?}", r.text().await);
        digest_of(bytes)
    }

    /// Pushes an image (layers, config, manifest) and returns it.
    pub async fn image(&self, repo: &str, tag: Option<&str>, spec: &ImageSpec) -> PushedImage {
        let mut layers = Vec::new();
        for l in &spec.layers {
            let d = self.blob(repo, l).await;
            layers.push((d, l.len()));
        }
        let diff_ids: Vec<String> = spec.layers.iter().map(|l| digest_of(l)).collect();
        let mut platform = serde_json::json!({});
        platform["architecture"] = spec.arch.clone().into();
        platform["os"] = spec.os.clone().into();
        if let Some(v) = &spec.variant {
            platform["variant"] = v.clone().into();
        }
        let mut config = serde_json::json!({
            "architecture": spec.arch,
            "os": spec.os,
            "config": {"Env": ["STRATA_TEST=1"], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(v) = &spec.variant {
            config["variant"] = v.clone().into();
        }
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = self.blob(repo, &config_bytes).await;
        let (mt, config_mt, layer_mt) = if spec.docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": config_mt, "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({
                "mediaType": layer_mt, "digest": d, "size": s
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).unwrap();
        let manifest_digest = digest_of(&manifest_bytes);
        self.manifest(repo, tag.unwrap_or(&manifest_digest), mt, &manifest_bytes)
            .await;
        PushedImage {
            manifest_digest,
            manifest_bytes,
            media_type: mt.to_string(),
            config_digest,
            config_bytes,
            layers: layers.into_iter().map(|(d, _)| d).collect(),
            platform,
        }
    }

    /// Pushes an index (OCI, or a Docker list) over already pushed images.
    pub async fn index(
        &self,
        repo: &str,
        tag: &str,
        images: &[&PushedImage],
        docker: bool,
    ) -> (String, Vec<u8>) {
        let mt = if docker {
            "application/vnd.docker.distribution.manifest.list.v2+json"
        } else {
            "application/vnd.oci.image.index.v1+json"
        };
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": images.iter().map(|i| serde_json::json!({
                "mediaType": i.media_type,
                "digest": i.manifest_digest,
                "size": i.manifest_bytes.len(),
                "platform": i.platform,
            })).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        let d = self.manifest(repo, tag, mt, &bytes).await;
        (d, bytes)
    }
}

#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
    pub layers: Vec<Vec<u8>>,
    pub docker: bool,
}

impl ImageSpec {
    pub fn new(arch: &str, layers: Vec<Vec<u8>>) -> Self {
        ImageSpec {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
            layers,
            docker: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PushedImage {
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub media_type: String,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub layers: Vec<String>,
    pub platform: serde_json::Value,
}

// A scriptable HTTP/1.1 proxy: strata's test kit.
pub use strata_testkit::{respond, Action, Attempts, Fault, Proxy, Seen};

/// Runs a test body with a hard time limit.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test took longer than {secs} s"));
}

// ---------------------------------------------------------------------------
// A TLS front: terminates TLS with a certificate from a throwaway test CA and
// tunnels the plain bytes to the registry.

pub struct TlsFront {
    pub port: u16,
    /// The test CA's certificate, PEM.
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsFront {
    pub async fn start(upstream: SocketAddr) -> TlsFront {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        use tokio_rustls::rustls;

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "strata-registry test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();

        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        );
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsFront {
            port,
            ca_pem: ca_cert.pem(),
            task,
        }
    }
}
