//! Real backing services for the tests: a throwaway PostgreSQL and Redis on free loopback
//! ports, each in a temp dir of its own. Every start, stop and command is bounded in time,
//! and each service is cleaned up on drop, or, for the shared instances that statics never
//! drop, by a watchdog process that stops it once the test process has gone.
//!
//! PostgreSQL refuses to run as root, and tests often run as root: it then runs as the
//! `postgres` OS user, its temp dir owned by that user.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a service may take to start or stop, or a command to run.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled while waiting for it.
const POLL: Duration = Duration::from_millis(20);

static NEXT: AtomicU64 = AtomicU64::new(0);

fn temp_dir(kind: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tollgate-{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// Runs `command` to its end within [`TIMEOUT`], panicking with its output if it fails.
fn run(command: &mut Command) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} took longer than {TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "{command:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    stdout
}

/// Starts a process that waits for this test process to end, then runs `cleanup` (a shell
/// command): the shared services live in statics, which are never dropped.
fn watchdog(cleanup: &str) -> Child {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; {cleanup}",
        std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A throwaway PostgreSQL server whose superuser `tollgate` logs in without a password.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    watchdog: Child,
}

impl Postgres {
    /// Starts a PostgreSQL with a `tollgate` role and database; see [`Postgres::url`].
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = temp_dir("pg");
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let port = free_port();
        let data = dir.join("data");
        let socket = dir.join("socket");
        std::fs::create_dir_all(&socket).unwrap();
        if as_postgres {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&socket));
        }
        let stop = format!(
            "{} -D {} stop -m immediate -t 60 >/dev/null 2>&1; rm -rf {}",
            owner_prefix(as_postgres, &bin.join("pg_ctl")),
            quoted(&data),
            quoted(&dir)
        );
        let watchdog = watchdog(&stop);
        let postgres = Postgres {
            dir,
            bin,
            port,
            as_postgres,
            watchdog,
        };
        run(postgres
            .command("initdb")
            .args([
                "-U",
                "tollgate",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data));
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c full_page_writes=off",
            socket.display()
        );
        let start = postgres
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(postgres.dir.join("log"))
            .args(["-o", &options])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if !start.success() {
            let log = std::fs::read_to_string(postgres.dir.join("log")).unwrap_or_default();
            panic!("postgres did not start ({start}):\n{log}");
        }
        postgres.psql("postgres", "CREATE DATABASE tollgate");
        postgres
    }

    /// One server for the whole test binary; give each test its own [`fresh_database`].
    ///
    /// [`fresh_database`]: Postgres::fresh_database
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://tollgate@127.0.0.1:PORT/tollgate`.
    pub fn url(&self) -> String {
        self.database_url("tollgate")
    }

    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database named after `name` (and unique in this server) and
    /// returns its URL, so that tests sharing a server do not see each other's rows.
    pub fn fresh_database(&self, name: &str) -> String {
        let clean: String = name
            .chars()
            .map(|c| match c.is_ascii_alphanumeric() {
                true => c.to_ascii_lowercase(),
                false => '_',
            })
            .take(40)
            .collect();
        let database = format!("t_{clean}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {database}"));
        self.database_url(&database)
    }

    /// Runs `sql` in `database` through `psql`, returning its unaligned output. A separate
    /// process, so it works from async tests too (the blocking client would panic there).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        run(Command::new(self.bin.join("psql"))
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "tollgate",
                "-d",
                database,
                "-c",
                sql,
            ]))
    }

    /// A command of the server's binaries, as the `postgres` user when running as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.as_postgres {
            true => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(path);
                command
            }
            false => Command::new(path),
        }
    }
}

fn owner_prefix(as_postgres: bool, program: &Path) -> String {
    match as_postgres {
        true => format!("runuser -u postgres -- {}", quoted(program)),
        false => quoted(program),
    }
}

/// The directory of `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir` when it has
/// them, else Debian's newest `/usr/lib/postgresql/N/bin`.
fn postgres_bin() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(bin) = from_pg_config.filter(|bin| bin.join("initdb").exists()) {
        return bin;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server binaries (initdb) found; install Debian's postgresql")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway Redis whose data survives [`Redis::stop`] and [`Redis::restart`]: every write
/// is in its append-only file before it is acknowledged.
pub struct Redis {
    dir: PathBuf,
    port: u16,
    server: Option<Child>,
    watchdog: Child,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = temp_dir("redis");
        let port = free_port();
        let pid_file = dir.join("server.pid");
        let cleanup = format!(
            "kill -9 $(cat {}) 2>/dev/null; rm -rf {}",
            quoted(&pid_file),
            quoted(&dir)
        );
        let watchdog = watchdog(&cleanup);
        let mut redis = Redis {
            dir,
            port,
            server: None,
            watchdog,
        };
        redis.restart();
        redis
    }

    /// One server for the whole test binary.
    pub fn shared() -> &'static Redis {
        static SHARED: OnceLock<Redis> = OnceLock::new();
        SHARED.get_or_init(Redis::start)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, as a crash would); its port refuses connections until
    /// [`Redis::restart`].
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server again on the same port and dir (stopping it first if it runs), with
    /// the data it had, and returns once it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.join("log")).unwrap();
        let server = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot run redis-server; install Debian's redis-server");
        std::fs::write(self.dir.join("server.pid"), server.id().to_string()).unwrap();
        self.server = Some(server);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if ping(self.port) {
                return;
            }
            let exited = self
                .server
                .as_mut()
                .and_then(|server| server.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                panic!("redis did not start ({exited:?}):\n{log}");
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Whether a Redis answers PING on `port`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0_u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
