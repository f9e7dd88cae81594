//! `deploy/` runs as written: the image's command starts a serving gateway as its user with its
//! config read-only, the Dockerfile lints clean and builds, the unit verifies, the manifests
//! validate against Kubernetes' schemas and their configs load; and what a deployment sets
//! from outside the config file (`TOLLGATE_DATA_DIR`, `TOLLGATE_LISTEN`) takes effect.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_sets_the_data_dir_and_the_address() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let state = common::temp_dir("deploy").join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(root.join("routes.toml"))
        .env("TOLLGATE_DATA_DIR", &state)
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    assert_serving(&url).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        state.join("keys.sqlite").exists(),
        "the keys live in TOLLGATE_DATA_DIR"
    );
    assert!(state.join("ledger.sqlite").exists());
}

/// A started gateway answers both probes and takes an admin write, which opens its stores.
async fn assert_serving(url: &str) {
    let http = reqwest::Client::new();
    // Ready comes a moment after the listener opens (probes are polled, as here).
    for path in ["/healthz", "/readyz"] {
        let mut status = reqwest::StatusCode::SERVICE_UNAVAILABLE;
        for _ in 0..40 {
            status = http
                .get(format!("{url}{path}"))
                .send()
                .await
                .unwrap()
                .status();
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200, "{path}");
    }
    let created = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(common::ADMIN_TOKEN)
        .json(&serde_json::json!({"name": "deployed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
}

/// The final stage of `deploy/Dockerfile`, as far as running the image depends on it.
#[derive(Default)]
struct Image {
    /// (source in the repository, or `None` for the binary from the build stage; destination).
    copies: Vec<(Option<String>, String)>,
    /// Directories made by `install -d`: (path, uid, gid, mode).
    directories: Vec<(String, u32, u32, u32)>,
    workdir: String,
    user: (u32, u32),
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// The build stage's Rust toolchain, from `FROM rust:X.Y…`.
    toolchain: Option<(u32, u32)>,
}

fn dockerfile() -> String {
    std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Reads the instructions a container's start depends on. Anything this reader does not
/// understand in the final stage fails the test rather than being skipped silently.
fn image() -> Image {
    let text = dockerfile().replace("\\\n", " ");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let mut image = Image {
        workdir: "/".into(),
        ..Image::default()
    };
    let stages = lines.iter().filter_map(|line| line.strip_prefix("FROM "));
    image.toolchain = stages
        .filter_map(|stage| stage.strip_prefix("rust:"))
        .find_map(|tag| version(tag.split('-').next().unwrap()));
    let last_stage = lines
        .iter()
        .rposition(|line| line.starts_with("FROM "))
        .unwrap();
    for line in &lines[last_stage + 1..] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match instruction {
            "RUN" => {
                for command in rest.split("&&").map(str::trim) {
                    if let Some(args) = command.strip_prefix("install -d ") {
                        image.directories.push(install_d(args));
                    }
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let (from, paths): (Vec<&str>, Vec<&str>) =
                    words.iter().partition(|w| w.starts_with("--"));
                let [source, destination] = paths[..] else {
                    panic!("COPY with one source expected: {line}");
                };
                let from_build = from.iter().any(|f| f.starts_with("--from="));
                image.copies.push((
                    (!from_build).then(|| source.to_owned()),
                    destination.to_owned(),
                ));
            }
            "WORKDIR" => image.workdir = rest.to_owned(),
            "USER" => {
                let (uid, gid) = rest.split_once(':').unwrap_or((rest, rest));
                image.user = (
                    uid.parse().expect("USER must be numeric (uid:gid)"),
                    gid.parse().expect("USER must be numeric (uid:gid)"),
                );
            }
            "ENTRYPOINT" => image.entrypoint = serde_json::from_str(rest).unwrap(),
            "CMD" => image.cmd = serde_json::from_str(rest).unwrap(),
            "ENV" => panic!("ENV is not read by this check yet: {line}"),
            "ARG" | "EXPOSE" | "VOLUME" | "LABEL" | "HEALTHCHECK" | "STOPSIGNAL" => {}
            other => panic!("unexpected instruction {other} in deploy/Dockerfile"),
        }
    }
    image
}

fn install_d(args: &str) -> (String, u32, u32, u32) {
    let mut words = args.split_whitespace();
    let (mut uid, mut gid, mut mode, mut path) = (0, 0, 0o755, String::new());
    while let Some(word) = words.next() {
        match word {
            "-o" => uid = words.next().unwrap().parse().expect("install -o: numeric"),
            "-g" => gid = words.next().unwrap().parse().expect("install -g: numeric"),
            "-m" => mode = u32::from_str_radix(words.next().unwrap(), 8).unwrap(),
            dir => path = dir.to_owned(),
        }
    }
    (path, uid, gid, mode)
}

/// Lays out the image's final stage in a directory: the binary and the shared libraries it
/// links (the base image's part), the baked config, the directories the Dockerfile makes.
/// Everything is root's; the config dir is read-only, as under a read-only mount.
fn image_root(image: &Image) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = common::temp_dir("image-root");
    let place = |path: &str| root.join(path.trim_start_matches('/'));
    let binary = Path::new(env!("CARGO_BIN_EXE_tollgate"));
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for library in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
    {
        let target = place(library);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(library, target).unwrap();
    }
    for (source, destination) in &image.copies {
        let target = place(destination);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        match source {
            Some(source) => std::fs::copy(repo().join(source), &target).unwrap(),
            None => std::fs::copy(binary, &target).unwrap(),
        };
    }
    let tmp = place("/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (path, uid, gid, mode) in &image.directories {
        let dir = place(path);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(*uid), Some(*gid)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    std::fs::create_dir_all(place(&image.workdir)).unwrap();
    let config_dir = place("/etc/tollgate");
    for entry in std::fs::read_dir(&config_dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    std::fs::set_permissions(&config_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    root
}

/// Starts the image's entrypoint with `args` as the container would: the image's root, its
/// working directory and its user. Needs root to change root; `None` when not root.
fn run_in_image(
    image: &Image,
    root: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> Option<std::process::Child> {
    let id = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&id.stdout).trim() != "0" {
        eprintln!("not root: the image check needs root to change root (CI runs as root)");
        return None;
    }
    let mut command = Command::new("unshare");
    command
        .arg(format!("--root={}", root.display()))
        .arg(format!("--wd={}", image.workdir))
        .args(["--setgid", &image.user.1.to_string()])
        .args(["--setuid", &image.user.0.to_string()])
        .args(&image.entrypoint)
        .args(args)
        .env_clear()
        .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("TOLLGATE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    Some(command.spawn().unwrap())
}

/// The first line the process prints that holds a URL, and everything it printed on stderr
/// meanwhile (read on a thread so a full pipe never blocks it).
fn first_url(child: &mut std::process::Child) -> (String, std::sync::mpsc::Receiver<String>) {
    let stderr = child.stderr.take().unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let log: Vec<String> = log.try_iter().collect();
            panic!("exited before printing its address:\n{}", log.join("\n"));
        }
        if let Some(start) = line.find("http://") {
            let url = line[start..].split_whitespace().next().unwrap();
            let url = url.trim_end_matches("/v1").to_owned();
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            return (url, log);
        }
    }
}

/// The image's exact `CMD`, as uid 10001 with `/etc/tollgate` read-only: it starts with the
/// baked config, writes its state under the image's data dir, serves `/healthz` and
/// `/readyz`, and says in its log which provider it points at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_as_its_user_with_a_read_only_config() {
    let image = image();
    assert_eq!(image.user, (10001, 10001), "the image runs as uid 10001");
    let root = image_root(&image);
    let Some(mut child) = run_in_image(
        &image,
        &root,
        &image.cmd,
        &[("TOLLGATE_LISTEN", "127.0.0.1:0")],
    ) else {
        return;
    };
    let (url, log) = first_url(&mut child);
    assert_serving(&url).await;
    let _ = child.kill();
    let _ = child.wait();
    let log: Vec<String> = log.try_iter().collect();
    assert!(
        log.iter()
            .any(|line| line.contains("https://api.openai.com/v1")),
        "the log names the provider it points at:\n{}",
        log.join("\n")
    );
    let state = std::fs::read_dir(root.join("var/lib/tollgate"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(
        state.contains(&"keys.sqlite".to_owned()) && state.contains(&"ledger.sqlite".to_owned()),
        "state in /var/lib/tollgate: {state:?}"
    );
}

/// `docker run -p 8080:8080 tollgate demo`: the demo inside the image, from its working
/// directory, listening on every interface with a note saying how to reach it from the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_demo() {
    let image = image();
    let root = image_root(&image);
    let Some(mut child) = run_in_image(
        &image,
        &root,
        &["demo".to_owned()],
        &[("TOLLGATE_LISTEN", "0.0.0.0:0")],
    ) else {
        return;
    };
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("curl -s http://") {
        assert_ne!(stdout.read_line(&mut printed).unwrap(), 0, "{printed}");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        printed.contains("all interfaces") && printed.contains("-p "),
        "a note on reaching the container: {printed}"
    );
    assert!(!printed.contains("http://0.0.0.0"), "{printed}");
}

/// hadolint, from its PyPI wheel, finds nothing in the Dockerfile; and its build stage's Rust
/// is at least what every locked dependency requires, or `cargo build --locked` fails there.
#[test]
fn the_dockerfile_lints_clean_and_builds_with_a_new_enough_rust() {
    common::python();
    let hadolint = repo().join(".venv/bin/hadolint");
    let lint = Command::new(&hadolint)
        .arg(repo().join("deploy/Dockerfile"))
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "hadolint deploy/Dockerfile:\n{}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let toolchain = image().toolchain.expect("the build stage is FROM rust:X.Y");
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(metadata.status.success());
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    for package in metadata["packages"].as_array().unwrap() {
        let Some(needed) = package["rust_version"].as_str().and_then(version) else {
            continue;
        };
        assert!(
            needed <= toolchain,
            "{} {} needs Rust {needed:?}; the Dockerfile builds with {toolchain:?}",
            package["name"],
            package["version"]
        );
    }
}

/// `systemd-analyze verify` accepts the unit with the binary where the unit runs it from (the
/// built binary stands in at that path), and warns about nothing.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/tollgate.service")).unwrap();
    let installed = "/usr/local/bin/tollgate";
    assert!(unit.contains(&format!("ExecStart={installed} ")), "{unit}");
    let dir = common::temp_dir("unit");
    let path = dir.join("tollgate.service");
    std::fs::write(
        &path,
        unit.replace(installed, env!("CARGO_BIN_EXE_tollgate")),
    )
    .unwrap();
    let Ok(verify) = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
    else {
        eprintln!("systemd-analyze is not installed (.ci/run installs it); unit not checked");
        return;
    };
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
}

/// Every YAML file in `deploy/` parses; the Kubernetes manifests validate strictly against
/// the schemas of a pinned Kubernetes version; every routes.toml a ConfigMap or the compose
/// stack carries passes `tollgate check` (tests/python/deploy_manifests.py).
#[test]
fn the_manifests_validate_against_kubernetes_and_their_configs_load() {
    let report = common::run_python(
        "deploy_manifests.py",
        &[
            repo().to_str().unwrap(),
            env!("CARGO_BIN_EXE_tollgate"),
            KUBERNETES,
        ],
        &[],
    );
    for object in [
        "Deployment/tollgate: valid",
        "ServiceMonitor/tollgate: selects Service tollgate",
        "Job/tollgate-migrate-to-postgres: valid",
        "ConfigMap/tollgate-config: routes.toml",
        "docker-compose.yml: service tollgate-1: routes.toml",
    ] {
        assert!(report.contains(object), "{object} not checked:\n{report}");
    }
}

/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.31.0";
