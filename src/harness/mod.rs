//! Real components for the demo, the tests and the benchmarks: Debian's
//! `docker-registry`, `containerd` (with `runc`), `skopeo`, and `strata serve`
//! itself, each started in a temporary directory on loopback and stopped
//! when dropped; and [`image`], which writes OCI images from real files.

pub mod image;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Finds a program on the PATH, or says which package brings it.
pub fn which(program: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let p = dir.join(program);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{program} not found: install it (apt-get install {package}), or run scripts/setup")
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 10 s) on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails with the log if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
            }
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to 10 s, then SIGKILL. Returns whether it
    /// stopped by itself.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        if c.try_wait()?.is_some() {
            return Ok(true);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if c.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        Ok(false)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Waits until `ready` holds, checking that `proc` is still alive.
pub fn wait_for(
    proc: &mut Proc,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("{what}: not ready after {timeout:?}:\n{}", proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a command to completion; fails with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Debian's `docker-registry` on 127.0.0.1.
pub struct Registry {
    proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200")
}

impl Registry {
    /// Starts a registry storing under `dir`.
    pub fn start(dir: &Path) -> Result<Registry> {
        let bin = which("docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config);
        let mut proc = Proc::spawn("docker-registry", cmd, dir.join("registry.log"))?;
        wait_for(
            &mut proc,
            "docker-registry",
            Duration::from_secs(30),
            || http_ok(&addr, "/v2/"),
        )?;
        Ok(Registry { proc, addr })
    }

    /// Pushes an OCI layout's `tag` to `NAME:TAG` here with skopeo.
    pub fn push(&mut self, layout: &Path, tag: &str, reference: &str) -> Result<String> {
        self.proc.check_alive()?;
        let skopeo = which("skopeo", "skopeo")?;
        let policy = layout.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        let dest = format!("{}/{reference}", self.addr);
        run(Command::new(skopeo)
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{dest}")))?;
        Ok(dest)
    }
}

/// `strata serve` on a unix socket in a temporary root.
pub struct Strata {
    proc: Proc,
    /// The socket.
    pub socket: PathBuf,
    /// Its root.
    pub root: PathBuf,
}

impl Strata {
    /// Starts `bin serve --root DIR/strata-root --address DIR/strata.sock`
    /// plus `extra` arguments.
    pub fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Strata> {
        Strata::start_at(bin, dir, &dir.join("strata-root"), extra)
    }

    /// Stops it (SIGTERM); fails if it had to be killed.
    pub fn stop(mut self) -> Result<()> {
        if !self.proc.stop()? {
            bail!(
                "strata did not stop within 10 s of SIGTERM:\n{}",
                self.proc.log_tail()
            );
        }
        Ok(())
    }

    /// The process, for liveness checks and its log.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The process alone (stopped when dropped).
    pub fn into_proc(self) -> Proc {
        self.proc
    }

    /// Its process id.
    pub fn proc_pid(&self) -> Result<i32> {
        let pid = self.proc.pid().context("strata is not running")?;
        Ok(i32::try_from(pid)?)
    }

    /// SIGKILLs it (a crash: nothing of its own runs).
    pub fn sigkill(&self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc_pid()?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        Ok(())
    }

    /// As [`Strata::start`], but with its state in `root` (another
    /// filesystem, say), while the socket and the log stay in `dir`.
    pub fn start_at(bin: &Path, dir: &Path, root: &Path, extra: &[&str]) -> Result<Strata> {
        let socket = dir.join("strata.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(&socket)
            .args(extra);
        let mut proc = Proc::spawn("strata serve", cmd, dir.join("strata.log"))?;
        let s = socket.clone();
        wait_for(&mut proc, "strata serve", Duration::from_secs(60), || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        })?;
        Ok(Strata {
            proc,
            socket,
            root: root.to_path_buf(),
        })
    }
}

/// Starts containerd's overlayfs snapshotter and local content store as a
/// proxy plugin (`refproxy` from `../shared/conformance/run --build-only`)
/// under `dir`; returns it and its socket.
pub fn start_refproxy(bin: &Path, dir: &Path) -> Result<(Proc, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("refproxy.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--root")
        .arg(dir.join("root"))
        .arg("--address")
        .arg(&socket);
    let mut proc = Proc::spawn("refproxy", cmd, dir.join("refproxy.log"))?;
    let s = socket.clone();
    wait_for(&mut proc, "refproxy", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&s).is_ok()
    })?;
    Ok((proc, socket))
}

/// An image as a plain-HTTP registry holds it (resolved for this host's
/// platform through strata's registry client).
pub struct RegistryImage {
    /// Its layers, bottom first: digest and size.
    pub layers: Vec<(String, u64)>,
    /// The chain id of its top layer (its snapshot's name in containerd).
    pub top_chain_id: String,
}

impl RegistryImage {
    /// Resolves `reference`.
    pub fn resolve(reference: &str) -> Result<RegistryImage> {
        let rt = tokio::runtime::Runtime::new()?;
        let mut cfg = strata_registry::ClientConfig::default();
        cfg.plain_http = true;
        let client = strata_registry::Client::new(cfg)?;
        let r = strata_registry::Reference::parse(reference)?;
        let m = rt.block_on(client.resolve(&r, &strata_registry::Platform::host()))?;
        let diff_ids = m.config.value.rootfs().diff_ids().clone();
        Ok(RegistryImage {
            layers: m
                .manifest
                .value
                .layers()
                .iter()
                .map(|l| (l.digest().to_string(), l.size()))
                .collect(),
            top_chain_id: crate::pull::chain_ids(&diff_ids)
                .last()
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// The layers' total size.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|(_, s)| s).sum()
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` that counts the bytes
/// sent back to clients (what a pull fetched). Stops when dropped.
pub struct CountingProxy {
    /// `127.0.0.1:PORT` to use instead of the upstream.
    pub addr: String,
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CountingProxy {
    /// Starts forwarding to `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> Result<CountingProxy> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, st, up) = (down.clone(), stop.clone(), upstream.to_string());
        std::thread::Builder::new()
            .name("counting-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(&up) else {
                        continue;
                    };
                    // No Nagle: small responses would wait for delayed ACKs
                    // (40 ms each) and the proxy would measure itself.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                        continue;
                    };
                    let (mut client, mut server) = (client, server);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let d = d.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            match server.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    d.fetch_add(n as u64, Ordering::Relaxed);
                                    if client.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = client.shutdown(std::net::Shutdown::Write);
                    });
                }
            })?;
        Ok(CountingProxy { addr, down, stop })
    }

    /// Bytes sent to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// CPU seconds (user + system) and peak resident memory (bytes) of a
/// process, from /proc.
pub fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((cpu, hwm_kib * 1024))
}

/// The folder of the conformance kit's reference binaries (`refproxy`,
/// `stargzd`, `ctr-remote`), built on first use by `run --build-only`.
/// `CONFORMANCE_RUN` names the kit's `run`; default `../shared/conformance/run`
/// from the working directory.
pub fn conformance_bins() -> Result<PathBuf> {
    let run_script = std::env::var_os("CONFORMANCE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/conformance/run"));
    let out = run(Command::new(&run_script).arg("--build-only"))
        .with_context(|| format!("building the references with {}", run_script.display()))?;
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .context("run --build-only printed no folder")?;
    Ok(dir)
}

/// The median latency of a 4 KiB write + fdatasync in `dir`: the floor for
/// any durable metadata write on this disk.
pub fn fdatasync_p50(dir: &Path) -> Result<Duration> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut lat = Vec::with_capacity(200);
    for i in 0..200u64 {
        let start = Instant::now();
        f.write_all_at(&block, (i % 16) * 4096)?;
        f.sync_data()?;
        lat.push(start.elapsed());
    }
    std::fs::remove_file(&path)?;
    lat.sort_unstable();
    Ok(lat[lat.len() / 2])
}

/// Which storage a containerd uses: its built-ins, or a proxy daemon's
/// (strata's, refproxy's, ...) snapshotters and content store.
#[derive(Debug, Clone, Default)]
pub struct ContainerdSetup {
    /// The proxy daemon's socket (None: built-ins only).
    pub proxy_socket: Option<PathBuf>,
    /// Snapshotter names containerd registers on that socket.
    pub proxy_snapshotters: Vec<String>,
    /// Use the proxy's content store, with the built-in one disabled.
    pub proxy_content: bool,
}

impl ContainerdSetup {
    /// containerd's built-in overlayfs and content store.
    pub fn builtin() -> Self {
        ContainerdSetup::default()
    }

    /// strata on `socket` as snapshotters `strata` and `strata-lazy` and as
    /// content store.
    pub fn strata(socket: &Path) -> Self {
        let mut s = Self::proxy(socket, "strata");
        s.proxy_snapshotters.push("strata-lazy".into());
        s
    }

    /// A proxy daemon on `socket` as snapshotter `name` and content store.
    pub fn proxy(socket: &Path, name: &str) -> Self {
        ContainerdSetup {
            proxy_socket: Some(socket.to_path_buf()),
            proxy_snapshotters: vec![name.to_string()],
            proxy_content: true,
        }
    }
}

/// Debian's containerd in a temporary directory, with its own socket.
pub struct Containerd {
    proc: Proc,
    ctr: PathBuf,
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The directory holding its root and state.
    pub dir: PathBuf,
}

impl Containerd {
    /// Starts containerd under `dir` as `setup` says.
    pub fn start(dir: &Path, setup: &ContainerdSetup) -> Result<Containerd> {
        let bin = which("containerd", "containerd")?;
        let ctr = which("ctr", "containerd")?;
        which("runc", "runc")?;
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{sock}.debug\"\n  level = \"warn\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.gc.v1.scheduler\"]\n  startup_delay = \"0s\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        if let Some(s) = &setup.proxy_socket {
            if setup.proxy_content {
                config = config.replace(
                    "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]",
                    "disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.content.v1.content\"]",
                );
                config.push_str(&format!(
                    "[proxy_plugins.\"proxy-content\"]\n  type = \"content\"\n  address = \"{}\"\n",
                    s.display()
                ));
            }
            for name in &setup.proxy_snapshotters {
                config.push_str(&format!(
                    "[proxy_plugins.\"{name}\"]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                    s.display()
                ));
            }
        }
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let mut proc = Proc::spawn("containerd", cmd, dir.join("containerd.log"))?;
        let s = socket.clone();
        wait_for(&mut proc, "containerd", Duration::from_secs(60), || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        })?;
        let mut c = Containerd {
            proc,
            ctr,
            socket,
            dir: dir.to_path_buf(),
        };
        // The socket is up before the plugins are: wait until ctr answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.ctr(&["version"]).is_err() {
            c.proc.check_alive()?;
            if Instant::now() > deadline {
                bail!("containerd does not answer:\n{}", c.proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    /// Runs `ctr -a SOCKET -n strata ARGS`; fails with its output on error.
    pub fn ctr(&mut self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.ctr_bytes(args)?).into_owned())
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER ls`, one line a snapshot
    /// (the header dropped).
    pub fn snapshot_lines(&mut self, snapshotter: &str) -> Result<Vec<String>> {
        let out = self.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
        Ok(out.lines().skip(1).map(str::to_string).collect())
    }

    /// `bin pull` (strata's client) of `reference` into this containerd's
    /// `strata` namespace on `snapshotter`.
    pub fn strata_pull(
        &self,
        bin: &Path,
        snapshotter: &str,
        reference: &str,
    ) -> Result<std::process::Output> {
        run(Command::new(bin).args([
            "pull",
            "-a",
            &self.socket.display().to_string(),
            "-n",
            "strata",
            "--snapshotter",
            snapshotter,
            reference,
        ]))
    }

    /// `ctr image pull --plain-http --snapshotter SNAPSHOTTER REFERENCE`.
    pub fn pull(&mut self, snapshotter: &str, reference: &str) -> Result<String> {
        self.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            reference,
        ])
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER REFERENCE ID [ARGS...]`: runs a
    /// container with runc and returns what it printed.
    pub fn run(
        &mut self,
        snapshotter: &str,
        reference: &str,
        id: &str,
        args: &[&str],
    ) -> Result<String> {
        let mut a = vec!["run", "--rm", "--snapshotter", snapshotter, reference, id];
        a.extend_from_slice(args);
        self.ctr(&a)
    }

    /// Mounts a read-only view of committed `snapshot` at `target` (a
    /// new directory) through `ctr snapshots view --mounts`; undo with
    /// [`Containerd::unmount_view`].
    pub fn mount_view(
        &mut self,
        snapshotter: &str,
        snapshot: &str,
        key: &str,
        target: &Path,
    ) -> Result<()> {
        let out = self.ctr(&[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "view",
            "--mounts",
            key,
            snapshot,
        ])?;
        let mounts: Vec<serde_json::Value> = serde_json::from_str(&out)
            .with_context(|| format!("ctr snapshots view --mounts printed {out:?}"))?;
        let m = mounts.first().context("no mounts for the view")?;
        // ctr prints containerd's mount.Mount, whose fields carry no JSON tags.
        let field = |k: &str| {
            let upper = format!("{}{}", k[..1].to_uppercase(), &k[1..]);
            m.get(k)
                .or_else(|| m.get(upper.as_str()))
                .cloned()
                .unwrap_or_default()
        };
        let kind = field("type").as_str().unwrap_or_default().to_string();
        let source = field("source").as_str().unwrap_or_default().to_string();
        let options: Vec<String> = field("options")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        std::fs::create_dir_all(target)?;
        let status = Command::new("mount")
            .arg("-t")
            .arg(&kind)
            .arg("-o")
            .arg(options.join(","))
            .arg(&source)
            .arg(target)
            .status()?;
        ensure!(status.success(), "mount {kind} {source} {options:?} failed");
        Ok(())
    }

    /// Unmounts a view made by [`Containerd::mount_view`] and removes it.
    pub fn unmount_view(&mut self, snapshotter: &str, key: &str, target: &Path) -> Result<()> {
        let _ = Command::new("umount").arg(target).status();
        // (ctr 1.6 makes the view under a short-lived lease: it may be gone.)
        let _ = self.ctr(&["snapshots", "--snapshotter", snapshotter, "rm", key]);
        Ok(())
    }

    /// [`Containerd::ctr`], with stdout as bytes.
    pub fn ctr_bytes(&mut self, args: &[&str]) -> Result<Vec<u8>> {
        self.proc.check_alive()?;
        let out = run(Command::new(&self.ctr)
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "strata"])
            .args(args))
        .map_err(|e| anyhow::anyhow!("{e}\ncontainerd log:\n{}", self.proc.log_tail()))?;
        Ok(out.stdout)
    }

    /// Runs another containerd client (`ctr-remote`, ...) as
    /// `BIN -a SOCKET -n strata ARGS`.
    pub fn client(&mut self, bin: &Path, args: &[&str]) -> Result<String> {
        self.proc.check_alive()?;
        let out = run(Command::new(bin)
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "strata"])
            .args(args))
        .map_err(|e| anyhow::anyhow!("{e}\ncontainerd log:\n{}", self.proc.log_tail()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// containerd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Stops containerd and the shims it started, and unmounts what is left.
    pub fn stop(mut self) -> Result<()> {
        self.proc.stop()?;
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.proc.stop();
        // A shim outlives containerd if a task was left running: stop those
        // that belong to this containerd (their socket path says so).
        let needle = self.dir.to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // Unmount anything left under its directory (deepest first).
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|t| t.starts_with(&needle))
                .collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for t in targets {
                let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
