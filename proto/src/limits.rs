//! Limits on what a request may store: labels as containerd's metadata
//! store checks them (`labels.Validate`), and keys (snapshot keys and
//! names, ingest refs). containerd checks labels before they reach a proxy
//! plugin, but strata's socket also takes requests from other clients, and
//! what it stores is returned by every List.

/// The most bytes of one label, key and value together (containerd's
/// `labels.Validate`).
pub const MAX_LABEL_BYTES: usize = 4096;

/// The most bytes of a snapshot key or name, or of an ingest ref. Real ones
/// are about a hundred bytes (`default/12/sha256:…`, `layer-sha256:…`).
pub const MAX_KEY_BYTES: usize = 4096;

/// How much of an offending label key an error message shows (containerd
/// shows 64 bytes).
const SHOWN_KEY_BYTES: usize = 64;

/// A label or key over its limit; both are InvalidArgument.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// A label's key and value are too long together.
    #[error(
        "label key and value length ({len} bytes) greater than maximum size \
         ({MAX_LABEL_BYTES} bytes), key: {key}"
    )]
    Label {
        /// The label's key, cut to its first 64 bytes.
        key: String,
        /// Its key and value's length.
        len: usize,
    },
    /// A key or ref is too long.
    #[error("{what} of {len} bytes is longer than the {MAX_KEY_BYTES} bytes allowed")]
    Key {
        /// What it is (`snapshot key`, `ref`, …).
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Checks each label against [`MAX_LABEL_BYTES`].
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LimitError> {
    for (k, v) in labels {
        let len = k.len() + v.len();
        if len > MAX_LABEL_BYTES {
            let mut cut = SHOWN_KEY_BYTES.min(k.len());
            while !k.is_char_boundary(cut) {
                cut -= 1;
            }
            return Err(LimitError::Label {
                key: k[..cut].to_string(),
                len,
            });
        }
    }
    Ok(())
}

/// Checks a key or ref against [`MAX_KEY_BYTES`].
pub fn check_key(what: &'static str, key: &str) -> Result<(), LimitError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(LimitError::Key {
            what,
            len: key.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn labels_up_to_the_limit_pass() {
        let ok = BTreeMap::from([("k".to_string(), "v".repeat(MAX_LABEL_BYTES - 1))]);
        assert!(check_labels(&ok).is_ok());
        let long_key = "é".repeat(MAX_LABEL_BYTES);
        let bad = BTreeMap::from([(long_key, String::new())]);
        match check_labels(&bad) {
            Err(LimitError::Label { key, len }) => {
                assert_eq!(len, 2 * MAX_LABEL_BYTES);
                assert_eq!(key.len(), SHOWN_KEY_BYTES);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_up_to_the_limit_pass() {
        assert!(check_key("ref", &"r".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(check_key("ref", &"r".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
