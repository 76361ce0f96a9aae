//! The domain types of a snapshotter, apart from the wire.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// A snapshot's kind, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A read-only view of a parent.
    View,
    /// A writable snapshot, being prepared.
    Active,
    /// An immutable snapshot that others may use as a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What containerd knows about a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    /// The snapshot's key (opaque; containerd puts its namespace in it).
    pub name: String,
    /// The parent's key, or empty.
    pub parent: String,
    /// Its kind.
    pub kind: Kind,
    /// When it was created (for a committed one: committed).
    pub created: SystemTime,
    /// When it was last changed.
    pub updated: SystemTime,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl strata_proto::filters::Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path.first().map(String::as_str)? {
            "kind" => Some(self.kind.as_str()),
            "name" => Some(&self.name),
            "parent" => Some(&self.parent),
            "labels" if path.len() > 1 => self.labels.get(&path[1..].join(".")).map(String::as_str),
            _ => None,
        }
    }
}

/// Disk usage as containerd reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated on disk.
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// A mount that makes a snapshot usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `bind`, `overlay`, ...
    pub kind: String,
    /// The mount source.
    pub source: String,
    /// Options in mount(8) syntax.
    pub options: Vec<String>,
}

/// Labels of a snapshot.
pub type Labels = BTreeMap<String, String>;
