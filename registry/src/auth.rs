//! Credentials and the registry auth handshake.
//!
//! A request goes out with whatever this client already knows for the host:
//! a cached Bearer token for the repository scope, or Basic credentials once
//! the host asked for Basic. On a 401 the `WWW-Authenticate` challenge is
//! remembered for the host and answered:
//!
//! - `Basic realm=…`: send the host's credentials (or fail: none configured);
//! - `Bearer realm=…,service=…,scope=…`: GET `realm?service=…&scope=…`, with
//!   Basic credentials when there are some (anonymous otherwise), read
//!   `token` (or `access_token`) and `expires_in` (default 60 s), cache it per
//!   host and scope, and retry the request with it.
//!
//! Credentials for a host come from the explicit `user:pass` of the client
//! (sent to every host, as `ctr --user` does), else from docker's
//! `config.json` (`auths.<host>.auth` = base64 of `user:pass`, or
//! `username`/`password`; `docker.io`, `index.docker.io`,
//! `https://index.docker.io/v1/` and `registry-1.docker.io` name one host).
//! Credential helpers (`credsStore`, `credHelpers`) and identity tokens are
//! not supported and are skipped with a debug log.
//!
//! Neither credentials nor tokens are ever logged or put in errors:
//! [`Credentials`]' `Debug` redacts the password, and header values carrying
//! them are marked sensitive.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::HeaderValue;

use crate::error::{Error, Result};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API};

/// A user name and password (or token) for Basic auth and token requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or personal access token. Never logged.
    pub password: String,
}

impl Credentials {
    /// Credentials from their parts.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Parses `user:pass` (the password may contain `:`).
    pub fn parse(user_pass: &str) -> Result<Self> {
        match user_pass.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials::new(u, p)),
            _ => Err(Error::InvalidArgument(
                "credentials must be \"user:password\"".into(),
            )),
        }
    }

    /// The `Authorization: Basic …` header value, marked sensitive.
    pub(crate) fn basic_header(&self) -> Result<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
            .map_err(|_| Error::InvalidArgument("credentials are not valid header text".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where to read docker's `config.json` from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; a missing
    /// file means no credentials.
    #[default]
    Default,
    /// This file; it must exist.
    Path(PathBuf),
    /// Do not read any.
    Disabled,
}

/// Credentials by normalized host name.
#[derive(Clone, Default)]
pub(crate) struct CredentialStore {
    explicit: Option<Credentials>,
    by_host: HashMap<String, Credentials>,
}

impl CredentialStore {
    pub fn load(explicit: Option<Credentials>, source: &DockerConfig) -> Result<Self> {
        let (path, must_exist) = match source {
            DockerConfig::Disabled => (None, false),
            DockerConfig::Path(p) => (Some(p.clone()), true),
            DockerConfig::Default => {
                let dir = std::env::var_os("DOCKER_CONFIG")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
                (dir.map(|d| d.join("config.json")), false)
            }
        };
        let mut by_host = HashMap::new();
        if let Some(path) = path {
            match std::fs::read(&path) {
                Ok(bytes) => by_host = parse_docker_config(&bytes, &path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {}
                Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
            }
        }
        Ok(CredentialStore { explicit, by_host })
    }

    /// The credentials to use with `authority`.
    pub fn get(&self, authority: &str) -> Option<&Credentials> {
        self.explicit
            .as_ref()
            .or_else(|| self.by_host.get(&normalize_host_key(authority)))
    }
}

fn parse_docker_config(bytes: &[u8], path: &Path) -> Result<HashMap<String, Credentials>> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
        #[serde(default, rename = "credsStore")]
        creds_store: Option<String>,
        #[serde(default, rename = "credHelpers")]
        cred_helpers: Option<HashMap<String, String>>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default, rename = "identitytoken")]
        identity_token: Option<String>,
    }
    // Not `{e}`: serde_json quotes the offending value, which may be a
    // credential (`"auths": {"h": "<base64>"}`); say where, not what.
    let file: File = serde_json::from_slice(bytes).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "read",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "unexpected value",
            serde_json::error::Category::Eof => "unexpected end",
        };
        Error::Config(format!(
            "{}: not a docker config.json ({kind} at line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    if file.creds_store.is_some() || file.cred_helpers.is_some() {
        tracing::debug!(path = %path.display(), "credential helpers are not supported; using \"auths\" only");
    }
    let mut out = HashMap::new();
    for (key, entry) in file.auths {
        let creds = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth.trim()))
                .map_err(|_| {
                    Error::Config(format!(
                        "{}: auths.{key}.auth is not valid base64",
                        path.display()
                    ))
                })?;
            let text = String::from_utf8(decoded).map_err(|_| {
                Error::Config(format!("{}: auths.{key}.auth is not UTF-8", path.display()))
            })?;
            match text.split_once(':') {
                Some((u, p)) => Credentials::new(u, p),
                None => {
                    return Err(Error::Config(format!(
                        "{}: auths.{key}.auth is not base64 of user:password",
                        path.display()
                    )))
                }
            }
        } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
            Credentials::new(u, p)
        } else {
            if entry.identity_token.is_some() {
                tracing::debug!(host = %key, "identity tokens are not supported; skipping");
            }
            continue;
        };
        out.insert(normalize_host_key(&key), creds);
    }
    Ok(out)
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_host_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | DOCKER_HUB_API => DOCKER_HUB.to_string(),
        _ => k,
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses the first Basic or Bearer challenge in a `WWW-Authenticate` value.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let mut rest = header.trim();
    while !rest.is_empty() {
        let scheme_end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
        let scheme = rest[..scheme_end]
            .trim_end_matches(',')
            .to_ascii_lowercase();
        rest = rest[scheme_end..].trim_start();
        let (params, after) = parse_params(rest);
        rest = after;
        match scheme.as_str() {
            "basic" => return Some(Challenge::Basic),
            "bearer" => {
                let realm = params.get("realm")?.clone();
                return Some(Challenge::Bearer {
                    realm,
                    service: params.get("service").cloned(),
                    scope: params.get("scope").cloned(),
                });
            }
            _ => {}
        }
    }
    None
}

/// Parses `k=v, k="quoted, v"` up to the start of the next challenge.
fn parse_params(mut s: &str) -> (HashMap<String, String>, &str) {
    let mut out = HashMap::new();
    loop {
        s = s.trim_start_matches([' ', '\t', ',']);
        let Some(eq) = s.find('=') else { break };
        let key = &s[..eq];
        if key.is_empty() || key.contains(char::is_whitespace) {
            // The next challenge's scheme.
            break;
        }
        let key = key.to_ascii_lowercase();
        s = &s[eq + 1..];
        let value;
        if let Some(q) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &q[end.min(q.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        out.insert(key, value);
    }
    (out, s)
}

/// What a host is known to want.
#[derive(Clone, Debug)]
enum HostAuth {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Clone)]
struct Token {
    value: HeaderValue,
    expires: Instant,
}

/// Per-host challenges and per-(host, scope) tokens, shared by all requests
/// of a client.
#[derive(Default)]
pub(crate) struct AuthCache {
    hosts: Mutex<HashMap<String, HostAuth>>,
    tokens: Mutex<HashMap<(String, String), TokenSlot>>,
}

/// One (host, scope)'s token, locked while it is being fetched.
type TokenSlot = Arc<tokio::sync::Mutex<Option<Token>>>;

/// The outcome of asking for an `Authorization` header.
pub(crate) enum AuthHeader {
    /// Nothing known (yet) for this host: send the request bare.
    None,
    /// Send this.
    Value(HeaderValue),
}

/// Something a token request failed with, sorted for the retry logic.
pub(crate) enum TokenError {
    /// Credentials missing or rejected.
    Unauthorized(String),
    /// Worth retrying (5xx, 429, connection error).
    Transient(String, Option<u16>),
    /// Anything else.
    Fatal(Error),
}

impl AuthCache {
    fn slot(&self, authority: &str, scope: &str) -> TokenSlot {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .entry((authority.to_string(), scope.to_string()))
            .or_default()
            .clone()
    }

    /// Remembers a 401's challenge for the host. Returns false when the
    /// challenge is not one this client can answer.
    pub fn learn(&self, authority: &str, challenge: Option<Challenge>) -> bool {
        let auth = match challenge {
            Some(Challenge::Basic) => HostAuth::Basic,
            Some(Challenge::Bearer { realm, service, .. }) => HostAuth::Bearer { realm, service },
            None => return false,
        };
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.insert(authority.to_string(), auth);
        true
    }

    /// Drops a token the host rejected.
    pub async fn invalidate(&self, authority: &str, scope: &str) {
        let slot = self.slot(authority, scope);
        *slot.lock().await = None;
    }

    /// The header to send to `authority` for `scope`, fetching a token when
    /// the host wants Bearer and none is cached.
    pub async fn header(
        &self,
        http: &reqwest::Client,
        creds: Option<&Credentials>,
        authority: &str,
        scope: &str,
        timeout: Duration,
    ) -> std::result::Result<AuthHeader, TokenError> {
        let known = {
            let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.get(authority).cloned()
        };
        match known {
            None => Ok(AuthHeader::None),
            Some(HostAuth::Basic) => match creds {
                Some(c) => c
                    .basic_header()
                    .map(AuthHeader::Value)
                    .map_err(TokenError::Fatal),
                None => Err(TokenError::Unauthorized(format!(
                    "{authority} wants Basic auth and no credentials are configured for it"
                ))),
            },
            Some(HostAuth::Bearer { realm, service }) => {
                let slot = self.slot(authority, scope);
                // One token request per (host, scope) at a time; the others wait for it.
                let mut guard = slot.lock().await;
                if let Some(t) = guard.as_ref() {
                    if t.expires > Instant::now() {
                        return Ok(AuthHeader::Value(t.value.clone()));
                    }
                }
                let token =
                    fetch_token(http, creds, &realm, service.as_deref(), scope, timeout).await?;
                let value = token.value.clone();
                *guard = Some(token);
                Ok(AuthHeader::Value(value))
            }
        }
    }
}

async fn fetch_token(
    http: &reqwest::Client,
    creds: Option<&Credentials>,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    timeout: Duration,
) -> std::result::Result<Token, TokenError> {
    let mut url = reqwest::Url::parse(realm).map_err(|e| {
        TokenError::Fatal(Error::InvalidResponse(format!(
            "token realm {realm:?}: {e}"
        )))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TokenError::Fatal(Error::InvalidResponse(format!(
            "token realm {realm:?} is not an http(s) URL"
        ))));
    }
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        if !scope.is_empty() {
            q.append_pair("scope", scope);
        }
    }
    let realm_host = url.host_str().unwrap_or("").to_string();
    let mut req = http.get(url);
    if let Some(c) = creds {
        let v = c.basic_header().map_err(TokenError::Fatal)?;
        req = req.header(reqwest::header::AUTHORIZATION, v);
    }
    tracing::debug!(
        realm_host,
        scope,
        with_credentials = creds.is_some(),
        "requesting registry token"
    );
    let resp = match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => {
            return Err(TokenError::Transient(
                format!("token request to {realm_host} timed out"),
                None,
            ))
        }
        Ok(Err(e)) => {
            return Err(TokenError::Transient(
                format!(
                    "token request to {realm_host}: {}",
                    crate::client::describe(&e)
                ),
                None,
            ))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(TokenError::Unauthorized(format!(
            "token endpoint {realm_host} answered {status}{}",
            if creds.is_some() {
                " (credentials rejected)"
            } else {
                " (no credentials configured)"
            }
        )));
    }
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        return Err(TokenError::Transient(
            format!("token endpoint {realm_host} answered {status}"),
            Some(status.as_u16()),
        ));
    }
    if !status.is_success() {
        return Err(TokenError::Fatal(Error::Fetch {
            what: format!("token from {realm_host}"),
            detail: format!("answered {status}"),
            status: Some(status.as_u16()),
        }));
    }
    let body = match tokio::time::timeout(timeout, resp.bytes()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(TokenError::Transient(
                format!(
                    "token response from {realm_host}: {}",
                    crate::client::describe(&e)
                ),
                None,
            ))
        }
        Err(_) => {
            return Err(TokenError::Transient(
                format!("token response from {realm_host} timed out"),
                None,
            ))
        }
    };
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        TokenError::Fatal(Error::InvalidResponse(format!(
            "token response from {realm_host} is not JSON: {e}"
        )))
    })?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| {
            TokenError::Fatal(Error::InvalidResponse(format!(
                "token response from {realm_host} has no token"
            )))
        })?;
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        TokenError::Fatal(Error::InvalidResponse(format!(
            "token from {realm_host} is not valid header text"
        )))
    })?;
    value.set_sensitive(true);
    // The spec's default lifetime is 60 s; renew 10 s early.
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(1));
    let expires = Instant::now()
        + lifetime
            .saturating_sub(Duration::from_secs(10))
            .max(Duration::from_secs(1));
    Ok(Token { value, expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"Negotiate, bearer realm=http://h/t , service="a,b""#),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: Some("a,b".into()),
                scope: None,
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Digest realm=x"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn docker_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                    "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                    "http://reg.local:8080/some/path": {{"auth": "{b64}"}},
                    "tok.io": {{"identitytoken": "x"}}
                }}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let store = CredentialStore::load(None, &DockerConfig::Path(path.clone())).unwrap();
        let alice = Credentials::new("alice", "pa:ss");
        assert_eq!(store.get("registry-1.docker.io"), Some(&alice));
        assert_eq!(store.get("docker.io"), Some(&alice));
        assert_eq!(store.get("reg.local:8080"), Some(&alice));
        assert_eq!(
            store.get("127.0.0.1:5000"),
            Some(&Credentials::new("bob", "pw"))
        );
        assert_eq!(store.get("tok.io"), None);
        assert_eq!(store.get("other"), None);

        // Explicit credentials win everywhere.
        let store = CredentialStore::load(
            Some(Credentials::parse("u:p").unwrap()),
            &DockerConfig::Path(path.clone()),
        )
        .unwrap();
        assert_eq!(store.get("docker.io").unwrap().username, "u");

        // Redacted in Debug.
        assert!(!format!("{alice:?}").contains("pa:ss"));

        // A named file must exist and parse.
        assert!(matches!(
            CredentialStore::load(None, &DockerConfig::Path(dir.path().join("nope.json"))),
            Err(Error::Config(_))
        ));
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            CredentialStore::load(None, &DockerConfig::Path(path.clone())),
            Err(Error::Config(_))
        ));
        std::fs::write(&path, r#"{"auths": {"h": {"auth": "!!!"}}}"#).unwrap();
        match CredentialStore::load(None, &DockerConfig::Path(path)) {
            Err(Error::Config(m)) => assert!(m.contains("base64")),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(Credentials::parse("nopassword").is_err());
        assert!(Credentials::parse(":x").is_err());
    }

    #[test]
    fn malformed_docker_config_errors_do_not_quote_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for text in [
            r#"{"auths": {"h": "dXNlcjpTRUNSRVQ="}}"#,
            r#"{"auths": {"h": {"username": "u", "password": 271828}}}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            match CredentialStore::load(None, &DockerConfig::Path(path.clone())) {
                Err(Error::Config(m)) => {
                    assert!(m.contains("line 1"), "{m}");
                    assert!(
                        !m.contains("dXNlcjpTRUNSRVQ=") && !m.contains("271828"),
                        "{m}"
                    );
                }
                other => panic!("{text}: {:?}", other.map(|_| ())),
            }
        }
    }
}
