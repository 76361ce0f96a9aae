//! `strata bench scaling`: how each figure grows as the snapshot count, the
//! chain depth, the concurrency and the blob size grow, per target, as a
//! table and an SVG plot.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use strata_proto::content::content_client::ContentClient;
use strata_proto::snapshots as pb;

use super::content::{ingest, noise, sha, ContentTarget};
use super::{summarize, Client, OpStats, Target};

/// One point of a scaling series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// `snapshots`, `chain depth`, `clients` or `blob KiB`.
    pub dimension: String,
    /// What was measured, with its unit.
    pub metric: String,
    /// Target label.
    pub target: String,
    /// The dimension's value.
    pub x: f64,
    /// The metric's value.
    pub y: f64,
}

/// The points of each dimension.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Snapshot counts to measure at.
    pub counts: Vec<usize>,
    /// Chain depths.
    pub depths: Vec<usize>,
    /// Concurrent clients.
    pub clients: Vec<usize>,
    /// Blob sizes, KiB.
    pub blob_kib: Vec<usize>,
}

impl Sizes {
    /// A developer's loop: small enough for well under two minutes.
    pub fn quick() -> Self {
        Sizes {
            counts: vec![100, 1000],
            depths: vec![1, 8, 32],
            clients: vec![1, 4, 16],
            blob_kib: vec![64, 1024, 16 * 1024],
        }
    }

    /// The full run: 1,000 to 100,000 snapshots, chains to 128.
    pub fn full() -> Self {
        Sizes {
            counts: vec![1000, 10_000, 100_000],
            depths: vec![1, 8, 32, 128],
            clients: vec![1, 4, 16, 64],
            blob_kib: vec![64, 1024, 16 * 1024, 128 * 1024],
        }
    }
}

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2)
        .map(|d| d.as_secs_f64() * 1e6)
        .unwrap_or(0.0)
}

/// Creates committed snapshots `{prefix}-{from..to}` with 16 clients.
async fn populate(t: &Target, prefix: &str, from: usize, to: usize) -> Result<()> {
    let clients = 16;
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (t, prefix) = (t.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&t).await?;
            let mut i = from + k;
            while i < to {
                c.prepare(&format!("{prefix}-a{i}"), "").await?;
                c.commit(&format!("{prefix}-{i}"), &format!("{prefix}-a{i}"))
                    .await?;
                i += clients;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn walk_count(t: &Target) -> Result<(usize, Duration)> {
    let mut c = strata_proto::snapshots::snapshots_client::SnapshotsClient::new(
        crate::client::connect(&t.socket).await?,
    )
    .max_decoding_message_size(64 << 20);
    let start = Instant::now();
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: t.snapshotter.clone(),
            filters: vec![],
        })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await? {
        n += m.info.len();
    }
    Ok((n, start.elapsed()))
}

/// Runs every dimension for every target, alternating targets at each point.
pub async fn run(
    snaps: &[Target],
    content: &[ContentTarget],
    sizes: &Sizes,
) -> Result<(Vec<OpStats>, Vec<Point>)> {
    let run_id = std::process::id();
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let mut point = |dimension: &str, metric: &str, target: &str, x: usize, y: f64| {
        points.push(Point {
            dimension: dimension.into(),
            metric: metric.into(),
            target: target.into(),
            x: x as f64,
            y,
        })
    };
    let mut row = |target: &str, op: String, lat: Vec<Duration>| {
        let total: Duration = lat.iter().sum();
        let mut r = summarize(target, &op, lat, total);
        r.group = "scaling".into();
        rows.push(r);
    };

    // Snapshot count: Stat, Prepare+Commit and Walk as the store grows.
    let mut have: HashMap<usize, usize> = HashMap::new();
    for &n in &sizes.counts {
        for (ti, t) in snaps.iter().enumerate() {
            let prefix = format!("scale-{run_id}");
            let from = *have.get(&ti).unwrap_or(&0);
            populate(t, &prefix, from, n)
                .await
                .with_context(|| format!("populating {} to {n}", t.label))?;
            have.insert(ti, n);
            let mut c = Client::connect(t).await?;
            let mut stat = Vec::new();
            for i in 0..200usize {
                let k = format!("{prefix}-{}", (i * 7919) % n);
                let s = Instant::now();
                c.stat(&k).await?;
                stat.push(s.elapsed());
            }
            let mut mutate = Vec::new();
            for i in 0..50usize {
                let (a, k) = (format!("{prefix}-n{n}-a{i}"), format!("{prefix}-n{n}-c{i}"));
                let s = Instant::now();
                c.prepare(&a, &format!("{prefix}-0")).await?;
                c.commit(&k, &a).await?;
                mutate.push(s.elapsed());
                c.remove(&k).await?;
            }
            let (seen, walk) = walk_count(t).await?;
            point("snapshots", "Stat p50 µs", &t.label, n, p50(stat.clone()));
            point(
                "snapshots",
                "Prepare+Commit p50 µs",
                &t.label,
                n,
                p50(mutate.clone()),
            );
            point(
                "snapshots",
                "Walk ms",
                &t.label,
                n,
                walk.as_secs_f64() * 1e3,
            );
            row(&t.label, format!("stat @{n}"), stat);
            row(&t.label, format!("prep+commit @{n}"), mutate);
            row(&t.label, format!("walk {seen} @{n}"), vec![walk]);
        }
    }

    // Chain depth: Prepare on top of a chain, and the Mounts of the result.
    let max_depth = sizes.depths.iter().copied().max().unwrap_or(1);
    for (ti, t) in snaps.iter().enumerate() {
        let mut c = Client::connect(t).await?;
        let chain = format!("chain-{run_id}-{ti}");
        let mut parent = String::new();
        let mut tops = HashMap::new();
        for d in 1..=max_depth {
            c.prepare(&format!("{chain}-a{d}"), &parent).await?;
            parent = format!("{chain}-{d}");
            c.commit(&parent, &format!("{chain}-a{d}")).await?;
            tops.insert(d, parent.clone());
        }
        for &d in &sizes.depths {
            let top = tops.get(&d).cloned().unwrap_or_default();
            let (mut prep, mut mounts) = (Vec::new(), Vec::new());
            for i in 0..20 {
                let a = format!("{chain}-d{d}-x{i}");
                let s = Instant::now();
                c.prepare(&a, &top).await?;
                prep.push(s.elapsed());
                let s = Instant::now();
                c.mounts(&a).await?;
                mounts.push(s.elapsed());
                c.remove(&a).await?;
            }
            point(
                "chain depth",
                "Prepare p50 µs",
                &t.label,
                d,
                p50(prep.clone()),
            );
            point(
                "chain depth",
                "Mounts p50 µs",
                &t.label,
                d,
                p50(mounts.clone()),
            );
            row(&t.label, format!("prepare depth {d}"), prep);
            row(&t.label, format!("mounts depth {d}"), mounts);
        }
    }

    // Concurrency: Prepare+Commit throughput with N clients.
    for &n in &sizes.clients {
        for t in snaps {
            let per = (400 / n).max(10);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for k in 0..n {
                let t = t.clone();
                let prefix = format!("conc-{run_id}-{n}-{k}");
                tasks.push(tokio::spawn(async move {
                    let mut c = Client::connect(&t).await?;
                    let mut lat = Vec::new();
                    for i in 0..per {
                        let s = Instant::now();
                        c.prepare(&format!("{prefix}-a{i}"), "").await?;
                        c.commit(&format!("{prefix}-{i}"), &format!("{prefix}-a{i}"))
                            .await?;
                        lat.push(s.elapsed());
                    }
                    Ok::<_, anyhow::Error>(lat)
                }));
            }
            let mut lat = Vec::new();
            for task in tasks {
                lat.extend(task.await??);
            }
            let wall = start.elapsed();
            let ops = lat.len() as f64 / wall.as_secs_f64();
            point("clients", "Prepare+Commit ops/s", &t.label, n, ops);
            let total = wall;
            let mut r = summarize(&t.label, &format!("prep+commit x{n}"), lat, total);
            r.group = "scaling".into();
            rows.push(r);
        }
    }

    // Blob size: ingest throughput.
    for &kib in &sizes.blob_kib {
        for (ti, t) in content.iter().enumerate() {
            let mut c = ContentClient::new(crate::client::connect(&t.socket).await?)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let count = ((16 << 10) / kib).clamp(1, 64);
            let (mut lat, mut bytes) = (Vec::new(), 0u64);
            for i in 0..count {
                let seed =
                    (u64::from(run_id) << 24) ^ ((kib as u64) << 8) ^ ((i as u64) << 4) ^ ti as u64;
                let data = noise(seed, kib << 10);
                lat.push(ingest(&mut c, &format!("scale-{seed}"), &data).await?);
                bytes += data.len() as u64;
                let _ = c
                    .delete(strata_proto::content::DeleteContentRequest { digest: sha(&data) })
                    .await;
            }
            let total: Duration = lat.iter().sum();
            let mib_s = bytes as f64 / (1 << 20) as f64 / total.as_secs_f64().max(1e-9);
            point("blob KiB", "ingest MiB/s", &t.label, kib, mib_s);
            let mut r = summarize(&t.label, &format!("ingest {kib}KiB MiB/s"), lat, total);
            r.group = "scaling".into();
            r.ops_per_s = mib_s;
            rows.push(r);
        }
    }
    Ok((rows, points))
}

/// Draws the series as one SVG: a panel per dimension and metric, a line
/// per target, log-scaled x.
pub fn plot(points: &[Point], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut panels: Vec<(String, String)> = Vec::new();
    for p in points {
        let k = (p.dimension.clone(), p.metric.clone());
        if !panels.contains(&k) {
            panels.push(k);
        }
    }
    let cols = 3;
    let rows_n = panels.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (1200, 360 * rows_n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((rows_n, cols));
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let mut targets: Vec<String> = Vec::new();
    for p in points {
        if !targets.contains(&p.target) {
            targets.push(p.target.clone());
        }
    }
    for ((dim, metric), area) in panels.iter().zip(areas.iter()) {
        let pts: Vec<&Point> = points
            .iter()
            .filter(|p| &p.dimension == dim && &p.metric == metric)
            .collect();
        let xmax = pts.iter().map(|p| p.x).fold(1.0, f64::max) * 1.5;
        let xmin = pts.iter().map(|p| p.x).fold(f64::MAX, f64::min).max(1e-3) / 1.5;
        let ymax = pts.iter().map(|p| p.y).fold(0.0, f64::max) * 1.15 + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{metric} vs {dim}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc(dim.as_str())
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, t) in targets.iter().enumerate() {
            let color = palette[i % palette.len()];
            let mut series: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| &p.target == t)
                .map(|p| (p.x, p.y))
                .collect();
            series.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(t.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(
                    series
                        .into_iter()
                        .map(|(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
