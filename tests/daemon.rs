//! `strata serve` as a process: gRPC error codes, durability across SIGKILL,
//! clean-up of what a crash leaves, graceful stop.

mod common;

use std::collections::HashMap;

use anyhow::{ensure, Result};
use strata::harness::Strata;
use strata_proto::snapshots as pb;
use tonic::Code;

fn prepare(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "strata".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_durability_and_crash_cleanup() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    let mut c = strata::client::snapshots(&strata.socket).await?;

    // An unknown snapshotter is NotFound, naming the served ones.
    let e = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "zfs".into(),
            key: "k".into(),
        })
        .await
        .expect_err("unknown snapshotter");
    ensure!(
        e.code() == Code::NotFound && e.message().contains("strata"),
        "{e:?}"
    );

    c.prepare(prepare("layer-1", "")).await?;
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "strata".into(),
        name: "base".into(),
        key: "layer-1".into(),
        labels: HashMap::from([("l".to_string(), "v".to_string())]),
    })
    .await?;
    c.prepare(prepare("child", "base")).await?;

    let codes = [
        (
            c.prepare(prepare("child", "base")).await.err(),
            Code::AlreadyExists,
        ),
        (
            c.prepare(prepare("x", "missing")).await.err(),
            Code::NotFound,
        ),
        (
            c.prepare(prepare("y", "child")).await.err(),
            Code::InvalidArgument,
        ),
        (
            c.prepare(prepare("", "")).await.err(),
            Code::InvalidArgument,
        ),
        (
            c.remove(pb::RemoveSnapshotRequest {
                snapshotter: "strata".into(),
                key: "base".into(),
            })
            .await
            .err(),
            Code::FailedPrecondition,
        ),
        (
            c.mounts(pb::MountsRequest {
                snapshotter: "strata".into(),
                key: "base".into(),
            })
            .await
            .err(),
            Code::FailedPrecondition,
        ),
        (
            c.list(pb::ListSnapshotsRequest {
                snapshotter: "strata".into(),
                filters: vec!["kind==".into()],
            })
            .await
            .err(),
            Code::InvalidArgument,
        ),
    ];
    for (i, (err, want)) in codes.into_iter().enumerate() {
        let err = err.ok_or_else(|| anyhow::anyhow!("case {i}: succeeded, wanted {want:?}"))?;
        ensure!(err.code() == want, "case {i}: {err:?}, wanted {want:?}");
    }

    // SIGKILL: what returned OK is there after a restart.
    let pid = nix::unistd::Pid::from_raw(strata.proc_pid()?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    drop(strata);

    // What a crash between "directory made" and "batch written" leaves, and
    // a removal that never ran: directories without records.
    let snaps = dir.join("strata-root/snapshots/strata");
    std::fs::create_dir_all(snaps.join("9999/fs"))?;
    std::fs::create_dir_all(snaps.join("new-10000/fs"))?;

    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    let mut c = strata::client::snapshots(&strata.socket).await?;
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "strata".into(),
            key: "base".into(),
        })
        .await?
        .into_inner()
        .info
        .ok_or_else(|| anyhow::anyhow!("no info"))?;
    ensure!(
        info.kind == pb::Kind::Committed as i32
            && info.labels.get("l").map(String::as_str) == Some("v")
    );
    let m = c
        .mounts(pb::MountsRequest {
            snapshotter: "strata".into(),
            key: "child".into(),
        })
        .await?
        .into_inner()
        .mounts;
    ensure!(
        m.len() == 1
            && m[0].r#type == "overlay"
            && m[0]
                .options
                .iter()
                .any(|o| o.starts_with("upperdir=") && o.ends_with("/2/fs"))
            && m[0]
                .options
                .iter()
                .any(|o| o.starts_with("lowerdir=") && o.ends_with("/1/fs")),
        "{m:?}"
    );
    // Start-up cleanup runs in the background; Cleanup does it now.
    c.cleanup(pb::CleanupRequest {
        snapshotter: "strata".into(),
    })
    .await?;
    let mut left: Vec<String> = std::fs::read_dir(&snaps)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    ensure!(
        left.len() == 2 && !left.iter().any(|n| n == "9999" || n.starts_with("new-")),
        "{left:?}"
    );

    // New ids never reuse those of the crash.
    c.prepare(prepare("after", "")).await?;
    strata.stop()?;
    Ok(())
}
