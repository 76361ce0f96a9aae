//! `strata bench`: latencies and throughput through containerd's proxy gRPC
//! APIs, against several targets side by side in one run (strata,
//! containerd's own overlayfs and local store in `refproxy`, any proxy
//! plugin). Rounds alternate between targets so that they share the
//! machine's noise.
//!
//! This module: snapshot ops, the shared summary and table. [`content`]:
//! content-store ingest, read and lookup.

pub mod cli;
pub mod content;
pub mod lazy;
pub mod machine;
pub mod pull;
pub mod scaling;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use strata_proto::snapshots as pb;
use strata_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

/// A snapshotter reachable over the proxy API.
#[derive(Debug, Clone)]
pub struct Target {
    /// Label in the report.
    pub label: String,
    /// Its socket.
    pub socket: PathBuf,
    /// The snapshotter name requests carry.
    pub snapshotter: String,
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;
    /// `LABEL=SOCKET:SNAPSHOTTER`.
    fn from_str(s: &str) -> Result<Self> {
        let (label, rest) = s
            .split_once('=')
            .context("target is LABEL=SOCKET:SNAPSHOTTER")?;
        let (socket, snapshotter) = rest
            .rsplit_once(':')
            .context("target is LABEL=SOCKET:SNAPSHOTTER")?;
        Ok(Target {
            label: label.into(),
            socket: socket.into(),
            snapshotter: snapshotter.into(),
        })
    }
}

/// Latency summary of one op on one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpStats {
    /// `snapshots`, `content`, `pull` or `scaling`.
    #[serde(default)]
    pub group: String,
    /// Target label.
    pub target: String,
    /// Op name (`prepare`, ...), with `xN` for N concurrent clients.
    pub op: String,
    /// Samples.
    pub n: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Completed ops per second (wall clock); MiB/s on `MiB/s` rows.
    pub ops_per_s: f64,
    /// More figures of the row (pull: CPU seconds, peak MiB, fetched MiB).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// A whole run: when, where, the machine's limits, and every row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// UTC date and time of the run.
    pub date: String,
    /// The command line.
    pub command: String,
    /// What the hardware allows.
    pub machine: machine::Limits,
    /// Every measured row.
    pub rows: Vec<OpStats>,
    /// Scaling series, for the plot.
    #[serde(default)]
    pub series: Vec<scaling::Point>,
}

/// A row of `group` from one sample per round (the wall time is their sum).
pub(crate) fn rounds_row(group: &str, target: &str, op: &str, lat: Vec<Duration>) -> OpStats {
    let wall: Duration = lat.iter().sum();
    let mut r = summarize(target, op, lat, wall);
    r.group = group.into();
    r
}

/// The means over rounds of what a pull cost: bytes fetched (`fetched_mib`),
/// CPU seconds (`cpu_s`) and peak memory (`peak_mib`) of the daemons, from
/// `(fetched bytes, CPU s, peak bytes)` per round.
pub(crate) fn usage_extra(rounds: &[(u64, f64, u64)]) -> BTreeMap<String, f64> {
    let n = rounds.len().max(1) as f64;
    let mib = (1u64 << 20) as f64;
    BTreeMap::from([
        (
            "fetched_mib".to_string(),
            rounds.iter().map(|r| r.0 as f64).sum::<f64>() / n / mib,
        ),
        (
            "cpu_s".to_string(),
            rounds.iter().map(|r| r.1).sum::<f64>() / n,
        ),
        (
            "peak_mib".to_string(),
            rounds.iter().map(|r| r.2 as f64).sum::<f64>() / n / mib,
        ),
    ])
}

pub(crate) fn summarize(target: &str, op: &str, mut lat: Vec<Duration>, wall: Duration) -> OpStats {
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1e6
    };
    OpStats {
        group: String::new(),
        extra: BTreeMap::new(),
        target: target.into(),
        op: op.into(),
        n: lat.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        ops_per_s: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
    }
}

pub(crate) struct Client {
    c: SnapshotsClient<Channel>,
    sn: String,
}

impl Client {
    pub(crate) async fn connect(t: &Target) -> Result<Client> {
        Ok(Client {
            c: crate::client::snapshots(&t.socket).await?,
            sn: t.snapshotter.clone(),
        })
    }
    pub(crate) async fn prepare(&mut self, key: &str, parent: &str) -> Result<()> {
        self.c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: self.sn.clone(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            })
            .await?;
        Ok(())
    }
    pub(crate) async fn commit(&mut self, name: &str, key: &str) -> Result<()> {
        self.c
            .commit(pb::CommitSnapshotRequest {
                snapshotter: self.sn.clone(),
                name: name.into(),
                key: key.into(),
                labels: HashMap::new(),
            })
            .await?;
        Ok(())
    }
    pub(crate) async fn stat(&mut self, key: &str) -> Result<()> {
        self.c
            .stat(pb::StatSnapshotRequest {
                snapshotter: self.sn.clone(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }
    pub(crate) async fn mounts(&mut self, key: &str) -> Result<()> {
        self.c
            .mounts(pb::MountsRequest {
                snapshotter: self.sn.clone(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }
    pub(crate) async fn remove(&mut self, key: &str) -> Result<()> {
        self.c
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: self.sn.clone(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }
}

const OPS: [&str; 5] = ["prepare", "mounts", "commit", "stat", "remove"];

/// Runs one phase of a round on one client: op `op` on its `n` snapshots.
async fn phase(
    mut c: Client,
    op: &'static str,
    prefix: String,
    base: String,
    n: usize,
) -> Result<(Client, Vec<Duration>)> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let (a, k) = (format!("{prefix}-a{i}"), format!("{prefix}-c{i}"));
        let s = Instant::now();
        match op {
            "prepare" => c.prepare(&a, &base).await,
            "mounts" => c.mounts(&a).await,
            "commit" => c.commit(&k, &a).await,
            "stat" => c.stat(&k).await,
            _ => c.remove(&k).await,
        }
        .with_context(|| format!("{op} {a}"))?;
        lat.push(s.elapsed());
    }
    Ok((c, lat))
}

/// Runs `rounds` alternating rounds of `ops` snapshots per target, serially
/// and with `concurrency` clients (one connection each); each phase (all
/// Prepares, then all Mounts, ...) is timed across its clients, so ops/s is
/// real throughput.
pub async fn snapshots(
    targets: &[Target],
    ops: usize,
    rounds: usize,
    concurrency: usize,
) -> Result<Vec<OpStats>> {
    if targets.is_empty() {
        bail!("no targets: give --target LABEL=SOCKET:SNAPSHOTTER or --start-strata/--refproxy");
    }
    let run_id = std::process::id();
    let base = format!("bench-{run_id}-base");
    // A committed base, so that Prepare has a parent as in an unpack.
    for t in targets {
        let mut c = Client::connect(t).await?;
        c.prepare(&format!("{base}-a"), "").await?;
        c.commit(&base, &format!("{base}-a")).await?;
    }
    let mut rows = Vec::new();
    let mut modes = vec![1usize];
    if concurrency > 1 {
        modes.push(concurrency);
    }
    for clients in modes {
        let mut lat: HashMap<(usize, &'static str), Vec<Duration>> = HashMap::new();
        let mut wall: HashMap<(usize, &'static str), Duration> = HashMap::new();
        let per_client = ops.div_ceil(clients);
        for r in 0..rounds {
            for (ti, t) in targets.iter().enumerate() {
                let mut conns = Vec::new();
                for _ in 0..clients {
                    conns.push(Client::connect(t).await?);
                }
                for op in OPS {
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for (k, c) in conns.drain(..).enumerate() {
                        let prefix = format!("bench-{run_id}-x{clients}-r{r}-k{k}");
                        tasks.push(tokio::spawn(phase(c, op, prefix, base.clone(), per_client)));
                    }
                    for task in tasks {
                        let (c, l) = task.await??;
                        conns.push(c);
                        lat.entry((ti, op)).or_default().extend(l);
                    }
                    *wall.entry((ti, op)).or_default() += start.elapsed();
                }
            }
        }
        for (ti, t) in targets.iter().enumerate() {
            for op in OPS {
                let name = if clients == 1 {
                    op.to_string()
                } else {
                    format!("{op} x{clients}")
                };
                rows.push(summarize(
                    &t.label,
                    &name,
                    lat.remove(&(ti, op)).unwrap_or_default(),
                    wall.get(&(ti, op)).copied().unwrap_or_default(),
                ));
            }
        }
    }
    for t in targets {
        let mut c = Client::connect(t).await?;
        let _ = c.remove(&base).await;
    }
    Ok(rows)
}

/// The rows as a table; `÷ first` is this target's p50 over the first
/// target's (below 1: faster than the first).
pub fn table(rows: &[OpStats]) -> String {
    let mut out = format!(
        "{:<20} {:<10} {:>7} {:>10} {:>10} {:>11} {:>12}\n",
        "op", "target", "n", "p50 µs", "p99 µs", "ops/s", "p50 ÷ first"
    );
    let first: HashMap<&str, &OpStats> = rows
        .iter()
        .filter(|r| rows.first().is_some_and(|f| f.target == r.target))
        .map(|r| (r.op.as_str(), r))
        .collect();
    let mut ops: Vec<&str> = Vec::new();
    for r in rows {
        if !ops.contains(&r.op.as_str()) {
            ops.push(&r.op);
        }
    }
    for op in ops {
        for r in rows.iter().filter(|r| r.op == op) {
            let ratio = first
                .get(op)
                .map(|f| r.p50_us / f.p50_us.max(1e-9))
                .unwrap_or(1.0);
            let extra: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={v:.2}")).collect();
            out.push_str(&format!(
                "{:<20} {:<10} {:>7} {:>10.0} {:>10.0} {:>11.0} {:>11.2}x  {}\n",
                r.op,
                r.target,
                r.n,
                r.p50_us,
                r.p99_us,
                r.ops_per_s,
                ratio,
                extra.join(" ")
            ));
        }
    }
    out
}

/// One row of a comparison of two reports.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Group, target and op.
    pub key: String,
    /// p50 in B over p50 in A.
    pub p50_ratio: f64,
    /// Throughput in B over throughput in A.
    pub throughput_ratio: f64,
    /// Slower beyond noise.
    pub regression: bool,
}

/// Compares report `b` against `a`, row by row. A row regressed when its
/// p50 grew by more than `threshold` and by more than A's own spread
/// (p99 over p50), so that noise alone does not flag it.
pub fn compare(a: &Report, b: &Report, threshold: f64) -> Vec<Change> {
    let key = |r: &OpStats| format!("{}/{}/{}", r.group, r.target, r.op);
    let old: HashMap<String, &OpStats> = a.rows.iter().map(|r| (key(r), r)).collect();
    let mut out = Vec::new();
    for r in &b.rows {
        let Some(o) = old.get(&key(r)) else { continue };
        let p50_ratio = r.p50_us / o.p50_us.max(1e-9);
        let throughput_ratio = r.ops_per_s / o.ops_per_s.max(1e-9);
        let noise = ((o.p99_us - o.p50_us) / o.p50_us.max(1e-9)).clamp(0.0, 1.0);
        let regression = p50_ratio > 1.0 + threshold.max(noise);
        out.push(Change {
            key: key(r),
            p50_ratio,
            throughput_ratio,
            regression,
        });
    }
    out
}

/// The comparison as a table.
pub fn compare_table(changes: &[Change]) -> String {
    let mut out = format!(
        "{:<48} {:>10} {:>12}  verdict\n",
        "group/target/op", "p50 B÷A", "thrpt B÷A"
    );
    for c in changes {
        out.push_str(&format!(
            "{:<48} {:>9.2}x {:>11.2}x  {}\n",
            c.key,
            c.p50_ratio,
            c.throughput_ratio,
            if c.regression { "REGRESSION" } else { "ok" }
        ));
    }
    out
}
