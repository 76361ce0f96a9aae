//! The client: configuration, shared HTTP connections, and the request
//! engine that every fetch goes through (hosts in order, auth, retries).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};

use crate::auth::{
    parse_challenge, AuthCache, AuthHeader, CredentialStore, Credentials, DockerConfig, TokenError,
};
use crate::error::{Error, Result};
use crate::hosts::{load_hosts, Capability, HostsOptions, RegistryHost, TlsSettings};
use crate::reference::Reference;
use crate::retry::RetryPolicy;

/// How to build a [`Client`]. Start from `ClientConfig::default()` and set
/// fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// containerd's `config_path`: a directory of `<host>/hosts.toml`
    /// files (see the `hosts` module docs). `None`: every registry is its
    /// own only host.
    pub config_path: Option<PathBuf>,
    /// Use plain HTTP for registries that `hosts.toml` does not configure
    /// (like `ctr --plain-http`).
    pub plain_http: bool,
    /// Do not verify TLS certificates, unless a host's `skip_verify` says
    /// otherwise (like `ctr --skip-verify`).
    pub skip_verify: bool,
    /// Explicit credentials, used for every host (like `ctr --user`).
    pub credentials: Option<Credentials>,
    /// Where docker's `config.json` is; used when `credentials` is `None`.
    pub docker_config: DockerConfig,
    /// Retries, backoff, stall detection.
    pub retry: RetryPolicy,
    /// TCP + TLS connect timeout (a host's `dial_timeout` overrides it).
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to its response headers.
    pub request_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
    /// Allow HTTP/2 (negotiated by ALPN over TLS). Off by default: parallel
    /// range reads then get one TCP connection each instead of sharing one
    /// HTTP/2 connection's flow-control window.
    pub http2: bool,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            config_path: None,
            plain_http: false,
            skip_verify: false,
            credentials: None,
            docker_config: DockerConfig::Default,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_idle_per_host: 16,
            http2: false,
            user_agent: concat!("strata-registry/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// An OCI registry client. Cheap to clone; clones share connections, tokens
/// and configuration.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    hosts: HostsOptions,
    creds: CredentialStore,
    auth: AuthCache,
    /// One HTTP client per distinct TLS setup; almost always just one.
    http: Mutex<HashMap<TlsSettings, reqwest::Client>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config_path", &self.inner.config.config_path)
            .field("plain_http", &self.inner.config.plain_http)
            .finish_non_exhaustive()
    }
}

/// What one operation talks to: the namespace, repository and hosts.
pub(crate) struct Target {
    pub ns: String,
    pub repository: String,
    pub hosts: Vec<RegistryHost>,
    pub scope: String,
    /// For errors and logs: "blob sha256:… of registry/repo".
    pub what: String,
    /// Index of the first host still worth trying: once a host has served
    /// this operation (a blob's probe, one of its ranges), later requests
    /// of the same operation (other ranges, resumes) start there instead of
    /// asking the mirrors that already failed it again.
    pub start: AtomicUsize,
}

/// A response with a 2xx status, and where it came from.
pub(crate) struct Sent {
    pub resp: reqwest::Response,
    pub authority: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    NotFound,
    Unauthorized,
    Retryable,
    Other,
}

struct Failure {
    kind: FailKind,
    detail: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(kind: FailKind, detail: impl Into<String>, status: Option<u16>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
            status,
            retry_after: None,
        }
    }
}

impl Client {
    /// Builds a client. Reads docker's `config.json` now; `hosts.toml`
    /// files are read at each operation, so edits apply without restart.
    pub fn new(config: ClientConfig) -> Result<Client> {
        let creds = CredentialStore::load(config.credentials.clone(), &config.docker_config)?;
        let hosts = HostsOptions {
            config_path: config.config_path.clone(),
            plain_http: config.plain_http,
            skip_verify: config.skip_verify,
        };
        let client = Client {
            inner: Arc::new(Inner {
                config,
                hosts,
                creds,
                auth: AuthCache::default(),
                http: Mutex::new(HashMap::new()),
            }),
        };
        // Build the default HTTP client now so a TLS setup error shows early.
        client.http_for(&TlsSettings {
            skip_verify: client.inner.config.skip_verify,
            ..Default::default()
        })?;
        Ok(client)
    }

    pub(crate) fn retry(&self) -> &RetryPolicy {
        &self.inner.config.retry
    }

    /// The hosts for `reference` that have `cap`, mirrors first.
    pub(crate) async fn target(
        &self,
        reference: &Reference,
        cap: Capability,
        what: String,
    ) -> Result<Target> {
        let ns = reference.registry();
        let all = load_hosts(&self.inner.hosts, ns).await?;
        let hosts: Vec<RegistryHost> = all.into_iter().filter(|h| h.has(cap)).collect();
        if hosts.is_empty() {
            return Err(Error::Config(format!(
                "no host for {ns} has the {} capability",
                match cap {
                    Capability::Pull => "pull",
                    Capability::Resolve => "resolve",
                }
            )));
        }
        Ok(Target {
            ns: ns.to_string(),
            repository: reference.repository().to_string(),
            hosts,
            scope: format!("repository:{}:pull", reference.repository()),
            what,
            start: AtomicUsize::new(0),
        })
    }

    fn http_for(&self, tls: &TlsSettings) -> Result<reqwest::Client> {
        {
            let map = self.inner.http.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = map.get(tls) {
                return Ok(c.clone());
            }
        }
        let built = build_http(&self.inner.config, tls)?;
        let mut map = self.inner.http.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.entry(tls.clone()).or_insert(built).clone())
    }

    /// Sends `method` to `<host>/<repository>/<suffix>` on each host in
    /// order until one answers 2xx. Mirrors get one attempt; the last host
    /// gets `max_attempts` with backoff on retryable failures. The error
    /// lists what every host answered.
    pub(crate) async fn send(
        &self,
        t: &Target,
        method: Method,
        suffix: &str,
        extra: &HeaderMap,
    ) -> Result<Sent> {
        let policy = self.retry();
        let mut outcomes: Vec<(String, Failure, u32)> = Vec::new();
        let n = t.hosts.len();
        let from = t.start.load(Ordering::Relaxed).min(n.saturating_sub(1));
        for (i, host) in t.hosts.iter().enumerate().skip(from) {
            let is_last = i + 1 == n;
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.send_once(t, host, &method, suffix, extra).await {
                    Ok(resp) => {
                        t.start.fetch_max(i, Ordering::Relaxed);
                        return Ok(Sent {
                            resp,
                            authority: host.authority.clone(),
                        });
                    }
                    Err(f) => {
                        let again =
                            f.kind == FailKind::Retryable && is_last && attempt < policy.attempts();
                        if again {
                            let pause = policy.backoff(attempt, f.retry_after);
                            tracing::warn!(
                                host = %host.authority, what = %t.what, attempt,
                                detail = %f.detail, pause_ms = pause.as_millis() as u64,
                                "registry request failed; retrying"
                            );
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        if !is_last {
                            tracing::info!(
                                host = %host.authority, what = %t.what, detail = %f.detail,
                                "registry host failed; trying the next host"
                            );
                        }
                        outcomes.push((host.authority.clone(), f, attempt));
                        break;
                    }
                }
            }
        }
        Err(summarize(&t.what, outcomes))
    }

    async fn send_once(
        &self,
        t: &Target,
        host: &RegistryHost,
        method: &Method,
        suffix: &str,
        extra: &HeaderMap,
    ) -> std::result::Result<reqwest::Response, Failure> {
        let http = self
            .http_for(&host.tls)
            .map_err(|e| Failure::new(FailKind::Other, e.to_string(), None))?;
        let url = host.url(&t.ns, &t.repository, suffix);
        let creds = self.inner.creds.get(&host.authority);
        let timeout = self.inner.config.request_timeout;
        let mut answered_challenge = false;
        loop {
            let auth = match self
                .inner
                .auth
                .header(&http, creds, &host.authority, &t.scope, timeout)
                .await
            {
                Ok(a) => a,
                Err(TokenError::Unauthorized(d)) => {
                    return Err(Failure::new(FailKind::Unauthorized, d, Some(401)))
                }
                Err(TokenError::Transient(d, s)) => {
                    return Err(Failure::new(FailKind::Retryable, d, s))
                }
                Err(TokenError::Fatal(e)) => {
                    return Err(Failure::new(FailKind::Other, e.to_string(), e.status()))
                }
            };
            let mut req = http.request(method.clone(), &url);
            for (k, v) in &host.headers {
                let name = HeaderName::from_bytes(k.as_bytes());
                let value = HeaderValue::from_str(v);
                match (name, value) {
                    (Ok(name), Ok(value)) => req = req.header(name, value),
                    _ => {
                        return Err(Failure::new(
                            FailKind::Other,
                            format!("invalid header {k:?} in hosts.toml"),
                            None,
                        ))
                    }
                }
            }
            for (k, v) in extra {
                req = req.header(k, v.clone());
            }
            let sent_auth = matches!(auth, AuthHeader::Value(_));
            if let AuthHeader::Value(v) = auth {
                req = req.header(AUTHORIZATION, v);
            }
            tracing::debug!(%method, host = %host.authority, suffix, "registry request");
            let resp = match tokio::time::timeout(timeout, req.send()).await {
                Err(_) => {
                    return Err(Failure::new(
                        FailKind::Retryable,
                        format!("no response within {timeout:?}"),
                        None,
                    ))
                }
                Ok(Err(e)) => {
                    let detail = describe(&e);
                    // A certificate the host will present again is not worth retrying.
                    let kind = if e.is_builder() || detail.contains("certificate") {
                        FailKind::Other
                    } else {
                        FailKind::Retryable
                    };
                    return Err(Failure::new(kind, detail, None));
                }
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            tracing::debug!(%method, host = %host.authority, suffix, status = status.as_u16(), "registry response");
            if status == StatusCode::UNAUTHORIZED {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                if answered_challenge {
                    return Err(Failure::new(
                        FailKind::Unauthorized,
                        if creds.is_some() {
                            "HTTP 401 Unauthorized: credentials or token rejected".to_string()
                        } else {
                            "HTTP 401 Unauthorized: anonymous access refused and no credentials are configured".to_string()
                        },
                        Some(401),
                    ));
                }
                if sent_auth {
                    self.inner.auth.invalidate(&host.authority, &t.scope).await;
                }
                if !self.inner.auth.learn(&host.authority, challenge) {
                    return Err(Failure::new(
                        FailKind::Unauthorized,
                        "HTTP 401 Unauthorized without a Basic or Bearer challenge",
                        Some(401),
                    ));
                }
                answered_challenge = true;
                continue;
            }
            return classify(resp);
        }
    }
}

fn classify(resp: reqwest::Response) -> std::result::Result<reqwest::Response, Failure> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let code = status.as_u16();
    let detail = format!("HTTP {status}");
    let kind = match code {
        404 => FailKind::NotFound,
        403 => FailKind::Unauthorized,
        408 | 429 => FailKind::Retryable,
        c if c >= 500 => FailKind::Retryable,
        _ => FailKind::Other,
    };
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Err(Failure {
        kind,
        detail,
        status: Some(code),
        retry_after,
    })
}

/// Turns per-host outcomes into one error. The last host (the server)
/// decides the kind; the detail lists every host.
fn summarize(what: &str, outcomes: Vec<(String, Failure, u32)>) -> Error {
    let detail = outcomes
        .iter()
        .map(|(host, f, attempts)| {
            if *attempts > 1 {
                format!("{host}: {} ({attempts} attempts)", f.detail)
            } else {
                format!("{host}: {}", f.detail)
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    let what = what.to_string();
    match outcomes.last() {
        Some((_, f, _)) if f.kind == FailKind::NotFound => Error::NotFound { what, detail },
        Some((_, f, _)) if f.kind == FailKind::Unauthorized => Error::Unauthorized { what, detail },
        Some((_, f, _)) => Error::Fetch {
            what,
            detail,
            status: f.status,
        },
        None => Error::Fetch {
            what,
            detail: "no host to try".into(),
            status: None,
        },
    }
}

fn build_http(config: &ClientConfig, tls: &TlsSettings) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .user_agent(config.user_agent.clone())
        .connect_timeout(tls.dial_timeout.unwrap_or(config.connect_timeout))
        .pool_max_idle_per_host(config.max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::limited(10));
    if !config.http2 {
        b = b.http1_only();
    }
    if tls.skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    for ca in &tls.ca {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::Config(format!("CA file {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::Config(format!("CA file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "CA file {}: no certificate",
                ca.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = tls.client.first() {
        if tls.client.len() > 1 {
            tracing::warn!("several client certificates configured for one host; using the first");
        }
        let mut pem = std::fs::read(cert)
            .map_err(|e| Error::Config(format!("client certificate {}: {e}", cert.display())))?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key)
                    .map_err(|e| Error::Config(format!("client key {}: {e}", key.display())))?,
            );
        }
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| Error::Config(format!("client certificate {}: {e}", cert.display())))?;
        b = b.identity(id);
    }
    b.build()
        .map_err(|e| Error::Config(format!("building the HTTP client: {}", describe(&e))))
}

/// A reqwest error with its cause chain ("connection refused", "connection
/// reset by peer"), without the URL.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    } else if e.is_connect() {
        parts.push("connect failed".to_string());
    } else if e.is_body() || e.is_decode() {
        parts.push("body read failed".to_string());
    } else if e.is_redirect() {
        parts.push("redirect failed".to_string());
    } else {
        parts.push("request failed".to_string());
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// A response body that fails when no byte arrives for `stall` — the
/// stall detector every body read goes through.
pub(crate) struct Body {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    stall: Duration,
}

impl Body {
    pub fn new(resp: reqwest::Response, stall: Duration) -> Self {
        Body {
            stream: Box::pin(resp.bytes_stream()),
            stall,
        }
    }

    /// The next chunk, `Ok(None)` at the end, or what went wrong.
    pub async fn next(&mut self) -> std::result::Result<Option<Bytes>, String> {
        match tokio::time::timeout(self.stall, self.stream.next()).await {
            Err(_) => Err(format!("stalled: no data for {:?}", self.stall)),
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => Ok(Some(b)),
            Ok(Some(Err(e))) => Err(describe(&e)),
        }
    }
}
