//! Hostile input, one named test per case.
//!
//! * gRPC (`strata serve` as a process, one per test): malformed keys,
//!   labels, digests, offsets, sizes, filters and Write streams must each
//!   get a clear error with containerd's gRPC code, and must not damage what
//!   was stored before them: every test first commits a snapshot with a file
//!   in it and a labelled blob, and checks after the hostile request that
//!   both are intact and that the daemon still answers.
//! * The layer extractor (`strata_unpack::apply`, no daemon): escapes
//!   through `..`, absolute names, symlinks and hard links, lying sizes,
//!   truncation, bad PAX records, a decompression bomb. Every case checks
//!   that nothing outside the target directory changed.
//! * The eStargz parser (`strata_lazy::estargz`, no daemon): damaged
//!   footers and TOCs, chunks outside the blob, overlapping or lying chunks,
//!   a TOC over the cap.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use sha2::Digest as _;
use strata::harness::{image::noise, Strata};
use strata_proto::content as cpb;
use strata_proto::snapshots as pb;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Snaps = pb::snapshots_client::SnapshotsClient<Channel>;
type Content = cpb::content_client::ContentClient<Channel>;

const SNAPSHOTTER: &str = "strata";
/// containerd's limit on one label, key and value together.
const MAX_LABEL: usize = 4096;
/// The contents of the file in the committed snapshot every test starts with.
const BASE_FILE: &[u8] = b"committed before the hostile request\n";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A label whose key and value are `total` bytes together.
fn label_of_size(total: usize) -> HashMap<String, String> {
    let key = "hostile.label".to_string();
    let value = "v".repeat(total - key.len());
    HashMap::from([(key, value)])
}

/// The error of `r`, which must be one with code `want`.
fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, want: Code) -> Result<Status> {
    match r {
        Ok(v) => {
            let shown: String = format!("{v:?}").chars().take(300).collect();
            bail!("succeeded ({shown}), wanted {want:?}")
        }
        Err(s) if s.code() == want => {
            ensure!(!s.message().is_empty(), "{want:?} without a message");
            Ok(s)
        }
        Err(s) => bail!(
            "failed with {:?} ({}), wanted {want:?}",
            s.code(),
            s.message()
        ),
    }
}

fn prepare_req(key: &str, parent: &str, l: HashMap<String, String>) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    }
}

fn commit_req(name: &str, key: &str, l: HashMap<String, String>) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        name: name.into(),
        key: key.into(),
        labels: l,
    }
}

fn stat_req(key: &str) -> pb::StatSnapshotRequest {
    pb::StatSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    }
}

fn wreq(
    action: cpb::WriteAction,
    reference: &str,
    total: i64,
    expected: &str,
    offset: i64,
    data: &[u8],
) -> cpb::WriteContentRequest {
    cpb::WriteContentRequest {
        action: action as i32,
        r#ref: reference.into(),
        total,
        expected: expected.into(),
        offset,
        data: data.to_vec(),
        labels: HashMap::new(),
    }
}

/// The directory a bind mount of a parentless snapshot names.
fn bind_source(mounts: &[strata_proto::types::Mount]) -> Result<PathBuf> {
    match mounts {
        [m] if m.r#type == "bind" => Ok(PathBuf::from(&m.source)),
        other => bail!("expected one bind mount, got {other:?}"),
    }
}

async fn list_snapshots(c: &mut Snaps, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(m.info);
    }
    Ok(out)
}

async fn list_content(c: &mut Content, filters: &[&str]) -> Result<Vec<cpb::Info>, Status> {
    let mut s = c
        .list(cpb::ListContentRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(m.info);
    }
    Ok(out)
}

async fn read_blob(
    c: &mut Content,
    digest: &str,
    offset: i64,
    size: i64,
) -> Result<Vec<u8>, Status> {
    let mut s = c
        .read(cpb::ReadContentRequest {
            digest: digest.into(),
            offset,
            size,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Sends `msgs` on one Write stream and reads every answer: the answers, or
/// the first error (from the call or the stream).
async fn write_stream(
    c: &mut Content,
    msgs: Vec<cpb::WriteContentRequest>,
) -> Result<Vec<cpb::WriteContentResponse>, Status> {
    let mut s = c.write(tokio_stream::iter(msgs)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

async fn ingest_offset(c: &mut Content, reference: &str) -> Result<i64, Status> {
    Ok(c.status(cpb::StatusRequest {
        r#ref: reference.into(),
    })
    .await?
    .into_inner()
    .status
    .map(|s| s.offset)
    .unwrap_or(-1))
}

/// A daemon with a committed snapshot (`base`, holding one file, labelled)
/// and a committed, labelled blob, made before any hostile request.
struct Fx {
    strata: Strata,
    snaps: Snaps,
    content: Content,
    base_file: PathBuf,
    blob: Vec<u8>,
    blob_digest: String,
    _tmp: tempfile::TempDir,
}

impl Fx {
    async fn new() -> Result<Fx> {
        common::require_root();
        let tmp = common::tempdir();
        let strata = Strata::start(&common::strata_bin(), tmp.path(), &[])?;
        let mut snaps = strata::client::snapshots(&strata.socket).await?;
        let mut content = strata::client::content(&strata.socket).await?;
        let m = snaps
            .prepare(prepare_req("base-active", "", HashMap::new()))
            .await?
            .into_inner()
            .mounts;
        let base_file = bind_source(&m)?.join("hello");
        std::fs::write(&base_file, BASE_FILE)?;
        snaps
            .commit(commit_req("base", "base-active", labels(&[("keep", "me")])))
            .await?;
        let blob = noise(42, 300_000);
        let blob_digest = strata::client::put_blob(&mut content, "seed", &blob).await?;
        content
            .update(cpb::UpdateRequest {
                info: Some(cpb::Info {
                    digest: blob_digest.clone(),
                    labels: labels(&[("keep", "me")]),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await?;
        Ok(Fx {
            strata,
            snaps,
            content,
            base_file,
            blob,
            blob_digest,
            _tmp: tmp,
        })
    }

    /// What was stored before the hostile request is all there, unchanged,
    /// and the daemon answers.
    async fn intact(&mut self) -> Result<()> {
        self.strata.proc().check_alive()?;
        let info = self
            .snaps
            .stat(stat_req("base"))
            .await
            .context("stat of the base snapshot")?
            .into_inner()
            .info
            .ok_or_else(|| anyhow!("no info"))?;
        ensure!(
            info.kind == pb::Kind::Committed as i32 && info.labels == labels(&[("keep", "me")]),
            "base snapshot changed: {info:?}"
        );
        ensure!(
            std::fs::read(&self.base_file)? == BASE_FILE,
            "the base snapshot's file changed"
        );
        let names: Vec<String> = list_snapshots(&mut self.snaps, &[])
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect();
        ensure!(
            names.contains(&"base".to_string()),
            "List lost base: {names:?}"
        );
        let back = read_blob(&mut self.content, &self.blob_digest.clone(), 0, 0).await?;
        ensure!(back == self.blob, "the seeded blob reads back differently");
        let ci = self
            .content
            .info(cpb::InfoRequest {
                digest: self.blob_digest.clone(),
            })
            .await?
            .into_inner()
            .info
            .ok_or_else(|| anyhow!("no info"))?;
        ensure!(
            ci.size == self.blob.len() as i64 && ci.labels == labels(&[("keep", "me")]),
            "seeded blob info changed: {ci:?}"
        );
        Ok(())
    }

    /// Every directory name under the snapshots root is a numeric id (with
    /// the `new-` prefix of a creation under way): no key became a path.
    fn snapshot_dirs_are_ids(&self) -> Result<()> {
        let root = self.strata.root.join("snapshots");
        for sn in std::fs::read_dir(&root)? {
            let sn = sn?.path();
            if !sn.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&sn)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                ensure!(
                    name.trim_start_matches("new-").parse::<u64>().is_ok(),
                    "{}: unexpected entry {name:?}",
                    sn.display()
                );
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Snapshots: keys
// ---------------------------------------------------------------------------

/// Prepare with an empty key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_prepare_empty_key_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    expect_code(
        fx.snaps.prepare(prepare_req("", "", HashMap::new())).await,
        Code::InvalidArgument,
    )?;
    fx.intact().await
}

/// View with an empty key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_view_empty_key_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let r = fx
        .snaps
        .view(pb::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: String::new(),
            parent: "base".into(),
            labels: HashMap::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument)?;
    fx.intact().await
}

/// Commit to an empty name: the active snapshot stays active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_commit_empty_name_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("work", "base", HashMap::new()))
        .await?;
    expect_code(
        fx.snaps
            .commit(commit_req("", "work", HashMap::new()))
            .await,
        Code::InvalidArgument,
    )?;
    let i = fx
        .snaps
        .stat(stat_req("work"))
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    ensure!(i.kind == pb::Kind::Active as i32, "{i:?}");
    fx.intact().await
}

/// Stat, Mounts, Usage and Remove of an empty key find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lookups_of_empty_key_are_not_found() -> Result<()> {
    let mut fx = Fx::new().await?;
    expect_code(fx.snaps.stat(stat_req("")).await, Code::NotFound)?;
    expect_code(
        fx.snaps
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: String::new(),
            })
            .await,
        Code::NotFound,
    )?;
    expect_code(
        fx.snaps
            .mounts(pb::MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: String::new(),
            })
            .await,
        Code::NotFound,
    )?;
    expect_code(
        fx.snaps
            .usage(pb::UsageRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: String::new(),
            })
            .await,
        Code::NotFound,
    )?;
    fx.intact().await
}

/// A 1 MiB key is refused before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_prepare_huge_key_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let key = "k".repeat(1 << 20);
    expect_code(
        fx.snaps
            .prepare(prepare_req(&key, "", HashMap::new()))
            .await,
        Code::InvalidArgument,
    )?;
    let n = list_snapshots(&mut fx.snaps, &[]).await?.len();
    ensure!(n == 1, "{n} snapshots after a refused Prepare");
    fx.snapshot_dirs_are_ids()?;
    fx.intact().await
}

/// Committing to a 1 MiB name is refused; the active snapshot stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_commit_huge_name_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("work", "base", HashMap::new()))
        .await?;
    let name = "n".repeat(1 << 20);
    expect_code(
        fx.snaps
            .commit(commit_req(&name, "work", HashMap::new()))
            .await,
        Code::InvalidArgument,
    )?;
    let i = fx
        .snaps
        .stat(stat_req("work"))
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    ensure!(i.kind == pb::Kind::Active as i32, "{i:?}");
    fx.intact().await
}

/// Keys are opaque to containerd (`default/3/sha256:…`): `/` in a key
/// is accepted, and names a record, never a path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_key_with_slashes_is_opaque() -> Result<()> {
    let mut fx = Fx::new().await?;
    for key in ["a/b/c", "/abs/key", "//", "base/child"] {
        fx.snaps
            .prepare(prepare_req(key, "base", HashMap::new()))
            .await?;
        let i = fx
            .snaps
            .stat(stat_req(key))
            .await?
            .into_inner()
            .info
            .unwrap_or_default();
        ensure!(i.name == key && i.parent == "base", "{i:?}");
    }
    fx.snapshot_dirs_are_ids()?;
    ensure!(!Path::new("/abs/key").exists());
    // A key that is a prefix of another is still its own record.
    expect_code(fx.snaps.stat(stat_req("a/b")).await, Code::NotFound)?;
    fx.intact().await
}

/// `..` in a key is opaque too: nothing is made outside the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_key_with_dotdot_is_opaque() -> Result<()> {
    let mut fx = Fx::new().await?;
    for key in ["..", "../../../../tmp/strata-hostile-escape", "a/../../b"] {
        fx.snaps
            .prepare(prepare_req(key, "", HashMap::new()))
            .await?;
        let i = fx
            .snaps
            .stat(stat_req(key))
            .await?
            .into_inner()
            .info
            .unwrap_or_default();
        ensure!(i.name == key, "{i:?}");
    }
    fx.snapshot_dirs_are_ids()?;
    ensure!(!Path::new("/tmp/strata-hostile-escape").exists());
    // Removing them removes only them.
    fx.snaps
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "..".into(),
        })
        .await?;
    fx.intact().await
}

/// A NUL in a key does not cut it short: `a\0b` is neither `a` nor
/// `a\0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_key_with_nul_is_opaque() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("a\0b", "base", HashMap::new()))
        .await?;
    expect_code(fx.snaps.stat(stat_req("a")).await, Code::NotFound)?;
    expect_code(fx.snaps.stat(stat_req("a\0")).await, Code::NotFound)?;
    let i = fx
        .snaps
        .stat(stat_req("a\0b"))
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    ensure!(i.name == "a\0b", "{i:?}");
    fx.snapshot_dirs_are_ids()?;
    // Commit to a name with a NUL, then use it as a parent.
    fx.snaps
        .commit(commit_req("c\0d", "a\0b", HashMap::new()))
        .await?;
    fx.snaps
        .prepare(prepare_req("child", "c\0d", HashMap::new()))
        .await?;
    expect_code(
        fx.snaps
            .prepare(prepare_req("x", "c", HashMap::new()))
            .await,
        Code::NotFound,
    )?;
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Snapshots: labels
// ---------------------------------------------------------------------------

/// A label of exactly 4096 bytes (key + value) is accepted: the limit
/// is containerd's, not lower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_label_at_the_limit_is_accepted() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("work", "base", label_of_size(MAX_LABEL)))
        .await?;
    let i = fx
        .snaps
        .stat(stat_req("work"))
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    ensure!(i.labels == label_of_size(MAX_LABEL), "label not kept");
    fx.intact().await
}

/// Prepare with a 4097-byte label: nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_prepare_oversized_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let s = expect_code(
        fx.snaps
            .prepare(prepare_req("work", "base", label_of_size(MAX_LABEL + 1)))
            .await,
        Code::InvalidArgument,
    )?;
    ensure!(s.message().contains("hostile.label"), "{}", s.message());
    expect_code(fx.snaps.stat(stat_req("work")).await, Code::NotFound)?;
    fx.snapshot_dirs_are_ids()?;
    fx.intact().await
}

/// Prepare with one huge (1 MiB) label value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_prepare_huge_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let l = labels(&[("k", &"v".repeat(1 << 20))]);
    expect_code(
        fx.snaps.prepare(prepare_req("work", "", l)).await,
        Code::InvalidArgument,
    )?;
    expect_code(fx.snaps.stat(stat_req("work")).await, Code::NotFound)?;
    fx.intact().await
}

/// Commit with an oversized label: the active snapshot stays active
/// and can still be committed properly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_commit_oversized_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("work", "base", HashMap::new()))
        .await?;
    expect_code(
        fx.snaps
            .commit(commit_req("done", "work", label_of_size(MAX_LABEL + 1)))
            .await,
        Code::InvalidArgument,
    )?;
    expect_code(fx.snaps.stat(stat_req("done")).await, Code::NotFound)?;
    fx.snaps
        .commit(commit_req("done", "work", HashMap::new()))
        .await?;
    fx.intact().await
}

/// Update with an oversized label leaves the labels as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_update_oversized_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    for mask in [None, Some(vec!["labels.hostile.label".to_string()])] {
        let r = fx
            .snaps
            .update(pb::UpdateSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                info: Some(pb::Info {
                    name: "base".into(),
                    labels: label_of_size(MAX_LABEL + 1),
                    ..Default::default()
                }),
                update_mask: mask.map(|paths| prost_types::FieldMask { paths }),
            })
            .await;
        expect_code(r, Code::InvalidArgument)?;
    }
    fx.intact().await
}

/// Update of a field other than labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_update_of_other_fields_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let r = fx
        .snaps
        .update(pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(pb::Info {
                name: "base".into(),
                parent: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await;
    expect_code(r, Code::InvalidArgument)?;
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Snapshots: structure and filters
// ---------------------------------------------------------------------------

/// Removing a parent with a child: FailedPrecondition, both stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_remove_parent_with_children_is_refused() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("child", "base", HashMap::new()))
        .await?;
    expect_code(
        fx.snaps
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: "base".into(),
            })
            .await,
        Code::FailedPrecondition,
    )?;
    fx.snaps.stat(stat_req("child")).await?;
    // A view on it counts as a child too.
    fx.snaps
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "child".into(),
        })
        .await?;
    fx.snaps
        .view(pb::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "v".into(),
            parent: "base".into(),
            labels: HashMap::new(),
        })
        .await?;
    expect_code(
        fx.snaps
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: "base".into(),
            })
            .await,
        Code::FailedPrecondition,
    )?;
    fx.intact().await
}

/// Prepare on an active (uncommitted) parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_prepare_on_active_parent_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    fx.snaps
        .prepare(prepare_req("work", "base", HashMap::new()))
        .await?;
    expect_code(
        fx.snaps
            .prepare(prepare_req("x", "work", HashMap::new()))
            .await,
        Code::InvalidArgument,
    )?;
    fx.intact().await
}

/// List with filters that do not parse: unterminated quotes, a
/// missing value, a bad operator, a bad regular expression.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_list_unparsable_filter_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    for f in [
        "name==\"unterminated",
        "kind==",
        "name=x",
        "labels.a~=/(/",
        "name==a,,",
        "\u{0}",
    ] {
        let r = list_snapshots(&mut fx.snaps, &[f]).await;
        expect_code(r, Code::InvalidArgument).with_context(|| format!("filter {f:?}"))?;
    }
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Content: digests
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum DigestOp {
    Info,
    Read,
    Delete,
    WriteCommit,
}

/// A bad digest, made from the seeded blob's (`sha256:<hex>`).
#[derive(Clone, Copy)]
enum BadDigest {
    /// `md5:` with 32 hex digits.
    Algorithm,
    /// `sha256:` with 6 hex digits.
    HexLength,
    /// The seeded blob's own digest in upper case.
    Uppercase,
    /// `""`; for a Write commit (where empty means "no expectation"),
    /// `sha256:` with no hex at all.
    Empty,
}

impl BadDigest {
    fn make(self, good: &str, op: DigestOp) -> String {
        match self {
            BadDigest::Algorithm => "md5:d41d8cd98f00b204e9800998ecf8427e".into(),
            BadDigest::HexLength => "sha256:abc123".into(),
            BadDigest::Uppercase => {
                format!(
                    "sha256:{}",
                    good.trim_start_matches("sha256:").to_uppercase()
                )
            }
            BadDigest::Empty if matches!(op, DigestOp::WriteCommit) => "sha256:".into(),
            BadDigest::Empty => String::new(),
        }
    }
}

async fn bad_digest_case(op: DigestOp, bad: BadDigest) -> Result<()> {
    let mut fx = Fx::new().await?;
    let c = &mut fx.content;
    match op {
        DigestOp::Info => {
            let d = bad.make(&fx.blob_digest, op);
            expect_code(
                c.info(cpb::InfoRequest { digest: d }).await,
                Code::InvalidArgument,
            )?;
        }
        DigestOp::Read => {
            let d = bad.make(&fx.blob_digest, op);
            expect_code(read_blob(c, &d, 0, 0).await, Code::InvalidArgument)?;
        }
        DigestOp::Delete => {
            let d = bad.make(&fx.blob_digest, op);
            expect_code(
                c.delete(cpb::DeleteContentRequest { digest: d }).await,
                Code::InvalidArgument,
            )?;
        }
        DigestOp::WriteCommit => {
            // New bytes, committed with a malformed expected digest (of
            // their own digest, for the upper-case case): refused, and
            // the ingest is kept for a proper commit.
            let data = noise(7, 50_000);
            let d = bad.make(&sha256(&data), op);
            let r = write_stream(
                c,
                vec![
                    wreq(
                        cpb::WriteAction::Write,
                        "bad-digest",
                        data.len() as i64,
                        "",
                        0,
                        &data,
                    ),
                    wreq(
                        cpb::WriteAction::Commit,
                        "bad-digest",
                        data.len() as i64,
                        &d,
                        data.len() as i64,
                        &[],
                    ),
                ],
            )
            .await;
            expect_code(r, Code::InvalidArgument)?;
            expect_code(
                c.info(cpb::InfoRequest {
                    digest: sha256(&data),
                })
                .await,
                Code::NotFound,
            )?;
            // Also as the first message's expected digest.
            let r = write_stream(
                c,
                vec![wreq(
                    cpb::WriteAction::Write,
                    "bad-digest-2",
                    0,
                    &d,
                    0,
                    &data,
                )],
            )
            .await;
            expect_code(r, Code::InvalidArgument)?;
            let got = write_stream(
                c,
                vec![wreq(
                    cpb::WriteAction::Commit,
                    "bad-digest",
                    data.len() as i64,
                    &sha256(&data),
                    data.len() as i64,
                    &[],
                )],
            )
            .await?;
            ensure!(
                got.last().map(|m| m.digest.as_str()) == Some(sha256(&data).as_str()),
                "{got:?}"
            );
        }
    }
    fx.intact().await
}

macro_rules! bad_digest_tests {
    ($($name:ident: $op:ident, $bad:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            bad_digest_case(DigestOp::$op, BadDigest::$bad).await
        }
    )*};
}

bad_digest_tests! {
    content_info_digest_bad_algorithm_is_invalid: Info, Algorithm;
    content_info_digest_bad_hex_length_is_invalid: Info, HexLength;
    content_info_digest_uppercase_is_invalid: Info, Uppercase;
    content_info_digest_empty_is_invalid: Info, Empty;
    content_read_digest_bad_algorithm_is_invalid: Read, Algorithm;
    content_read_digest_bad_hex_length_is_invalid: Read, HexLength;
    content_read_digest_uppercase_is_invalid: Read, Uppercase;
    content_read_digest_empty_is_invalid: Read, Empty;
    content_delete_digest_bad_algorithm_is_invalid: Delete, Algorithm;
    content_delete_digest_bad_hex_length_is_invalid: Delete, HexLength;
    content_delete_digest_uppercase_is_invalid: Delete, Uppercase;
    content_delete_digest_empty_is_invalid: Delete, Empty;
    content_write_commit_digest_bad_algorithm_is_invalid: WriteCommit, Algorithm;
    content_write_commit_digest_bad_hex_length_is_invalid: WriteCommit, HexLength;
    content_write_commit_digest_uppercase_is_invalid: WriteCommit, Uppercase;
    content_write_commit_digest_empty_hex_is_invalid: WriteCommit, Empty;
}

// ---------------------------------------------------------------------------
// Content: offsets, sizes, commits
// ---------------------------------------------------------------------------

/// Read at a negative offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_read_negative_offset_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let d = fx.blob_digest.clone();
    expect_code(
        read_blob(&mut fx.content, &d, -1, 0).await,
        Code::InvalidArgument,
    )?;
    expect_code(
        read_blob(&mut fx.content, &d, i64::MIN, 10).await,
        Code::InvalidArgument,
    )?;
    fx.intact().await
}

/// Read past the end of the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_read_offset_past_end_is_out_of_range() -> Result<()> {
    let mut fx = Fx::new().await?;
    let d = fx.blob_digest.clone();
    let n = fx.blob.len() as i64;
    expect_code(
        read_blob(&mut fx.content, &d, n + 1, 0).await,
        Code::OutOfRange,
    )?;
    expect_code(
        read_blob(&mut fx.content, &d, i64::MAX, i64::MAX).await,
        Code::OutOfRange,
    )?;
    // Exactly at the end is an empty read; a size past the end is cut.
    ensure!(read_blob(&mut fx.content, &d, n, 0).await?.is_empty());
    ensure!(read_blob(&mut fx.content, &d, n - 5, i64::MAX).await? == fx.blob[fx.blob.len() - 5..]);
    fx.intact().await
}

/// Read of a digest that is well formed but absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_read_missing_blob_is_not_found() -> Result<()> {
    let mut fx = Fx::new().await?;
    let d = sha256(b"never written");
    expect_code(read_blob(&mut fx.content, &d, 0, 0).await, Code::NotFound)?;
    expect_code(
        fx.content
            .delete(cpb::DeleteContentRequest { digest: d })
            .await,
        Code::NotFound,
    )?;
    fx.intact().await
}

/// Write at a negative offset: refused, the ingest keeps its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_negative_offset_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(8, 10_000);
    write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Write,
            "neg",
            0,
            "",
            0,
            &data[..4000],
        )],
    )
    .await?;
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Write,
            "neg",
            0,
            "",
            -1,
            &data[4000..],
        )],
    )
    .await;
    expect_code(r, Code::InvalidArgument)?;
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "neg",
            0,
            "",
            i64::MIN,
            &data[4000..],
        )],
    )
    .await;
    expect_code(r, Code::InvalidArgument)?;
    let off = ingest_offset(&mut fx.content, "neg").await?;
    ensure!(off == 4000, "ingest offset {off} after refused writes");
    // Resumed properly, it commits the right bytes.
    let got = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "neg",
            data.len() as i64,
            &sha256(&data),
            4000,
            &data[4000..],
        )],
    )
    .await?;
    ensure!(
        got.last().map(|m| m.digest.clone()) == Some(sha256(&data)),
        "{got:?}"
    );
    fx.intact().await
}

/// Write at an offset other than the ingest's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_offset_ahead_is_out_of_range() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(9, 10_000);
    let r = write_stream(
        &mut fx.content,
        vec![
            wreq(cpb::WriteAction::Write, "ahead", 0, "", 0, &data[..100]),
            wreq(cpb::WriteAction::Write, "ahead", 0, "", 5000, &data[5000..]),
        ],
    )
    .await;
    expect_code(r, Code::OutOfRange)?;
    let off = ingest_offset(&mut fx.content, "ahead").await?;
    ensure!(off == 100, "ingest offset {off}");
    fx.intact().await
}

/// Writing more bytes than the expected total: refused at the write,
/// not only at the commit, and the ingest keeps what fitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_past_total_is_out_of_range() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(10, 10_000);
    let r = write_stream(
        &mut fx.content,
        vec![
            wreq(cpb::WriteAction::Write, "past", 6000, "", 0, &data[..5000]),
            wreq(cpb::WriteAction::Write, "past", 0, "", 5000, &data[5000..]),
        ],
    )
    .await;
    expect_code(r, Code::OutOfRange)?;
    let off = ingest_offset(&mut fx.content, "past").await?;
    ensure!(
        off == 5000,
        "ingest offset {off} after a refused write past the total"
    );
    // In one message from the start, too.
    let r = write_stream(
        &mut fx.content,
        vec![wreq(cpb::WriteAction::Commit, "past2", 10, "", 0, &data)],
    )
    .await;
    expect_code(r, Code::OutOfRange)?;
    expect_code(
        fx.content
            .info(cpb::InfoRequest {
                digest: sha256(&data),
            })
            .await,
        Code::NotFound,
    )?;
    // What fits commits.
    let got = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "past",
            6000,
            &sha256(&data[..6000]),
            5000,
            &data[5000..6000],
        )],
    )
    .await?;
    ensure!(
        got.last().map(|m| m.digest.clone()) == Some(sha256(&data[..6000])),
        "{got:?}"
    );
    fx.intact().await
}

/// A negative total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_negative_total_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let r = write_stream(
        &mut fx.content,
        vec![wreq(cpb::WriteAction::Write, "negtotal", -5, "", 0, b"abc")],
    )
    .await;
    expect_code(r, Code::InvalidArgument)?;
    fx.intact().await
}

/// Commit with a digest that is not the bytes': FailedPrecondition,
/// nothing committed, the ingest kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_commit_wrong_digest_is_failed_precondition() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(11, 20_000);
    let wrong = sha256(b"something else");
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "wrongd",
            data.len() as i64,
            &wrong,
            0,
            &data,
        )],
    )
    .await;
    expect_code(r, Code::FailedPrecondition)?;
    for d in [wrong, sha256(&data)] {
        expect_code(
            fx.content.info(cpb::InfoRequest { digest: d }).await,
            Code::NotFound,
        )?;
    }
    ensure!(ingest_offset(&mut fx.content, "wrongd").await? == data.len() as i64);
    fx.intact().await
}

/// Commit with a size that is not the bytes'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_commit_wrong_size_is_failed_precondition() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(12, 20_000);
    // Fewer bytes than the total.
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "wrongs",
            data.len() as i64 + 1,
            &sha256(&data),
            0,
            &data,
        )],
    )
    .await;
    expect_code(r, Code::FailedPrecondition)?;
    expect_code(
        fx.content
            .info(cpb::InfoRequest {
                digest: sha256(&data),
            })
            .await,
        Code::NotFound,
    )?;
    ensure!(ingest_offset(&mut fx.content, "wrongs").await? == data.len() as i64);
    fx.intact().await
}

/// Committing bytes already stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_commit_existing_blob_is_already_exists() -> Result<()> {
    let mut fx = Fx::new().await?;
    let blob = fx.blob.clone();
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Commit,
            "again",
            blob.len() as i64,
            "",
            0,
            &blob,
        )],
    )
    .await;
    expect_code(r, Code::AlreadyExists)?;
    fx.intact().await
}

/// A Write stream whose first message has no ref, or that ends before
/// its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_empty_ref_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let r = write_stream(
        &mut fx.content,
        vec![wreq(cpb::WriteAction::Write, "", 0, "", 0, b"x")],
    )
    .await;
    expect_code(r, Code::InvalidArgument)?;
    let r = write_stream(&mut fx.content, vec![]).await;
    expect_code(r, Code::InvalidArgument)?;
    fx.intact().await
}

/// A 1 MiB ref.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_huge_ref_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let reference = "r".repeat(1 << 20);
    let r = write_stream(
        &mut fx.content,
        vec![wreq(cpb::WriteAction::Write, &reference, 0, "", 0, b"x")],
    )
    .await;
    expect_code(r, Code::InvalidArgument)?;
    let n = fx
        .content
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await?
        .into_inner()
        .statuses
        .len();
    ensure!(n == 0, "{n} ingests after a refused write");
    fx.intact().await
}

/// Refs with `/`, `..` and NUL name ingests, never paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_ref_with_path_characters_is_opaque() -> Result<()> {
    let mut fx = Fx::new().await?;
    let refs = ["../../../../tmp/strata-hostile-ingest", "a/b", "x\0y", "x"];
    for (i, r) in refs.iter().enumerate() {
        write_stream(
            &mut fx.content,
            vec![wreq(cpb::WriteAction::Write, r, 0, "", 0, &[i as u8; 10])],
        )
        .await?;
    }
    ensure!(!Path::new("/tmp/strata-hostile-ingest").exists());
    let ingest = fx.strata.root.join("content/ingest");
    for e in std::fs::read_dir(&ingest)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        ensure!(
            n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()),
            "ingest entry {n:?}"
        );
    }
    let mut got: Vec<String> = fx
        .content
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await?
        .into_inner()
        .statuses
        .into_iter()
        .map(|s| s.r#ref)
        .collect();
    got.sort();
    let mut want: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
    want.sort();
    ensure!(got == want, "{got:?}");
    fx.intact().await
}

/// An unknown Write action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_unknown_action_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let mut m = wreq(cpb::WriteAction::Write, "act", 0, "", 0, b"x");
    m.action = 99;
    expect_code(
        write_stream(&mut fx.content, vec![m]).await,
        Code::InvalidArgument,
    )?;
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Content: labels and filters
// ---------------------------------------------------------------------------

/// Update with an oversized label leaves the labels as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_update_oversized_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    for mask in [None, Some(vec!["labels.hostile.label".to_string()])] {
        let r = fx
            .content
            .update(cpb::UpdateRequest {
                info: Some(cpb::Info {
                    digest: fx.blob_digest.clone(),
                    labels: label_of_size(MAX_LABEL + 1),
                    ..Default::default()
                }),
                update_mask: mask.map(|paths| prost_types::FieldMask { paths }),
            })
            .await;
        expect_code(r, Code::InvalidArgument)?;
    }
    fx.intact().await
}

/// A label of exactly 4096 bytes is accepted on content too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_label_at_the_limit_is_accepted() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(13, 1000);
    let mut m = wreq(
        cpb::WriteAction::Commit,
        "lim",
        data.len() as i64,
        &sha256(&data),
        0,
        &data,
    );
    m.labels = label_of_size(MAX_LABEL);
    write_stream(&mut fx.content, vec![m]).await?;
    let i = fx
        .content
        .info(cpb::InfoRequest {
            digest: sha256(&data),
        })
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    ensure!(i.labels == label_of_size(MAX_LABEL));
    fx.intact().await
}

/// Commit (Writer) with an oversized label: not committed, the ingest
/// kept for a commit without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_write_commit_oversized_label_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(14, 1000);
    let mut m = wreq(
        cpb::WriteAction::Commit,
        "biglabel",
        data.len() as i64,
        &sha256(&data),
        0,
        &data,
    );
    m.labels = label_of_size(MAX_LABEL + 1);
    expect_code(
        write_stream(&mut fx.content, vec![m]).await,
        Code::InvalidArgument,
    )?;
    expect_code(
        fx.content
            .info(cpb::InfoRequest {
                digest: sha256(&data),
            })
            .await,
        Code::NotFound,
    )?;
    ensure!(ingest_offset(&mut fx.content, "biglabel").await? == data.len() as i64);
    fx.intact().await
}

/// Update of a field other than labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_update_of_other_fields_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    let r = fx
        .content
        .update(cpb::UpdateRequest {
            info: Some(cpb::Info {
                digest: fx.blob_digest.clone(),
                size: 1,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["size".into()],
            }),
        })
        .await;
    expect_code(r, Code::InvalidArgument)?;
    fx.intact().await
}

/// List with filters that do not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_list_unparsable_filter_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    for f in ["digest==\"unterminated", "labels.a~=/(/", "digest=", "==x"] {
        expect_code(
            list_content(&mut fx.content, &[f]).await,
            Code::InvalidArgument,
        )
        .with_context(|| format!("filter {f:?}"))?;
    }
    fx.intact().await
}

/// ListStatuses with filters that do not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_list_statuses_unparsable_filter_is_invalid() -> Result<()> {
    let mut fx = Fx::new().await?;
    for f in ["ref==\"unterminated", "ref~=(", "ref!"] {
        let r = fx
            .content
            .list_statuses(cpb::ListStatusesRequest {
                filters: vec![f.into()],
            })
            .await;
        expect_code(r, Code::InvalidArgument).with_context(|| format!("filter {f:?}"))?;
    }
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Content: ref locks held by idle Write streams
// ---------------------------------------------------------------------------

/// A content client on a connection of its own, and a duplicate of its
/// socket: shutting that down is the client process dying, as the daemon
/// sees it.
async fn killable_client(socket: &Path) -> Result<(Content, std::os::fd::OwnedFd)> {
    use std::os::fd::AsFd;
    let path = socket.to_path_buf();
    let (fd_tx, fd_rx) = std::sync::mpsc::channel();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (path, fd_tx) = (path.clone(), fd_tx.clone());
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                let _ = fd_tx.send(s.as_fd().try_clone_to_owned()?);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    let fd = fd_rx.try_recv().context("the connector did not run")?;
    Ok((Content::new(channel), fd))
}

/// Opens a Write stream, writes `first`, waits for its answer and keeps
/// the stream open (idle): the sender and the answers.
async fn idle_writer(
    c: &mut Content,
    reference: &str,
    first: &[u8],
) -> Result<(
    tokio::sync::mpsc::Sender<cpb::WriteContentRequest>,
    tonic::Streaming<cpb::WriteContentResponse>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wreq(cpb::WriteAction::Write, reference, 0, "", 0, first))
        .await?;
    let mut answers = c
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let a = answers
        .message()
        .await?
        .ok_or_else(|| anyhow!("no answer to the first write"))?;
    ensure!(a.offset == first.len() as i64, "{a:?}");
    Ok((tx, answers))
}

/// Writes `data` at the ingest's offset and commits it, retrying while the
/// ref is locked, for up to `within`.
async fn commit_when_unlocked(
    c: &mut Content,
    reference: &str,
    offset: usize,
    data: &[u8],
    within: std::time::Duration,
) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let r = write_stream(
            c,
            vec![wreq(
                cpb::WriteAction::Commit,
                reference,
                data.len() as i64,
                &sha256(data),
                offset as i64,
                &data[offset..],
            )],
        )
        .await;
        match r {
            Ok(m) => {
                ensure!(
                    m.last().map(|m| m.digest.clone()) == Some(sha256(data)),
                    "{m:?}"
                );
                return Ok(());
            }
            Err(s) if s.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(s) => bail!("commit of {reference:?} after the first writer left: {s:?}"),
        }
    }
}

/// While a Write stream holds a ref (idle, connection alive), a second
/// writer of the same ref is told Unavailable (containerd's "ref
/// locked", which its clients retry), within about a second; Status
/// still answers and other refs are not blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_second_writer_of_a_live_ref_is_unavailable() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(15, 8000);
    let mut first = strata::client::content(&fx.strata.socket).await?;
    let (tx, _answers) = idle_writer(&mut first, "locked", &data[..3000]).await?;
    let t = std::time::Instant::now();
    let r = write_stream(
        &mut fx.content,
        vec![wreq(
            cpb::WriteAction::Write,
            "locked",
            0,
            "",
            3000,
            &data[3000..],
        )],
    )
    .await;
    let s = expect_code(r, Code::Unavailable)?;
    ensure!(s.message().contains("locked"), "{}", s.message());
    ensure!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    ensure!(ingest_offset(&mut fx.content, "locked").await? == 3000);
    write_stream(
        &mut fx.content,
        vec![wreq(cpb::WriteAction::Write, "other", 0, "", 0, b"x")],
    )
    .await?;
    drop(tx);
    fx.intact().await
}

/// The lock is released when the first writer ends its stream without
/// committing: the second writer resumes at its offset and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_ref_lock_released_when_the_writer_closes_its_stream() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(16, 8000);
    let mut first = strata::client::content(&fx.strata.socket).await?;
    let (tx, mut answers) = idle_writer(&mut first, "closed", &data[..3000]).await?;
    drop(tx);
    // The server ends the session: the answers end cleanly.
    ensure!(answers.message().await?.is_none());
    commit_when_unlocked(
        &mut fx.content,
        "closed",
        3000,
        &data,
        std::time::Duration::from_secs(5),
    )
    .await?;
    fx.intact().await
}

/// The lock is released when the first writer's process goes away
/// with its stream open (its socket shut down under it, as when a
/// client dies): the second writer resumes and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_ref_lock_released_when_the_writer_disconnects() -> Result<()> {
    let mut fx = Fx::new().await?;
    let data = noise(17, 8000);
    let (mut first, fd) = killable_client(&fx.strata.socket).await?;
    let (tx, answers) = idle_writer(&mut first, "gone", &data[..3000]).await?;
    std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both)?;
    commit_when_unlocked(
        &mut fx.content,
        "gone",
        3000,
        &data,
        std::time::Duration::from_secs(5),
    )
    .await?;
    drop((tx, answers, first));
    fx.intact().await
}

// ---------------------------------------------------------------------------
// Layer extraction (strata_unpack), no daemon
// ---------------------------------------------------------------------------

mod layers {
    use super::*;
    use strata_unpack::{apply, ApplyOptions, Error};

    /// A target directory `layer/` next to `outside/sentinel`.
    pub struct Sandbox {
        pub tmp: tempfile::TempDir,
        pub layer: PathBuf,
        pub outside: PathBuf,
        before: BTreeMap<String, common::TreeEntry>,
        sentinel_times: (i64, i64, i64, i64),
    }

    fn times(p: &Path) -> (i64, i64, i64, i64) {
        let m = std::fs::symlink_metadata(p).expect("stat");
        (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
    }

    impl Sandbox {
        pub fn new() -> Result<Sandbox> {
            let tmp = common::tempdir();
            let layer = tmp.path().join("layer");
            let outside = tmp.path().join("outside");
            std::fs::create_dir(&layer)?;
            std::fs::create_dir(&outside)?;
            std::fs::write(outside.join("sentinel"), b"sentinel")?;
            std::fs::create_dir(outside.join("dir"))?;
            let before = common::tree(tmp.path())?;
            let sentinel_times = times(&outside.join("sentinel"));
            Ok(Sandbox {
                tmp,
                layer,
                outside,
                before,
                sentinel_times,
            })
        }

        pub fn outside_str(&self) -> String {
            self.outside.display().to_string()
        }

        /// Nothing outside `layer/` changed (entries, kinds, modes,
        /// owners, contents, xattrs, link counts; the sentinel's times).
        pub fn assert_outside_untouched(&self) -> Result<()> {
            let mut now = common::tree(self.tmp.path())?;
            now.retain(|p, _| !p.starts_with("layer/"));
            let mut before = self.before.clone();
            before.retain(|p, _| !p.starts_with("layer/"));
            let d = common::tree_diff(&before, &now);
            ensure!(d.is_empty(), "outside the target changed: {d:#?}");
            ensure!(
                times(&self.outside.join("sentinel")) == self.sentinel_times,
                "the sentinel's times changed"
            );
            Ok(())
        }

        /// Applies `tar` plainly with the pipeline, and gzip-compressed
        /// without it, each into a fresh target; the outcomes.
        pub fn apply_both(&self, tar: &[u8]) -> Result<Vec<Result<strata_unpack::Report, Error>>> {
            let mut out = Vec::new();
            for (blob, pipeline) in [(tar.to_vec(), true), (gzip(tar), false)] {
                if self.layer.exists() {
                    std::fs::remove_dir_all(&self.layer)?;
                }
                std::fs::create_dir(&self.layer)?;
                let opts = ApplyOptions {
                    pipeline,
                    ..Default::default()
                };
                out.push(apply(&blob[..], &self.layer, &opts));
                self.assert_outside_untouched()?;
            }
            Ok(out)
        }
    }

    pub fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gzip into memory");
        e.finish().expect("gzip into memory")
    }

    fn octal(field: &mut [u8], v: u64) {
        let w = field.len() - 1;
        let s = format!("{v:0w$o}");
        field[..w].copy_from_slice(&s.as_bytes()[s.len() - w..]);
        field[w] = 0;
    }

    /// A USTAR header; `size` goes in base-256 when it is negative or too
    /// large for octal.
    pub fn header(name: &[u8], typeflag: u8, size: i64, link: &[u8]) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..name.len()].copy_from_slice(name);
        octal(&mut b[100..108], 0o644);
        octal(&mut b[108..116], 0);
        octal(&mut b[116..124], 0);
        if (0..1 << 33).contains(&size) {
            octal(&mut b[124..136], size as u64);
        } else {
            b[124..136].copy_from_slice(&i128::from(size).to_be_bytes()[4..]);
            b[124] |= 0x80;
        }
        octal(&mut b[136..148], 1_600_000_000);
        b[156] = typeflag;
        b[157..157 + link.len()].copy_from_slice(link);
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().div_ceil(512) * 512, 0);
    }

    /// Header, data, padding.
    pub fn entry(name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
        let mut v = header(name, typeflag, data.len() as i64, link).to_vec();
        v.extend_from_slice(data);
        pad(&mut v);
        v
    }

    pub fn file(name: &str, data: &[u8]) -> Vec<u8> {
        entry(name.as_bytes(), b'0', data, b"")
    }

    pub fn symlink(name: &str, target: &str) -> Vec<u8> {
        entry(name.as_bytes(), b'2', b"", target.as_bytes())
    }

    pub fn hardlink(name: &str, target: &str) -> Vec<u8> {
        entry(name.as_bytes(), b'1', b"", target.as_bytes())
    }

    /// One PAX record, `"%d key=value\n"` with its own length.
    pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = key.len() + value.len() + 3;
        let mut len = body + 1;
        while len.to_string().len() + body != len {
            len = len.to_string().len() + body;
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        r
    }

    /// A PAX extended header holding `records` as they are.
    pub fn pax(records: &[u8]) -> Vec<u8> {
        entry(b"PaxHeaders/x", b'x', records, b"")
    }

    pub fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut t = entries.concat();
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    pub fn assert_unsafe(
        results: &[Result<strata_unpack::Report, Error>],
        entry: &str,
    ) -> Result<()> {
        for r in results {
            match r {
                Err(Error::UnsafeEntry { entry: e, reason }) => {
                    ensure!(e == entry, "refused {e:?} ({reason}), wanted {entry:?}")
                }
                other => bail!("wanted UnsafeEntry for {entry:?}, got {other:?}"),
            }
        }
        Ok(())
    }

    pub fn assert_format(
        results: &[Result<strata_unpack::Report, Error>],
        needles: &[&str],
    ) -> Result<()> {
        for r in results {
            match r {
                Err(Error::Format(m)) => {
                    for n in needles {
                        ensure!(m.contains(n), "{m:?} does not mention {n:?}");
                    }
                }
                other => bail!("wanted a format error mentioning {needles:?}, got {other:?}"),
            }
        }
        Ok(())
    }

    pub fn assert_ok(results: Vec<Result<strata_unpack::Report, Error>>) -> Result<()> {
        for r in results {
            r.map_err(|e| anyhow!("apply failed: {e}"))?;
        }
        Ok(())
    }
}

use layers::*;

#[test]
fn unpack_dotdot_entry_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[file("../outside/pwned", b"x")]))?;
    assert_unsafe(&r, "../outside/pwned")
}

#[test]
fn unpack_dotdot_inside_a_name_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[file("a/b/../../../outside/pwned", b"x")]))?;
    assert_unsafe(&r, "a/b/../../../outside/pwned")
}

#[test]
fn unpack_dotdot_directory_entry_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[entry(b"../outside/newdir/", b'5', b"", b"")]))?;
    assert_unsafe(&r, "../outside/newdir/")
}

#[test]
fn unpack_absolute_path_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let abs = format!("{}/pwned", sb.outside_str());
    let r = sb.apply_both(&archive(&[file(&abs, b"x")]))?;
    assert_unsafe(&r, &abs)?;
    ensure!(!sb.outside.join("pwned").exists());
    Ok(())
}

#[test]
fn unpack_pax_path_with_dotdot_is_refused() -> Result<()> {
    // The header's name is harmless; the PAX record that overrides it is not.
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        pax(&pax_record("path", b"../outside/pwned")),
        file("harmless", b"x"),
    ]))?;
    assert_unsafe(&r, "../outside/pwned")
}

#[test]
fn unpack_gnu_long_name_with_dotdot_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let mut long = b"../".repeat(40);
    long.extend_from_slice(b"outside/pwned\0");
    let r = sb.apply_both(&archive(&[
        entry(b"././@LongLink", b'L', &long, b""),
        file("harmless", b"x"),
    ]))?;
    assert_unsafe(&r, std::str::from_utf8(&long[..long.len() - 1])?)
}

#[test]
fn unpack_symlink_escape_then_write_through_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("link", &sb.outside_str()),
        file("link/pwned", b"x"),
    ]))?;
    assert_unsafe(&r, "link/pwned")
}

#[test]
fn unpack_relative_symlink_escape_then_write_through_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        entry(b"d/", b'5', b"", b""),
        symlink("d/up", "../../outside"),
        file("d/up/sentinel", b"overwritten"),
    ]))?;
    assert_unsafe(&r, "d/up/sentinel")
}

#[test]
fn unpack_symlink_escape_then_directory_through_it_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("link", &sb.outside_str()),
        entry(b"link/dir/sub/", b'5', b"", b""),
    ]))?;
    assert_unsafe(&r, "link/dir/sub/")
}

#[test]
fn unpack_symlink_escape_then_whiteout_through_it_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("link", &sb.outside_str()),
        file("link/.wh.sentinel", b""),
    ]))?;
    assert_unsafe(&r, "link/.wh.sentinel")
}

#[test]
fn unpack_file_replacing_an_outward_symlink_is_written_inside() -> Result<()> {
    // `s -> outside/sentinel`, then a file `s`: the symlink is replaced,
    // never written through.
    let sb = Sandbox::new()?;
    let target = format!("{}/sentinel", sb.outside_str());
    let r = sb.apply_both(&archive(&[symlink("s", &target), file("s", b"inside")]))?;
    assert_ok(r)?;
    ensure!(std::fs::read(sb.layer.join("s"))? == b"inside");
    ensure!(!std::fs::symlink_metadata(sb.layer.join("s"))?
        .file_type()
        .is_symlink());
    Ok(())
}

#[test]
fn unpack_directory_replacing_an_outward_symlink_is_made_inside() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("s", &sb.outside_str()),
        entry(b"s/", b'5', b"", b""),
        file("s/inner", b"inside"),
    ]))?;
    assert_ok(r)?;
    ensure!(std::fs::read(sb.layer.join("s/inner"))? == b"inside");
    Ok(())
}

#[test]
fn unpack_hardlink_to_outside_path_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[hardlink("h", "../outside/sentinel")]))?;
    assert_unsafe(&r, "h")
}

#[test]
fn unpack_hardlink_to_absolute_path_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let target = format!("{}/sentinel", sb.outside_str());
    let r = sb.apply_both(&archive(&[hardlink("h", &target)]))?;
    assert_unsafe(&r, "h")
}

#[test]
fn unpack_hardlink_through_a_symlink_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("s", &sb.outside_str()),
        hardlink("h", "s/sentinel"),
    ]))?;
    assert_unsafe(&r, "h")
}

#[test]
fn unpack_hardlink_through_a_relative_symlink_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        symlink("up", ".."),
        hardlink("h", "up/outside/sentinel"),
    ]))?;
    assert_unsafe(&r, "h")
}

#[test]
fn unpack_hardlink_to_an_outward_symlink_links_the_symlink_only() -> Result<()> {
    // `h` becomes a second name of the symlink `s` (never of its target);
    // writing through `h` is then refused like through `s`.
    let sb = Sandbox::new()?;
    let target = format!("{}/sentinel", sb.outside_str());
    let ok = sb.apply_both(&archive(&[symlink("s", &target), hardlink("h", "s")]))?;
    assert_ok(ok)?;
    let m = std::fs::symlink_metadata(sb.layer.join("h"))?;
    ensure!(m.file_type().is_symlink() && m.nlink() == 2, "{m:?}");
    let r = sb.apply_both(&archive(&[
        symlink("s", &sb.outside_str()),
        hardlink("h", "s"),
        file("h/pwned", b"x"),
    ]))?;
    assert_unsafe(&r, "h/pwned")
}

#[test]
fn unpack_hardlink_named_through_a_symlink_is_refused() -> Result<()> {
    // The link's own name goes through a symlink out of the layer.
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        file("f", b"x"),
        symlink("s", &sb.outside_str()),
        hardlink("s/h", "f"),
    ]))?;
    assert_unsafe(&r, "s/h")
}

#[test]
fn unpack_pax_linkpath_escape_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let target = format!("{}/sentinel", sb.outside_str());
    let r = sb.apply_both(&archive(&[
        pax(&pax_record("linkpath", target.as_bytes())),
        hardlink("h", "harmless"),
    ]))?;
    assert_unsafe(&r, "h")
}

#[test]
fn unpack_trusted_xattrs_from_the_archive_are_ignored() -> Result<()> {
    // An overlayfs redirect or opaque marker of the layer's own making
    // could point the merged view elsewhere: containerd drops trusted.*.
    let sb = Sandbox::new()?;
    let mut recs = pax_record("SCHILY.xattr.trusted.overlay.redirect", b"/etc");
    recs.extend(pax_record("SCHILY.xattr.trusted.overlay.opaque", b"y"));
    let r = sb.apply_both(&archive(&[pax(&recs), entry(b"d/", b'5', b"", b"")]))?;
    assert_ok(r)?;
    let names: Vec<String> = xattr::list(sb.layer.join("d"))?
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    ensure!(
        !names.iter().any(|n| n.starts_with("trusted.")),
        "{names:?}"
    );
    Ok(())
}

#[test]
fn unpack_huge_size_in_header_is_refused_when_data_runs_out() -> Result<()> {
    // 1 TiB (base-256) with 4 KiB behind it: refused as truncated, without
    // allocating anything like the size.
    let sb = Sandbox::new()?;
    let mut t = header(b"huge", b'0', 1 << 40, b"").to_vec();
    t.extend_from_slice(&[1u8; 4096]);
    let r = sb.apply_both(&t)?;
    assert_format(&r, &["truncated", "huge"])
}

#[test]
fn unpack_max_size_in_header_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let mut t = header(b"max", b'0', i64::MAX, b"").to_vec();
    t.extend_from_slice(&[0u8; 1024]);
    let r = sb.apply_both(&t)?;
    assert_format(&r, &["truncated"])
}

#[test]
fn unpack_negative_size_in_header_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let mut t = header(b"neg", b'0', -1, b"").to_vec();
    t.extend_from_slice(&[0u8; 1024]);
    let r = sb.apply_both(&t)?;
    assert_format(&r, &["negative size"])
}

#[test]
fn unpack_negative_size_in_pax_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        pax(&pax_record("size", b"-512")),
        file("neg", b""),
    ]))?;
    assert_format(&r, &["negative size"])
}

#[test]
fn unpack_huge_pax_header_is_refused() -> Result<()> {
    // A PAX header claiming 1 TiB is refused before it is read.
    let sb = Sandbox::new()?;
    let mut t = header(b"PaxHeaders/huge", b'x', 1 << 40, b"").to_vec();
    t.extend_from_slice(&[b'9'; 4096]);
    let r = sb.apply_both(&t)?;
    assert_format(&r, &["PAX header", "larger"])
}

#[test]
fn unpack_truncated_in_file_data_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let full = archive(&[file("big", &noise(1, 10_000))]);
    let r = sb.apply_both(&full[..512 + 5000])?;
    assert_format(&r, &["truncated", "big"])
}

#[test]
fn unpack_truncated_in_header_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let full = archive(&[file("small", b"x"), file("next", b"y")]);
    let r = sb.apply_both(&full[..1024 + 100])?;
    assert_format(&r, &["truncated", "small"])
}

#[test]
fn unpack_truncated_after_pax_header_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[pax(&pax_record("path", b"x"))]))?;
    assert_format(&r, &["extended header"])
}

#[test]
fn unpack_truncated_gzip_stream_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let gz = gzip(&archive(&[file("big", &noise(2, 100_000))]));
    std::fs::create_dir_all(&sb.layer)?;
    let r = strata_unpack::apply(&gz[..gz.len() / 2], &sb.layer, &Default::default());
    ensure!(matches!(r, Err(strata_unpack::Error::Format(_))), "{r:?}");
    sb.assert_outside_untouched()
}

#[test]
fn unpack_pax_record_longer_than_its_header_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[pax(b"99 path=x\n"), file("f", b"x")]))?;
    assert_format(&r, &["malformed PAX record"])
}

#[test]
fn unpack_pax_record_with_bad_length_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[pax(b"x1 path=y\n"), file("f", b"x")]))?;
    assert_format(&r, &["PAX record"])
}

#[test]
fn unpack_pax_record_without_equals_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[pax(b"9 pathxy\n"), file("f", b"x")]))?;
    assert_format(&r, &["without '='"])
}

#[test]
fn unpack_pax_path_with_nul_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        pax(&pax_record("path", b"a\0../../outside/pwned")),
        file("f", b"x"),
    ]))?;
    assert_format(&r, &["NUL"])
}

#[test]
fn unpack_pax_size_not_a_number_is_refused() -> Result<()> {
    let sb = Sandbox::new()?;
    let r = sb.apply_both(&archive(&[
        pax(&pax_record("size", b"12x")),
        file("f", b""),
    ]))?;
    assert_format(&r, &["PAX size"])
}

#[test]
fn unpack_sparse_map_past_the_file_is_refused() -> Result<()> {
    // GNU sparse 0.1: a fragment past the file's real size.
    let sb = Sandbox::new()?;
    let mut recs = pax_record("GNU.sparse.major", b"0");
    recs.extend(pax_record("GNU.sparse.minor", b"1"));
    recs.extend(pax_record("GNU.sparse.size", b"100"));
    recs.extend(pax_record("GNU.sparse.map", b"1000000,4"));
    let r = sb.apply_both(&archive(&[pax(&recs), file("sparse", b"abcd")]))?;
    assert_format(&r, &["sparse map"])
}

/// A decompression bomb: 64 MiB of zeros in a ~64 KiB gzip. strata-unpack
/// has no ratio or size limit (containerd has none either): the layer is
/// streamed to disk with bounded memory, and what it may fill is bounded
/// only by the filesystem. This test pins that behaviour down.
#[test]
fn unpack_gzip_bomb_is_streamed_without_a_ratio_limit() -> Result<()> {
    let sb = Sandbox::new()?;
    let size: usize = 64 << 20;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&header(b"zeros", b'0', size as i64, b""))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        gz.write_all(&zeros)?;
    }
    gz.write_all(&[0u8; 1024])?;
    let blob = gz.finish()?;
    let report = strata_unpack::apply(&blob[..], &sb.layer, &Default::default())
        .map_err(|e| anyhow!("{e}"))?;
    let ratio = report.uncompressed_bytes / report.compressed_bytes.max(1);
    ensure!(ratio > 500, "ratio {ratio}");
    ensure!(std::fs::metadata(sb.layer.join("zeros"))?.len() == size as u64);
    sb.assert_outside_untouched()
}

// ---------------------------------------------------------------------------
// eStargz footers and TOCs (strata_lazy::estargz), no daemon
// ---------------------------------------------------------------------------

mod stargz {
    use super::*;
    use strata_lazy::estargz::{Error, Footer, Toc, FOOTER_SIZE};

    pub fn gz_member(data: &[u8]) -> Vec<u8> {
        layers::gzip(data)
    }

    /// The TOC's gzip member: a tar holding `stargz.index.json`.
    pub fn toc_member(json: &[u8]) -> Vec<u8> {
        let mut tar = layers::entry(b"stargz.index.json", b'0', json, b"");
        tar.extend_from_slice(&[0u8; 1024]);
        gz_member(&tar)
    }

    /// The 51-byte eStargz footer naming the TOC's offset.
    pub fn footer(toc_offset: u64) -> Vec<u8> {
        let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0];
        f.extend_from_slice(b"SG");
        f.extend_from_slice(&[22, 0]);
        f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
        // An empty stored deflate block, CRC32 0, ISIZE 0.
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len() as u64, FOOTER_SIZE);
        f
    }

    /// A blob: a leading member, then one member per file (offsets and
    /// digests in `entries`, filled in), the TOC from `entries` (after
    /// `edit`), the footer. Returns the blob and the TOC JSON.
    pub fn blob_with(
        files: &[(&str, &[u8])],
        edit: impl FnOnce(&mut Vec<serde_json::Value>, u64),
    ) -> (Vec<u8>, Vec<u8>) {
        let mut blob = gz_member(b"");
        let mut entries = vec![serde_json::json!({"name": "./", "type": "dir", "mode": 0o755})];
        for (name, data) in files {
            let off = blob.len();
            blob.extend(gz_member(data));
            entries.push(serde_json::json!({
                "name": name,
                "type": "reg",
                "mode": 0o644,
                "size": data.len(),
                "offset": off,
                "chunkDigest": sha256(data),
            }));
        }
        let toc_offset = blob.len() as u64;
        edit(&mut entries, toc_offset);
        let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries}))
            .expect("JSON of a Value");
        blob.extend(toc_member(&json));
        blob.extend(footer(toc_offset));
        (blob, json)
    }

    /// As the lazy snapshotter reads a blob: footer from the tail, TOC
    /// between them, checked against `expected`.
    pub fn parse(blob: &[u8], expected: Option<&str>) -> Result<Toc, Error> {
        let size = blob.len() as u64;
        let tail = &blob[blob.len().saturating_sub(FOOTER_SIZE as usize + 16)..];
        let footer = Footer::parse(tail, size)?;
        let end = (size - footer.size) as usize;
        Toc::parse(&blob[footer.toc_offset as usize..end], footer, expected)
    }

    pub fn expect_toc_err(r: Result<Toc, Error>, needle: &str) -> Result<()> {
        match r {
            Err(Error::Toc(m)) if m.contains(needle) => Ok(()),
            other => bail!("wanted a TOC error mentioning {needle:?}, got {other:?}"),
        }
    }

    pub fn expect_not_estargz(r: Result<Toc, Error>) -> Result<()> {
        match r {
            Err(Error::NotEstargz(_)) => Ok(()),
            other => bail!("wanted NotEstargz, got {other:?}"),
        }
    }
}

use stargz::*;

#[test]
fn estargz_well_formed_blob_parses() -> Result<()> {
    // The baseline the hostile cases below are made from.
    let (blob, json) = blob_with(&[("a", b"hello"), ("b", b"world")], |_, _| {});
    let toc = parse(&blob, Some(&sha256(&json))).map_err(|e| anyhow!("{e}"))?;
    let a = toc.lookup("a").ok_or_else(|| anyhow!("no a"))?;
    let c = &toc.nodes[a].chunks[0];
    let got = toc
        .decode_chunk("a", c, &blob[c.blob_offset as usize..c.blob_end as usize])
        .map_err(|e| anyhow!("{e}"))?;
    ensure!(got == b"hello");
    Ok(())
}

#[test]
fn estargz_footer_truncated_is_not_estargz() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    for cut in [1, 10, 30] {
        expect_not_estargz(parse(&blob[..blob.len() - cut], None))?;
    }
    expect_not_estargz(parse(&blob[blob.len() - 20..], None))?;
    expect_not_estargz(parse(&[], None))
}

#[test]
fn estargz_footer_bad_magic_is_not_estargz() -> Result<()> {
    let (mut blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let n = blob.len();
    blob[n - 15] = b'X'; // STARGZ -> STXRGZ
    expect_not_estargz(parse(&blob, None))
}

#[test]
fn estargz_footer_offset_not_hex_is_not_estargz() -> Result<()> {
    let (mut blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let n = blob.len();
    blob[n - 51 + 16..n - 51 + 20].copy_from_slice(b"zzzz");
    expect_not_estargz(parse(&blob, None))
}

#[test]
fn estargz_footer_offset_past_the_blob_is_not_estargz() -> Result<()> {
    let (mut blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let n = blob.len();
    for off in [n as u64, n as u64 - 10, u64::MAX] {
        blob.truncate(n - 51);
        blob.extend(footer(off));
        expect_not_estargz(parse(&blob, None))?;
    }
    Ok(())
}

#[test]
fn estargz_toc_truncated_gzip_is_refused() -> Result<()> {
    // The TOC member cut in half.
    let (blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let size = blob.len();
    let footer_at = size - 51;
    let f = strata_lazy::estargz::Footer::parse(&blob[footer_at..], size as u64)
        .map_err(|e| anyhow!("{e}"))?;
    let toc = &blob[f.toc_offset as usize..footer_at];
    let r = strata_lazy::estargz::Toc::parse(&toc[..toc.len() / 2], f, None);
    expect_toc_err(r, "gunzip")
}

#[test]
fn estargz_toc_not_gzip_is_refused() -> Result<()> {
    let (mut blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let n = blob.len();
    let footer = strata_lazy::estargz::Footer::parse(&blob[n - 51..], n as u64)
        .map_err(|e| anyhow!("{e}"))?;
    for b in &mut blob[footer.toc_offset as usize..n - 51] {
        *b = b'j';
    }
    expect_toc_err(parse(&blob, None), "gunzip")
}

#[test]
fn estargz_toc_tar_shorter_than_its_entry_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    let n = blob.len();
    let footer = strata_lazy::estargz::Footer::parse(&blob[n - 51..], n as u64)
        .map_err(|e| anyhow!("{e}"))?;
    // A TOC tar whose header claims 1 MiB and holds 10 bytes.
    let mut tar = layers::header(b"stargz.index.json", b'0', 1 << 20, b"").to_vec();
    tar.extend_from_slice(b"{\"version\"");
    let mut b = blob[..footer.toc_offset as usize].to_vec();
    b.extend(gz_member(&tar));
    b.extend(stargz::footer(footer.toc_offset));
    expect_toc_err(parse(&b, None), "shorter than its entry")
}

#[test]
fn estargz_toc_wrong_file_name_is_refused() -> Result<()> {
    let mut b = gz_member(b"");
    let off = b.len() as u64;
    let mut tar = layers::entry(b"../../etc/passwd", b'0', b"{}", b"");
    tar.extend_from_slice(&[0u8; 1024]);
    b.extend(gz_member(&tar));
    b.extend(footer(off));
    expect_toc_err(parse(&b, None), "not stargz.index.json")
}

#[test]
fn estargz_toc_bad_json_is_refused() -> Result<()> {
    let mut b = gz_member(b"");
    let off = b.len() as u64;
    b.extend(toc_member(b"{\"version\": 1, \"entries\": [ {\"name\": "));
    b.extend(footer(off));
    expect_toc_err(parse(&b, None), "JSON")
}

#[test]
fn estargz_toc_wrong_types_in_json_are_refused() -> Result<()> {
    let mut b = gz_member(b"");
    let off = b.len() as u64;
    b.extend(toc_member(
        br#"{"version": 1, "entries": [{"name": "a", "type": "reg", "size": "big"}]}"#,
    ));
    b.extend(footer(off));
    expect_toc_err(parse(&b, None), "JSON")
}

#[test]
fn estargz_toc_digest_mismatch_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |_, _| {});
    match parse(&blob, Some(&sha256(b"another TOC"))) {
        Err(strata_lazy::estargz::Error::TocDigest { .. }) => Ok(()),
        other => bail!("wanted TocDigest, got {other:?}"),
    }
}

#[test]
fn estargz_toc_chunk_offset_past_the_data_is_refused() -> Result<()> {
    for past in [0u64, 1, 1 << 40] {
        let (blob, _) = blob_with(&[("a", b"hello")], |e, toc| {
            e[1]["offset"] = serde_json::json!(toc + past);
        });
        expect_toc_err(parse(&blob, None), "outside the blob's data")?;
    }
    Ok(())
}

#[test]
fn estargz_toc_chunk_offset_zero_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["offset"] = serde_json::json!(0);
    });
    expect_toc_err(parse(&blob, None), "outside the blob's data")
}

#[test]
fn estargz_toc_negative_offset_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["offset"] = serde_json::json!(-1);
    });
    expect_toc_err(parse(&blob, None), "negative offset")
}

#[test]
fn estargz_toc_negative_size_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["size"] = serde_json::json!(-5);
    });
    expect_toc_err(parse(&blob, None), "negative size")
}

#[test]
fn estargz_toc_negative_chunk_offset_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello world, in two chunks")], |e, _| {
        e[1]["chunkSize"] = serde_json::json!(5);
        let mut c = e[1].clone();
        c["type"] = "chunk".into();
        c["chunkOffset"] = serde_json::json!(-5);
        c["chunkSize"] = serde_json::json!(0);
        e.push(c);
    });
    expect_toc_err(parse(&blob, None), "negative chunkOffset")
}

#[test]
fn estargz_toc_overlapping_chunks_are_refused() -> Result<()> {
    // Two chunks of one file: the second starts inside the first.
    let data = noise(3, 200);
    let (blob, _) = blob_with(&[("a", &data)], |e, _| {
        e[1]["chunkSize"] = serde_json::json!(100);
        let mut c = e[1].clone();
        c["type"] = "chunk".into();
        c["chunkOffset"] = serde_json::json!(50);
        c["chunkSize"] = serde_json::json!(150);
        e.push(c);
    });
    expect_toc_err(parse(&blob, None), "does not follow")
}

#[test]
fn estargz_toc_chunks_not_covering_the_file_are_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", &noise(4, 200))], |e, _| {
        e[1]["chunkSize"] = serde_json::json!(100);
    });
    expect_toc_err(parse(&blob, None), "chunks cover 100 of its 200 bytes")
}

#[test]
fn estargz_toc_chunk_before_any_file_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        let mut c = e[1].clone();
        c["type"] = "chunk".into();
        e.insert(1, c);
    });
    expect_toc_err(parse(&blob, None), "before any file")
}

#[test]
fn estargz_toc_chunk_larger_than_the_cap_is_refused() -> Result<()> {
    // A file that claims 2^62 bytes in one chunk: refused at parse time,
    // so decode_chunk never allocates it.
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["size"] = serde_json::json!(1u64 << 62);
    });
    expect_toc_err(parse(&blob, None), "does not follow")
}

#[test]
fn estargz_toc_chunk_without_a_valid_digest_is_refused() -> Result<()> {
    for d in ["", "sha256:xyz", "md5:d41d8cd98f00b204e9800998ecf8427e"] {
        let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
            e[1]["chunkDigest"] = d.into();
        });
        expect_toc_err(parse(&blob, None), "chunkDigest")?;
    }
    Ok(())
}

#[test]
fn estargz_chunk_digest_mismatch_is_refused_on_read() -> Result<()> {
    // The TOC (and its digest) say one thing, the blob's member holds
    // another: the chunk is refused when decoded, never served.
    let (blob, json) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["chunkDigest"] = sha256(b"HELLO").into();
    });
    let toc = parse(&blob, Some(&sha256(&json))).map_err(|e| anyhow!("{e}"))?;
    let a = toc.lookup("a").ok_or_else(|| anyhow!("no a"))?;
    let c = &toc.nodes[a].chunks[0];
    let r = toc.decode_chunk("a", c, &blob[c.blob_offset as usize..c.blob_end as usize]);
    match r {
        Err(strata_lazy::estargz::Error::Chunk { msg, .. }) if msg.contains("chunkDigest") => {
            Ok(())
        }
        other => bail!("wanted a chunk digest error, got {other:?}"),
    }
}

#[test]
fn estargz_chunk_truncated_in_the_blob_is_refused_on_read() -> Result<()> {
    let data = noise(5, 5000);
    let (blob, _) = blob_with(&[("a", &data)], |_, _| {});
    let toc = parse(&blob, None).map_err(|e| anyhow!("{e}"))?;
    let a = toc.lookup("a").ok_or_else(|| anyhow!("no a"))?;
    let c = &toc.nodes[a].chunks[0];
    let cut =
        &blob[c.blob_offset as usize..(c.blob_offset + (c.blob_end - c.blob_offset) / 2) as usize];
    match toc.decode_chunk("a", c, cut) {
        Err(strata_lazy::estargz::Error::Chunk { msg, .. }) if msg.contains("gunzip") => Ok(()),
        other => bail!("wanted a gunzip chunk error, got {other:?}"),
    }
}

#[test]
fn estargz_files_sharing_a_blob_range_are_each_verified() -> Result<()> {
    // `b` claims `a`'s member as its own data: the TOC parses (shared
    // members are legal for identical contents), but b's bytes are
    // checked against b's digest when read.
    let (blob, _) = blob_with(&[("a", b"hello"), ("b", b"world")], |e, _| {
        e[2]["offset"] = e[1]["offset"].clone();
    });
    let toc = parse(&blob, None).map_err(|e| anyhow!("{e}"))?;
    let b = toc.lookup("b").ok_or_else(|| anyhow!("no b"))?;
    let c = &toc.nodes[b].chunks[0];
    let r = toc.decode_chunk("b", c, &blob[c.blob_offset as usize..c.blob_end as usize]);
    ensure!(
        matches!(r, Err(strata_lazy::estargz::Error::Chunk { .. })),
        "{r:?}"
    );
    Ok(())
}

#[test]
fn estargz_toc_dotdot_name_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e[1]["name"] = "../../etc/passwd".into();
    });
    expect_toc_err(parse(&blob, None), "'..'")
}

#[test]
fn estargz_toc_hardlink_to_missing_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e.push(serde_json::json!({"name": "h", "type": "hardlink", "linkName": "../outside"}));
    });
    expect_toc_err(parse(&blob, None), "'..'")?;
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e.push(serde_json::json!({"name": "h", "type": "hardlink", "linkName": "missing"}));
    });
    expect_toc_err(parse(&blob, None), "missing")
}

#[test]
fn estargz_toc_entry_under_a_file_is_refused() -> Result<()> {
    let (blob, _) = blob_with(&[("a", b"hello")], |e, _| {
        e.push(serde_json::json!({"name": "a/b", "type": "dir"}));
    });
    expect_toc_err(parse(&blob, None), "not a directory")
}

#[test]
fn estargz_toc_unknown_version_is_refused() -> Result<()> {
    let mut b = gz_member(b"");
    let off = b.len() as u64;
    b.extend(toc_member(br#"{"version": 2, "entries": []}"#));
    b.extend(footer(off));
    expect_toc_err(parse(&b, None), "version 2")
}

#[test]
fn estargz_toc_larger_than_the_cap_is_refused() -> Result<()> {
    // A TOC member that inflates past MAX_TOC_BYTES (256 MiB): refused
    // after reading just past the cap, not inflated to the end.
    use strata_lazy::estargz::MAX_TOC_BYTES;
    let claimed = MAX_TOC_BYTES + (64 << 20);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layers::header(
        b"stargz.index.json",
        b'0',
        claimed as i64,
        b"",
    ))?;
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..(claimed >> 20) {
        gz.write_all(&spaces)?;
    }
    let toc = gz.finish()?;
    let mut b = gz_member(b"");
    let off = b.len() as u64;
    b.extend(toc);
    b.extend(footer(off));
    let t = std::time::Instant::now();
    expect_toc_err(parse(&b, None), "larger than")?;
    ensure!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    Ok(())
}
