//! Manifests, indexes and image configs: resolving a reference to the
//! platform's image.

use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::Method;

use crate::blob::blob_what;
use crate::client::{Body, Client};
use crate::digest::{sha256_of, Hasher};
use crate::error::{Error, Result};
use crate::hosts::Capability;
use crate::platform::Platform;
use crate::reference::Reference;

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_TYPE_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Manifests larger than this are refused (containerd's limit too).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Image configs larger than this are refused.
const MAX_CONFIG_BYTES: u64 = 32 << 20;

/// Something fetched and verified by digest: its raw bytes (to store as
/// they are) and their parsed form.
#[derive(Clone, Debug)]
pub struct Fetched<T> {
    /// The digest of `bytes`, verified.
    pub digest: Digest,
    /// The media type (from the response or the descriptor).
    pub media_type: String,
    /// The bytes exactly as the registry sent them.
    pub bytes: Bytes,
    /// The parsed value.
    pub value: T,
}

/// A manifest as fetched by reference: an image manifest or an index.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// A single-platform image manifest (OCI or Docker schema 2).
    Image(Box<ImageManifest>),
    /// An index (OCI image index or Docker manifest list).
    Index(Box<ImageIndex>),
}

/// An image resolved for one platform.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The index the reference named, when it named one.
    pub index: Option<Fetched<ImageIndex>>,
    /// The platform's image manifest.
    pub manifest: Fetched<ImageManifest>,
    /// The image config.
    pub config: Fetched<ImageConfiguration>,
}

impl ResolvedImage {
    /// The digest the reference resolved to: the index's when there is
    /// one, else the manifest's (what containerd records as the image target).
    pub fn target_digest(&self) -> &Digest {
        match &self.index {
            Some(i) => &i.digest,
            None => &self.manifest.digest,
        }
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> &[Descriptor] {
        self.manifest.value.layers()
    }
}

impl Client {
    /// Fetches what `reference` names (by digest when it pins one, else by
    /// tag), accepting OCI and Docker manifests and indexes, and verifies
    /// its digest: against the pinned digest, else against the
    /// `Docker-Content-Digest` header when the registry sends one.
    pub async fn fetch_manifest(&self, reference: &Reference) -> Result<Fetched<Manifest>> {
        let object = reference.object();
        let what = format!("manifest {object} of {}", reference.name());
        let cap = if reference.digest().is_some() {
            Capability::Pull
        } else {
            Capability::Resolve
        };
        let target = self.target(reference, cap, what.clone()).await?;
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(concat!(
                "application/vnd.oci.image.index.v1+json, ",
                "application/vnd.docker.distribution.manifest.list.v2+json, ",
                "application/vnd.oci.image.manifest.v1+json, ",
                "application/vnd.docker.distribution.manifest.v2+json"
            )),
        );
        let suffix = format!("manifests/{object}");

        // Manifests are small: a broken body is re-requested whole.
        let policy = self.retry().clone();
        let mut attempt = 0;
        let (bytes, content_type, header_digest, authority) = loop {
            attempt += 1;
            let sent = self.send(&target, Method::GET, &suffix, &headers).await?;
            let authority = sent.authority.clone();
            let content_type = sent
                .resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
                .filter(|v| !v.is_empty());
            let header_digest = sent
                .resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if sent
                .resp
                .content_length()
                .is_some_and(|l| l > MAX_MANIFEST_BYTES as u64)
            {
                return Err(Error::InvalidResponse(format!(
                    "{authority}: {what} is larger than {MAX_MANIFEST_BYTES} bytes"
                )));
            }
            let mut body = Body::new(sent.resp, policy.stall_timeout);
            let mut buf = BytesMut::new();
            let outcome = loop {
                match body.next().await {
                    Ok(Some(chunk)) => {
                        if buf.len() + chunk.len() > MAX_MANIFEST_BYTES {
                            return Err(Error::InvalidResponse(format!(
                                "{authority}: {what} is larger than {MAX_MANIFEST_BYTES} bytes"
                            )));
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok(None) => break Ok(()),
                    Err(d) => break Err(d),
                }
            };
            match outcome {
                Ok(()) => break (buf.freeze(), content_type, header_digest, authority),
                Err(detail) if attempt < policy.attempts() => {
                    let pause = policy.backoff(attempt, None);
                    tracing::warn!(host = %authority, %what, %detail, "manifest body broke; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(detail) => {
                    return Err(Error::Fetch {
                        what,
                        detail: format!("{authority}: {detail} ({attempt} attempts)"),
                        status: None,
                    })
                }
            }
        };

        // Verify: the pinned digest, else the registry's header.
        let digest = match reference.digest() {
            Some(pinned) => {
                let mut h = Hasher::for_digest(pinned)?;
                h.update(&bytes);
                h.verify(pinned, &format!("{what} from {authority}"))?;
                pinned.clone()
            }
            None => {
                let computed = Digest::from_str(&sha256_of(&bytes))
                    .map_err(|e| Error::InvalidResponse(format!("digest of {what}: {e}")))?;
                if let Some(hd) = header_digest.as_deref() {
                    if let Ok(hd) = Digest::from_str(hd) {
                        let mut h = Hasher::for_digest(&hd)?;
                        h.update(&bytes);
                        h.verify(
                            &hd,
                            &format!("{what} from {authority} (Docker-Content-Digest)"),
                        )?;
                        hd
                    } else {
                        tracing::debug!(host = %authority, "ignoring malformed Docker-Content-Digest header");
                        computed
                    }
                } else {
                    computed
                }
            }
        };
        let (media_type, value) = parse_manifest(&bytes, content_type.as_deref(), &what)?;
        tracing::debug!(%what, %digest, %media_type, host = %authority, "manifest fetched");
        Ok(Fetched {
            digest,
            media_type,
            bytes,
            value,
        })
    }

    /// Resolves `reference` for `platform`: fetches the manifest; when it is
    /// an index, picks the platform's manifest and fetches it by digest
    /// (checking its size against the index); then fetches and verifies the
    /// image config.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let root = self.fetch_manifest(reference).await?;
        let (index, manifest) = match root.value {
            Manifest::Image(m) => (
                None,
                Fetched {
                    digest: root.digest,
                    media_type: root.media_type,
                    bytes: root.bytes,
                    value: *m,
                },
            ),
            Manifest::Index(idx) => {
                let what = format!("index {} of {}", root.digest, reference.name());
                let desc = platform.select(&idx, &what)?.clone();
                tracing::debug!(%what, %platform, manifest = %desc.digest(), "platform manifest selected");
                let child = self
                    .fetch_manifest(&reference.with_digest(desc.digest().clone()))
                    .await?;
                if child.bytes.len() as u64 != desc.size() {
                    return Err(Error::SizeMismatch {
                        what: format!("manifest {} of {}", desc.digest(), reference.name()),
                        expected: desc.size(),
                        actual: child.bytes.len() as u64,
                    });
                }
                let m = match child.value {
                    Manifest::Image(m) => *m,
                    Manifest::Index(_) => {
                        return Err(Error::Unsupported(format!(
                            "{what}: the entry for {platform} is itself an index"
                        )))
                    }
                };
                let index = Fetched {
                    digest: root.digest,
                    media_type: root.media_type,
                    bytes: root.bytes,
                    value: *idx,
                };
                let manifest = Fetched {
                    digest: child.digest,
                    media_type: child.media_type,
                    bytes: child.bytes,
                    value: m,
                };
                (Some(index), manifest)
            }
        };

        let cd = manifest.value.config().clone();
        if cd.size() > MAX_CONFIG_BYTES {
            return Err(Error::Unsupported(format!(
                "config {} of {} is {} bytes (limit {MAX_CONFIG_BYTES})",
                cd.digest(),
                reference.name(),
                cd.size()
            )));
        }
        let bytes = self
            .fetch_blob_bytes(reference, cd.digest(), Some(cd.size()))
            .await?;
        let value: ImageConfiguration = serde_json::from_slice(&bytes).map_err(|e| {
            Error::InvalidResponse(format!(
                "{} is not an image config: {e}",
                blob_what(reference, cd.digest())
            ))
        })?;
        let config = Fetched {
            digest: cd.digest().clone(),
            media_type: cd.media_type().to_string(),
            bytes,
            value,
        };
        Ok(ResolvedImage {
            index,
            manifest,
            config,
        })
    }
}

/// Parses by media type, falling back on the JSON's own `mediaType` and shape.
fn parse_manifest(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<(String, Manifest)> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default, rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| Error::InvalidResponse(format!("{what} is not JSON: {e}")))?;
    let declared = content_type
        .filter(|t| {
            matches!(
                *t,
                MEDIA_TYPE_OCI_MANIFEST
                    | MEDIA_TYPE_OCI_INDEX
                    | MEDIA_TYPE_DOCKER_MANIFEST
                    | MEDIA_TYPE_DOCKER_LIST
                    | MEDIA_TYPE_DOCKER_SCHEMA1
                    | MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED
            )
        })
        .map(str::to_string)
        .or(probe.media_type.clone());
    let media_type = match declared {
        Some(t) => t,
        None if probe.schema_version == Some(1) => MEDIA_TYPE_DOCKER_SCHEMA1.to_string(),
        None if probe.manifests.is_some() => MEDIA_TYPE_OCI_INDEX.to_string(),
        None if probe.layers.is_some() => MEDIA_TYPE_OCI_MANIFEST.to_string(),
        None => {
            return Err(Error::Unsupported(format!(
                "{what}: cannot tell the manifest type (Content-Type {content_type:?})"
            )))
        }
    };
    let invalid =
        |e: serde_json::Error| Error::InvalidResponse(format!("{what} ({media_type}): {e}"));
    let value = match media_type.as_str() {
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST => {
            Manifest::Index(Box::new(serde_json::from_slice(bytes).map_err(invalid)?))
        }
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {
            Manifest::Image(Box::new(serde_json::from_slice(bytes).map_err(invalid)?))
        }
        MEDIA_TYPE_DOCKER_SCHEMA1 | MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED => {
            return Err(Error::Unsupported(format!(
                "{what}: Docker schema 1 manifests are not supported; rebuild the image as OCI or Docker schema 2"
            )))
        }
        other => {
            return Err(Error::Unsupported(format!(
                "{what}: media type {other:?} is not a manifest or index"
            )))
        }
    };
    Ok((media_type, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_kinds() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        let (t, m) = parse_manifest(index, None, "x").unwrap();
        assert_eq!(t, MEDIA_TYPE_OCI_INDEX);
        assert!(matches!(m, Manifest::Index(_)));
        let (t, _) = parse_manifest(index, Some(MEDIA_TYPE_DOCKER_LIST), "x").unwrap();
        assert_eq!(t, MEDIA_TYPE_DOCKER_LIST);

        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":2,
            "digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},"layers":[]}"#;
        let (t, m) = parse_manifest(image, Some("application/octet-stream"), "x").unwrap();
        assert_eq!(t, MEDIA_TYPE_DOCKER_MANIFEST);
        assert!(matches!(m, Manifest::Image(_)));

        let s1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest(s1, None, "x"),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            parse_manifest(b"{}", Some("application/json"), "x"),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            parse_manifest(b"nope", None, "x"),
            Err(Error::InvalidResponse(_))
        ));
        assert!(matches!(
            parse_manifest(br#"{"manifests": 3}"#, Some(MEDIA_TYPE_OCI_INDEX), "x"),
            Err(Error::InvalidResponse(_))
        ));
    }
}
