//! Crash consistency, measured: `strata serve` is SIGKILLed at seeded
//! random points, many times in a row on one root, while three clients
//! churn it: two doing Prepare, Commit (with a file written into the
//! snapshot first) and Remove on shared parents, one writing, committing
//! and deleting blobs that share chunks while compaction runs every
//! second. After each kill, `strata fsck` runs on the dead root (every
//! tenth kill), strata restarts, and the harness checks:
//!
//! - every RPC that returned OK is still true (snapshots with their kind and
//!   parent and the file written into them; blobs byte for byte; deleted
//!   ones gone);
//! - an RPC cut short by the kill took effect entirely or not at all (a
//!   Commit moved its key to its name, or left it), and nothing else is
//!   visible: no snapshot or blob that no client asked for;
//! - no snapshot's parent is gone, and no removal of a parent with
//!   children ever succeeded;
//! - after Cleanup, the snapshot directories on disk are exactly the
//!   snapshots listed (leftovers cleaned);
//! - an ingest cut short is resumed from the offset strata reports, and
//!   commits with the right digest.
//!
//! `STRATA_CRASH_KILLS` (default 300) and `STRATA_CRASH_SEED` (default: from
//! the clock, printed) set the run; with `STRATA_SUMMARY` naming a file,
//! the counts are appended to it for CI's summary line.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{env_or, summary, Rng};
use sha2::Digest as _;
use strata::harness::Strata;
use strata_proto::content as cpb;
use strata_proto::snapshots as pb;
use tonic::Code;

const SNAP: &str = "strata";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Snap {
    Active(String),
    Committed(String),
}

/// A name's state, `None` for absent: snapshots by key or name, blobs by
/// digest.
#[derive(Clone, Debug, PartialEq, Eq)]
enum St {
    Snap(Option<Snap>),
    Blob(bool),
}

/// What an RPC in flight may have left: one of these, on all its names.
type Alternatives = Vec<BTreeMap<String, St>>;

#[derive(Default)]
struct Model {
    snaps: BTreeMap<String, Snap>,
    blobs: BTreeMap<String, Arc<Vec<u8>>>,
    /// Committed snapshot → the directory its file was written in.
    dirs: HashMap<String, PathBuf>,
    /// RPCs sent and not answered, by id.
    pending: BTreeMap<u64, Alternatives>,
    /// Blob data of puts in flight, by ref (to resume them).
    ingests: HashMap<String, Arc<Vec<u8>>>,
    next: u64,
    acked: u64,
    refused_parent_removals: u64,
    /// Set just before the kill: from then on a failed RPC may be the
    /// kill's doing; before, it is a failure of strata's.
    dying: bool,
    /// Per parent, how many times one of its children came or went in
    /// the model (replies are taken in another order than strata ran
    /// them: a refusal may be answered for a child that is gone since).
    child_events: HashMap<String, u64>,
}

impl Model {
    fn children(&self, name: &str) -> usize {
        self.snaps
            .values()
            .filter(|s| matches!(s, Snap::Active(p) | Snap::Committed(p) if p == name))
            .count()
    }

    /// Whether an RPC in flight may give `name` a child.
    fn preparing(&self, name: &str) -> bool {
        self.pending
            .values()
            .flatten()
            .flat_map(|a| a.values())
            .any(|s| matches!(s, St::Snap(Some(Snap::Active(p))) if p == name))
    }

    /// Whether `name` has, or may soon have, a child.
    fn may_have_children(&self, name: &str) -> bool {
        self.children(name) > 0 || self.preparing(name)
    }

    fn child_event(&mut self, parent: &str) {
        *self.child_events.entry(parent.to_string()).or_default() += 1;
    }

    /// Children of `name` that no RPC in flight may have removed already
    /// (replies are taken in another order than strata ran them).
    fn sure_children(&self, name: &str) -> usize {
        let child_of =
            |s: &St| matches!(s, St::Snap(Some(Snap::Active(p) | Snap::Committed(p))) if p == name);
        self.snaps
            .iter()
            .filter(|(_, s)| matches!(s, Snap::Active(p) | Snap::Committed(p) if p == name))
            .filter(|(c, _)| {
                !self
                    .pending
                    .values()
                    .flatten()
                    .any(|alt| alt.get(*c) == Some(&St::Snap(None)) && !alt.values().any(child_of))
            })
            .count()
    }

    fn begin(&mut self, alts: Alternatives) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, alts);
        self.next
    }
}

type Shared = Arc<Mutex<Model>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reply that says the request was refused, not cut short.
fn definite(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition | Code::InvalidArgument
    )
}

/// The directory a mount of an active snapshot writes to.
fn upper_of(mounts: &[strata_proto::types::Mount]) -> Option<PathBuf> {
    let m = mounts.first()?;
    if m.r#type == "bind" {
        return Some(PathBuf::from(&m.source));
    }
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

fn snap_state(s: Option<Snap>) -> St {
    St::Snap(s)
}

/// Snapshot churn by client `t` until the daemon goes.
async fn snapshot_churn(socket: PathBuf, t: usize, model: Shared, seed: u64) -> Result<()> {
    // Connecting fails if the kill came first.
    let Ok(mut c) = strata::client::snapshots(&socket).await else {
        return Ok(());
    };
    let mut rng = Rng::new(seed);
    loop {
        enum Op {
            Prepare(String, String),
            Commit(String, String, String),
            /// Key, its state, and whether it may have had children when
            /// sent and the parent's child events then.
            Remove(String, Option<Snap>, bool, u64),
        }
        let (op, id) = {
            let mut m = lock(&model);
            let mine = format!("t{t}-");
            let own: Vec<(String, Snap)> = m
                .snaps
                .iter()
                .filter(|(k, _)| k.starts_with(&mine))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect();
            let committed: Vec<String> = m
                .snaps
                .iter()
                .filter(|(_, s)| matches!(s, Snap::Committed(_)))
                .map(|(k, _)| k.clone())
                .collect();
            let n = m.next + 1;
            let roll = rng.below(10);
            let op = if own.len() > 24 || (roll < 3 && !own.is_empty()) {
                let (k, s) = rng.pick(&own).cloned().context("own snapshots")?;
                let may = m.may_have_children(&k);
                let events = m.child_events.get(&k).copied().unwrap_or(0);
                Op::Remove(k, Some(s), may, events)
            } else if roll < 6 {
                let actives: Vec<&(String, Snap)> = own
                    .iter()
                    .filter(|(_, s)| matches!(s, Snap::Active(_)))
                    .collect();
                match rng.pick(&actives) {
                    Some((k, Snap::Active(p))) => {
                        Op::Commit(k.clone(), format!("t{t}-c{n}"), p.clone())
                    }
                    _ => Op::Prepare(format!("t{t}-a{n}"), String::new()),
                }
            } else {
                let parent = if rng.below(4) == 0 {
                    String::new()
                } else {
                    rng.pick(&committed).cloned().unwrap_or_default()
                };
                Op::Prepare(format!("t{t}-a{n}"), parent)
            };
            let alts = match &op {
                Op::Prepare(k, p) => vec![
                    BTreeMap::from([(k.clone(), snap_state(None))]),
                    BTreeMap::from([(k.clone(), snap_state(Some(Snap::Active(p.clone()))))]),
                ],
                Op::Commit(k, name, p) => vec![
                    BTreeMap::from([
                        (k.clone(), snap_state(Some(Snap::Active(p.clone())))),
                        (name.clone(), snap_state(None)),
                    ]),
                    BTreeMap::from([
                        (k.clone(), snap_state(None)),
                        (name.clone(), snap_state(Some(Snap::Committed(p.clone())))),
                    ]),
                ],
                Op::Remove(k, s, _, _) => vec![
                    BTreeMap::from([(k.clone(), snap_state(s.clone()))]),
                    BTreeMap::from([(k.clone(), snap_state(None))]),
                ],
            };
            let id = m.begin(alts);
            (op, id)
        };
        let result: std::result::Result<(), tonic::Status> = match &op {
            Op::Prepare(k, p) => c
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: SNAP.into(),
                    key: k.clone(),
                    parent: p.clone(),
                    labels: HashMap::new(),
                })
                .await
                .map(drop),
            Op::Commit(k, name, _) => {
                // The layer's contents: a file naming the snapshot.
                let mounts = c
                    .mounts(pb::MountsRequest {
                        snapshotter: SNAP.into(),
                        key: k.clone(),
                    })
                    .await;
                match mounts {
                    Ok(r) => {
                        let dir = upper_of(&r.into_inner().mounts)
                            .context("no directory in the mounts")?;
                        std::fs::write(dir.join("marker"), name)?;
                        lock(&model).dirs.insert(name.clone(), dir);
                        c.commit(pb::CommitSnapshotRequest {
                            snapshotter: SNAP.into(),
                            name: name.clone(),
                            key: k.clone(),
                            labels: HashMap::new(),
                        })
                        .await
                        .map(drop)
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Remove(k, ..) => c
                .remove(pb::RemoveSnapshotRequest {
                    snapshotter: SNAP.into(),
                    key: k.clone(),
                })
                .await
                .map(drop),
        };
        let mut m = lock(&model);
        match result {
            Ok(()) => {
                m.pending.remove(&id);
                m.acked += 1;
                match op {
                    Op::Prepare(k, p) => {
                        m.child_event(&p);
                        m.snaps.insert(k, Snap::Active(p));
                    }
                    Op::Commit(k, name, p) => {
                        m.child_event(&p);
                        m.snaps.remove(&k);
                        m.snaps.insert(name, Snap::Committed(p));
                    }
                    Op::Remove(k, ..) => {
                        ensure!(
                            m.sure_children(&k) == 0,
                            "Remove of {k} succeeded while it has children"
                        );
                        if let Some(Snap::Active(p) | Snap::Committed(p)) = m.snaps.remove(&k) {
                            m.child_event(&p);
                        }
                        m.dirs.remove(&k);
                    }
                }
            }
            Err(e) if definite(e.code()) => {
                m.pending.remove(&id);
                if let Op::Remove(k, _, may_then, events_then) = &op {
                    // A child when it was sent, now, or one that came or
                    // went in between (strata may have run the refusal
                    // before a child's removal whose reply came first).
                    let changed = m.child_events.get(k).copied().unwrap_or(0) != *events_then;
                    ensure!(
                        e.code() == Code::FailedPrecondition
                            && (*may_then || m.may_have_children(k) || changed),
                        "Remove of {k}: {e:?}"
                    );
                    m.refused_parent_removals += 1;
                }
                // A Prepare on a parent another client just removed.
            }
            // Cut short by the kill: it stays pending.
            Err(e) => {
                ensure!(m.dying, "snapshot RPC failed before the kill: {e:?}");
                return Ok(());
            }
        }
    }
}

/// Blobs sharing chunks: put, deleted, until the daemon goes.
async fn content_churn(socket: PathBuf, model: Shared, seed: u64) -> Result<()> {
    let Ok(mut c) = strata::client::content(&socket).await else {
        return Ok(());
    };
    let mut rng = Rng::new(seed);
    let pieces: Vec<Vec<u8>> = (0..8)
        .map(|i| strata::harness::image::noise(1000 + i, 64 << 10))
        .collect();
    loop {
        let (put, id, reference) = {
            let mut m = lock(&model);
            let digests: Vec<String> = m.blobs.keys().cloned().collect();
            let n = m.next + 1;
            if digests.len() > 30 || (rng.below(3) == 0 && !digests.is_empty()) {
                let d = rng.pick(&digests).cloned().context("blobs")?;
                let alts = vec![
                    BTreeMap::from([(d.clone(), St::Blob(true))]),
                    BTreeMap::from([(d.clone(), St::Blob(false))]),
                ];
                (Err(d), m.begin(alts), String::new())
            } else {
                let mut data = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    data.extend_from_slice(&pieces[rng.below(pieces.len())]);
                }
                data.extend_from_slice(&n.to_le_bytes());
                let d = format!("sha256:{:x}", sha2::Sha256::digest(&data));
                let data = Arc::new(data);
                let present = m.blobs.contains_key(&d);
                let alts = vec![
                    BTreeMap::from([(d.clone(), St::Blob(present))]),
                    BTreeMap::from([(d.clone(), St::Blob(true))]),
                ];
                let reference = format!("ingest-{n}");
                m.ingests.insert(reference.clone(), data.clone());
                (Ok((d, data)), m.begin(alts), reference)
            }
        };
        match put {
            Ok((d, data)) => {
                let r = strata::client::put_blob(&mut c, &reference, &data).await;
                let mut m = lock(&model);
                match r {
                    Ok(_) => {
                        m.pending.remove(&id);
                        m.ingests.remove(&reference);
                        m.acked += 1;
                        m.blobs.insert(d, data);
                    }
                    Err(e) => {
                        ensure!(m.dying, "put of {d} failed before the kill: {e:#}");
                        return Ok(());
                    }
                }
            }
            Err(d) => {
                let r = c
                    .delete(cpb::DeleteContentRequest { digest: d.clone() })
                    .await;
                let mut m = lock(&model);
                match r {
                    Ok(_) => {
                        m.pending.remove(&id);
                        m.acked += 1;
                        m.blobs.remove(&d);
                    }
                    Err(e) if definite(e.code()) => bail!("Delete of {d}: {e:?}"),
                    Err(e) => {
                        ensure!(m.dying, "Delete of {d} failed before the kill: {e:?}");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Every snapshot strata lists: name → state.
async fn listed(socket: &Path) -> Result<BTreeMap<String, Snap>> {
    let mut c = strata::client::snapshots(socket).await?;
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: SNAP.into(),
            filters: vec![],
        })
        .await?
        .into_inner();
    let mut out = BTreeMap::new();
    while let Some(r) = s.message().await? {
        for i in r.info {
            let st = match pb::Kind::try_from(i.kind) {
                Ok(pb::Kind::Active) => Snap::Active(i.parent),
                Ok(pb::Kind::Committed) => Snap::Committed(i.parent),
                other => bail!("unexpected snapshot {} of kind {other:?}", i.name),
            };
            out.insert(i.name, st);
        }
    }
    Ok(out)
}

async fn blob_state(
    c: &mut cpb::content_client::ContentClient<tonic::transport::Channel>,
    d: &str,
) -> Result<bool> {
    match c.info(cpb::InfoRequest { digest: d.into() }).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => bail!("Info {d}: {e:?}"),
    }
}

#[derive(Default)]
struct Counts {
    uncertain: u64,
    resumed: u64,
    fsck: u64,
}

/// After a restart: ingests cut short are resumed; then every fact is
/// checked and the model takes what strata has.
async fn check(socket: &Path, model: &Shared, counts: &mut Counts) -> Result<()> {
    let mut cc = strata::client::content(socket).await?;
    // Ingests left by the kill: resumed from strata's offset.
    let statuses = cc
        .list_statuses(cpb::ListStatusesRequest { filters: vec![] })
        .await?
        .into_inner()
        .statuses;
    for st in statuses {
        let data = lock(model).ingests.get(&st.r#ref).cloned();
        let Some(data) = data else {
            bail!("an ingest no client started: {}", st.r#ref);
        };
        let off = usize::try_from(st.offset).context("offset")?;
        ensure!(
            off <= data.len(),
            "{} at {off} past its {} bytes",
            st.r#ref,
            data.len()
        );
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&data[..]));
        let req = cpb::WriteContentRequest {
            action: cpb::WriteAction::Commit as i32,
            r#ref: st.r#ref.clone(),
            total: data.len() as i64,
            expected: digest.clone(),
            offset: st.offset,
            data: data[off..].to_vec(),
            labels: HashMap::new(),
        };
        let mut s = cc.write(tokio_stream::iter(vec![req])).await?.into_inner();
        let mut got = None;
        while let Some(r) = s.message().await? {
            got = Some(r.digest);
        }
        ensure!(
            got.as_deref() == Some(digest.as_str()),
            "resumed {}: {got:?}",
            st.r#ref
        );
        counts.resumed += 1;
    }

    let actual = listed(socket).await?;
    let (pending, acked_blobs) = {
        let mut m = lock(model);
        let pending: Vec<Alternatives> = std::mem::take(&mut m.pending).into_values().collect();
        (pending, m.blobs.clone())
    };
    counts.uncertain += pending.len() as u64;
    let mut uncertain_names = std::collections::BTreeSet::new();
    for alts in &pending {
        uncertain_names.extend(alts.iter().flat_map(|a| a.keys().cloned()));
    }
    // Blobs: acknowledged ones byte for byte, the uncertain ones all or nothing.
    let mut blob_states = BTreeMap::new();
    for name in uncertain_names.iter().filter(|n| n.starts_with("sha256:")) {
        blob_states.insert(name.clone(), St::Blob(blob_state(&mut cc, name).await?));
    }
    for (d, data) in acked_blobs {
        if uncertain_names.contains(&d) {
            continue;
        }
        let got = common::read_blob(&mut cc, &d)
            .await
            .with_context(|| format!("acknowledged blob {d}"))?;
        ensure!(
            got == *data,
            "blob {d} reads back {} wrong bytes",
            got.len()
        );
    }
    {
        let mut m = lock(model);
        // Every in-flight RPC: one of its outcomes, on all its names at once.
        for alts in &pending {
            let matched = alts.iter().any(|alt| {
                alt.iter().all(|(name, want)| {
                    let have = match want {
                        St::Snap(_) => St::Snap(actual.get(name).cloned()),
                        St::Blob(_) => blob_states.get(name).cloned().unwrap_or(St::Blob(false)),
                    };
                    have == *want
                })
            });
            ensure!(
                matched,
                "an RPC cut short left a state it allows none of: {alts:?}"
            );
        }
        // Acknowledged snapshots are there as they were; nothing else is.
        for (name, s) in &m.snaps {
            if !uncertain_names.contains(name) {
                ensure!(
                    actual.get(name) == Some(s),
                    "acknowledged {name} ({s:?}) is now {:?}",
                    actual.get(name)
                );
            }
        }
        for (name, s) in &actual {
            ensure!(
                m.snaps.contains_key(name) || uncertain_names.contains(name),
                "{name} ({s:?}) is listed but no RPC that made it succeeded or was cut short"
            );
            let (Snap::Active(p) | Snap::Committed(p)) = s;
            ensure!(
                p.is_empty() || actual.contains_key(p),
                "{name}'s parent {p} is gone"
            );
        }
        // Committed snapshots hold the file written before their Commit.
        for (name, s) in &actual {
            if let (Snap::Committed(_), Some(dir)) = (s, m.dirs.get(name)) {
                let marker = std::fs::read_to_string(dir.join("marker"))
                    .with_context(|| format!("{name}'s file"))?;
                ensure!(marker == *name, "{name}'s file says {marker}");
            }
        }
        m.snaps = actual;
        for (d, st) in blob_states {
            if st == St::Blob(true) {
                let data = m
                    .ingests
                    .values()
                    .find(|b| format!("sha256:{:x}", sha2::Sha256::digest(&b[..])) == d)
                    .cloned()
                    .or_else(|| m.blobs.get(&d).cloned());
                match data {
                    Some(b) => {
                        m.blobs.insert(d, b);
                    }
                    None => bail!("blob {d} is there but its bytes are unknown"),
                }
            } else {
                m.blobs.remove(&d);
            }
        }
        m.ingests.clear();
    }

    // The content store lists exactly the blobs that should be there:
    // none deleted comes back, none that nobody put appears.
    let mut s = cc
        .list(cpb::ListContentRequest { filters: vec![] })
        .await?
        .into_inner();
    let mut have = std::collections::BTreeSet::new();
    while let Some(r) = s.message().await? {
        have.extend(r.info.into_iter().map(|i| i.digest));
    }
    let want: std::collections::BTreeSet<String> = lock(model).blobs.keys().cloned().collect();
    ensure!(
        have == want,
        "content lists {} blobs, the model {}: extra {:?}, missing {:?}",
        have.len(),
        want.len(),
        have.difference(&want).collect::<Vec<_>>(),
        want.difference(&have).collect::<Vec<_>>()
    );

    // Leftovers cleaned: after Cleanup, a directory per snapshot.
    let mut c = strata::client::snapshots(socket).await?;
    c.cleanup(pb::CleanupRequest {
        snapshotter: SNAP.into(),
    })
    .await?;
    Ok(())
}

fn snapshot_dirs(root: &Path) -> Result<usize> {
    let dir = root.join("snapshots").join(SNAP);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let name = e?.file_name();
        if name.to_string_lossy().parse::<u64>().is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Which clients churn in a round.
#[derive(Clone, Copy)]
enum Churn {
    All,
    SnapshotsOnly,
    ContentOnly,
}

/// Clients churn strata for a random while; then SIGKILL.
async fn churn_then_kill(
    strata: &Strata,
    model: &Shared,
    rng: &mut Rng,
    churn: Churn,
) -> Result<()> {
    let socket = strata.socket.clone();
    lock(model).dying = false;
    let mut tasks = Vec::new();
    if !matches!(churn, Churn::ContentOnly) {
        tasks.push(tokio::spawn(snapshot_churn(
            socket.clone(),
            0,
            model.clone(),
            rng.next(),
        )));
        tasks.push(tokio::spawn(snapshot_churn(
            socket.clone(),
            1,
            model.clone(),
            rng.next(),
        )));
    }
    if !matches!(churn, Churn::SnapshotsOnly) {
        tasks.push(tokio::spawn(content_churn(
            socket.clone(),
            model.clone(),
            rng.next(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(5 + rng.below(150) as u64)).await;
    lock(model).dying = true;
    strata.sigkill()?;
    for t in tasks {
        t.await.context("a client panicked")??;
    }
    Ok(())
}

/// After a restart: the checks, then a directory per snapshot.
async fn restart_checks(strata: &Strata, model: &Shared, counts: &mut Counts) -> Result<()> {
    check(&strata.socket, model, counts).await?;
    let listed_now = lock(model).snaps.len();
    let on_disk = snapshot_dirs(&strata.root)?;
    ensure!(
        on_disk == listed_now,
        "after Cleanup: {on_disk} snapshot directories for {listed_now} snapshots"
    );
    Ok(())
}

fn fsck(bin: &Path, root: &Path, config: &str) -> Result<()> {
    let out = std::process::Command::new(bin)
        .args(["fsck", "--root"])
        .arg(root)
        .args(["--config", config])
        .output()?;
    ensure!(
        out.status.success(),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn seed() -> u64 {
    env_or(
        "STRATA_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let kills: u64 = env_or("STRATA_CRASH_KILLS", 300);
    let seed = seed();
    eprintln!("crash harness: {kills} kills, STRATA_CRASH_SEED={seed}");
    let config = dir.join("strata.toml");
    std::fs::write(&config, "[content]\ncompact_interval_secs = 1\n")?;
    let config = config.display().to_string();
    let args = ["--log-level", "warn", "--config", config.as_str()];
    let bin = common::strata_bin();
    let model: Shared = Arc::default();
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();
    let mut strata = Strata::start(&bin, dir, &args)?;
    for k in 0..kills {
        churn_then_kill(&strata, &model, &mut rng, Churn::All).await?;
        let root = strata.root.clone();
        drop(strata);
        if k % 10 == 0 {
            fsck(&bin, &root, &config).with_context(|| format!("after kill {k}"))?;
            counts.fsck += 1;
        }
        strata = Strata::start(&bin, dir, &args)?;
        restart_checks(&strata, &model, &mut counts)
            .await
            .with_context(|| format!("after kill {k} (STRATA_CRASH_SEED={seed})"))?;
    }

    // Everything can still be removed, children first, and nothing is left.
    let mut c = strata::client::snapshots(&strata.socket).await?;
    loop {
        let snaps = lock(&model).snaps.clone();
        if snaps.is_empty() {
            break;
        }
        for name in snaps.keys() {
            if lock(&model).children(name) == 0 {
                c.remove(pb::RemoveSnapshotRequest {
                    snapshotter: SNAP.into(),
                    key: name.clone(),
                })
                .await?;
                lock(&model).snaps.remove(name);
            }
        }
    }
    c.cleanup(pb::CleanupRequest {
        snapshotter: SNAP.into(),
    })
    .await?;
    ensure!(
        snapshot_dirs(&strata.root)? == 0,
        "directories left after removing every snapshot"
    );
    let line = {
        let m = lock(&model);
        format!(
            "crash: {kills} SIGKILLs survived (seed {seed}): {} acknowledged RPCs held, {} cut short resolved all-or-nothing, {} ingests resumed, {} fsck runs clean, {} removals of a parent refused",
            m.acked, counts.uncertain, counts.resumed, counts.fsck, m.refused_parent_removals
        )
    };
    eprintln!("{line}");
    summary(&format!("kills={kills}"))?;
    strata.stop()?;
    Ok(())
}

/// Runs a command; fails with its output if it fails.
fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An ext4 filesystem in a file, on a loop device, mounted; unmounted and
/// detached when dropped.
struct Disk {
    img: PathBuf,
    mnt: PathBuf,
    dev: Option<String>,
}

impl Disk {
    fn create(img: &Path, mnt: &Path, mib: u64) -> Result<Disk> {
        let f = std::fs::File::create(img)?;
        f.set_len(mib << 20)?;
        sh("mkfs.ext4", &["-q", "-F", &img.display().to_string()])?;
        std::fs::create_dir_all(mnt)?;
        let mut d = Disk {
            img: img.to_path_buf(),
            mnt: mnt.to_path_buf(),
            dev: None,
        };
        d.attach()?;
        Ok(d)
    }

    /// Attaches the image and mounts it (replaying its journal). No
    /// periodic journal commit: only what strata syncs reaches the device
    /// before a cut.
    fn attach(&mut self) -> Result<()> {
        let dev = sh(
            "losetup",
            &["--find", "--show", &self.img.display().to_string()],
        )?;
        self.dev = Some(dev.clone());
        sh(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "commit=600,noauto_da_alloc",
                &dev,
                &self.mnt.display().to_string(),
            ],
        )?;
        Ok(())
    }

    fn detach(&mut self) -> Result<()> {
        if let Some(dev) = self.dev.take() {
            sh("umount", &[&self.mnt.display().to_string()])?;
            sh("losetup", &["-d", &dev])?;
        }
        Ok(())
    }

    /// A power cut: the device's bytes as they are now become the disk
    /// (what was never written back is lost), and it is mounted again.
    fn cut(&mut self) -> Result<()> {
        let copy = self.img.with_extension("cut");
        sh(
            "cp",
            &[
                "--sparse=always",
                &self.img.display().to_string(),
                &copy.display().to_string(),
            ],
        )?;
        self.detach()?;
        std::fs::rename(&copy, &self.img)?;
        self.attach()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let m = self.mnt.display().to_string();
            if sh("umount", &[&m]).is_err() {
                let _ = sh("umount", &["-l", &m]);
            }
            let _ = sh("losetup", &["-d", &dev]);
        }
    }
}

/// Kernel writeback settings, put back when dropped.
struct Writeback(Vec<(&'static str, String)>);

impl Writeback {
    /// No periodic writeback: dirty pages stay in memory until something
    /// syncs them, so a copy of the device after a kill holds only what
    /// was synced (and what strata's own syncs pushed out).
    fn hold() -> Result<Writeback> {
        // Each setting is put back on drop once it was read, even if a
        // later one fails.
        let mut held = Writeback(Vec::new());
        for (k, v) in [
            ("/proc/sys/vm/dirty_writeback_centisecs", "0"),
            ("/proc/sys/vm/dirty_expire_centisecs", "360000"),
            // No writeback for crossing a dirty threshold either.
            ("/proc/sys/vm/dirty_background_ratio", "50"),
            ("/proc/sys/vm/dirty_ratio", "80"),
        ] {
            held.0
                .push((k, std::fs::read_to_string(k)?.trim().to_string()));
            std::fs::write(k, v)?;
        }
        Ok(held)
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            let _ = std::fs::write(k, v);
        }
    }
}

/// Power loss: strata's root is on a loop device whose image, copied right
/// after a SIGKILL with kernel writeback held off, keeps only what was
/// written back, which is what a disk keeps when the power goes (unsynced
/// writes lost). The copy becomes the disk, its journal is replayed, and
/// strata starts on it: every acknowledged RPC must still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_nothing_acknowledged() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let cuts: u64 = env_or("STRATA_POWER_CUTS", 40);
    let seed = seed();
    eprintln!("power-cut harness: {cuts} cuts, STRATA_CRASH_SEED={seed}");
    let config = dir.join("strata.toml");
    std::fs::write(&config, "[content]\ncompact_interval_secs = 1\n")?;
    let config = config.display().to_string();
    let args = ["--log-level", "warn", "--config", config.as_str()];
    let bin = common::strata_bin();
    let _writeback = Writeback::hold()?;
    let mnt = dir.join("disk");
    let mut disk = Disk::create(&dir.join("disk.img"), &mnt, 384)?;
    let model: Shared = Arc::default();
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();
    let mut strata = Strata::start(&bin, &mnt, &args)?;
    for k in 0..cuts {
        // Alone, each store's syncs must be enough: no sync of the other
        // store's can make its writes durable by the way.
        let churn = [Churn::All, Churn::SnapshotsOnly, Churn::ContentOnly][(k % 3) as usize];
        churn_then_kill(&strata, &model, &mut rng, churn).await?;
        let root = strata.root.clone();
        drop(strata);
        disk.cut().with_context(|| format!("power cut {k}"))?;
        fsck(&bin, &root, &config).with_context(|| format!("after power cut {k}"))?;
        counts.fsck += 1;
        strata = Strata::start(&bin, &mnt, &args)?;
        restart_checks(&strata, &model, &mut counts)
            .await
            .with_context(|| format!("after power cut {k} (STRATA_CRASH_SEED={seed})"))?;
    }
    let line = {
        let m = lock(&model);
        format!(
            "power: {cuts} power cuts survived (seed {seed}): {} acknowledged RPCs held, {} cut short resolved all-or-nothing, {} ingests resumed, {} fsck runs clean",
            m.acked, counts.uncertain, counts.resumed, counts.fsck
        )
    };
    eprintln!("{line}");
    summary(&format!("power_cuts={cuts}"))?;
    strata.stop()?;
    disk.detach()?;
    Ok(())
}
