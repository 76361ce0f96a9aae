//! `strata bench` as a user runs it: the quick run against strata and
//! containerd's own implementations (refproxy from the conformance kit),
//! through real daemons and a real containerd; then `bench compare`.

mod common;

use std::process::Command;

use anyhow::{ensure, Context, Result};

#[test]
fn quick_bench_reports_every_group_and_compare_flags_regressions() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let json = tmp.path().join("a.json");
    let svg = tmp.path().join("scaling.svg");
    let out = Command::new(common::strata_bin())
        .args(["bench", "all", "--quick", "--refproxy", "auto", "--workdir"])
        .arg(tmp.path())
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.starts_with("machine: "),
        "the machine's limits come first: {stdout}"
    );

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let rows = report["rows"].as_array().context("rows")?;
    for group in ["snapshots", "content", "pull", "scaling"] {
        for target in ["strata", "refproxy"] {
            ensure!(
                rows.iter().any(|r| r["group"] == group
                    && r["target"] == target
                    && r["n"].as_u64() > Some(0)),
                "no {group} row for {target}"
            );
        }
    }
    ensure!(
        rows.iter()
            .any(|r| r["group"] == "pull" && r["target"] == "containerd"),
        "pull compares containerd's built-ins too"
    );
    // `ctr image pull` on strata (containerd unpacks) and `strata pull`
    // (strata unpacks) both fetch the image.
    for target in ["strata", "strata-pull"] {
        let pull = rows
            .iter()
            .find(|r| r["group"] == "pull" && r["target"] == target && r["op"] == "pull+unpack")
            .with_context(|| format!("{target} pull row"))?;
        ensure!(
            pull["extra"]["fetched_mib"].as_f64() > Some(1.0),
            "bytes fetched measured: {pull}"
        );
        ensure!(
            pull["extra"]["cpu_s"].as_f64() > Some(0.0),
            "CPU measured: {pull}"
        );
    }
    ensure!(
        report["machine"]["sha256_mib_s"].as_f64() > Some(10.0),
        "{}",
        report["machine"]
    );
    let plot = std::fs::read_to_string(&svg)?;
    ensure!(
        plot.contains("<svg") && plot.contains("Walk ms vs snapshots"),
        "plot drawn"
    );

    // The same report against itself: no regression.
    let same = Command::new(common::strata_bin())
        .args(["bench", "compare"])
        .arg(&json)
        .arg(&json)
        .output()?;
    ensure!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );

    // One row three times slower: flagged, and the exit code says so.
    let mut slower = report.clone();
    let row = slower["rows"]
        .as_array_mut()
        .and_then(|r| {
            r.iter_mut()
                .find(|r| r["group"] == "snapshots" && r["target"] == "strata")
        })
        .context("a strata snapshots row")?;
    let p50 = row["p50_us"].as_f64().unwrap_or(1.0);
    row["p50_us"] = serde_json::json!(p50 * 3.0);
    let b = tmp.path().join("b.json");
    std::fs::write(&b, serde_json::to_vec(&slower)?)?;
    let cmp = Command::new(common::strata_bin())
        .args(["bench", "compare"])
        .arg(&json)
        .arg(&b)
        .output()?;
    let text = String::from_utf8_lossy(&cmp.stdout);
    ensure!(
        !cmp.status.success() && text.contains("REGRESSION"),
        "{text}"
    );
    Ok(())
}
