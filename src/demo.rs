//! `strata demo`: strata's main job on an embedded default. Starts a local
//! registry, pushes a three-layer image built from real files, starts strata
//! and a containerd that uses it, pulls the image with `strata pull` (strata
//! fetches and unpacks the layers) and runs it, and does the same with
//! containerd's built-in overlayfs and `ctr image pull` for comparison. Each
//! container runs twice and the second (warm) run is timed, so that neither
//! side pays for the first start of runc alone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::{image, Containerd, ContainerdSetup, Registry, Strata};

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    eprint!("  {name:<48}");
    let start = Instant::now();
    let r = f().with_context(|| name.to_string());
    let took = start.elapsed();
    match &r {
        Ok(_) => eprintln!("{:>8.3} s", took.as_secs_f64()),
        Err(_) => eprintln!("  failed"),
    }
    Ok((r?, took))
}

/// Pulls and runs `reference` in a fresh containerd using `snapshotter`.
fn pull_and_run(
    dir: &Path,
    reference: &str,
    snapshotter: &str,
    strata: Option<&Strata>,
) -> Result<(Duration, Duration, String)> {
    let setup = match strata {
        Some(s) => ContainerdSetup::strata(&s.socket),
        None => ContainerdSetup::builtin(),
    };
    let (mut cd, _) = step(&format!("start containerd ({snapshotter})"), || {
        Containerd::start(&dir.join(format!("containerd-{snapshotter}")), &setup)
    })?;
    let (_, pull) = match strata {
        Some(_) => step("strata pull (strata fetches and unpacks)", || {
            let me = std::env::current_exe().context("finding the strata binary")?;
            let socket = cd.socket.display().to_string();
            crate::harness::run(
                std::process::Command::new(me)
                    .args(["pull", "-a", &socket, "-n", "strata", reference]),
            )
            .map(|_| ())
        })?,
        None => step("ctr image pull (containerd unpacks)", || {
            cd.pull(snapshotter, reference).map(|_| ())
        })?,
    };
    step(
        &format!("run a container with {snapshotter} (cold)"),
        || cd.run(snapshotter, reference, "demo-cold", &[]),
    )?;
    let (out, run) = step(
        &format!("run a container with {snapshotter} (warm)"),
        || cd.run(snapshotter, reference, "demo", &[]),
    )?;
    if strata.is_some() {
        let snaps = cd.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
        eprintln!("\n  snapshots strata holds for containerd:");
        for l in snaps.lines() {
            eprintln!("    {l}");
        }
    }
    cd.stop()?;
    Ok((pull, run, out))
}

/// Runs the demo in a temporary directory under `workdir`.
pub fn run(workdir: &Path) -> Result<()> {
    std::fs::create_dir_all(workdir)?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-demo")
        .tempdir_in(workdir)?;
    let dir = tmp.path();
    let me = std::env::current_exe().context("finding the strata binary")?;
    eprintln!("strata demo in {}\n", dir.display());

    let (mut registry, _) = step("start docker-registry on 127.0.0.1", || {
        Registry::start(&dir.join("registry"))
    })?;
    let (written, _) = step("build a 3-layer image (busybox, data, whiteout)", || {
        image::demo_image()?.write_layout(&dir.join("oci"), "v1")
    })?;
    let (reference, _) = step("push it with skopeo", || {
        registry.push(&dir.join("oci"), "v1", "demo/app:v1")
    })?;
    let (strata, _) = step("start strata serve", || Strata::start(&me, dir, &[]))?;

    let (s_pull, s_run, out) = pull_and_run(dir, &reference, "strata", Some(&strata))?;
    eprintln!("\n  the container printed:");
    for l in out.lines() {
        eprintln!("    {l}");
    }
    eprintln!();
    let (o_pull, o_run, _) = pull_and_run(dir, &reference, "overlayfs", None)?;
    strata.stop()?;

    let total: u64 = written.layer_sizes.iter().sum();
    println!(
        "\nimage {reference}: {} layers, {:.1} MiB compressed",
        written.layer_sizes.len(),
        total as f64 / (1 << 20) as f64
    );
    println!("{:<26} {:>12} {:>12}", "", "pull+unpack", "warm run");
    println!(
        "{:<26} {:>10.3} s {:>10.3} s",
        "strata pull (strata)",
        s_pull.as_secs_f64(),
        s_run.as_secs_f64()
    );
    println!(
        "{:<26} {:>10.3} s {:>10.3} s",
        "ctr pull (built-ins)",
        o_pull.as_secs_f64(),
        o_run.as_secs_f64()
    );
    Ok(())
}
