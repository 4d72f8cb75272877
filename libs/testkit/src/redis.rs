//! Private Redis servers for tests: `redis-server` on a free loopback port,
//! working in a temporary folder, without persistence.
//!
//! Not for keeping data: nothing is saved, so a restart starts empty; the
//! server is killed and its folder deleted when the [`Redis`] is dropped.

use std::path::PathBuf;
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ports::free_port;
use crate::process::{exchange, locate, log_stdio, make_tempdir, wait_ready};

/// Environment variable naming the `redis-server` binary to use.
pub const REDIS_BIN_ENV: &str = "CONVOY_REDIS_BIN";

/// The attempts made to find a free port that nobody else grabs first.
const PORT_ATTEMPTS: usize = 3;

/// A private Redis server; killed on drop.
#[derive(Debug)]
pub struct Redis {
    port: u16,
    binary: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    dir: TempDir,
}

impl Redis {
    /// Starts `redis-server` on a free loopback port (no RDB, no AOF) and
    /// waits until it answers `PING`.
    pub async fn start() -> Result<Redis> {
        let binary = locate("redis-server", REDIS_BIN_ENV, "redis-server")?;
        let dir = make_tempdir("convoy-redis-")?;
        let log = dir.path().join("redis.log");
        let mut redis = Redis {
            port: 0,
            binary,
            log,
            child: None,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.spawn().await {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS && e.is_address_in_use() => {
                    warn!(
                        port = redis.port,
                        "redis port taken by someone else; trying another"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        debug!(port = redis.port, "redis started");
        Ok(redis)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the server process is up.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL), to simulate a dead node. Does nothing if it
    /// is not running.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.map_err(Error::io(format!(
                "kill redis-server on port {}",
                self.port
            )))?;
            debug!(port = self.port, "redis stopped");
        }
        Ok(())
    }

    /// Starts it again on the same port (stopping it first if it is running)
    /// and waits until it answers `PING`. The data set starts empty.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await?;
        debug!(port = self.port, "redis restarted");
        Ok(())
    }

    /// Spawns `redis-server` on `self.port` and waits for `PING`; kills it on failure.
    async fn spawn(&mut self) -> Result<()> {
        let what = format!("redis-server on 127.0.0.1:{}", self.port);
        let (stdout, stderr) = log_stdio(&self.log)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("spawn {}", self.binary.display())))?;
        let port = self.port;
        // On failure the child is dropped here, which kills it.
        wait_ready(&what, &self.log, Some(&mut child), || answers_ping(port)).await?;
        self.child = Some(child);
        Ok(())
    }
}

/// Whether a Redis server on 127.0.0.1:`port` answers `PING` with `+PONG`.
pub async fn answers_ping(port: u16) -> bool {
    exchange(port, b"PING\r\n", |answer| answer.contains(&b'\n'))
        .await
        .is_ok_and(|answer| answer.starts_with(b"+PONG"))
}
