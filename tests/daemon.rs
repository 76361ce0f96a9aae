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
    strata.sigkill()?;
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

/// An ingest cut off by a crash resumes after the restart at the offset
/// Status reports, and commits to the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_ingest_resumes_after_sigkill() -> Result<()> {
    use sha2::Digest;
    use strata_proto::content as cpb;
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let data = strata::harness::image::noise(77, 3 << 20);
    let digest = format!("sha256:{:x}", sha2::Sha256::digest(&data));
    let write =
        |reference: &str, offset: usize, part: &[u8], commit: bool| cpb::WriteContentRequest {
            action: if commit {
                cpb::WriteAction::Commit
            } else {
                cpb::WriteAction::Write
            } as i32,
            r#ref: reference.into(),
            total: data.len() as i64,
            expected: digest.clone(),
            offset: offset as i64,
            data: part.to_vec(),
            labels: HashMap::new(),
        };

    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    let mut c =
        cpb::content_client::ContentClient::new(strata::client::connect(&strata.socket).await?);
    let first = vec![
        write("pull-1", 0, &data[..1 << 20], false),
        write("pull-1", 1 << 20, &data[1 << 20..2 << 20], false),
    ];
    let mut s = c.write(tokio_stream::iter(first)).await?.into_inner();
    while s.message().await?.is_some() {}
    // Let the session end and its bytes reach the file, then crash.
    let mut offset = 0;
    for _ in 0..100 {
        offset = c
            .status(cpb::StatusRequest {
                r#ref: "pull-1".into(),
            })
            .await?
            .into_inner()
            .status
            .map(|s| s.offset)
            .unwrap_or(0);
        if offset == 2 << 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ensure!(offset == 2 << 20, "status offset {offset} before the crash");
    strata.sigkill()?;
    drop(strata);

    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    let mut c =
        cpb::content_client::ContentClient::new(strata::client::connect(&strata.socket).await?);
    let st = c
        .status(cpb::StatusRequest {
            r#ref: "pull-1".into(),
        })
        .await?
        .into_inner()
        .status;
    let offset = st.as_ref().map(|s| s.offset).unwrap_or(-1) as usize;
    ensure!(offset == 2 << 20, "after the restart Status says {st:?}");
    let rest = vec![write("pull-1", offset, &data[offset..], true)];
    let mut s = c.write(tokio_stream::iter(rest)).await?.into_inner();
    let mut committed = String::new();
    while let Some(m) = s.message().await? {
        committed = m.digest;
    }
    ensure!(
        committed == digest,
        "committed {committed}, wanted {digest}"
    );
    let back = common::read_blob(&mut c, &digest).await?;
    ensure!(
        back == data,
        "read back {} bytes, not the {} written",
        back.len(),
        data.len()
    );
    // Committing it again is AlreadyExists.
    let again = vec![write("pull-2", 0, &data, true)];
    let e = match c.write(tokio_stream::iter(again)).await {
        Err(e) => e,
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match s.message().await {
                    Err(e) => break e,
                    Ok(None) => anyhow::bail!("second commit of {digest} succeeded"),
                    Ok(Some(_)) => {}
                }
            }
        }
    };
    ensure!(e.code() == Code::AlreadyExists, "{e:?}");
    strata.stop()?;
    Ok(())
}

/// strata's state is readable by root alone, whatever umask it was started
/// with; containerd reaches the socket (0660), nobody else does; a root left
/// open by an older strata is closed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_socket_are_private_whatever_the_umask() -> Result<()> {
    use nix::sys::stat::{umask, Mode};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::symlink_metadata(p)?.permissions().mode() & 0o7777)
    };
    let check = |strata: &Strata| -> Result<()> {
        ensure!(
            mode(&strata.root)? == 0o700,
            "root is {:o}",
            mode(&strata.root)?
        );
        let sock = std::fs::symlink_metadata(&strata.socket)?;
        ensure!(sock.file_type().is_socket());
        ensure!(
            mode(&strata.socket)? == 0o660,
            "socket is {:o}",
            mode(&strata.socket)?
        );
        // Below the root, nothing the content store keeps is open to others.
        let mut stack = vec![strata.root.join("content")];
        let mut seen = 0;
        while let Some(p) = stack.pop() {
            ensure!(mode(&p)? & 0o077 == 0, "{} is {:o}", p.display(), mode(&p)?);
            seen += 1;
            if p.is_dir() {
                for e in std::fs::read_dir(&p)? {
                    stack.push(e?.path());
                }
            }
        }
        ensure!(seen >= 4, "only {seen} entries under content/");
        Ok(())
    };

    let old = umask(Mode::empty());
    let started = Strata::start(&common::strata_bin(), dir, &[]);
    umask(old);
    let strata = started?;
    let mut c = strata::client::content(&strata.socket).await?;
    strata::client::put_blob(&mut c, "blob-1", &strata::harness::image::noise(5, 300_000)).await?;
    check(&strata)?;
    strata.stop()?;

    // An existing root that others can read is closed at the next start.
    std::fs::set_permissions(
        dir.join("strata-root"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let strata = Strata::start(&common::strata_bin(), dir, &[])?;
    check(&strata)?;
    strata.stop()?;
    Ok(())
}

/// `strata content stats` and `strata fsck` find the state where the
/// config's `root` says, and `--root` overrides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tools_take_the_root_from_the_config() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let root = dir.join("state");
    let config = dir.join("strata.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\naddress = {:?}\n",
            root.display().to_string(),
            dir.join("s.sock").display().to_string()
        ),
    )?;
    let mut cmd = std::process::Command::new(common::strata_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let mut proc = strata::harness::Proc::spawn("strata serve", cmd, dir.join("serve.log"))?;
    let sock = dir.join("s.sock");
    strata::harness::wait_for(
        &mut proc,
        "strata serve",
        std::time::Duration::from_secs(60),
        || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
    )?;
    let mut c = strata::client::content(&sock).await?;
    strata::client::put_blob(&mut c, "b", b"hello from the config's root").await?;
    drop(c);
    ensure!(proc.stop()?, "strata did not stop on SIGTERM");

    let run = |args: &[&str]| -> Result<String> {
        let out =
            strata::harness::run(std::process::Command::new(common::strata_bin()).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let cfg = config.display().to_string();
    let stats = run(&["content", "stats", "--config", &cfg])?;
    ensure!(
        stats
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["blobs", "1"]),
        "{stats}"
    );
    let fsck = run(&["fsck", "--config", &cfg])?;
    ensure!(fsck.contains("1 blob"), "{fsck}");
    // --root wins over the config: an empty root has no database.
    let empty = dir.join("empty");
    let e = strata::harness::run(std::process::Command::new(common::strata_bin()).args([
        "content",
        "stats",
        "--config",
        &cfg,
        "--root",
        &empty.display().to_string(),
    ]));
    ensure!(e.is_err(), "stats of an empty root succeeded: {e:?}");
    Ok(())
}
