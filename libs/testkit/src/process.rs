//! Shared plumbing for the test servers: finding binaries, temporary folders,
//! log files, running helper commands and waiting for readiness.
//!
//! Not public API, and not server specific: each server module builds on it.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::error::{Error, Result};

/// How long a server may take to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a helper command (initdb, createdb, chown...) may run.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Folders searched after `PATH`, since `sbin` is often missing from it.
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Whether this process runs with effective uid 0 (read once, then cached).
pub(crate) fn is_root() -> bool {
    static EUID: OnceLock<Option<u32>> = OnceLock::new();
    *EUID.get_or_init(effective_uid) == Some(0)
}

/// The effective uid, from `/proc/self/status` or else `id -u`.
fn effective_uid() -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok());
        if euid.is_some() {
            return euid;
        }
    }
    let out = std::process::Command::new("id").arg("-u").output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Whether `path` is a regular file with an execute bit set.
pub(crate) fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `name` on `PATH`, then in the usual system folders.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Finds a server binary: the path in `env_var` if set, else on `PATH`.
pub(crate) fn locate(binary: &str, env_var: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        return Err(Error::MissingBinary {
            binary: binary.to_owned(),
            hint: format!(
                "{env_var}={} is not an executable file; unset it or install {binary} with `apt-get install -y {package}`",
                path.display()
            ),
        });
    }
    find_in_path(binary).ok_or_else(|| Error::MissingBinary {
        binary: binary.to_owned(),
        hint: format!(
            "looked in ${env_var} and PATH; install it with `apt-get install -y {package}`"
        ),
    })
}

/// Creates a private (0700) temporary folder. As root it is made under `/tmp`,
/// so that the `postgres` user can reach it whatever `TMPDIR` says.
pub(crate) fn make_tempdir(prefix: &str) -> Result<TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    let tmp = Path::new("/tmp");
    let dir = if is_root() && tmp.is_dir() {
        builder.tempdir_in(tmp)
    } else {
        builder.tempdir()
    }
    .map_err(Error::io("create a temporary folder"))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("chmod 0700 {}", dir.path().display())))?;
    Ok(dir)
}

/// Opens (appending) the log file and returns stdout and stderr handles for a child.
pub(crate) fn log_stdio(log: &Path) -> Result<(Stdio, Stdio)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("open {}", log.display())))?;
    let err = file
        .try_clone()
        .map_err(Error::io(format!("duplicate handle of {}", log.display())))?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// The last lines (at most about 4 KiB) of a log file, or a note saying why there are none.
pub(crate) fn log_tail(log: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    const MAX_LINES: usize = 40;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => format!("({} is empty)", log.display()),
        Ok(text) => tail_lines(&text, MAX_LINES),
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// The last `max` lines of `text`.
pub(crate) fn tail_lines(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}

/// Runs a helper command to completion (bounded by [`COMMAND_TIMEOUT`]);
/// a non-zero exit becomes [`Error::CommandFailed`] with the tail of its output.
pub(crate) async fn run(mut cmd: Command, what: &str) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(out) => out.map_err(Error::io(format!("run {what}")))?,
        Err(_) => {
            return Err(Error::Timeout {
                what: what.to_owned(),
                log: "(command output unavailable: it was killed)".to_owned(),
            });
        }
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(Error::CommandFailed {
            what: format!("{what} ({})", out.status),
            output: tail_lines(&text, 40),
        })
    }
}

/// Removes the given environment variables, plus all whose names start with `prefix`.
pub(crate) fn clear_env(cmd: &mut std::process::Command, names: &[&str], prefix: Option<&str>) {
    for name in names {
        cmd.env_remove(name);
    }
    if let Some(prefix) = prefix {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with(prefix) {
                cmd.env_remove(&name);
            }
        }
    }
}

/// Polls `probe` every 50 ms until it answers true, the child exits, or
/// [`READY_TIMEOUT`] passes.
pub(crate) async fn wait_ready<F, Fut>(
    what: &str,
    log: &Path,
    mut child: Option<&mut Child>,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if timeout(PROBE_TIMEOUT, probe()).await.unwrap_or(false) {
            return Ok(());
        }
        if let Some(child) = child.as_deref_mut() {
            let exited = child
                .try_wait()
                .map_err(Error::io(format!("check whether {what} is alive")))?;
            if let Some(status) = exited {
                return Err(Error::StartFailed {
                    what: format!("{what} (it exited with {status})"),
                    log: log_tail(log),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{what} to become ready ({}s)", READY_TIMEOUT.as_secs()),
                log: log_tail(log),
            });
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) async fn tcp_accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// Sends `request` to 127.0.0.1:`port` and returns what comes back until the
/// peer closes the connection or `stop_when` says the answer is complete.
pub(crate) async fn exchange(
    port: u16,
    request: &[u8],
    stop_when: impl Fn(&[u8]) -> bool,
) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(answer);
        }
        answer.extend_from_slice(&buf[..n]);
        if stop_when(&answer) {
            return Ok(answer);
        }
    }
}

/// Whether `haystack` contains the bytes of `needle`.
pub(crate) fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).any(|w| w == needle)
}
