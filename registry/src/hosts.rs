//! Registry hosts from containerd's `hosts.toml` layout.
//!
//! For a registry namespace `ns` (`docker.io`, `127.0.0.1:5000`) under a
//! `config_path` directory, the first of these directories that exists is
//! used: `<config_path>/<host>_<port>_` (when `ns` has a port),
//! `<config_path>/<ns>`, `<config_path>/_default`. In it, `hosts.toml` lists:
//!
//! ```toml
//! server = "https://registry.example.com"   # the upstream; default: the namespace itself
//!
//! [host."http://mirror.local:5000"]         # mirrors, tried in file order, before the server
//!   capabilities = ["pull", "resolve"]      # default: pull, resolve (and push)
//!   skip_verify = true                      # TLS: do not verify the certificate
//!   ca = "/etc/certs/mirror.pem"            # TLS: extra root CA(s), a path or a list
//!   client = [["client.cert", "client.key"]] # TLS: client certificate(s)
//!   override_path = true                    # the URL path is the API root (no /v2 added)
//!   dial_timeout = "3s"
//!   [host."http://mirror.local:5000".header]
//!     x-custom = "value"                    # or a list of values
//! ```
//!
//! Top-level `capabilities`, `skip_verify`, `ca`, `client`, `header`,
//! `override_path` apply to the server entry. Without `hosts.toml`, a host
//! directory's `*.crt` files are CAs and `*.cert`/`*.key` pairs client
//! certificates (docker's `certs.d` layout). An `http://` URL is plain HTTP; a
//! URL without scheme is HTTPS. The server entry with no `server` key uses
//! HTTPS, or plain HTTP when the client's `plain_http` is set or the
//! namespace is a loopback host with a port other than 443 (containerd tries
//! HTTPS first there and falls back; this client goes straight to HTTP).
//!
//! Requests to a host other than the namespace's own get `?ns=<namespace>`,
//! as containerd sends, so a mirror serving several registries can tell them
//! apart. A malformed `hosts.toml` is an error (containerd logs and ignores
//! it; failing loudly is easier to debug).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

use crate::error::{Error, Result};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API};

/// How a host's TLS is set up; hosts with equal settings share one HTTP client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct TlsSettings {
    pub skip_verify: bool,
    pub ca: Vec<PathBuf>,
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub dial_timeout: Option<Duration>,
}

/// One endpoint to try for a registry namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegistryHost {
    pub scheme: String,
    /// `host[:port]`
    pub authority: String,
    /// The API root path, `/v2` unless `override_path`.
    pub path: String,
    pub pull: bool,
    pub resolve: bool,
    pub tls: TlsSettings,
    pub headers: Vec<(String, String)>,
}

/// Which capability an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Capability {
    /// Manifests by digest and blobs.
    Pull,
    /// Manifests by tag (needs pull as well, as in containerd).
    Resolve,
}

impl RegistryHost {
    pub fn has(&self, cap: Capability) -> bool {
        match cap {
            Capability::Pull => self.pull,
            Capability::Resolve => self.pull && self.resolve,
        }
    }

    /// Whether requests to this host for namespace `ns` are proxied requests
    /// (and so carry `?ns=`).
    fn is_proxy(&self, ns: &str) -> bool {
        ns != self.authority && !(ns == DOCKER_HUB && self.authority == DOCKER_HUB_API)
    }

    /// `scheme://authority/path/<repository>/<suffix>[?ns=<ns>]`
    pub fn url(&self, ns: &str, repository: &str, suffix: &str) -> String {
        let mut url = format!("{}://{}", self.scheme, self.authority);
        for part in [self.path.as_str(), repository, suffix] {
            let part = part.trim_matches('/');
            if !part.is_empty() {
                url.push('/');
                url.push_str(part);
            }
        }
        if self.is_proxy(ns) {
            url.push_str("?ns=");
            url.push_str(&urlencode(ns));
        }
        url
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The knobs that shape host lists.
#[derive(Clone, Debug, Default)]
pub(crate) struct HostsOptions {
    pub config_path: Option<PathBuf>,
    pub plain_http: bool,
    pub skip_verify: bool,
}

/// The hosts to try for namespace `ns`, mirrors first, server last.
/// Reads the files at every call, as containerd does, so edits apply
/// without a restart.
pub(crate) async fn load_hosts(opts: &HostsOptions, ns: &str) -> Result<Vec<RegistryHost>> {
    let mut entries: Option<Vec<HostEntry>> = None;
    if let Some(root) = &opts.config_path {
        if let Some(dir) = find_host_dir(root, ns).await? {
            tracing::debug!(dir = %dir.display(), ns, "loading registry host directory");
            let file = dir.join("hosts.toml");
            let text = match tokio::fs::read_to_string(&file).await {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::Config(format!("reading {}: {e}", file.display())));
                }
            };
            entries = Some(match text {
                Some(t) if !t.trim().is_empty() => parse_hosts_toml(&t, &dir)
                    .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?,
                _ => vec![cert_dir_entry(&dir).await?],
            });
        }
    }
    let mut entries = entries.unwrap_or_else(|| vec![HostEntry::default()]);
    if let Some(last) = entries.last_mut() {
        if last.url.is_none() {
            // The server entry with no `server`: the namespace itself.
            last.capabilities = None;
            last.override_path = false;
        }
    }
    entries.into_iter().map(|e| e.into_host(ns, opts)).collect()
}

async fn find_host_dir(root: &Path, ns: &str) -> Result<Option<PathBuf>> {
    let mut candidates = Vec::new();
    if let Some(idx) = ns.rfind(':') {
        if idx > 0 && !ns.ends_with(']') {
            candidates.push(root.join(format!("{}_{}_", &ns[..idx], &ns[idx + 1..])));
        }
    }
    candidates.push(root.join(ns));
    candidates.push(root.join("_default"));
    for c in candidates {
        match tokio::fs::metadata(&c).await {
            Ok(m) if m.is_dir() => return Ok(Some(c)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Config(format!("{}: {e}", c.display()))),
        }
    }
    Ok(None)
}

/// One `[host."…"]` table or the top level (the server).
#[derive(Clone, Debug, Default)]
struct HostEntry {
    url: Option<String>,
    capabilities: Option<(bool, bool)>,
    skip_verify: Option<bool>,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
    headers: Vec<(String, String)>,
    override_path: bool,
    dial_timeout: Option<Duration>,
}

impl HostEntry {
    fn into_host(self, ns: &str, opts: &HostsOptions) -> Result<RegistryHost> {
        let (scheme, authority, path) = match &self.url {
            Some(raw) => parse_host_url(raw, self.override_path)?,
            None => {
                let (scheme, authority) = if ns == DOCKER_HUB {
                    ("https".to_string(), DOCKER_HUB_API.to_string())
                } else if opts.plain_http || is_loopback_with_port(ns) {
                    ("http".to_string(), ns.to_string())
                } else {
                    ("https".to_string(), ns.to_string())
                };
                (scheme, authority, "/v2".to_string())
            }
        };
        let (pull, resolve) = self.capabilities.unwrap_or((true, true));
        Ok(RegistryHost {
            scheme,
            authority,
            path,
            pull,
            resolve,
            tls: TlsSettings {
                skip_verify: self.skip_verify.unwrap_or(opts.skip_verify),
                ca: self.ca,
                client: self.client,
                dial_timeout: self.dial_timeout,
            },
            headers: self.headers,
        })
    }
}

fn is_loopback_with_port(ns: &str) -> bool {
    let (host, port) = if let Some(rest) = ns.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((h, p)) => (h, p),
            None => return false,
        }
    } else {
        match ns.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => return false,
        }
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    loopback && port != "443"
}

/// Parses a host URL the way containerd does: no scheme means https; the
/// path gets `/v2` appended unless it already ends in `/v2` or
/// `override_path` is set.
fn parse_host_url(raw: &str, override_path: bool) -> Result<(String, String, String)> {
    let with_scheme = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_string()
    } else {
        format!("https://{raw}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|e| Error::Config(format!("invalid host URL {raw:?}: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| Error::Config(format!("host URL {raw:?} has no host")))?;
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut path = clean_path(url.path());
    if path.is_empty() {
        if !override_path {
            path = "/v2".into();
        }
    } else if !path.ends_with("/v2") && !override_path {
        path.push_str("/v2");
    }
    Ok((url.scheme().to_string(), authority, path))
}

/// `/a//b/./c/` is `/a/b/c`; `/` and `` are ``.
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("/{}", parts.join("/"))
    }
}

fn parse_hosts_toml(text: &str, dir: &Path) -> std::result::Result<Vec<HostEntry>, String> {
    // Not `{e}`: it quotes the offending line, which may hold a header's
    // credential; say where, not what.
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| match e.span() {
        Some(s) => {
            let before = &text.as_bytes()[..s.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    })?;
    let mut hosts = Vec::new();
    if let Some(h) = table.get("host") {
        let h = h
            .as_table()
            .ok_or_else(|| "\"host\" must be a table".to_string())?;
        // `preserve_order` keeps file order: mirrors are tried in that order.
        for (url, cfg) in h {
            let cfg = cfg
                .as_table()
                .ok_or_else(|| format!("host {url:?} must be a table"))?;
            let mut entry = parse_entry(cfg, dir).map_err(|e| format!("host {url:?}: {e}"))?;
            entry.url = Some(url.clone());
            hosts.push(entry);
        }
    }
    let mut server = parse_entry(&table, dir)?;
    server.url = match table.get("server") {
        None => None,
        Some(toml::Value::String(s)) if s.is_empty() => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("\"server\" must be a string".into()),
    };
    hosts.push(server);
    Ok(hosts)
}

fn parse_entry(t: &toml::Table, dir: &Path) -> std::result::Result<HostEntry, String> {
    let mut e = HostEntry::default();
    if let Some(caps) = t.get("capabilities") {
        let caps = string_list(caps).ok_or("\"capabilities\" must be a list of strings")?;
        if !caps.is_empty() {
            let (mut pull, mut resolve) = (false, false);
            for c in caps {
                match c.to_ascii_lowercase().as_str() {
                    "pull" => pull = true,
                    "resolve" => resolve = true,
                    "push" => {}
                    other => return Err(format!("unknown capability {other:?}")),
                }
            }
            e.capabilities = Some((pull, resolve));
        }
    }
    if let Some(v) = t.get("skip_verify") {
        e.skip_verify = Some(v.as_bool().ok_or("\"skip_verify\" must be a boolean")?);
    }
    if let Some(v) = t.get("override_path") {
        e.override_path = v.as_bool().ok_or("\"override_path\" must be a boolean")?;
    }
    if let Some(v) = t.get("ca") {
        let list = match v {
            toml::Value::String(s) => vec![s.clone()],
            other => string_list(other).ok_or("\"ca\" must be a string or a list of strings")?,
        };
        e.ca = list.iter().map(|p| abs_path(p, dir)).collect();
    }
    if let Some(v) = t.get("client") {
        let bad = "\"client\" must be a path, a list of paths or a list of [cert, key] pairs";
        match v {
            toml::Value::String(s) => e.client.push((abs_path(s, dir), None)),
            toml::Value::Array(items) => {
                for item in items {
                    match item {
                        toml::Value::String(s) => e.client.push((abs_path(s, dir), None)),
                        pair @ toml::Value::Array(_) => {
                            let pair = string_list(pair).ok_or(bad)?;
                            let [cert, key] = pair.as_slice() else {
                                return Err(bad.into());
                            };
                            e.client
                                .push((abs_path(cert, dir), Some(abs_path(key, dir))));
                        }
                        _ => return Err(bad.into()),
                    }
                }
            }
            _ => return Err(bad.into()),
        }
    }
    if let Some(v) = t.get("header") {
        let headers = v.as_table().ok_or("\"header\" must be a table")?;
        for (name, value) in headers {
            match value {
                toml::Value::String(s) => e.headers.push((name.clone(), s.clone())),
                other => {
                    let list = string_list(other)
                        .ok_or_else(|| format!("header {name:?} must be a string or a list"))?;
                    for s in list {
                        e.headers.push((name.clone(), s));
                    }
                }
            }
        }
    }
    if let Some(v) = t.get("dial_timeout") {
        let s = v.as_str().ok_or("\"dial_timeout\" must be a string")?;
        e.dial_timeout = Some(parse_go_duration(s)?);
    }
    Ok(e)
}

fn string_list(v: &toml::Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect()
}

fn abs_path(p: &str, dir: &Path) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Go's duration syntax, as `dial_timeout` uses: `500ms`, `3s`, `1m30s`.
fn parse_go_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let num: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += num * scale;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// docker's `certs.d` layout: `*.crt` are CAs, `*.cert` (+ `*.key`) client certs.
async fn cert_dir_entry(dir: &Path) -> Result<HostEntry> {
    let mut e = HostEntry::default();
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(e),
        Err(err) => return Err(Error::Config(format!("{}: {err}", dir.display()))),
    };
    let mut names = Vec::new();
    while let Some(entry) = rd
        .next_entry()
        .await
        .map_err(|err| Error::Config(format!("{}: {err}", dir.display())))?
    {
        names.push(entry.path());
    }
    names.sort();
    for p in names {
        match p.extension().and_then(|x| x.to_str()) {
            Some("crt") => e.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                let key = tokio::fs::metadata(&key).await.is_ok().then_some(key);
                e.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> HostsOptions {
        HostsOptions {
            config_path: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn defaults_without_config() {
        let o = HostsOptions::default();
        let h = load_hosts(&o, "docker.io").await.unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            h[0].url("docker.io", "library/alpine", "manifests/latest"),
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
        );
        let h = load_hosts(&o, "ghcr.io").await.unwrap();
        assert_eq!(
            h[0].url("ghcr.io", "a/b", "blobs/x"),
            "https://ghcr.io/v2/a/b/blobs/x"
        );
        let h = load_hosts(&o, "127.0.0.1:5000").await.unwrap();
        assert_eq!(h[0].scheme, "http");
        let h = load_hosts(&o, "localhost:443").await.unwrap();
        assert_eq!(h[0].scheme, "https");
        let plain = HostsOptions {
            plain_http: true,
            skip_verify: true,
            ..Default::default()
        };
        let h = load_hosts(&plain, "reg.example:8080").await.unwrap();
        assert_eq!(h[0].scheme, "http");
        assert!(h[0].tls.skip_verify);
    }

    #[tokio::test]
    async fn mirrors_in_file_order_then_server() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("docker.io");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            r#"
server = "https://registry-1.docker.io"
skip_verify = false
[host."http://zzz.local:5000"]
  capabilities = ["pull"]
  [host."http://zzz.local:5000".header]
    x-a = "1"
    x-b = ["2", "3"]
[host."https://aaa.local/prefix"]
  skip_verify = true
  ca = "ca.pem"
  client = [["c.cert", "/abs/c.key"]]
  dial_timeout = "1m30s"
[host."mmm.local/custom/api"]
  override_path = true
"#,
        )
        .unwrap();
        let o = opts(dir.path());
        let h = load_hosts(&o, "docker.io").await.unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(
            h[0].url("docker.io", "library/a", "blobs/d"),
            "http://zzz.local:5000/v2/library/a/blobs/d?ns=docker.io"
        );
        assert!(h[0].has(Capability::Pull) && !h[0].has(Capability::Resolve));
        assert_eq!(
            h[0].headers,
            vec![
                ("x-a".to_string(), "1".to_string()),
                ("x-b".to_string(), "2".to_string()),
                ("x-b".to_string(), "3".to_string())
            ]
        );
        assert_eq!(
            h[1].url("docker.io", "r", "manifests/t"),
            "https://aaa.local/prefix/v2/r/manifests/t?ns=docker.io"
        );
        assert!(h[1].tls.skip_verify);
        assert_eq!(h[1].tls.ca, vec![d.join("ca.pem")]);
        assert_eq!(
            h[1].tls.client,
            vec![(d.join("c.cert"), Some(PathBuf::from("/abs/c.key")))]
        );
        assert_eq!(h[1].tls.dial_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            h[2].url("docker.io", "r", "manifests/t"),
            "https://mmm.local/custom/api/r/manifests/t?ns=docker.io"
        );
        assert_eq!(
            h[3].url("docker.io", "r", "manifests/t"),
            "https://registry-1.docker.io/v2/r/manifests/t"
        );
        assert!(h[3].has(Capability::Resolve));
    }

    #[tokio::test]
    async fn port_dirs_default_dir_and_cert_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "[host.\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        // Port directory in the `host_port_` form.
        std::fs::create_dir_all(dir.path().join("reg.local_5000_")).unwrap();
        std::fs::write(
            dir.path().join("reg.local_5000_/hosts.toml"),
            "server = \"http://reg.local:5000\"\n",
        )
        .unwrap();
        // A certs.d-style directory without hosts.toml.
        let certs = dir.path().join("secure.local");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.crt"), "x").unwrap();
        std::fs::write(certs.join("client.cert"), "x").unwrap();
        std::fs::write(certs.join("client.key"), "x").unwrap();

        let o = opts(dir.path());
        let h = load_hosts(&o, "reg.local:5000").await.unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            h[0].url("reg.local:5000", "r", "x"),
            "http://reg.local:5000/v2/r/x"
        );

        let h = load_hosts(&o, "other.io").await.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0].url("other.io", "r", "x"),
            "http://127.0.0.1:1/v2/r/x?ns=other.io"
        );
        assert_eq!(h[1].url("other.io", "r", "x"), "https://other.io/v2/r/x");

        let h = load_hosts(&o, "secure.local").await.unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].tls.ca, vec![certs.join("ca.crt")]);
        assert_eq!(
            h[0].tls.client,
            vec![(certs.join("client.cert"), Some(certs.join("client.key")))]
        );
    }

    #[tokio::test]
    async fn malformed_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bad.io")).unwrap();
        for (text, want) in [
            ("server = [", "bad.io"),
            (
                "[host.\"http://x\"]\ncapabilities = [\"fly\"]\n",
                "unknown capability",
            ),
            ("skip_verify = \"yes\"\n", "skip_verify"),
            (
                "[host.\"http://x\"]\ndial_timeout = \"soon\"\n",
                "invalid duration",
            ),
        ] {
            std::fs::write(dir.path().join("bad.io/hosts.toml"), text).unwrap();
            match load_hosts(&opts(dir.path()), "bad.io").await {
                Err(Error::Config(msg)) => assert!(msg.contains(want), "{msg}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn malformed_files_do_not_quote_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bad.io")).unwrap();
        let text = "server = \"https://bad.io\"\n[header]\nauthorization = Bearer SECRETTOKEN\n";
        std::fs::write(dir.path().join("bad.io/hosts.toml"), text).unwrap();
        match load_hosts(&opts(dir.path()), "bad.io").await {
            Err(Error::Config(msg)) => {
                assert!(
                    msg.contains("hosts.toml") && msg.contains("line 3"),
                    "{msg}"
                );
                assert!(!msg.contains("SECRETTOKEN"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_go_duration("1h2m3s").unwrap(),
            Duration::from_secs(3723)
        );
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("").is_err());
    }
}
