//! Private single-member etcd servers for tests: `etcd` on free loopback
//! client and peer ports, with its data in a temporary folder.
//!
//! Not a multi-member cluster, and not tuned for durability; the server is
//! killed and its data deleted when the [`Etcd`] is dropped.

use std::path::PathBuf;
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ports::free_port;
use crate::process::{clear_env, contains, exchange, locate, log_stdio, make_tempdir, wait_ready};

/// Environment variable naming the `etcd` binary to use.
pub const ETCD_BIN_ENV: &str = "CONVOY_ETCD_BIN";

/// The attempts made to find free ports that nobody else grabs first.
const PORT_ATTEMPTS: usize = 3;

/// A private single-member etcd server; killed on drop.
#[derive(Debug)]
pub struct Etcd {
    port: u16,
    peer_port: u16,
    binary: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    dir: TempDir,
}

impl Etcd {
    /// Starts a single-member etcd on free loopback ports and waits until
    /// `GET /health` reports `{"health":"true"}`.
    pub async fn start() -> Result<Etcd> {
        let binary = locate("etcd", ETCD_BIN_ENV, "etcd-server")?;
        let dir = make_tempdir("convoy-etcd-")?;
        let log = dir.path().join("etcd.log");
        let mut etcd = Etcd {
            port: 0,
            peer_port: 0,
            binary,
            data: PathBuf::new(),
            log,
            child: None,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            etcd.port = free_port();
            etcd.peer_port = free_port();
            // A failed first boot may have recorded the old peer URL: start afresh.
            etcd.data = etcd.dir.path().join(format!("data-{attempt}"));
            match etcd.spawn().await {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS && e.is_address_in_use() => {
                    warn!(
                        port = etcd.port,
                        "etcd port taken by someone else; trying others"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        debug!(port = etcd.port, peer_port = etcd.peer_port, "etcd started");
        Ok(etcd)
    }

    /// The client port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peer port it listens on (127.0.0.1).
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The client endpoint, `http://127.0.0.1:{port}`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether the server process is up.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL), keeping its data folder. Does nothing if it
    /// is not running.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .map_err(Error::io(format!("kill etcd on port {}", self.port)))?;
            debug!(port = self.port, "etcd stopped");
        }
        Ok(())
    }

    /// Starts it again with the same data folder and ports (stopping it first
    /// if it is running) and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await?;
        debug!(port = self.port, "etcd restarted");
        Ok(())
    }

    /// Spawns `etcd` and waits for health; kills it on failure.
    async fn spawn(&mut self) -> Result<()> {
        let what = format!("etcd on 127.0.0.1:{}", self.port);
        let client_url = format!("http://127.0.0.1:{}", self.port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let (stdout, stderr) = log_stdio(&self.log)?;
        let mut cmd = std::process::Command::new(&self.binary);
        // ETCD_* variables clash with the flags below.
        clear_env(&mut cmd, &[], Some("ETCD_"));
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let mut cmd = Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("spawn {}", self.binary.display())))?;
        let port = self.port;
        // On failure the child is dropped here, which kills it.
        wait_ready(&what, &self.log, Some(&mut child), || is_healthy(port)).await?;
        self.child = Some(child);
        Ok(())
    }
}

/// Whether the etcd on 127.0.0.1:`port` answers `GET /health` with `"health":"true"`.
pub async fn is_healthy(port: u16) -> bool {
    exchange(
        port,
        b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
        |_| false,
    )
    .await
    .is_ok_and(|answer| contains(&answer, r#""health":"true""#))
}
