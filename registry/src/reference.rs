//! Image references: `[host[:port]/]repo[:tag][@digest]`, normalized the way
//! docker and containerd do it (`alpine` is `docker.io/library/alpine:latest`).

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Digest;

use crate::error::{Error, Result};

/// The registry name docker uses for Docker Hub.
pub(crate) const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's API is served from.
pub(crate) const DOCKER_HUB_API: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalized image reference.
///
/// ```
/// use strata_registry::Reference;
/// let r: Reference = "alpine".parse().unwrap();
/// assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
/// assert_eq!(r.api_host(), "registry-1.docker.io");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes a reference. A reference with neither tag nor
    /// digest gets the tag `latest`.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument(format!("image reference {s:?}: {why}"));
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace or control characters"));
        }

        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::from_str(d)
                    .map_err(|e| invalid(&format!("invalid digest {d:?}: {e}")))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };

        // A ':' after the last '/' starts the tag; one before it is a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(&rest[at + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|why| invalid(&why))?;
        }
        if name.is_empty() {
            return Err(invalid("missing repository name"));
        }

        let (registry, remote) = split_domain(name);
        let mut registry = registry.unwrap_or(DOCKER_HUB).to_string();
        validate_domain(&registry).map_err(|why| invalid(&why))?;
        if registry == "index.docker.io" {
            registry = DOCKER_HUB.to_string();
        }
        let mut repository = remote.to_string();
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        validate_repository(&repository).map_err(|why| invalid(&why))?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid(&format!(
                "name longer than {MAX_NAME_LEN} characters"
            )));
        }

        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry namespace: `docker.io`, `ghcr.io`, `127.0.0.1:5000`.
    /// This is the name `hosts.toml` directories and credentials are looked
    /// up by.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host the registry API is served from when no `hosts.toml` says
    /// otherwise: `registry-1.docker.io` for `docker.io`, else the registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path: `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// What to put after `/manifests/`: the digest when pinned, else the tag.
    pub(crate) fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// `registry/repository`, without tag or digest.
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Splits off the domain the way docker does: the first component is a
/// domain when it has a `.` or a `:`, is `localhost`, or has upper case.
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_domain(domain: &str) -> std::result::Result<(), String> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6]:port
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(format!("invalid registry host {domain:?}"));
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address in {domain:?}"));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return Err(format!("invalid registry host {domain:?}")),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.split('.').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            });
        if !ok {
            return Err(format!("invalid registry host {domain:?}"));
        }
    }
    if let Some(port) = port {
        if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5 {
            return Err(format!("invalid port in registry host {domain:?}"));
        }
    }
    Ok(())
}

/// path-component := [a-z0-9]+ (separator [a-z0-9]+)*, separator := [_.] | __ | -+
fn validate_repository(repo: &str) -> std::result::Result<(), String> {
    if repo.is_empty() {
        return Err("missing repository name".into());
    }
    for component in repo.split('/') {
        if component.is_empty() {
            return Err(format!("empty path component in repository {repo:?}"));
        }
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(format!(
                "repository component {component:?} must start and end with a lower-case letter or digit"
            ));
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if alnum(b) {
                i += 1;
                continue;
            }
            // A separator run: one '.', one or two '_', or any number of '-'.
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let sep = &component[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(format!(
                    "invalid characters {sep:?} in repository component {component:?} (lower case letters, digits and separators . _ __ - only)"
                ));
            }
        }
    }
    Ok(())
}

/// tag := [\w][\w.-]{0,127}
fn validate_tag(tag: &str) -> std::result::Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    match chars.next() {
        None => return Err("empty tag".into()),
        Some(c) if !word(c) => return Err(format!("invalid tag {tag:?}")),
        _ => {}
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("tag longer than {MAX_TAG_LEN} characters"));
    }
    if !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(format!("invalid tag {tag:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_normalization() {
        let r = p("alpine");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(p("user/app:1.0").to_string(), "docker.io/user/app:1.0");
        assert_eq!(
            p("index.docker.io/library/busybox").to_string(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(p("docker.io/busybox").repository(), "library/busybox");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let r = p("127.0.0.1:5000/a/b/c:v1.2-rc_3");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "a/b/c");
        assert_eq!(r.tag(), Some("v1.2-rc_3"));
        assert!(r.digest().is_none());

        let r = p(&format!("localhost:5000/x@{D}"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.object(), D);

        let r = p(&format!("ghcr.io/o/r:t@{D}"));
        assert_eq!(r.tag(), Some("t"));
        assert_eq!(r.object(), D);
        assert_eq!(r.to_string(), format!("ghcr.io/o/r:t@{D}"));

        assert_eq!(p("localhost/x").registry(), "localhost");
        assert_eq!(p("[::1]:5000/x:y").registry(), "[::1]:5000");
        assert_eq!(p("a__b/c-d.e--f:x").repository(), "a__b/c-d.e--f");
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            "Alpine",
            "docker.io/Library/alpine",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:abc",
            "alpine@md5",
            "a//b",
            "a/b/",
            "/a",
            "a b",
            "a/_b",
            "a/b.-c",
            "host:port/x",
            "-host.com/x",
            "[zz]:5/x",
        ] {
            match Reference::parse(bad) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains("image reference")),
                other => panic!("{bad:?} should be InvalidArgument, got {other:?}"),
            }
        }
        let long = format!("x/{}", "a".repeat(300));
        assert!(Reference::parse(&long).is_err());
        let long_tag = format!("x:{}", "a".repeat(129));
        assert!(Reference::parse(&long_tag).is_err());
    }
}
