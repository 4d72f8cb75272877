//! Private PostgreSQL servers for tests: a fresh cluster (`initdb`) in a
//! temporary folder, listening on a free loopback port, with a `convoy`
//! database and trust authentication for the `postgres` superuser, and
//! `pg_stat_statements` preloaded when installed (a test that reads it runs
//! `CREATE EXTENSION pg_stat_statements` itself, as production shards must).
//!
//! Not for durable data: settings trade safety for speed (`fsync=off`...), and
//! the cluster is stopped and deleted when the [`Postgres`] is dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tempfile::TempDir;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ports::free_port;
use crate::process::{
    clear_env, find_in_path, is_executable, is_root, log_tail, make_tempdir, run, tcp_accepts,
    wait_ready,
};

/// Environment variable naming the folder that holds `initdb`, `pg_ctl` and `createdb`.
pub const PG_BIN_ENV: &str = "CONVOY_PG_BIN";

/// The database created in every test server.
pub const DATABASE: &str = "convoy";

/// libpq variables that would redirect or alter the helper commands.
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
    "PGTZ",
];

/// The attempts made to find a free port that nobody else grabs first.
const PORT_ATTEMPTS: usize = 3;

/// A private PostgreSQL server; stopped immediately and deleted on drop.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    bin_dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    run_as: RunAs,
    dir: TempDir,
}

impl Postgres {
    /// `initdb`s a fresh cluster in a temporary folder (trust auth, locale C,
    /// encoding UTF8, `pg_stat_statements` preloaded when installed), starts it on a free
    /// loopback port, waits until it accepts connections and creates the database `convoy`.
    pub async fn start() -> Result<Postgres> {
        Self::start_with(&[]).await
    }

    /// Same as [`Postgres::start`], with extra `postgresql.conf` lines
    /// (e.g. `"wal_level = replica"`), which win over the defaults.
    pub async fn start_with(conf: &[&str]) -> Result<Postgres> {
        let mut pg = Postgres::unstarted("convoy-pg-", pg_bin_dir()?, RunAs::detect()?).await?;
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&pg.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb.into(), "initdb").await?;

        let socket_dir = pg.dir.path().display().to_string();
        let mut settings = vec![
            String::new(),
            "# convoy-testkit".to_owned(),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!(
                "unix_socket_directories = '{}'",
                socket_dir.replace('\'', "''")
            ),
            "fsync = off".to_owned(),
            // Commits must reach the OS before they are acknowledged: tests kill servers
            // (`stop` is an immediate shutdown, a crash) and assert that no acknowledged write
            // is lost. fsync=off is still safe for that, since the OS outlives the process.
            "synchronous_commit = on".to_owned(),
            "full_page_writes = off".to_owned(),
            "max_connections = 200".to_owned(),
            "shared_buffers = 32MB".to_owned(),
        ];
        if pg.has_library("pg_stat_statements") {
            // Statement statistics for `convoyctl queries` (Debian's postgresql ships it).
            settings.push("shared_preload_libraries = 'pg_stat_statements'".to_owned());
        } else {
            debug!("pg_stat_statements is not installed; not preloaded");
        }
        settings.extend(conf.iter().map(|line| (*line).to_owned()));
        pg.append_conf(&settings)?;

        pg.start_on_a_free_port().await?;
        pg.create_database(DATABASE).await?;
        debug!(port = pg.port, dir = %pg.dir.path().display(), "postgres started");
        Ok(pg)
    }

    /// Starts a streaming replica of this server: a base backup (`pg_basebackup -R`, which
    /// also writes the standby settings) in a temporary folder of its own, started on a free
    /// loopback port, read-only, replaying this server's WAL as it comes.
    pub async fn start_replica(&self) -> Result<Postgres> {
        let mut replica = Postgres::unstarted(
            "convoy-pg-replica-",
            self.bin_dir.clone(),
            self.run_as.clone(),
        )
        .await?;
        let mut backup = replica.command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&replica.data)
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]);
        run(
            backup.into(),
            &format!("pg_basebackup of 127.0.0.1:{}", self.port),
        )
        .await?;
        // The backup carries the primary's settings: the socket folder and port are ours.
        let socket_dir = replica.dir.path().display().to_string();
        replica.append_conf(&[
            "# convoy-testkit replica".to_owned(),
            format!(
                "unix_socket_directories = '{}'",
                socket_dir.replace('\'', "''")
            ),
            "hot_standby = on".to_owned(),
        ])?;
        replica.start_on_a_free_port().await?;
        debug!(port = replica.port, primary = self.port, "replica started");
        Ok(replica)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/convoy`: superuser, no password.
    pub fn dsn(&self) -> String {
        self.dsn_for(DATABASE)
    }

    /// The DSN of another database on this server.
    pub fn dsn_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's data folder (owned by the `postgres` user when run as root).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The folder holding the PostgreSQL programs used (`pg_ctl`, `pg_basebackup`...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Whether the server process is up (its `postmaster.pid` exists).
    pub fn is_running(&self) -> bool {
        self.pid_file().exists()
    }

    /// Creates another database on this server.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let mut createdb = std::process::Command::new(self.bin_dir.join("createdb"));
        clear_env(&mut createdb, PG_ENV, None);
        createdb
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg(name)
            .current_dir(self.dir.path());
        run(
            createdb.into(),
            &format!("createdb {name} on port {}", self.port),
        )
        .await?;
        Ok(())
    }

    /// Stops the server immediately (`pg_ctl stop -m immediate`), keeping its
    /// data folder, to simulate a dead shard. Does nothing if it is not running.
    pub async fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        run(cmd.into(), &format!("pg_ctl stop (port {})", self.port)).await?;
        debug!(port = self.port, "postgres stopped");
        Ok(())
    }

    /// Starts it again on the same port and data folder (stopping it first if
    /// it is running) and waits until it is ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.pg_ctl_start().await?;
        debug!(port = self.port, "postgres restarted");
        Ok(())
    }

    /// A server not yet created: a temporary folder (owned by the postgres user when run
    /// as root) for its data and log.
    async fn unstarted(prefix: &str, bin_dir: PathBuf, run_as: RunAs) -> Result<Postgres> {
        let dir = make_tempdir(prefix)?;
        if is_root() {
            let mut chown = std::process::Command::new("chown");
            chown.arg("-R").arg("postgres:postgres").arg(dir.path());
            run(
                chown.into(),
                &format!("chown -R postgres:postgres {}", dir.path().display()),
            )
            .await?;
        }
        Ok(Postgres {
            port: 0,
            bin_dir,
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            run_as,
            dir,
        })
    }

    /// Starts the cluster on a free loopback port, trying another if someone else takes
    /// the one picked first.
    async fn start_on_a_free_port(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            self.port = free_port();
            self.append_conf(&[format!("port = {}", self.port)])?;
            match self.pg_ctl_start().await {
                Err(e) if attempt < PORT_ATTEMPTS && e.is_address_in_use() => {
                    warn!(
                        port = self.port,
                        "postgres port taken by someone else; trying another"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// `pg_ctl start`, then waits until the port accepts connections.
    async fn pg_ctl_start(&self) -> Result<()> {
        let what = format!("PostgreSQL on 127.0.0.1:{}", self.port);
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args([
                "-w",
                "-t",
                &crate::process::READY_TIMEOUT.as_secs().to_string(),
                "start",
            ]);
        match run(cmd.into(), "pg_ctl start").await {
            Ok(_) => {}
            Err(Error::CommandFailed { output, .. }) => {
                return Err(Error::StartFailed {
                    what,
                    log: format!(
                        "{}\n--- pg_ctl output ---\n{}",
                        log_tail(&self.log),
                        output.trim_end()
                    ),
                });
            }
            Err(Error::Timeout { .. }) => {
                return Err(Error::Timeout {
                    what,
                    log: log_tail(&self.log),
                });
            }
            Err(e) => return Err(e),
        }
        let port = self.port;
        wait_ready(&what, &self.log, None, || tcp_accepts(port)).await
    }

    /// Appends lines to `postgresql.conf` (later lines win).
    fn append_conf(&self, lines: &[String]) -> Result<()> {
        use std::io::Write;
        let path = self.data.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(Error::io(format!("open {}", path.display())))?;
        let mut text = lines.join("\n");
        text.push('\n');
        file.write_all(text.as_bytes())
            .map_err(Error::io(format!("write {}", path.display())))
    }

    /// Whether the server library `name` is installed: in `../lib` of the programs'
    /// folder, where Debian's packages put it.
    fn has_library(&self, name: &str) -> bool {
        self.bin_dir
            .parent()
            .is_some_and(|version| version.join("lib").join(format!("{name}.so")).is_file())
    }

    fn pid_file(&self) -> PathBuf {
        self.data.join("postmaster.pid")
    }

    /// A command running PostgreSQL program `program` as the user that may run it.
    fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = self.run_as.command(&self.bin_dir.join(program));
        clear_env(&mut cmd, PG_ENV, None);
        // The postgres user may not be able to enter our working directory.
        cmd.current_dir(self.dir.path());
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.is_running() {
            return;
        }
        let pid = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()));
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let stopped = cmd.status().map(|s| s.success()).unwrap_or(false);
        if stopped {
            return;
        }
        if let Some(pid) = pid {
            warn!(
                port = self.port,
                pid, "pg_ctl stop failed; killing the postmaster"
            );
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Starts `n` PostgreSQL servers concurrently, e.g. one per shard. If any
/// fails, the others are stopped and the first error is returned.
pub async fn start_postgres_shards(n: usize) -> Result<Vec<Postgres>> {
    let mut tasks = JoinSet::new();
    for index in 0..n {
        tasks.spawn(async move { (index, Postgres::start().await) });
    }
    let mut shards: Vec<Option<Postgres>> = (0..n).map(|_| None).collect();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, Ok(pg))) => shards[index] = Some(pg),
            Ok((_, Err(e))) => {
                first_error.get_or_insert(e);
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                first_error.get_or_insert(Error::StartFailed {
                    what: "a PostgreSQL shard".to_owned(),
                    log: e.to_string(),
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(shards.into_iter().flatten().collect()),
    }
}

/// Finds the folder with `initdb`, `pg_ctl` and `createdb`: `$CONVOY_PG_BIN`,
/// else `/usr/lib/postgresql/<highest version>/bin`, else `PATH`.
fn pg_bin_dir() -> Result<PathBuf> {
    const PROGRAMS: &[&str] = &["initdb", "pg_ctl", "createdb"];
    let missing = |dir: &Path| {
        PROGRAMS
            .iter()
            .copied()
            .find(|p| !is_executable(&dir.join(p)))
    };

    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        return match missing(&dir) {
            None => Ok(dir),
            Some(program) => Err(Error::MissingBinary {
                binary: program.to_owned(),
                hint: format!(
                    "looked in {PG_BIN_ENV}={}; point it at PostgreSQL's bin folder or unset it",
                    dir.display()
                ),
            }),
        };
    }

    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions
        .into_iter()
        .rev()
        .find(|(_, dir)| missing(dir).is_none())
    {
        return Ok(dir);
    }

    let hint = "looked in /usr/lib/postgresql/*/bin and PATH; install it with `apt-get install -y postgresql`";
    let initdb = find_in_path("initdb").ok_or_else(|| Error::MissingBinary {
        binary: "initdb".to_owned(),
        hint: hint.to_owned(),
    })?;
    let dir = initdb.parent().map(Path::to_path_buf).unwrap_or_default();
    match missing(&dir) {
        None => Ok(dir),
        Some(program) => Err(Error::MissingBinary {
            binary: program.to_owned(),
            hint: format!("looked next to {}; {hint}", initdb.display()),
        }),
    }
}

/// How PostgreSQL programs are run: directly, or (as root, which PostgreSQL
/// refuses) as the `postgres` OS user.
#[derive(Debug, Clone)]
enum RunAs {
    /// Run directly as the current user.
    Current,
    /// `runuser -u postgres -- program...`
    Runuser(PathBuf),
    /// `setpriv --reuid=postgres --regid=postgres --init-groups -- program...`
    Setpriv(PathBuf),
}

impl RunAs {
    fn detect() -> Result<RunAs> {
        if !is_root() {
            return Ok(RunAs::Current);
        }
        if let Some(runuser) = find_in_path("runuser") {
            return Ok(RunAs::Runuser(runuser));
        }
        if let Some(setpriv) = find_in_path("setpriv") {
            return Ok(RunAs::Setpriv(setpriv));
        }
        Err(Error::MissingBinary {
            binary: "runuser".to_owned(),
            hint: "PostgreSQL refuses to run as root, and neither runuser nor setpriv is on PATH \
                   to switch to the postgres user; install them with `apt-get install -y util-linux`"
                .to_owned(),
        })
    }

    fn command(&self, program: &Path) -> std::process::Command {
        let (launcher, args): (&Path, Vec<OsString>) = match self {
            RunAs::Current => return std::process::Command::new(program),
            RunAs::Runuser(path) => (path, vec!["-u".into(), "postgres".into(), "--".into()]),
            RunAs::Setpriv(path) => (
                path,
                vec![
                    "--reuid=postgres".into(),
                    "--regid=postgres".into(),
                    "--init-groups".into(),
                    "--".into(),
                ],
            ),
        };
        let mut cmd = std::process::Command::new(launcher);
        cmd.args(args).arg(program);
        cmd
    }
}
