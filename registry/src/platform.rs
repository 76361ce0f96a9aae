//! Platforms (`os/arch[/variant]`) and picking a manifest out of an index.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex};

use crate::error::{Error, Result};

/// A target platform, in Go's `GOOS`/`GOARCH` names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`, `windows`, ...
    pub os: String,
    /// `amd64`, `arm64`, `arm`, ...
    pub architecture: String,
    /// `v8`, `v7`, ...; `None` accepts any variant (the usual one first).
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts; names are normalized (`x86_64` is `amd64`,
    /// `aarch64` is `arm64`).
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        let (architecture, normalized) = normalize_arch(architecture, variant);
        // Keep "any variant" when none was given; normalize one that was.
        let variant = variant.and(normalized);
        Platform {
            os: os.to_ascii_lowercase(),
            architecture,
            variant,
        }
    }

    /// Linux on the architecture this process runs on.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            other => other,
        };
        Platform::new("linux", arch, None)
    }

    /// Whether an index entry's platform satisfies this one.
    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        let os = p.os().to_string().to_ascii_lowercase();
        let (arch, variant) = normalize_arch(&p.architecture().to_string(), p.variant().as_deref());
        if os != self.os || arch != self.architecture {
            return false;
        }
        match &self.variant {
            None => true,
            Some(want) => variant.as_deref() == Some(want.as_str()),
        }
    }

    /// Picks the descriptor for this platform out of an index: entries that
    /// match, the arch's usual variant first (`v8` for arm64, `v7` for arm),
    /// then file order.
    pub(crate) fn select<'a>(&self, index: &'a ImageIndex, what: &str) -> Result<&'a Descriptor> {
        let usual = default_variant(&self.architecture);
        let mut best: Option<(&Descriptor, bool)> = None;
        for d in index.manifests() {
            let Some(p) = d.platform() else { continue };
            if !self.matches(p) {
                continue;
            }
            let (_, variant) =
                normalize_arch(&p.architecture().to_string(), p.variant().as_deref());
            let preferred = variant.as_deref() == usual;
            match best {
                None => best = Some((d, preferred)),
                Some((_, false)) if preferred => best = Some((d, true)),
                _ => {}
            }
        }
        if let Some((d, _)) = best {
            return Ok(d);
        }
        let available: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| {
                let mut s = format!("{}/{}", p.os(), p.architecture());
                if let Some(v) = p.variant() {
                    s.push('/');
                    s.push_str(v);
                }
                s
            })
            .collect();
        Err(Error::PlatformNotFound {
            what: what.to_string(),
            platform: self.to_string(),
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        })
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::host()
    }
}

impl FromStr for Platform {
    type Err = Error;
    /// `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::InvalidArgument(format!("platform {s:?}: expected os/arch[/variant]"));
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

/// Normalizes architecture aliases and fills in the implied variant where
/// the spec has one (arm64 without variant is v8, arm is v7).
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .filter(|v| !v.is_empty())
        .map(|v| v.to_ascii_lowercase());
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant),
        "i386" | "386" | "x86" => ("386".into(), variant),
        "aarch64" | "arm64" => {
            let v = match variant.as_deref() {
                None | Some("8") | Some("v8") => Some("v8".to_string()),
                _ => variant,
            };
            ("arm64".into(), v)
        }
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => {
            let v = match variant.as_deref() {
                None | Some("7") | Some("v7") => Some("v7".to_string()),
                Some("5") | Some("v5") => Some("v5".to_string()),
                Some("6") | Some("v6") => Some("v6".to_string()),
                Some("8") | Some("v8") => Some("v8".to_string()),
                _ => variant,
            };
            ("arm".into(), v)
        }
        _ => (arch, variant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, v))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = v {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{:064x}", i),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    fn pick(idx: &ImageIndex, p: &str) -> Result<String> {
        let p: Platform = p.parse()?;
        p.select(idx, "test").map(|d| d.digest().to_string())
    }

    #[test]
    fn parse_and_normalize() {
        let p: Platform = "linux/aarch64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        let p: Platform = "linux/arm64/8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let p: Platform = "linux/x86_64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn selects_by_os_arch_variant() {
        let idx = index(&[
            ("linux", "amd64", None),
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
            ("linux", "arm64", Some("v8")),
            ("unknown", "unknown", None),
            ("windows", "amd64", None),
        ]);
        let d = |i: u32| format!("sha256:{:064x}", i);
        assert_eq!(pick(&idx, "linux/amd64").unwrap(), d(0));
        assert_eq!(pick(&idx, "linux/arm64").unwrap(), d(3));
        assert_eq!(pick(&idx, "linux/arm/v6").unwrap(), d(1));
        // arm with no variant prefers v7 even though v6 comes first.
        assert_eq!(pick(&idx, "linux/arm").unwrap(), d(2));
        assert_eq!(pick(&idx, "windows/amd64").unwrap(), d(5));
        match pick(&idx, "linux/s390x") {
            Err(Error::PlatformNotFound { available, .. }) => {
                assert!(available.contains("linux/arm/v7"), "{available}")
            }
            other => panic!("{other:?}"),
        }
        // arm64 without a variant in the index is v8.
        let idx = index(&[("linux", "arm64", None)]);
        assert_eq!(pick(&idx, "linux/arm64/v8").unwrap(), d(0));
    }
}
