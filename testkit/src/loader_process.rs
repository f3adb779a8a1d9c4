//! A real `atmorep loader serve` process for cross-process tests: started on 127.0.0.1:0, its
//! address read from its `listening on ADDR` line, killed when dropped (its log tail printed if
//! the test is failing).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::atmorep_bin;

/// How long a server may take to report its address.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is still guarded")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Waits for the process and returns what it wrote (stdout and stderr must be piped).
    pub fn wait_output(mut self) -> Output {
        let child = self.0.take().expect("the child is still guarded");
        child
            .wait_with_output()
            .expect("waiting for a child process")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `atmorep loader serve` with its address and log file.
#[derive(Debug)]
pub struct Server {
    child: ChildGuard,
    pid: u32,
    /// The address the server reported.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts `atmorep loader serve ARGS --bind 127.0.0.1:0` with its log in `log`.
    pub fn start(args: &[String], log: &Path) -> Self {
        Self::start_on("127.0.0.1:0", args, log)
    }

    /// Starts the server on `bind` and waits for its `listening on ADDR` line.
    pub fn start_on(bind: &str, args: &[String], log: &Path) -> Self {
        Self::start_with_env(bind, args, &[], log)
    }

    /// [`Server::start_on`] with extra environment variables (test hooks, store settings).
    pub fn start_with_env(bind: &str, args: &[String], env: &[(&str, &str)], log: &Path) -> Self {
        let stderr = std::fs::File::create(log).expect("creating the server log");
        let child = Command::new(atmorep_bin())
            .args(["loader", "serve"])
            .args(args)
            .args(["--bind", bind])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting atmorep loader serve");
        let mut child = ChildGuard(Some(child));
        let stdout = child.child().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // A thread reads the address line and then drains stdout until the server exits, so the
        // server can never block on a full pipe.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                if let Some(addr) = line.trim().strip_prefix("listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().ok());
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                    return;
                }
                line.clear();
            }
            let _ = tx.send(None);
        });
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Some(addr)) => Self {
                pid: child.child().id(),
                child,
                addr,
                log: log.to_path_buf(),
            },
            outcome => {
                drop(child);
                panic!(
                    "the server did not report its address ({outcome:?}); its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// `kill -9`: no graceful shutdown, open streams are cut mid-message.
    pub fn kill9(&mut self) {
        let child = self.child.child();
        child.kill().expect("SIGKILL the server");
        let _ = child.wait();
    }

    /// A line of `/proc/PID/status` in KiB (`VmHWM`: peak resident set; `VmRSS`: now).
    pub fn proc_status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/PID/status (Linux)");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{}/status", self.pid()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}
