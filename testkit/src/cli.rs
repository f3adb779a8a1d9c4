//! The `atmorep` CLI run as a child process, for tests that check what a command writes.

use std::process::{Command, Output};

use crate::atmorep_bin;

/// Runs `atmorep ARGS…` (logging at `warn`) to the end and returns what it wrote.
pub fn atmorep(args: &[&str]) -> Output {
    Command::new(atmorep_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running atmorep")
}

/// The standard output of a command that must have succeeded; otherwise a panic showing both of
/// its outputs.
pub fn stdout_of_success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
