//! The unpack fast path under SIGKILL: `strata serve` is killed at seeded
//! points while it fetches and unpacks an image's layers (Prepares with the
//! remote-snapshot labels, as containerd sends them). After each restart,
//! every layer snapshot that exists is committed and complete (its tree is
//! the one a run without a kill gave), no active or half-made snapshot is
//! visible, and Cleanup leaves no directory without a record; the pull then
//! finishes.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use strata::harness::{image, Registry, Strata};
use strata_proto::snapshots as pb;
use strata_snapshotter::remote::{
    CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, TARGET_REF,
};
use tonic::transport::Channel;

type Client = pb::snapshots_client::SnapshotsClient<Channel>;
type Tree = BTreeMap<String, common::TreeEntry>;

/// The layers and labels of one image, as containerd's unpacker sends them.
struct Image {
    reference: String,
    manifest: String,
    layers: Vec<String>,
    chains: Vec<String>,
}

/// The committed snapshot of `chain` on `parent`, found as containerd finds
/// it after an AlreadyExists: by label and parent.
async fn find(c: &mut Client, chain: &str, parent: &str) -> Result<Option<String>> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: vec![format!(
                "labels.\"containerd.io/snapshot.ref\"=={chain},parent=={parent:?}"
            )],
        })
        .await?
        .into_inner();
    let mut found = None;
    while let Some(m) = s.message().await? {
        for i in m.info {
            if i.kind == pb::Kind::Committed as i32 {
                found = Some(i.name);
            }
        }
    }
    Ok(found)
}

/// Prepares every layer with the labels; returns the committed names.
async fn pull(c: &mut Client, img: &Image) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for (i, (layer, chain)) in img.layers.iter().zip(&img.chains).enumerate() {
        let parent = names.last().cloned().unwrap_or_default();
        if let Some(n) = find(c, chain, &parent).await? {
            names.push(n);
            continue;
        }
        let r = c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "strata".into(),
                key: format!("extract-{i}-{chain}"),
                parent: parent.clone(),
                labels: HashMap::from([
                    (TARGET_REF.to_string(), chain.clone()),
                    (CRI_IMAGE_REF.to_string(), img.reference.clone()),
                    (CRI_LAYER_DIGEST.to_string(), layer.clone()),
                    (CRI_MANIFEST_DIGEST.to_string(), img.manifest.clone()),
                ]),
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            other => {
                anyhow::bail!("layer {i}: the fast path should answer AlreadyExists: {other:?}")
            }
        }
        names.push(
            find(c, chain, &parent)
                .await?
                .with_context(|| format!("layer {i} committed but not found"))?,
        );
    }
    Ok(names)
}

/// The tree of a read-only view of `name`, mounted under `dir`.
async fn tree_of(c: &mut Client, name: &str, dir: &Path) -> Result<Tree> {
    let key = format!("check-{name}");
    let mounts = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "strata".into(),
            key: key.clone(),
            parent: name.into(),
            labels: HashMap::new(),
        })
        .await?
        .into_inner()
        .mounts;
    let m = mounts.first().context("no mount")?;
    let target = dir.join("check");
    std::fs::create_dir_all(&target)?;
    let ok = std::process::Command::new("mount")
        .args(["-t", &m.r#type, "-o", &m.options.join(","), &m.source])
        .arg(&target)
        .status()?
        .success();
    ensure!(ok, "mount {m:?}");
    let t = common::tree(&target);
    let _ = std::process::Command::new("umount").arg(&target).status();
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "strata".into(),
        key,
    })
    .await?;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_unpack_leaves_only_complete_layers() -> Result<()> {
    common::require_root();
    let tmp = common::tempdir();
    let dir = tmp.path();
    let mut registry = Registry::start(&dir.join("registry"))?;
    // busybox, then two layers of real files (a few thousand entries).
    let img = image::Image {
        layers: vec![
            image::busybox_layer()?,
            vec![image::Entry::HostTree {
                src: "/usr/share/doc".into(),
                dest: "doc".into(),
                max_bytes: 24 << 20,
            }],
            vec![image::Entry::HostTree {
                src: "/usr/lib/x86_64-linux-gnu".into(),
                dest: "lib".into(),
                max_bytes: 24 << 20,
            }],
        ],
        cmd: vec!["/bin/true".into()],
        uncompressed: false,
    };
    let written = img.write_layout(&dir.join("oci"), "v1")?;
    let reference = registry.push(&dir.join("oci"), "v1", "strata/crash:v1")?;
    let layers = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("oci/index.json"))?)?;
        let m = index["manifests"][0]["digest"]
            .as_str()
            .context("manifest")?;
        let path = dir
            .join("oci/blobs/sha256")
            .join(m.trim_start_matches("sha256:"));
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        manifest["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter_map(|l| l["digest"].as_str().map(String::from))
            .collect::<Vec<_>>()
    };
    let img = Image {
        reference,
        manifest: written.manifest_digest.clone(),
        layers,
        chains: strata::pull::chain_ids(&written.diff_ids),
    };

    // A run without a kill: the tree of every layer.
    let clean = dir.join("clean");
    std::fs::create_dir_all(&clean)?;
    let strata = Strata::start(&common::strata_bin(), &clean, &[])?;
    let mut c = strata::client::snapshots(&strata.socket).await?;
    let names = pull(&mut c, &img).await?;
    let mut want = HashMap::new();
    for (chain, name) in img.chains.iter().zip(&names) {
        want.insert(chain.clone(), tree_of(&mut c, name, &clean).await?);
    }
    drop(c);
    strata.stop()?;

    // STRATA_UNPACK_KILLS rounds (default 12), each on a fresh root.
    let rounds: u64 = common::env_or("STRATA_UNPACK_KILLS", 12);
    let mut survived = 0;
    for round in 0..rounds {
        let rdir = dir.join(format!("round{round}"));
        std::fs::create_dir_all(&rdir)?;
        let strata = Strata::start(&common::strata_bin(), &rdir, &[])?;
        let socket = strata.socket.clone();
        let puller = tokio::spawn({
            let img = Image {
                reference: img.reference.clone(),
                manifest: img.manifest.clone(),
                layers: img.layers.clone(),
                chains: img.chains.clone(),
            };
            async move {
                let mut c = strata::client::snapshots(&socket).await?;
                pull(&mut c, &img).await
            }
        });
        // Seeded kill points spread over the pull (0.005 to 0.78 s).
        let delay = 5 + (round * 7919 % 97) * 8;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        strata.sigkill()?;
        let _ = puller.await;
        drop(strata);

        let strata = Strata::start(&common::strata_bin(), &rdir, &[])?;
        let mut c = strata::client::snapshots(&strata.socket).await?;
        let mut all = Vec::new();
        let mut s = c
            .list(pb::ListSnapshotsRequest {
                snapshotter: "strata".into(),
                filters: vec![],
            })
            .await?
            .into_inner();
        while let Some(m) = s.message().await? {
            all.extend(m.info);
        }
        for i in &all {
            ensure!(
                i.kind == pb::Kind::Committed as i32,
                "round {round} (kill at {delay} ms): a snapshot that is not committed is visible: {i:?}"
            );
            let chain = i
                .labels
                .get(TARGET_REF)
                .context("layer without its target label")?;
            let got = tree_of(&mut c, &i.name, &rdir).await?;
            let diff = common::tree_diff(&got, &want[chain]);
            ensure!(
                diff.is_empty(),
                "round {round} (kill at {delay} ms): layer {chain} is incomplete:\n{}",
                diff.join("\n")
            );
        }
        c.cleanup(pb::CleanupRequest {
            snapshotter: "strata".into(),
        })
        .await?;
        let dirs = std::fs::read_dir(strata.root.join("snapshots/strata"))?.count();
        ensure!(
            dirs == all.len(),
            "round {round}: {dirs} directories for {} snapshots after Cleanup",
            all.len()
        );
        // The pull then finishes, with the same trees.
        let names = pull(&mut c, &img).await?;
        let top = names.last().context("no layers")?;
        let got = tree_of(&mut c, top, &rdir).await?;
        let last = img.chains.last().context("no chain")?;
        ensure!(common::tree_diff(&got, &want[last]).is_empty());
        eprintln!(
            "round {round}: killed at {delay} ms with {} of {} layers committed; recovered",
            all.len(),
            img.layers.len()
        );
        survived += 1;
        drop(c);
        strata.stop()?;
    }
    ensure!(survived == rounds);
    common::summary(&format!("kills={rounds}"))?;
    Ok(())
}
