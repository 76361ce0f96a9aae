//! Concurrency stress: one `strata serve` whose content store compacts every
//! second with a threshold (`compact_below = 0.99`) that makes nearly every
//! pass rewrite packs, and 16 clients, each on its own gRPC connection:
//!
//! - 8 snapshot clients run rounds in lock step (a barrier between phases):
//!   all Prepare the same key on a shared parent (exactly one OK, the others
//!   AlreadyExists); all Commit their own key to one name and the shared key
//!   to another (exactly one OK each); all try to Remove the shared parent
//!   (always FailedPrecondition: it has children); half Remove a committed
//!   snapshot while the other half Prepare children on it, then race the
//!   removal of those children against more removals of the parent (a parent
//!   is never removed while a child exists); all Remove one name (exactly
//!   one OK). The model is built from the OK replies; at the end List equals
//!   it, every parent listed exists, and after Cleanup the directories on
//!   disk are exactly the snapshots listed.
//! - 8 content clients commit, delete and re-commit blobs built from a small
//!   pool of 64–256 KiB pieces (so different blobs share dedup chunks) and
//!   read them back, whole or by range, while compaction runs: every Read
//!   that ends OK returns exactly the right bytes (a read racing a delete
//!   may be NotFound, never wrong or short). Commits and deletes of one blob
//!   are serialized by the test, so their replies are checked exactly
//!   (AlreadyExists if present, NotFound if absent); some commits break
//!   their stream off half way and resume it from the offset Status
//!   reports. Every few operations the clients race in lock step: on one
//!   ref (one writer holds it at a time, the others wait and get
//!   AlreadyExists or, after a second, Unavailable; exactly one commit), on
//!   one digest under different refs (exactly one commit, the others
//!   AlreadyExists), and deletes against re-commits of one blob (successes
//!   alternate). At the end every blob of the model reads back byte for
//!   byte, List is the model, no ingest is left, and `strata fsck` passes
//!   after the daemon stops on SIGTERM.
//!
//! Every RPC has a timeout, so a deadlock fails the test. The run prints
//! `stress: N concurrent operations checked (...)` and appends
//! `concurrent=N` to the file `STRATA_SUMMARY` names. `STRATA_STRESS_SEED`,
//! `STRATA_STRESS_ROUNDS` (snapshot rounds, default 400) and
//! `STRATA_STRESS_OPS` (content operations per client, default 500) set the
//! run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{env_or, Rng};
use sha2::Digest as _;
use strata::harness::Strata;
use strata_proto::content as cpb;
use strata_proto::content::content_client::ContentClient;
use strata_proto::snapshots as pb;
use strata_proto::snapshots::snapshots_client::SnapshotsClient;
use tokio::sync::Barrier;
use tonic::transport::Channel;
use tonic::{Code, Status};

const SNAP: &str = "strata";
const SNAP_CLIENTS: usize = 8;
const CONTENT_CLIENTS: usize = 8;
/// Committed snapshots every round's snapshots hang off.
const BASES: usize = 4;
/// Pieces that blobs are made of.
const PIECES: usize = 32;
/// Blobs the content clients commit, delete and read at random.
const BLOBS: usize = 48;
/// Content operations between two lock-step races.
const RACE_EVERY: usize = 8;
/// Longer than any answer takes unless something is stuck.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole concurrent part.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Operations checked, by kind.
#[derive(Default)]
struct Counts {
    snapshot_rpcs: AtomicU64,
    content_rpcs: AtomicU64,
    races: AtomicU64,
    reads_ok: AtomicU64,
    reads_raced: AtomicU64,
    read_bytes: AtomicU64,
    lock_unavailable: AtomicU64,
    lock_waited_out: AtomicU64,
    /// When the last snapshot and content client finished, ms from start.
    snapshots_done_ms: AtomicU64,
    content_done_ms: AtomicU64,
}

impl Counts {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Awaits `f`, or fails if it takes longer than [`RPC_TIMEOUT`].
async fn timed<T>(what: &str, f: impl Future<Output = T>) -> Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(v) => Ok(v),
        Err(_) => bail!("{what}: no answer within {RPC_TIMEOUT:?} (deadlock?)"),
    }
}

fn code_of<T>(r: &Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

/// The reply's code if it is one of `allowed`; otherwise the test fails.
fn expect<T>(what: &str, r: &Result<T, Status>, allowed: &[Code]) -> Result<Code> {
    let code = code_of(r);
    if allowed.contains(&code) {
        return Ok(code);
    }
    match r {
        Ok(_) => bail!("{what}: succeeded, wanted one of {allowed:?}"),
        Err(e) => bail!(
            "{what}: {:?} {:?}, wanted one of {allowed:?}",
            e.code(),
            e.message()
        ),
    }
}

/// Exactly one `Ok` among `codes`.
fn one_winner(what: &str, codes: &[Code]) -> Result<()> {
    let wins = codes.iter().filter(|c| **c == Code::Ok).count();
    ensure!(
        wins == 1,
        "{what}: {wins} of {} racing clients succeeded ({codes:?}), wanted exactly one",
        codes.len()
    );
    Ok(())
}

// ---------------------------------------------------------------- snapshots

#[derive(Clone, Debug, PartialEq, Eq)]
struct SnapRec {
    committed: bool,
    parent: String,
}

/// What the clients of one round saw, for its leader to check.
#[derive(Default)]
struct RoundLog {
    shared_prepare: Vec<Code>,
    commit_c: Vec<Code>,
    commit_s: Vec<Code>,
    /// Phase 3: removals of `r-c` racing Prepares of children on it.
    remove_c3: Vec<Code>,
    child_prepare: Vec<(usize, Code)>,
    /// Phase 4: removals of `r-c` (with when the OK came back) racing the
    /// removals of its children (with when they were sent).
    remove_c4: Vec<(Code, Instant)>,
    child_removed: Vec<(usize, Instant)>,
    remove_s: Vec<Code>,
}

struct SnapCtx {
    socket: PathBuf,
    rounds: usize,
    seed: u64,
    barrier: Barrier,
    model: Mutex<BTreeMap<String, SnapRec>>,
    logs: Mutex<Vec<RoundLog>>,
    counts: Arc<Counts>,
}

impl SnapCtx {
    fn model(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SnapRec>> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, r: usize, f: impl FnOnce(&mut RoundLog)) {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut logs[r]);
    }

    fn prepared(&self, key: &str, parent: &str) -> Result<()> {
        let old = self.model().insert(
            key.to_string(),
            SnapRec {
                committed: false,
                parent: parent.to_string(),
            },
        );
        ensure!(
            old.is_none(),
            "Prepare of {key} succeeded, but it existed: {old:?}"
        );
        Ok(())
    }

    fn committed(&self, name: &str, key: &str) -> Result<()> {
        let mut m = self.model();
        let rec = m.remove(key).with_context(|| {
            format!("Commit of {key} as {name} succeeded, but {key} was absent")
        })?;
        ensure!(!rec.committed, "Commit of committed {key} succeeded");
        let old = m.insert(
            name.to_string(),
            SnapRec {
                committed: true,
                parent: rec.parent,
            },
        );
        ensure!(
            old.is_none(),
            "Commit to {name} succeeded, but {name} existed: {old:?}"
        );
        Ok(())
    }

    fn removed(&self, key: &str) -> Result<()> {
        let mut m = self.model();
        // (Whether it had children then is for the round's leader and the
        // final List to say: replies to one round come in any order.)
        ensure!(
            m.remove(key).is_some(),
            "Remove of {key} succeeded, but it was absent"
        );
        Ok(())
    }
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Result<(), Status>> {
    let req = pb::PrepareSnapshotRequest {
        snapshotter: SNAP.into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    };
    Ok(timed(&format!("Prepare {key}"), c.prepare(req))
        .await?
        .map(|_| ()))
}

async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
) -> Result<Result<(), Status>> {
    let req = pb::CommitSnapshotRequest {
        snapshotter: SNAP.into(),
        name: name.into(),
        key: key.into(),
        labels: Default::default(),
    };
    Ok(timed(&format!("Commit {key} as {name}"), c.commit(req))
        .await?
        .map(|_| ()))
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<Result<(), Status>> {
    let req = pb::RemoveSnapshotRequest {
        snapshotter: SNAP.into(),
        key: key.into(),
    };
    Ok(timed(&format!("Remove {key}"), c.remove(req))
        .await?
        .map(|_| ()))
}

async fn list_snapshots(c: &mut SnapshotsClient<Channel>) -> Result<Vec<pb::Info>> {
    timed("List snapshots", async {
        let mut s = c
            .list(pb::ListSnapshotsRequest {
                snapshotter: SNAP.into(),
                filters: vec![],
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            out.extend(m.info);
        }
        Ok::<_, Status>(out)
    })
    .await?
    .context("List snapshots")
}

/// One snapshot client's rounds; see the module docs.
async fn snapshot_client(ctx: Arc<SnapCtx>, t: usize) -> Result<()> {
    let mut c = strata::client::snapshots(&ctx.socket).await?;
    let mut rng = Rng::new(ctx.seed ^ (0x5A00 + t as u64));
    let n = |k: u64| Counts::add(&ctx.counts.snapshot_rpcs, k);
    for r in 0..ctx.rounds {
        let base = format!("base-{}", r % BASES);
        let shared = format!("r{r}-shared");
        let own = format!("r{r}-t{t}");
        let cname = format!("r{r}-c");
        let sname = format!("r{r}-s");
        let child = format!("r{r}-t{t}-x");

        // Phase 1: every client prepares the same key on the shared parent,
        // then a key of its own.
        ctx.barrier.wait().await;
        let res = prepare(&mut c, &shared, &base).await?;
        let code = expect(
            &format!("Prepare {shared}"),
            &res,
            &[Code::Ok, Code::AlreadyExists],
        )?;
        if code == Code::Ok {
            ctx.prepared(&shared, &base)?;
        }
        ctx.log(r, |l| l.shared_prepare.push(code));
        let res = prepare(&mut c, &own, &base).await?;
        expect(&format!("Prepare {own}"), &res, &[Code::Ok])?;
        ctx.prepared(&own, &base)?;
        n(2);

        // Phase 2: every client commits its own key to one name and the
        // shared key to another (in either order, so the races overlap).
        ctx.barrier.wait().await;
        let mut own_code = Code::Ok;
        for step in 0..2 {
            if (step + t).is_multiple_of(2) {
                let res = commit(&mut c, &cname, &own).await?;
                own_code = expect(
                    &format!("Commit {own} as {cname}"),
                    &res,
                    &[Code::Ok, Code::AlreadyExists],
                )?;
                if own_code == Code::Ok {
                    ctx.committed(&cname, &own)?;
                }
                ctx.log(r, |l| l.commit_c.push(own_code));
            } else {
                let res = commit(&mut c, &sname, &shared).await?;
                let code = expect(
                    &format!("Commit {shared} as {sname}"),
                    &res,
                    &[Code::Ok, Code::AlreadyExists, Code::NotFound],
                )?;
                if code == Code::Ok {
                    ctx.committed(&sname, &shared)?;
                }
                ctx.log(r, |l| l.commit_s.push(code));
            }
        }
        n(2);

        // Phase 3: the shared parent has children, so removing it is
        // refused; half the clients remove `r-c` while the other half
        // prepare children on it.
        ctx.barrier.wait().await;
        let res = remove(&mut c, &base).await?;
        expect(
            &format!("Remove {base} (it has children)"),
            &res,
            &[Code::FailedPrecondition],
        )?;
        let mut child_alive = false;
        if t % 2 == 1 {
            let res = remove(&mut c, &cname).await?;
            let code = expect(
                &format!("Remove {cname}"),
                &res,
                &[Code::Ok, Code::FailedPrecondition, Code::NotFound],
            )?;
            if code == Code::Ok {
                ctx.removed(&cname)?;
            }
            ctx.log(r, |l| l.remove_c3.push(code));
        } else {
            let res = prepare(&mut c, &child, &cname).await?;
            let code = expect(
                &format!("Prepare {child} on {cname}"),
                &res,
                &[Code::Ok, Code::NotFound],
            )?;
            if code == Code::Ok {
                ctx.prepared(&child, &cname)?;
                child_alive = true;
            }
            ctx.log(r, |l| l.child_prepare.push((t, code)));
        }
        n(2);

        // Phase 4: removals of `r-c` race the removals of its children;
        // every client removes `r-s` on even rounds; losers of the commit
        // race drop their key half the time.
        ctx.barrier.wait().await;
        if t % 2 == 1 {
            for _ in 0..6 {
                let res = remove(&mut c, &cname).await?;
                let at = Instant::now();
                n(1);
                let code = expect(
                    &format!("Remove {cname}"),
                    &res,
                    &[Code::Ok, Code::FailedPrecondition, Code::NotFound],
                )?;
                if code == Code::Ok {
                    ctx.removed(&cname)?;
                }
                ctx.log(r, |l| l.remove_c4.push((code, at)));
                if code != Code::FailedPrecondition {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(3) as u64)).await;
            }
        } else if child_alive && rng.below(4) != 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(3) as u64)).await;
            let sent = Instant::now();
            let res = remove(&mut c, &child).await?;
            n(1);
            expect(&format!("Remove {child}"), &res, &[Code::Ok])?;
            ctx.removed(&child)?;
            ctx.log(r, |l| l.child_removed.push((t, sent)));
        }
        if own_code != Code::Ok && rng.below(2) == 0 {
            let res = remove(&mut c, &own).await?;
            n(1);
            expect(&format!("Remove {own}"), &res, &[Code::Ok])?;
            ctx.removed(&own)?;
        }
        if r.is_multiple_of(2) {
            let res = remove(&mut c, &sname).await?;
            n(1);
            let code = expect(
                &format!("Remove {sname}"),
                &res,
                &[Code::Ok, Code::NotFound],
            )?;
            if code == Code::Ok {
                ctx.removed(&sname)?;
            }
            ctx.log(r, |l| l.remove_s.push(code));
        }

        if ctx.barrier.wait().await.is_leader() {
            let logs = ctx.logs.lock().unwrap_or_else(|p| p.into_inner());
            check_round(r, &logs[r])?;
            Counts::add(&ctx.counts.races, if r.is_multiple_of(2) { 5 } else { 4 });
        }
    }
    Ok(())
}

/// The races of round `r`, from every client's replies.
fn check_round(r: usize, l: &RoundLog) -> Result<()> {
    one_winner(&format!("Prepare r{r}-shared"), &l.shared_prepare)?;
    one_winner(&format!("Commit to r{r}-c"), &l.commit_c)?;
    one_winner(&format!("Commit r{r}-shared as r{r}-s"), &l.commit_s)?;
    if r.is_multiple_of(2) {
        one_winner(&format!("Remove r{r}-s"), &l.remove_s)?;
    }
    let removed3 = l.remove_c3.iter().filter(|c| **c == Code::Ok).count();
    let removed4: Vec<Instant> = l
        .remove_c4
        .iter()
        .filter(|(c, _)| *c == Code::Ok)
        .map(|(_, at)| *at)
        .collect();
    ensure!(
        removed3 + removed4.len() <= 1,
        "r{r}-c was removed {} times",
        removed3 + removed4.len()
    );
    let children: Vec<usize> = l
        .child_prepare
        .iter()
        .filter(|(_, c)| *c == Code::Ok)
        .map(|(t, _)| *t)
        .collect();
    if removed3 == 1 {
        // Nobody removes a child in phase 3.
        ensure!(
            children.is_empty(),
            "r{r}-c was removed although children {children:?} were prepared on it"
        );
    }
    if let Some(&at) = removed4.first() {
        for t in &children {
            match l.child_removed.iter().find(|(c, _)| c == t) {
                None => bail!("r{r}-c was removed while its child r{r}-t{t}-x exists"),
                Some((_, sent)) if *sent > at => {
                    bail!("r{r}-c was removed before the removal of its child r{r}-t{t}-x was sent")
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ content

struct Blob {
    digest: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        Blob {
            digest: format!("sha256:{:x}", sha2::Sha256::digest(&data)),
            data,
        }
    }
}

/// The pool: 64–256 KiB pieces, one in four compressible (zstd chunks).
fn pieces(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed ^ 0x9000);
    (0..PIECES)
        .map(|i| {
            let len = (64 << 10) + rng.below(192 << 10);
            let mut p = strata::harness::image::noise(seed ^ (0x1_0000 + i as u64), len);
            if i.is_multiple_of(4) {
                p.iter_mut().for_each(|b| *b &= 0x0f);
            }
            p
        })
        .collect()
}

/// A blob of 2 to `most` pieces after a unique 1 KiB header: different
/// blobs share pieces, so they share chunks, but never a digest.
fn blob_of(pool: &[Vec<u8>], rng: &mut Rng, header_seed: u64, most: usize) -> Blob {
    let mut data = strata::harness::image::noise(header_seed, 1024);
    for _ in 0..2 + rng.below(most - 1) {
        data.extend_from_slice(&pool[rng.below(pool.len())]);
    }
    Blob::new(data)
}

/// What one client did in a lock-step content race.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RaceOp {
    Write,
    Delete,
}

struct ContentCtx {
    socket: PathBuf,
    ops: usize,
    seed: u64,
    barrier: Barrier,
    catalog: Vec<Blob>,
    /// Whether each catalog blob is committed; held across its commits and
    /// deletes, which are therefore checked exactly.
    present: Vec<tokio::sync::Mutex<bool>>,
    /// Race `k`'s blob, and whether it is committed (set by the leaders).
    race: Vec<Blob>,
    race_present: Mutex<Vec<bool>>,
    race_logs: Mutex<Vec<Vec<(RaceOp, Code)>>>,
    /// Writers that know they hold a ref right now.
    holders: AtomicI64,
    counts: Arc<Counts>,
}

/// The Write messages of `blob` under `reference`, `piece` bytes each, the
/// last one committing (the expected digest on the first and the last, as
/// containerd's client sends it).
fn write_msgs(reference: &str, blob: &Blob, piece: usize) -> Vec<cpb::WriteContentRequest> {
    strata::client::write_requests(reference, &blob.data, &blob.digest, piece)
}

/// Reads the Write answers to the end: Ok if the commit was answered with
/// the right digest and size, the status if strata refused.
async fn write_answers(
    s: &mut tonic::Streaming<cpb::WriteContentResponse>,
    reference: &str,
    blob: &Blob,
) -> Result<Result<(), Status>> {
    let mut committed = None;
    loop {
        match s.message().await {
            Ok(Some(m)) => {
                if m.action == cpb::WriteAction::Commit as i32 {
                    committed = Some(m);
                }
            }
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        }
    }
    let m = committed
        .with_context(|| format!("write of {reference} ended OK without answering its commit"))?;
    ensure!(
        m.digest == blob.digest && m.offset == blob.data.len() as i64,
        "commit of {reference} answered {} at {}, wanted {} at {}",
        m.digest,
        m.offset,
        blob.digest,
        blob.data.len()
    );
    Ok(Ok(()))
}

/// Writes and commits `blob` under `reference` in one stream.
async fn write_blob(
    c: &mut ContentClient<Channel>,
    reference: &str,
    blob: &Blob,
    piece: usize,
) -> Result<Result<(), Status>> {
    let msgs = write_msgs(reference, blob, piece);
    timed(&format!("Write {reference}"), async {
        let mut s = match c.write(tokio_stream::iter(msgs)).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Ok(Err(e)),
        };
        write_answers(&mut s, reference, blob).await
    })
    .await?
}

/// Writes `blob` under `reference` in two streams, as a client does whose
/// first stream broke: the first sends some of the data and ends without a
/// commit, Status then reports the bytes the ingest holds, and the second
/// stream resumes from there and commits.
async fn resumed_write(
    c: &mut ContentClient<Channel>,
    reference: &str,
    blob: &Blob,
    cut: u64,
) -> Result<Result<(), Status>> {
    let mut msgs = write_msgs(reference, blob, 64 << 10);
    ensure!(msgs.len() >= 2, "a resumed blob is one message");
    let rest = msgs.split_off(1 + (cut % (msgs.len() as u64 - 1)) as usize);
    let sent: i64 = msgs.iter().map(|m| m.data.len() as i64).sum();
    let first = timed(&format!("Write {reference} (first part)"), async {
        let mut s = c.write(tokio_stream::iter(msgs)).await?.into_inner();
        let mut offset = 0;
        while let Some(m) = s.message().await? {
            offset = m.offset;
        }
        Ok::<_, Status>(offset)
    })
    .await?;
    match first {
        Ok(offset) => ensure!(
            offset == sent,
            "Write {reference}: answered offset {offset} after {sent} bytes"
        ),
        Err(e) => return Ok(Err(e)),
    }
    let st = timed(
        &format!("Status {reference}"),
        c.status(cpb::StatusRequest {
            r#ref: reference.into(),
        }),
    )
    .await?
    .with_context(|| format!("Status of the broken-off ingest {reference}"))?
    .into_inner()
    .status
    .map(|s| (s.offset, s.total));
    ensure!(
        st == Some((sent, blob.data.len() as i64)),
        "Status {reference} after {sent} of {} bytes: (offset, total) {st:?}",
        blob.data.len()
    );
    // The first stream's writer may still be letting go of the ref: retry
    // on Unavailable, as containerd's content.OpenWriter does.
    let mut tries = 0;
    loop {
        let res = timed(&format!("Write {reference} (resumed)"), async {
            let mut s = match c.write(tokio_stream::iter(rest.clone())).await {
                Ok(r) => r.into_inner(),
                Err(e) => return Ok(Err(e)),
            };
            write_answers(&mut s, reference, blob).await
        })
        .await??;
        tries += 1;
        match res {
            Err(e) if e.code() == Code::Unavailable && tries < 10 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            res => return Ok(res),
        }
    }
}

/// What a writer racing for one ref got.
#[derive(Debug, PartialEq, Eq)]
enum LockOutcome {
    /// Refused before it held the ref.
    Refused(Code),
    /// Held the ref (for `hold`), then committed.
    Committed,
    /// Held the ref, then the commit was refused.
    RefusedLater(Code),
}

/// Writes `blob` under `reference` holding the ref for `hold` between the
/// answer to the first message (from then on strata holds the ref for this
/// writer) and the rest of the data: `holders` counts the writers inside
/// that window, which must never be more than one.
async fn locked_write(
    c: &mut ContentClient<Channel>,
    reference: &str,
    blob: &Blob,
    hold: Duration,
    holders: &AtomicI64,
) -> Result<LockOutcome> {
    let msgs = write_msgs(reference, blob, 64 << 10);
    ensure!(msgs.len() >= 2, "a race blob is one message");
    let (tx, rx) = tokio::sync::mpsc::channel(msgs.len());
    let mut msgs = msgs.into_iter();
    if let Some(first) = msgs.next() {
        tx.send(first).await?;
    }
    timed(&format!("Write {reference} (racing)"), async {
        let mut s = match c
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return Ok(LockOutcome::Refused(e.code())),
        };
        match s.message().await {
            Ok(Some(_)) => {}
            Ok(None) => bail!("write of {reference} ended before answering its first message"),
            Err(e) => return Ok(LockOutcome::Refused(e.code())),
        }
        let others = holders.fetch_add(1, Ordering::SeqCst);
        ensure!(
            others == 0,
            "ref {reference} is held by {} writers at once",
            others + 1
        );
        tokio::time::sleep(hold).await;
        holders.fetch_sub(1, Ordering::SeqCst);
        for m in msgs {
            tx.send(m).await?;
        }
        drop(tx);
        Ok(match write_answers(&mut s, reference, blob).await? {
            Ok(()) => LockOutcome::Committed,
            Err(e) => LockOutcome::RefusedLater(e.code()),
        })
    })
    .await?
}

/// Reads `[offset, offset + size)` of `digest` (`size` 0: to the end),
/// checking that the answers follow on from each other.
async fn read_blob(
    c: &mut ContentClient<Channel>,
    digest: &str,
    offset: i64,
    size: i64,
) -> Result<Result<Vec<u8>, Status>> {
    timed(&format!("Read {digest}"), async {
        let req = cpb::ReadContentRequest {
            digest: digest.into(),
            offset,
            size,
        };
        let mut s = match c.read(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Ok(Err(e)),
        };
        let mut out = Vec::new();
        loop {
            match s.message().await {
                Ok(Some(m)) => {
                    ensure!(
                        m.offset == offset + out.len() as i64,
                        "Read {digest}: an answer at {} after {} bytes from {offset}",
                        m.offset,
                        out.len()
                    );
                    out.extend_from_slice(&m.data);
                }
                Ok(None) => return Ok(Ok(out)),
                Err(e) => return Ok(Err(e)),
            }
        }
    })
    .await?
}

async fn info(c: &mut ContentClient<Channel>, digest: &str) -> Result<Result<i64, Status>> {
    let req = cpb::InfoRequest {
        digest: digest.into(),
    };
    Ok(timed(&format!("Info {digest}"), c.info(req))
        .await?
        .map(|r| r.into_inner().info.map(|i| i.size).unwrap_or(-1)))
}

async fn delete(c: &mut ContentClient<Channel>, digest: &str) -> Result<Result<(), Status>> {
    let req = cpb::DeleteContentRequest {
        digest: digest.into(),
    };
    Ok(timed(&format!("Delete {digest}"), c.delete(req))
        .await?
        .map(|_| ()))
}

/// A read of `[offset, offset + size)` of `blob` that ended OK must be
/// exactly those bytes.
fn check_read(blob: &Blob, offset: usize, size: usize, got: &[u8]) -> Result<()> {
    let end = if size == 0 {
        blob.data.len()
    } else {
        (offset + size).min(blob.data.len())
    };
    let want = &blob.data[offset..end];
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        bail!(
            "Read {} [{offset}, +{size}) ended OK with {} bytes, wanted {}; first difference at {}",
            blob.digest,
            got.len(),
            want.len(),
            offset + first
        );
    }
    Ok(())
}

/// One content client's operations; see the module docs.
async fn content_client(ctx: Arc<ContentCtx>, t: usize) -> Result<()> {
    let mut c = strata::client::content(&ctx.socket).await?;
    let mut rng = Rng::new(ctx.seed ^ (0xC000 + t as u64));
    let n = |k: u64| Counts::add(&ctx.counts.content_rpcs, k);
    for i in 0..ctx.ops {
        if i.is_multiple_of(RACE_EVERY) {
            content_race(&ctx, &mut c, &mut rng, t, i / RACE_EVERY).await?;
            continue;
        }
        let j = rng.below(ctx.catalog.len());
        let blob = &ctx.catalog[j];
        let piece = [1 << 20, 256 << 10, 64 << 10][rng.below(3)];
        match rng.below(20) {
            // Commit, serialized with the blob's other commits and deletes.
            0..=6 => {
                let mut present = ctx.present[j].lock().await;
                let reference = format!("t{t}-{i}");
                let res = if !*present && rng.below(3) == 0 {
                    let cut = rng.next();
                    n(2);
                    resumed_write(&mut c, &reference, blob, cut).await?
                } else {
                    write_blob(&mut c, &reference, blob, piece).await?
                };
                n(1);
                if *present {
                    expect(
                        &format!("commit of committed {}", blob.digest),
                        &res,
                        &[Code::AlreadyExists],
                    )?;
                } else {
                    expect(&format!("commit of {}", blob.digest), &res, &[Code::Ok])?;
                    *present = true;
                }
            }
            // Delete, likewise.
            7..=10 => {
                let mut present = ctx.present[j].lock().await;
                let res = delete(&mut c, &blob.digest).await?;
                n(1);
                if *present {
                    expect(&format!("delete of {}", blob.digest), &res, &[Code::Ok])?;
                    *present = false;
                } else {
                    expect(
                        &format!("delete of absent {}", blob.digest),
                        &res,
                        &[Code::NotFound],
                    )?;
                }
            }
            // Read while others commit and delete it: right bytes, or
            // NotFound.
            11..=16 => {
                let len = blob.data.len();
                let (offset, size) = if rng.below(2) == 0 {
                    (0, 0)
                } else {
                    let off = rng.below(len);
                    (off, [0, 1 + rng.below(len - off)][rng.below(2)])
                };
                let res = read_blob(&mut c, &blob.digest, offset as i64, size as i64).await?;
                n(1);
                match res {
                    Ok(got) => {
                        check_read(blob, offset, size, &got)?;
                        Counts::add(&ctx.counts.reads_ok, 1);
                        Counts::add(&ctx.counts.read_bytes, got.len() as u64);
                    }
                    Err(e) if e.code() == Code::NotFound => {
                        Counts::add(&ctx.counts.reads_raced, 1);
                    }
                    Err(e) => bail!(
                        "Read {} [{offset}, +{size}): {:?} {:?}",
                        blob.digest,
                        e.code(),
                        e.message()
                    ),
                }
            }
            // Info and a whole read with the blob's state known.
            _ => {
                let present = ctx.present[j].lock().await;
                let res = info(&mut c, &blob.digest).await?;
                n(1);
                if *present {
                    expect(&format!("Info {}", blob.digest), &res, &[Code::Ok])?;
                    ensure!(
                        res.as_ref().ok() == Some(&(blob.data.len() as i64)),
                        "Info {}: size {res:?}, wanted {}",
                        blob.digest,
                        blob.data.len()
                    );
                    let res = read_blob(&mut c, &blob.digest, 0, 0).await?;
                    n(1);
                    expect(&format!("Read {}", blob.digest), &res, &[Code::Ok])?;
                    let got = res.unwrap_or_default();
                    check_read(blob, 0, 0, &got)?;
                    Counts::add(&ctx.counts.reads_ok, 1);
                    Counts::add(&ctx.counts.read_bytes, got.len() as u64);
                } else {
                    expect(
                        &format!("Info of absent {}", blob.digest),
                        &res,
                        &[Code::NotFound],
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// Lock-step race `k` of the content clients: one ref (k % 3 == 0), one
/// digest under different refs (1), deletes against re-commits of the
/// previous race's blob (2).
async fn content_race(
    ctx: &ContentCtx,
    c: &mut ContentClient<Channel>,
    rng: &mut Rng,
    t: usize,
    k: usize,
) -> Result<()> {
    ctx.barrier.wait().await;
    let (op, code) = match k % 3 {
        0 => {
            // Every fourth time the holder keeps the ref past the second
            // the others wait for it.
            let hold = if k.is_multiple_of(4) {
                Duration::from_millis(1200)
            } else {
                Duration::from_millis(rng.below(20) as u64)
            };
            let out =
                locked_write(c, &format!("race{k}"), &ctx.race[k], hold, &ctx.holders).await?;
            let code = match out {
                LockOutcome::Committed => Code::Ok,
                LockOutcome::Refused(code)
                    if code == Code::AlreadyExists || code == Code::Unavailable =>
                {
                    code
                }
                other => bail!("racing writer of ref race{k}: {other:?}"),
            };
            if code == Code::Unavailable {
                Counts::add(&ctx.counts.lock_unavailable, 1);
            } else if code == Code::AlreadyExists {
                Counts::add(&ctx.counts.lock_waited_out, 1);
            }
            (RaceOp::Write, code)
        }
        1 => {
            let res = write_blob(c, &format!("race{k}-t{t}"), &ctx.race[k], 256 << 10).await?;
            let code = expect(
                &format!("racing commit of {}", ctx.race[k].digest),
                &res,
                &[Code::Ok, Code::AlreadyExists],
            )?;
            (RaceOp::Write, code)
        }
        _ => {
            let blob = &ctx.race[k - 1];
            if t.is_multiple_of(2) {
                let res = delete(c, &blob.digest).await?;
                let code = expect(
                    &format!("racing delete of {}", blob.digest),
                    &res,
                    &[Code::Ok, Code::NotFound],
                )?;
                (RaceOp::Delete, code)
            } else {
                let res = write_blob(c, &format!("race{k}-t{t}"), blob, 1 << 20).await?;
                let code = expect(
                    &format!("racing re-commit of {}", blob.digest),
                    &res,
                    &[Code::Ok, Code::AlreadyExists],
                )?;
                (RaceOp::Write, code)
            }
        }
    };
    Counts::add(&ctx.counts.content_rpcs, 1);
    ctx.race_logs.lock().unwrap_or_else(|p| p.into_inner())[k].push((op, code));
    if ctx.barrier.wait().await.is_leader() {
        let log = ctx.race_logs.lock().unwrap_or_else(|p| p.into_inner())[k].clone();
        let mut present = ctx.race_present.lock().unwrap_or_else(|p| p.into_inner());
        let ok = |o: RaceOp| {
            log.iter()
                .filter(|(op, code)| *op == o && *code == Code::Ok)
                .count()
        };
        match k % 3 {
            0 | 1 => {
                let codes: Vec<Code> = log.iter().map(|(_, c)| *c).collect();
                one_winner(
                    &format!("race {k}: commit of {}", ctx.race[k].digest),
                    &codes,
                )?;
                present[k] = true;
            }
            _ => {
                // Started committed: a delete succeeds only on a committed
                // blob, a commit only on a deleted one, so the successes
                // alternate, a delete first.
                let (d, m) = (ok(RaceOp::Delete), ok(RaceOp::Write));
                ensure!(
                    d == m || d == m + 1,
                    "race {k}: {d} deletes and {m} commits of {} succeeded ({log:?})",
                    ctx.race[k - 1].digest
                );
                present[k - 1] = d == m;
            }
        }
        Counts::add(&ctx.counts.races, 1);
    }
    Ok(())
}

// --------------------------------------------------------------------- run

/// Runs every client; the first failure ends the run.
async fn run_clients(snap: Arc<SnapCtx>, content: Arc<ContentCtx>) -> Result<()> {
    let start = Instant::now();
    let done = move |at: &AtomicU64| {
        at.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    let mut set = tokio::task::JoinSet::new();
    for t in 0..SNAP_CLIENTS {
        let ctx = snap.clone();
        set.spawn(async move {
            snapshot_client(ctx.clone(), t)
                .await
                .with_context(|| format!("snapshot client {t}"))?;
            done(&ctx.counts.snapshots_done_ms);
            Ok(())
        });
    }
    for t in 0..CONTENT_CLIENTS {
        let ctx = content.clone();
        set.spawn(async move {
            content_client(ctx.clone(), t)
                .await
                .with_context(|| format!("content client {t}"))?;
            done(&ctx.counts.content_done_ms);
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            Err(e) => {
                set.abort_all();
                bail!("a client task failed: {e}");
            }
        }
    }
    Ok(())
}

/// The snapshots after the run: List is the model, every parent exists,
/// and after Cleanup the directories are the snapshots.
async fn check_snapshots(socket: &Path, root: &Path, ctx: &SnapCtx) -> Result<usize> {
    let mut c = strata::client::snapshots(socket).await?;
    let listed: BTreeMap<String, SnapRec> = list_snapshots(&mut c)
        .await?
        .into_iter()
        .map(|i| {
            (
                i.name,
                SnapRec {
                    committed: i.kind == pb::Kind::Committed as i32,
                    parent: i.parent,
                },
            )
        })
        .collect();
    for (name, s) in &listed {
        ensure!(
            s.parent.is_empty() || listed.contains_key(&s.parent),
            "snapshot {name} is listed, its parent {} is not",
            s.parent
        );
    }
    let model = ctx.model().clone();
    if listed != model {
        let only_listed: Vec<_> = listed
            .iter()
            .filter(|(k, v)| model.get(*k) != Some(v))
            .collect();
        let only_model: Vec<_> = model
            .iter()
            .filter(|(k, v)| listed.get(*k) != Some(v))
            .collect();
        bail!(
            "List differs from the replies: listed but not so in the model {only_listed:?}; in the model but not so listed {only_model:?}"
        );
    }
    timed(
        "Cleanup",
        c.cleanup(pb::CleanupRequest {
            snapshotter: SNAP.into(),
        }),
    )
    .await??;
    // Directories of removed snapshots go in the background, so Cleanup
    // may find one still being removed.
    let count =
        || -> Result<usize> { Ok(std::fs::read_dir(root.join("snapshots").join(SNAP))?.count()) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dirs = count()?;
    while dirs != listed.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        dirs = count()?;
    }
    ensure!(
        dirs == listed.len(),
        "{dirs} snapshot directories after Cleanup, {} snapshots",
        listed.len()
    );
    Ok(listed.len())
}

/// The blobs after the run: each reads back byte for byte or is NotFound as
/// the model says, List is the model, and no ingest is left.
async fn check_content(socket: &Path, ctx: &ContentCtx) -> Result<usize> {
    let mut c = strata::client::content(socket).await?;
    let race_present = ctx
        .race_present
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut want = BTreeSet::new();
    let mut blobs: Vec<(&Blob, bool)> = Vec::new();
    for (b, p) in ctx.catalog.iter().zip(&ctx.present) {
        blobs.push((b, *p.lock().await));
    }
    blobs.extend(ctx.race.iter().zip(race_present));
    for (b, present) in blobs {
        if present {
            let res = read_blob(&mut c, &b.digest, 0, 0).await?;
            expect(&format!("final Read {}", b.digest), &res, &[Code::Ok])?;
            check_read(b, 0, 0, &res.unwrap_or_default())?;
            want.insert(b.digest.clone());
        } else {
            let res = info(&mut c, &b.digest).await?;
            expect(
                &format!("final Info of deleted {}", b.digest),
                &res,
                &[Code::NotFound],
            )?;
        }
    }
    let listed: BTreeSet<String> = timed("List content", async {
        let mut s = c
            .list(cpb::ListContentRequest { filters: vec![] })
            .await?
            .into_inner();
        let mut out = BTreeSet::new();
        while let Some(m) = s.message().await? {
            out.extend(m.info.into_iter().map(|i| i.digest));
        }
        Ok::<_, Status>(out)
    })
    .await??;
    ensure!(
        listed == want,
        "content List differs from the model: listed only {:?}, model only {:?}",
        listed.difference(&want).collect::<Vec<_>>(),
        want.difference(&listed).collect::<Vec<_>>()
    );
    let left = timed(
        "ListStatuses",
        c.list_statuses(cpb::ListStatusesRequest { filters: vec![] }),
    )
    .await??
    .into_inner()
    .statuses;
    ensure!(
        left.is_empty(),
        "ingests left after every write ended: {:?}",
        left.iter().map(|s| &s.r#ref).collect::<Vec<_>>()
    );
    Ok(want.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_while_compaction_runs() -> Result<()> {
    common::require_root();
    let started = Instant::now();
    let seed: u64 = env_or(
        "STRATA_STRESS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let rounds: usize = env_or("STRATA_STRESS_ROUNDS", 400);
    let ops: usize = env_or("STRATA_STRESS_OPS", 500);
    println!("stress: seed {seed} (STRATA_STRESS_SEED), {rounds} snapshot rounds, {ops} content operations per client");

    let tmp = common::tempdir();
    let dir = tmp.path();
    let config = dir.join("strata.toml");
    // Compaction every second, rewriting every pack that is not all live.
    std::fs::write(
        &config,
        "[content]\ncompact_interval_secs = 1\ncompact_below = 0.99\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    let mut strata = Strata::start(&common::strata_bin(), dir, &["--config", &config])?;
    let socket = strata.socket.clone();

    // The shared parents.
    let snap = Arc::new(SnapCtx {
        socket: socket.clone(),
        rounds,
        seed,
        barrier: Barrier::new(SNAP_CLIENTS),
        model: Mutex::new(BTreeMap::new()),
        logs: Mutex::new((0..rounds).map(|_| RoundLog::default()).collect()),
        counts: Arc::new(Counts::default()),
    });
    {
        let mut c = strata::client::snapshots(&socket).await?;
        for b in 0..BASES {
            let (key, name) = (format!("base-{b}-a"), format!("base-{b}"));
            let res = prepare(&mut c, &key, "").await?;
            expect(&format!("Prepare {key}"), &res, &[Code::Ok])?;
            snap.prepared(&key, "")?;
            let res = commit(&mut c, &name, &key).await?;
            expect(&format!("Commit {key}"), &res, &[Code::Ok])?;
            snap.committed(&name, &key)?;
        }
    }
    let counts = snap.counts.clone();

    let pool = pieces(seed);
    let mut rng = Rng::new(seed ^ 0xB10B);
    let catalog: Vec<Blob> = (0..BLOBS)
        .map(|j| blob_of(&pool, &mut rng, seed ^ (0x20_0000 + j as u64), 5))
        .collect();
    let races = ops.div_ceil(RACE_EVERY);
    // Race blobs span several 256 KiB messages.
    let race: Vec<Blob> = (0..races)
        .map(|k| blob_of(&pool, &mut rng, seed ^ (0x30_0000 + k as u64), 4))
        .collect();
    let content = Arc::new(ContentCtx {
        socket: socket.clone(),
        ops,
        seed,
        barrier: Barrier::new(CONTENT_CLIENTS),
        present: (0..catalog.len())
            .map(|_| tokio::sync::Mutex::new(false))
            .collect(),
        catalog,
        race_present: Mutex::new(vec![false; race.len()]),
        race_logs: Mutex::new(vec![Vec::new(); race.len()]),
        race,
        holders: AtomicI64::new(0),
        counts: counts.clone(),
    });
    drop(pool);

    match tokio::time::timeout(RUN_TIMEOUT, run_clients(snap.clone(), content.clone())).await {
        Ok(r) => r.with_context(|| format!("seed {seed}; daemon log:\n{}", strata.proc().log_tail()))?,
        Err(_) => bail!(
            "the clients did not finish within {RUN_TIMEOUT:?} (deadlock?); seed {seed}; daemon log:\n{}",
            strata.proc().log_tail()
        ),
    }
    strata.proc().check_alive()?;

    let snapshots = check_snapshots(&socket, &strata.root, &snap).await?;
    let blobs = check_content(&socket, &content).await?;

    let log = strata.proc().log_text();
    let compactions = log
        .lines()
        .filter(|l| l.contains("content compaction"))
        .count();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    for w in warnings.iter().take(5) {
        println!("stress: the daemon warned: {w}");
    }
    for bad in ["panicked", "compaction failed", "compaction left a pack"] {
        if let Some(line) = log.lines().find(|l| l.contains(bad)) {
            bail!("the daemon logged {bad:?}: {line}");
        }
    }
    ensure!(
        compactions > 0,
        "no compaction did any work during the run:\n{}",
        strata.proc().log_tail()
    );
    let root = strata.root.clone();
    strata.stop()?;
    let out = strata::harness::run(
        std::process::Command::new(common::strata_bin())
            .arg("fsck")
            .arg("--root")
            .arg(&root),
    )?;
    let fsck = String::from_utf8_lossy(&out.stdout);
    ensure!(
        fsck.contains(&format!("fsck: {blobs} blob")),
        "fsck checked another number of blobs than the {blobs} committed: {fsck}"
    );

    let (s, c) = (
        Counts::get(&counts.snapshot_rpcs),
        Counts::get(&counts.content_rpcs),
    );
    let total = s + c;
    let line = format!(
        "stress: {total} concurrent operations checked ({s} snapshot RPCs in {rounds} rounds, {c} content RPCs; {} lock-step races; {} reads OK ({} MiB), {} NotFound (absent, or deleted meanwhile); ref lock: {} waited and found it committed, {} gave up (Unavailable); {compactions} compactions did work; {snapshots} snapshots and {blobs} blobs at the end; {} daemon warnings; snapshot clients {:.1} s, content clients {:.1} s, all {:.1} s)",
        Counts::get(&counts.races),
        Counts::get(&counts.reads_ok),
        Counts::get(&counts.read_bytes) >> 20,
        Counts::get(&counts.reads_raced),
        Counts::get(&counts.lock_waited_out),
        Counts::get(&counts.lock_unavailable),
        warnings.len(),
        Counts::get(&counts.snapshots_done_ms) as f64 / 1000.0,
        Counts::get(&counts.content_done_ms) as f64 / 1000.0,
        started.elapsed().as_secs_f64(),
    );
    println!("{line}");
    print!("{fsck}");
    common::summary(&format!("concurrent={total}"))?;
    Ok(())
}
