//! containerd's filter language (`strata_proto::filters`), as List calls
//! carry it: the input, split at newlines, is the list of filter strings
//! (alternatives); what parses is matched against a fixed snapshot.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_proto::filters::{Adaptor, Filter};

/// A snapshot with a name, a kind, an empty parent and two labels.
struct Snapshot;

impl Adaptor for Snapshot {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path {
            [f] if f == "name" => Some("default/3/sha256:ab"),
            [f] if f == "kind" => Some("committed"),
            [f] if f == "parent" => Some(""),
            [l, rest @ ..] if l == "labels" && !rest.is_empty() => match rest.join(".").as_str() {
                "a" => Some("b"),
                "containerd.io/gc.root" => Some("2024-01-01T00:00:00Z"),
                _ => None,
            },
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let filters: Vec<&str> = text.split('\n').collect();
    if let Ok(f) = Filter::parse_all(&filters) {
        let matched = f.matches(&Snapshot);
        assert!(
            !f.is_always() || matched,
            "a match-all filter did not match"
        );
        let _ = f.single_equal("name");
    }
});
