//! Faults from outside strata: a full disk under its root, and containerd
//! and strata restarted under each other.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use strata::harness::{image, Containerd, ContainerdSetup, Registry, Strata};
use strata_proto::content as cpb;
use strata_proto::snapshots as pb;
use tonic::transport::Channel;
use tonic::Code;

type Snaps = pb::snapshots_client::SnapshotsClient<Channel>;
type Blobs = cpb::content_client::ContentClient<Channel>;

const SNAPSHOTTER: &str = "strata";

/// A small ext4 filesystem in a file, on a loop device, mounted. Unmounted
/// and detached when dropped, whatever happened: a leaked loop device
/// outlives the test.
struct LoopFs {
    dev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// `mib` MiB under `dir`, mounted at `dir/mnt`.
    fn new(dir: &Path, mib: u64) -> Result<LoopFs> {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)?.set_len(mib << 20)?;
        // No blocks reserved for root: strata runs as root and would use them.
        strata::harness::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img),
        )?;
        let out =
            strata::harness::run(Command::new("losetup").args(["--find", "--show"]).arg(&img))?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        // From here the guard detaches it.
        let mut fs = LoopFs {
            dev,
            mnt: dir.join("mnt"),
            mounted: false,
        };
        std::fs::create_dir_all(&fs.mnt)?;
        strata::harness::run(Command::new("mount").arg(&fs.dev).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Bytes an unprivileged write could still take.
    fn free_bytes(&self) -> Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.mnt)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let mut done = false;
            for _ in 0..50 {
                if nix::mount::umount(&self.mnt).is_ok() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !done {
                eprintln!("{} is busy: detaching it lazily", self.mnt.display());
                let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Stops strata (SIGTERM; it must stop within 10 s), and checks that its
/// log shows no panic.
fn stop_clean(strata: Strata) -> Result<()> {
    let mut proc = strata.into_proc();
    let stopped = proc.stop()?;
    let log = proc.log_text();
    ensure!(
        stopped,
        "strata did not stop within 10 s of SIGTERM:\n{}",
        proc.log_tail()
    );
    ensure!(!log.contains("panicked"), "strata panicked:\n{log}");
    Ok(())
}

/// A request strata refused.
#[derive(Debug)]
struct Refusal {
    op: String,
    code: Code,
    message: String,
}

/// The gRPC status behind an error of `strata::client`.
fn status_of(e: &anyhow::Error) -> Option<&tonic::Status> {
    e.chain().find_map(|c| c.downcast_ref::<tonic::Status>())
}

/// Whether a refusal says plainly that the disk is full, and why.
fn says_disk_full(code: Code, message: &str) -> bool {
    code == Code::ResourceExhausted
        && message.starts_with("disk full")
        && message.contains("No space left on device")
}

fn ensure_disk_full(r: &Refusal) -> Result<()> {
    ensure!(
        says_disk_full(r.code, &r.message),
        "{} on a full disk: {:?} {:?}, wanted ResourceExhausted saying the disk is full",
        r.op,
        r.code,
        r.message
    );
    Ok(())
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

async fn blobs_intact(c: &mut Blobs, blobs: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    for (digest, data) in blobs {
        let back = common::read_blob(c, digest)
            .await
            .with_context(|| format!("reading {digest}"))?;
        ensure!(
            back == *data,
            "{digest}: read back {} bytes that differ from the {} written",
            back.len(),
            data.len()
        );
    }
    Ok(())
}

async fn prepare(
    c: &mut Snaps,
    key: &str,
    parent: &str,
) -> Result<Vec<strata_proto::types::Mount>, tonic::Status> {
    Ok(c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await?
    .into_inner()
    .mounts)
}

async fn commit(c: &mut Snaps, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::from([("faults".to_string(), name.to_string())]),
    })
    .await?;
    Ok(())
}

async fn remove(c: &mut Snaps, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    })
    .await?;
    Ok(())
}

/// Every snapshot: name to (kind, parent).
async fn listed(c: &mut Snaps) -> Result<BTreeMap<String, (i32, String)>> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        })
        .await?
        .into_inner();
    let mut out = BTreeMap::new();
    while let Some(r) = s.message().await? {
        for i in r.info {
            out.insert(i.name, (i.kind, i.parent));
        }
    }
    Ok(out)
}

/// Where a writable snapshot's changes go: the bind source, or `upperdir=`.
fn upper_of(mounts: &[strata_proto::types::Mount]) -> Result<PathBuf> {
    let m = mounts.first().context("no mounts")?;
    if m.r#type == "bind" {
        return Ok(PathBuf::from(&m.source));
    }
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .with_context(|| format!("no upperdir in {m:?}"))
}

/// A view's layers, top first: the bind source, or `lowerdir=`.
fn lowers_of(mounts: &[strata_proto::types::Mount]) -> Result<Vec<PathBuf>> {
    let m = mounts.first().context("no mounts")?;
    if m.r#type == "bind" {
        return Ok(vec![PathBuf::from(&m.source)]);
    }
    let l = m
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .with_context(|| format!("no lowerdir in {m:?}"))?;
    Ok(l.split(':').map(PathBuf::from).collect())
}

/// Writes `files` (relative path, bytes) under `dir`.
fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    for (rel, data) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, data).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// Checks that layers `lowers` (top first) show `files`, as an overlay
/// of them would.
fn layers_show(lowers: &[PathBuf], files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    for (rel, want) in files {
        let found = lowers
            .iter()
            .map(|l| l.join(rel))
            .find(|p| p.exists())
            .with_context(|| format!("{rel} is in none of the layers {lowers:?}"))?;
        let got = std::fs::read(&found)?;
        ensure!(
            got == *want,
            "{}: {} bytes that differ from the {} written",
            found.display(),
            got.len(),
            want.len()
        );
    }
    Ok(())
}

/// The committed snapshot `name` through a view: its layers show `files`.
async fn view_shows(
    c: &mut Snaps,
    name: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<PathBuf>> {
    let key = format!("check-view-{name}");
    let mounts = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
            parent: name.into(),
            labels: HashMap::new(),
        })
        .await?
        .into_inner()
        .mounts;
    let lowers = lowers_of(&mounts)?;
    let shown = layers_show(&lowers, files);
    remove(c, &key).await?;
    shown?;
    Ok(lowers)
}

fn committed(list: &BTreeMap<String, (i32, String)>, name: &str, parent: &str) -> Result<()> {
    match list.get(name) {
        Some((kind, p)) if *kind == pb::Kind::Committed as i32 && p == parent => Ok(()),
        other => bail!("snapshot {name}: {other:?}, wanted committed on {parent:?}; all: {list:?}"),
    }
}

/// Retries `f` until it succeeds or `within` has passed; returns the
/// result and the attempts it took.
fn retry<T>(within: Duration, mut f: impl FnMut() -> Result<T>) -> (Result<T>, u32) {
    let deadline = Instant::now() + within;
    let mut n = 0;
    loop {
        n += 1;
        match f() {
            Ok(v) => return (Ok(v), n),
            Err(e) if Instant::now() >= deadline => return (Err(e), n),
            Err(e) => {
                let text = format!("{e:#}");
                let why = text
                    .lines()
                    .find(|l| l.starts_with("ctr:"))
                    .or_else(|| text.lines().next())
                    .unwrap_or_default()
                    .to_string();
                eprintln!("attempt {n}: {why}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Refusal {
    fn new(op: impl Into<String>, s: &tonic::Status) -> Refusal {
        let r = Refusal {
            op: op.into(),
            code: s.code(),
            message: s.message().to_string(),
        };
        eprintln!("refused: {} -> {:?} {}", r.op, r.code, r.message);
        r
    }
}

/// Writes 1 MiB files of noise into `dir` until `limit` bytes are written
/// or the disk is full (as a container would); returns the files.
fn write_until_full(dir: &Path, seed: u64, limit: u64) -> Result<Vec<PathBuf>> {
    let block = image::noise(seed, 1 << 20);
    let mut files = Vec::new();
    let mut written = 0;
    while written < limit {
        let p = dir.join(format!("f{}", files.len()));
        let r = std::fs::write(&p, &block);
        files.push(p.clone());
        match r {
            Ok(()) => written += block.len() as u64,
            Err(e) if is_enospc(&e) => break,
            Err(e) => bail!("writing {}: {e}", p.display()),
        }
    }
    Ok(files)
}

/// A blob write refused, or the digest stored.
async fn try_put(c: &mut Blobs, reference: &str, data: &[u8]) -> Result<Result<String, Refusal>> {
    match strata::client::put_blob(c, reference, data).await {
        Ok(d) => Ok(Ok(d)),
        Err(e) => {
            let s = status_of(&e).with_context(|| format!("not a gRPC error: {e:#}"))?;
            Ok(Err(Refusal::new(format!("content write {reference}"), s)))
        }
    }
}

/// Replaces the labels of blob `digest`.
async fn set_labels(
    c: &mut Blobs,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.update(cpb::UpdateRequest {
        info: Some(cpb::Info {
            digest: digest.into(),
            labels,
            ..Default::default()
        }),
        update_mask: None,
    })
    .await?;
    Ok(())
}

/// Every blob strata lists, sorted.
async fn listed_blobs(c: &mut Blobs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut s = c
        .list(cpb::ListContentRequest { filters: vec![] })
        .await?
        .into_inner();
    while let Some(r) = s.message().await? {
        out.extend(r.info.into_iter().map(|i| i.digest));
    }
    out.sort();
    Ok(out)
}

/// A full disk under strata's root, twice. First it fills with what
/// containers write and with blobs, while strata's database still has room
/// in the WAL RocksDB preallocates: every refused write is
/// ResourceExhausted saying so, nothing committed is damaged, and once
/// blobs and snapshots are deleted through the API (compaction gives the
/// packs' space back) strata takes writes again without a restart. Then
/// the database itself runs into the full disk (metadata writes past the
/// preallocated WAL): RocksDB stops taking writes, and only resumes by
/// itself once it sees as much free space as its write buffer (64 MiB), so
/// recovery there is checked across a restart. At the end a restart finds
/// everything and `strata fsck` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_clear_errors_and_recovers() -> Result<()> {
    common::require_root();
    let started = Instant::now();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let fs = LoopFs::new(dir, 128)?;
    let root = fs.mnt.join("strata-root");
    // Compaction gives deleted blobs' pack space back: every second here,
    // and small packs, so that a pack is soon sealed and compacted.
    let config = dir.join("strata.toml");
    std::fs::write(
        &config,
        "[content]\ncompact_interval_secs = 1\npack_max_mib = 8\n",
    )?;
    let cfg = config.display().to_string();
    let bin = common::strata_bin();
    let mut runs = 0;
    let mut start = || -> Result<Strata> {
        runs += 1;
        let logs = dir.join(format!("run-{runs}"));
        std::fs::create_dir_all(&logs)?;
        Strata::start_at(&bin, &logs, &root, &["--config", &cfg])
    };
    let mut strata = start()?;
    let mut cc = strata::client::content(&strata.socket).await?;
    let mut sc = strata::client::snapshots(&strata.socket).await?;

    // What must survive: blobs (incompressible, compressible, small) and
    // two committed layers with files.
    let mut kept: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let text: Vec<u8> = (0..40_000)
        .flat_map(|i| format!("line {i} of a compressible blob\n").into_bytes())
        .collect();
    for (i, data) in [image::noise(1, 3 << 20), text, image::noise(2, 10_000)]
        .into_iter()
        .enumerate()
    {
        let d = strata::client::put_blob(&mut cc, &format!("kept-{i}"), &data).await?;
        kept.insert(d, data);
    }
    let base_files = BTreeMap::from([
        ("a.txt".to_string(), b"in the base layer\n".to_vec()),
        ("dir/b.bin".to_string(), image::noise(3, 300_000)),
    ]);
    let top_files = BTreeMap::from([("c.txt".to_string(), image::noise(4, 50_000))]);
    let mut all_files = base_files.clone();
    all_files.extend(top_files.clone());
    let m = prepare(&mut sc, "base-active", "").await?;
    write_files(&upper_of(&m)?, &base_files)?;
    commit(&mut sc, "base", "base-active").await?;
    let m = prepare(&mut sc, "top-active", "base").await?;
    write_files(&upper_of(&m)?, &top_files)?;
    commit(&mut sc, "top", "top-active").await?;
    let top_layers = view_shows(&mut sc, "top", &all_files).await?;
    let free_before = fs.free_bytes()?;
    eprintln!(
        "{} MiB free of 128 after the kept data (RocksDB preallocates 64 MiB of WAL)",
        free_before >> 20
    );

    // Part 1. What containers write: a third of the space, into the upper
    // dirs of three active snapshots.
    let mut refusals: Vec<Refusal> = Vec::new();
    let mut fill_snaps = Vec::new();
    for j in 0..3u64 {
        let key = format!("fill-{j}");
        let m = prepare(&mut sc, &key, "base").await?;
        fill_snaps.push(key);
        write_until_full(&upper_of(&m)?, 2000 + j, free_before / 9)?;
    }
    // Then blobs of noise until strata refuses three.
    let mut fillers = Vec::new();
    let mut content_refused = 0;
    for i in 0..400u64 {
        let data = image::noise(1000 + i, 4 << 20);
        match try_put(&mut cc, &format!("filler-{i}"), &data).await? {
            Ok(d) => fillers.push(d),
            Err(r) => {
                refusals.push(r);
                content_refused += 1;
                if content_refused == 3 {
                    break;
                }
            }
        }
        strata.proc().check_alive()?;
    }
    ensure!(content_refused == 3, "the disk never filled up");
    eprintln!(
        "{} filler blobs stored; {} MiB free",
        fillers.len(),
        fs.free_bytes()? >> 20
    );
    // Then more containers, until Prepare is refused three times.
    let mut snap_refused = 0;
    for j in 3..400u64 {
        let key = format!("fill-{j}");
        match prepare(&mut sc, &key, "base").await {
            Ok(m) => {
                fill_snaps.push(key);
                write_until_full(&upper_of(&m)?, 2000 + j, u64::MAX)?;
            }
            Err(s) => {
                refusals.push(Refusal::new(format!("Prepare {key}"), &s));
                snap_refused += 1;
                if snap_refused == 3 {
                    break;
                }
            }
        }
        strata.proc().check_alive()?;
    }
    ensure!(snap_refused == 3, "Prepare was never refused");
    // Committing the full layers (metadata only: the WAL has room), and
    // more blobs, big and small.
    for key in &fill_snaps {
        match commit(&mut sc, &format!("{key}-committed"), key).await {
            Ok(()) => eprintln!("Commit {key}: done on the full disk"),
            Err(s) => refusals.push(Refusal::new(format!("Commit {key}"), &s)),
        }
    }
    for (name, len) in [("late-big", 4usize << 20), ("late-small", 5000)] {
        match try_put(&mut cc, name, &image::noise(77, len)).await? {
            Ok(d) => {
                eprintln!("{name}: stored on the full disk");
                fillers.push(d);
            }
            Err(r) => refusals.push(r),
        }
    }
    strata.proc().check_alive()?;
    for r in &refusals {
        ensure_disk_full(r)?;
    }

    // Nothing committed before is damaged, while the disk is still full.
    blobs_intact(&mut cc, &kept).await?;
    layers_show(&top_layers, &all_files)?;
    let list = listed(&mut sc).await?;
    committed(&list, "base", "")?;
    committed(&list, "top", "base")?;

    // Free space through the API: the filler blobs and the ingests the
    // refused writes left, and the filler snapshots. Compaction then gives
    // the packs' space back.
    for d in &fillers {
        cc.delete(cpb::DeleteContentRequest { digest: d.clone() })
            .await
            .with_context(|| format!("deleting {d} on the full disk"))?;
    }
    let statuses = cc
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await?
        .into_inner()
        .statuses;
    ensure!(
        !statuses.is_empty(),
        "refused writes left no ingest to abort"
    );
    for s in statuses {
        cc.abort(cpb::AbortRequest {
            r#ref: s.r#ref.clone(),
        })
        .await
        .with_context(|| format!("aborting ingest {}", s.r#ref))?;
    }
    for name in listed(&mut sc)
        .await?
        .keys()
        .filter(|n| n.starts_with("fill-"))
    {
        remove(&mut sc, name)
            .await
            .with_context(|| format!("removing {name}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs.free_bytes()? + (4 << 20) < free_before {
        if Instant::now() > deadline {
            let du = strata::harness::run(Command::new("du").arg("-ak").arg(&root))?;
            bail!(
                "{} MiB free a minute after the fillers were deleted, {} MiB before filling:\n{}\n{}",
                fs.free_bytes()? >> 20,
                free_before >> 20,
                String::from_utf8_lossy(&du.stdout),
                strata.proc().log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("freed: {} MiB free", fs.free_bytes()? >> 20);

    // Recovered without a restart: new blobs and layers go in.
    let fresh = image::noise(9, 4 << 20);
    let d = strata::client::put_blob(&mut cc, "after-full", &fresh)
        .await
        .context("a blob after the disk was freed")?;
    kept.insert(d, fresh);
    let after_files = BTreeMap::from([("after.txt".to_string(), image::noise(10, 200_000))]);
    let m = prepare(&mut sc, "after-active", "top").await?;
    write_files(&upper_of(&m)?, &after_files)?;
    commit(&mut sc, "after", "after-active").await?;
    let mut all_after = all_files.clone();
    all_after.extend(after_files);
    view_shows(&mut sc, "after", &all_after).await?;
    blobs_intact(&mut cc, &kept).await?;
    strata.proc().check_alive()?;
    let part1 = refusals.len();
    eprintln!("part 1: {part1} writes refused, recovered without a restart");

    // Part 2: the database runs into the full disk. Ready beforehand: a
    // blob to delete, a layer to commit, a blob whose labels grow.
    let doomed = strata::client::put_blob(&mut cc, "doomed", &image::noise(11, 100_000)).await?;
    let m = prepare(&mut sc, "pending-active", "top").await?;
    write_files(
        &upper_of(&m)?,
        &BTreeMap::from([("p.txt".to_string(), b"p\n".to_vec())]),
    )?;
    let flood_data = image::noise(12, 1000);
    let flood = strata::client::put_blob(&mut cc, "flood", &flood_data).await?;
    kept.insert(flood.clone(), flood_data);
    // Another program fills the disk.
    let other = fs.mnt.join("other-program");
    std::fs::create_dir_all(&other)?;
    let other_files = write_until_full(&other, 13, u64::MAX)?;
    eprintln!(
        "another program took the rest: {} MiB free",
        fs.free_bytes()? >> 20
    );
    // Metadata writes (labels) fill the WAL past its preallocated space.
    let mut db_refused = None;
    for n in 0..400u64 {
        let labels: HashMap<String, String> = (0..200)
            .map(|l| (format!("flood.{l}"), format!("{n}-{}", "x".repeat(4000))))
            .collect();
        if let Err(s) = set_labels(&mut cc, &flood, labels).await {
            db_refused = Some(Refusal::new(format!("Update labels #{n}"), &s));
            break;
        }
    }
    let r = db_refused.context("400 label updates of 800 KB on a full disk all went through")?;
    ensure_disk_full(&r)?;
    refusals.push(r);
    // Now every write is refused, the same way; reads go on.
    if let Err(s) = cc
        .delete(cpb::DeleteContentRequest {
            digest: doomed.clone(),
        })
        .await
    {
        refusals.push(Refusal::new("Delete", &s));
    } else {
        bail!("Delete went through after the database refused a write");
    }
    match commit(&mut sc, "pending", "pending-active").await {
        Err(s) => refusals.push(Refusal::new("Commit pending-active", &s)),
        Ok(()) => bail!("Commit went through after the database refused a write"),
    }
    match set_labels(&mut cc, &flood, HashMap::new()).await {
        Err(s) => refusals.push(Refusal::new("Update (small)", &s)),
        Ok(()) => bail!("a small Update went through after the database refused a write"),
    }
    for r in &refusals[part1..] {
        ensure_disk_full(r)?;
    }
    strata.proc().check_alive()?;
    blobs_intact(&mut cc, &kept).await?;
    layers_show(&top_layers, &all_files)?;
    let list = listed(&mut sc).await?;
    committed(&list, "after", "top")?;

    // The other program frees its space. RocksDB resumes by itself only
    // once as much is free as its write buffer (64 MiB; it looks every
    // 5 s), and strata's own deletes are refused meanwhile: see whether
    // it did.
    for f in &other_files {
        std::fs::remove_file(f)?;
    }
    let freed = fs.free_bytes()?;
    let resumed = {
        let deadline = Instant::now() + Duration::from_secs(6);
        loop {
            if set_labels(&mut cc, &flood, HashMap::new()).await.is_ok() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    eprintln!(
        "part 2: {} MiB free again; the database {} without a restart",
        freed >> 20,
        if resumed { "resumed" } else { "did not resume" }
    );
    // It does after a restart, even with the disk full again: the daemon
    // whose database stopped stops on SIGTERM, and replaying the WAL into
    // tables gives the WAL's space back.
    let other_files = write_until_full(&other, 15, u64::MAX)?;
    ensure!(fs.free_bytes()? < 1 << 20, "the disk did not fill again");
    drop((cc, sc));
    stop_clean(strata)?;
    let strata = start().context("starting strata on the full disk")?;
    eprintln!(
        "started again on the full disk; then {} MiB free",
        fs.free_bytes()? >> 20
    );
    let mut cc = strata::client::content(&strata.socket).await?;
    let mut sc = strata::client::snapshots(&strata.socket).await?;
    blobs_intact(&mut cc, &kept).await?;
    set_labels(&mut cc, &flood, HashMap::new())
        .await
        .context("Update after the restart")?;
    cc.delete(cpb::DeleteContentRequest { digest: doomed })
        .await
        .context("Delete after the restart")?;
    commit(&mut sc, "pending", "pending-active")
        .await
        .context("Commit after the restart")?;
    remove(&mut sc, "pending").await?;
    for f in &other_files {
        std::fs::remove_file(f)?;
    }
    let fresh = image::noise(14, 2 << 20);
    let d = strata::client::put_blob(&mut cc, "after-restart", &fresh)
        .await
        .context("a blob after the restart")?;
    kept.insert(d, fresh);
    drop((cc, sc));

    // A restart finds all of it, and no filler.
    stop_clean(strata)?;
    let strata = start()?;
    let mut cc = strata::client::content(&strata.socket).await?;
    let mut sc = strata::client::snapshots(&strata.socket).await?;
    blobs_intact(&mut cc, &kept).await?;
    let blobs = listed_blobs(&mut cc).await?;
    ensure!(
        blobs == kept.keys().cloned().collect::<Vec<_>>(),
        "blobs after the restart: {blobs:?}"
    );
    let list = listed(&mut sc).await?;
    committed(&list, "base", "")?;
    committed(&list, "top", "base")?;
    committed(&list, "after", "top")?;
    ensure!(list.len() == 3, "snapshots after the restart: {list:?}");
    view_shows(&mut sc, "top", &all_files).await?;
    view_shows(&mut sc, "after", &all_after).await?;
    drop((cc, sc));
    stop_clean(strata)?;

    let out = strata::harness::run(Command::new(&bin).arg("fsck").arg("--root").arg(&root))?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.contains(&format!("{} blobs checked, every one matches", kept.len())),
        "fsck: {out}"
    );

    common::summary(&format!("enospc={}", refusals.len()))?;
    eprintln!(
        "full disk: {} writes refused ({part1} with room left in the WAL), recovered; {:.1?}",
        refusals.len(),
        started.elapsed()
    );
    Ok(())
}

/// `ctr run` of the image, printing two of its files.
fn run_cat(cd: &mut Containerd, reference: &str, id: &str) -> Result<()> {
    let out = cd.run(
        SNAPSHOTTER,
        reference,
        id,
        &["/bin/cat", "/data/kept.txt", "/data/added.txt"],
    )?;
    ensure!(
        out == "kept from layer 2\nadded in layer 3\n",
        "container {id} saw: {out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_and_strata_restart_under_each_other() -> Result<()> {
    common::require_root();
    let started = Instant::now();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let bin = common::strata_bin();

    let mut registry = Registry::start(&dir.join("registry"))?;
    image::demo_image()?.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/faults:v1")?;

    let mut strata = Strata::start(&bin, dir, &[])?;
    let cd_dir = dir.join("containerd");
    let setup = ContainerdSetup::strata(&strata.socket);
    let mut cd = Containerd::start(&cd_dir, &setup)?;
    cd.pull(SNAPSHOTTER, &reference)?;
    let out = cd.run(SNAPSHOTTER, &reference, "first", &[])?;
    ensure!(
        out.contains("kept from layer 2\n")
            && out.contains("new content from layer 3\n")
            && out.contains("added in layer 3\n")
            && !out.contains("deleted.txt"),
        "first run saw: {out}"
    );
    run_cat(&mut cd, &reference, "first-cat")?;
    let snaps = cd.snapshot_lines(SNAPSHOTTER)?;
    ensure!(
        snaps.len() == 3 && snaps.iter().all(|l| l.contains("Committed")),
        "{snaps:#?}"
    );
    let blobs = cd.ctr(&["content", "ls", "-q"])?;
    // No registry from here on: nothing can be pulled again.
    drop(registry);

    // containerd restarts; strata keeps running.
    cd.stop()?;
    let mut cd = Containerd::start(&cd_dir, &setup)?;
    strata.proc().check_alive()?;
    ensure!(
        cd.ctr(&["image", "ls", "-q"])?
            .lines()
            .any(|l| l == reference),
        "image gone after containerd's restart"
    );
    run_cat(&mut cd, &reference, "after-containerd-restart")?;
    ensure!(
        cd.snapshot_lines(SNAPSHOTTER)? == snaps,
        "snapshots changed across containerd's restart"
    );
    ensure!(cd.ctr(&["content", "ls", "-q"])? == blobs);

    // strata restarts (SIGTERM, then SIGKILL) under a running containerd,
    // which reconnects by itself. Its gRPC client dials again with a
    // backoff (1 s at first) once a dial failed, so requests in the second
    // after strata is back can still fail Unavailable: retried here.
    for (round, kill) in [(1, false), (2, true)] {
        if kill {
            strata.sigkill()?;
            drop(strata);
        } else {
            stop_clean(strata)?;
        }
        // After a kill, a request while strata is down fails, and
        // containerd survives it.
        if kill {
            let down = cd.run(SNAPSHOTTER, &reference, &format!("down-{round}"), &[]);
            ensure!(down.is_err(), "a container ran with strata down: {down:?}");
        }
        strata = Strata::start(&bin, dir, &[])?;
        let t = Instant::now();
        let id = format!("after-strata-restart-{round}");
        let (ran, attempts) = retry(Duration::from_secs(20), || {
            run_cat(&mut cd, &reference, &id)
        });
        ran.with_context(|| {
            format!(
                "after strata's restart ({})",
                if kill { "SIGKILL" } else { "SIGTERM" }
            )
        })?;
        eprintln!(
            "round {round} ({}): the container ran after {attempts} attempt(s), {:.1?}",
            if kill { "SIGKILL" } else { "SIGTERM" },
            t.elapsed()
        );
        ensure!(
            cd.snapshot_lines(SNAPSHOTTER)? == snaps,
            "snapshots after strata's restart: {:#?}",
            cd.snapshot_lines(SNAPSHOTTER)?
        );
        ensure!(cd.ctr(&["content", "ls", "-q"])? == blobs);
    }
    // A container writes, and the image does not change.
    let out = cd.run(
        SNAPSHOTTER,
        &reference,
        "writer",
        &[
            "/bin/sh",
            "-c",
            "echo scribble > /data/kept.txt; cat /data/kept.txt",
        ],
    )?;
    ensure!(out == "scribble\n", "{out}");
    run_cat(&mut cd, &reference, "last")?;

    cd.stop()?;
    stop_clean(strata)?;
    eprintln!("restarts: {:.0?}", started.elapsed());
    Ok(())
}
