//! Child processes of the commands that orchestrate others (`atmorep demo`, `atmorep ablate
//! --quick`): a loader service on loopback that dies with its parent, and `atmorep` subcommands
//! run to completion on the parent's terminal.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A child process killed when dropped (no loader is ever left behind).
#[derive(Debug)]
pub struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `atmorep loader serve --dataset NAME=STORE --bind 127.0.0.1:0 --until-stdin-closes` as a
/// child; its log goes to `log`; returns it with its endpoint once it listens.
pub fn start_loader(datasets: &[(&str, &Path)], log: &Path) -> Result<(Guard, String)> {
    let exe = std::env::current_exe().context("locating the atmorep binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "loader",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--until-stdin-closes",
    ]);
    for (name, store) in datasets {
        cmd.arg("--dataset")
            .arg(format!("{name}={}", store.display()));
    }
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Guard(
        cmd.stdout(Stdio::piped())
            .stderr(log_file)
            // The pipe's write end stays with this process (in the guard's `Child`): when
            // this process ends, however it ends, the loader sees its stdin close and stops.
            .stdin(Stdio::piped())
            .spawn()
            .context("starting the loader process")?,
    );
    let stdout = child.0.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.trim().strip_prefix("listening on ") {
                    let endpoint = format!("http://{addr}");
                    // Keep draining stdout so the server never blocks on a full pipe.
                    std::thread::spawn(move || lines.for_each(drop));
                    return Ok((child, endpoint));
                }
            }
            _ => bail!(
                "the loader process exited before listening; its log: {}",
                log.display()
            ),
        }
    }
}

/// Runs `atmorep ARGS` as a child process, inheriting the terminal (progress bars, tables).
pub async fn run_child(what: &str, args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("locating the atmorep binary")?;
    let args = args.to_vec();
    let status = tokio::task::spawn_blocking(move || Command::new(exe).args(args).status())
        .await?
        .with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn path_arg(p: &Path) -> String {
    p.display().to_string()
}
