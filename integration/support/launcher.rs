//! The ringvip process under test: its launcher and controls.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, wait_until};

/// The ringvip process under test.
pub struct Ringvip {
    child: Child,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    /// Its handover socket.
    pub handover: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringvip")
}

impl Ringvip {
    /// Starts `ringvip run` on a directory holding `manifest.yaml`, NodePorts on
    /// 127.0.0.1, any nodePort allowed, fast connect retries.
    pub fn start(manifest: &str, extra: &[&str]) -> Ringvip {
        Self::launch(None, manifest, extra)
    }

    /// Like `start`, but inside network namespace `netns` (when given) with
    /// its TUN device capturing the service CIDRs.
    pub fn launch(netns: Option<&str>, manifest: &str, extra: &[&str]) -> Ringvip {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.yaml"), manifest).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(["run", "--manifests"]).arg(dir.path());
        // Many tests run at once: only those in their own namespace get a TUN.
        if netns.is_none() {
            cmd.arg("--no-tun");
        }
        Ringvip::spawn(cmd, dir, extra, "snapshot published")
    }

    /// Starts `cmd` (ringvip with its source arguments) with the settings
    /// every test shares (NodePorts on 127.0.0.1, node `node-a`, 2 workers,
    /// 100 ms connect timeout, admin ports of its own), logging into `dir`;
    /// returns once the log shows `ready`.
    pub fn spawn(cmd: Command, dir: tempfile::TempDir, extra: &[&str], ready: &str) -> Ringvip {
        let health = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        // free_port releases its port: two calls may return the same one.
        let metrics = loop {
            let m = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            if m != health {
                break m;
            }
        };
        Self::spawn_with_admin(cmd, dir, extra, ready, (health, metrics))
    }

    /// The upgrade's new process: a second ringvip on a copy of this one's
    /// manifest, with its admin addresses and handover socket (and `extra`);
    /// returns once its log shows `ready` (e.g. "handover complete").
    pub fn successor(&self, extra: &[&str], ready: &str) -> Ringvip {
        self.successor_in(None, extra, ready)
    }

    /// [`Ringvip::successor`] inside network namespace `netns` (when
    /// given) with its TUN device, as [`Ringvip::launch`] starts one.
    pub fn successor_in(&self, netns: Option<&str>, extra: &[&str], ready: &str) -> Ringvip {
        let (cmd, dir) = self.successor_command_in(netns);
        let mut args = vec!["--handover", self.handover.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::spawn_with_admin(cmd, dir, &args, ready, (self.health, self.metrics))
    }

    /// `ringvip run` on a copy of this one's manifest in a directory of its
    /// own (the command, without the settings every test shares).
    pub fn successor_command(&self) -> (Command, tempfile::TempDir) {
        self.successor_command_in(None)
    }

    /// [`Ringvip::successor_command`] inside network namespace `netns`
    /// (when given), with its TUN device.
    pub fn successor_command_in(&self, netns: Option<&str>) -> (Command, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            self.dir.path().join("manifest.yaml"),
            dir.path().join("manifest.yaml"),
        )
        .unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin()).arg("run");
                c
            }
            None => {
                let mut c = Command::new(bin());
                c.args(["run", "--no-tun"]);
                c
            }
        };
        cmd.arg("--manifests").arg(dir.path());
        (cmd, dir)
    }

    /// [`Ringvip::spawn`] on the given admin (health, metrics) addresses.
    pub fn spawn_with_admin(
        mut cmd: Command,
        dir: tempfile::TempDir,
        extra: &[&str],
        ready: &str,
        (health, metrics): (SocketAddr, SocketAddr),
    ) -> Ringvip {
        let log = dir.path().join("ringvip.log");
        let handover = handover_path(&dir, extra);
        let child = cmd
            .args(shared_args(health, metrics))
            .args(extra)
            .args(handover_arg(&dir, extra))
            .env("RINGVIP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ringvip");
        let r = Ringvip {
            child,
            dir,
            log,
            health,
            metrics,
            handover,
        };
        assert!(
            wait_until(Duration::from_secs(20), || r.log().contains(ready)),
            "ringvip never logged {ready:?}:\n{}",
            r.log()
        );
        r
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the manifest (atomically, by rename, as editors and kubectl do).
    pub fn write_manifest(&self, text: &str) {
        let tmp = self.dir.path().join(".manifest.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("manifest.yaml")).unwrap();
    }

    /// Replaces the manifest and returns once ringvip has compiled and published
    /// the change (a precondition of every "first connection after a change"
    /// check, not a wait for the good answer).
    pub fn apply(&self, text: &str) {
        let before = self.generations();
        self.write_manifest(text);
        assert!(
            wait_until(Duration::from_secs(10), || self.generations() > before),
            "the change was never published:\n{}",
            self.log()
        );
    }

    /// Sends SIGTERM (graceful stop: drain).
    pub fn sigterm(&self) {
        // SAFETY: kill only signals our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Process id of ringvip (`ip netns exec` execs it, so the same process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`: re-read the manifests).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only signals our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `limit` for the process to exit; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let child = &mut self.child;
        wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Number of "snapshot published" lines so far.
    pub fn generations(&self) -> usize {
        self.log().matches("snapshot published").count()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Ringvip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The settings every test shares: NodePorts on 127.0.0.1, node `node-a`,
/// 2 workers, 100 ms connect timeout, the given admin addresses.
pub fn shared_args(health: SocketAddr, metrics: SocketAddr) -> Vec<String> {
    let mut a: Vec<String> = [
        "--nodeport-addresses",
        "127.0.0.1/32",
        "--node-port-range",
        "1-65535",
        "--workers",
        "2",
        "--node-name",
        "node-a",
        "--connect-timeout-ms",
        "100",
    ]
    .map(String::from)
    .to_vec();
    a.extend([
        "--health-addr".into(),
        health.to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
    ]);
    a
}

/// The handover socket a process started with `extra` in `dir` uses.
fn handover_path(dir: &tempfile::TempDir, extra: &[&str]) -> PathBuf {
    match extra.iter().position(|a| *a == "--handover") {
        Some(i) => PathBuf::from(extra.get(i + 1).copied().unwrap_or_default()),
        None => dir.path().join("handover.sock"),
    }
}

/// A handover socket of the test's own in `dir`, so that concurrent tests
/// never take over from each other (the default path is the host's), unless
/// `extra` says otherwise.
fn handover_arg(dir: &tempfile::TempDir, extra: &[&str]) -> Vec<String> {
    if extra
        .iter()
        .any(|a| a.starts_with("--handover") || *a == "--no-handover")
    {
        return Vec::new();
    }
    vec![
        "--handover".into(),
        dir.path().join("handover.sock").display().to_string(),
    ]
}

/// Runs `ringvip ARGS`, a one-shot command (`check`, `env`, `status`,
/// `demo`), to its end.
pub fn command(args: &[&str]) -> Output {
    command_in(&[], args)
}

/// [`command`] run through `prefix` (e.g. `ip netns exec NAME`); an empty
/// prefix runs the binary directly.
pub fn command_in(prefix: &[&str], args: &[&str]) -> Output {
    let mut c = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    c.args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prefix:?} ringvip {args:?}: {e}"))
}

/// [`command`], which must succeed; what it printed on stdout.
pub fn command_ok(args: &[&str]) -> String {
    command_ok_in(&[], args)
}

/// [`command_in`], which must succeed; what it printed on stdout.
pub fn command_ok_in(prefix: &[&str], args: &[&str]) -> String {
    let out = command_in(prefix, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{prefix:?} ringvip {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
