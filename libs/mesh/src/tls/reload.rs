//! The process's TLS handle, [`MeshTls`]: the material in force, kept current from the
//! files by a reloader task.
//!
//! The reloader compares the files' contents (a hash), not their modification times: a
//! Kubernetes Secret update swaps a symlink to a new folder, and what the process sees
//! through the link need not look newer. New contents are swapped in only if they load
//! ([`TlsMaterial::load`]); a failure is logged and counted once per distinct set of
//! contents, and the material in force stays. Files caught half-updated (written one by one,
//! outside Kubernetes) are not reported: a failed load is reported only if a second read
//! finds the same contents, otherwise the next round looks again.
//!
//! Not here: using the material (the [`super::accept`] and [`super::connect`] sides).

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::material::{Contents, TlsError, TlsFiles, TlsMaterial};

/// How a [`MeshTls`] behaves beyond its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// How often the files are read again. Default 10 s: the kubelet takes up to a minute
    /// or so to update a mounted Secret, and reading three small files costs nothing.
    pub reload_interval: Duration,
    /// The name servers' certificates must carry, instead of the host dialled. Default none:
    /// the host dialled (a DNS name or an IP address). Set it where peers are dialled by
    /// addresses no certificate names, as pod IPs from discovery are.
    pub server_name: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            reload_interval: Duration::from_secs(10),
            server_name: None,
        }
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// Nothing to act on: the contents in force, contents already refused, or files that
    /// changed while being read (the next look sees them settled).
    Unchanged,
    /// New material is in force.
    Reloaded,
    /// New contents failed to load; the material in force stays.
    Refused(TlsError),
}

/// How many reloads a [`MeshTls`] made and refused since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    /// New material swapped in.
    pub reloaded: u64,
    /// New contents refused (each distinct set once).
    pub refused: u64,
}

struct State {
    material: Arc<TlsMaterial>,
    /// The contents `material` came from.
    stamp: u64,
    /// The last contents refused, so they are reported once.
    refused_stamp: Option<u64>,
    counts: ReloadCounts,
}

struct Shared {
    files: TlsFiles,
    server_name: Option<ServerName<'static>>,
    state: RwLock<State>,
}

/// A process's mutual-TLS material, shared by its server and its clients (clone freely:
/// every clone sees the same material). The reloader task runs while any clone lives.
#[derive(Clone)]
pub struct MeshTls {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("files", &self.shared.files)
            .field("server_name", &self.shared.server_name)
            .finish_non_exhaustive()
    }
}

// === impl MeshTls ===

impl MeshTls {
    /// Loads `files` (failing if they do not load: a process must not start without its
    /// identity) and starts the reloader. Must be called inside a tokio runtime.
    pub fn load(files: TlsFiles, options: TlsOptions) -> Result<Self, TlsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TlsError::NoRuntime)?;
        let server_name = options
            .server_name
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })
            })
            .transpose()?;
        let contents = Contents::read(&files)?;
        let material = TlsMaterial::from_contents(&files, &contents)?;
        tracing::info!(
            cert = %files.cert.display(),
            key = %files.key.display(),
            ca = %files.ca.display(),
            "TLS material loaded"
        );
        let shared = Arc::new(Shared {
            files,
            server_name,
            state: RwLock::new(State {
                material: Arc::new(material),
                stamp: contents.stamp(),
                refused_stamp: None,
                counts: ReloadCounts::default(),
            }),
        });
        runtime.spawn(reload_every(
            Arc::downgrade(&shared),
            options.reload_interval.max(Duration::from_millis(10)),
        ));
        Ok(Self { shared })
    }

    /// The material in force: what a handshake starting now uses.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.shared.read().material.clone()
    }

    /// The files this material comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.shared.files
    }

    /// Reloads and refusals so far.
    pub fn counts(&self) -> ReloadCounts {
        self.shared.read().counts
    }

    /// Looks at the files once, as the reloader does every interval (it blocks on reading
    /// them: call it off the async workers).
    pub fn reload(&self) -> Reload {
        self.shared.reload()
    }

    /// The name to verify a server's certificate against when dialling `host`.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(name) = &self.shared.server_name {
            return Ok(name.clone());
        }
        // A URI's IPv6 host comes in brackets.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
            name: host.to_owned(),
        })
    }
}

// === impl Shared ===

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn reload(&self) -> Reload {
        let (stamp, loaded) = self.look();
        {
            let state = self.read();
            if stamp == state.stamp || Some(stamp) == state.refused_stamp {
                return Reload::Unchanged;
            }
        }
        match loaded {
            Ok(material) => {
                let mut state = self.write();
                state.material = Arc::new(material);
                state.stamp = stamp;
                state.refused_stamp = None;
                state.counts.reloaded += 1;
                drop(state);
                metrics::counter!("convoy_tls_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(cert = %self.files.cert.display(), "TLS material reloaded");
                Reload::Reloaded
            }
            Err(error) => {
                // Files written one after another may have been caught in between.
                if self.look().0 != stamp {
                    return Reload::Unchanged;
                }
                let mut state = self.write();
                state.refused_stamp = Some(stamp);
                state.counts.refused += 1;
                drop(state);
                metrics::counter!("convoy_tls_reloads_total", "outcome" => "failed").increment(1);
                tracing::warn!(%error, "new TLS material refused; the material in force stays");
                Reload::Refused(error)
            }
        }
    }

    /// Reads and loads the files: a stamp of what was seen (the contents' hash, or the
    /// error's, so an unreadable file is reported once too) and the load's outcome.
    fn look(&self) -> (u64, Result<TlsMaterial, TlsError>) {
        match Contents::read(&self.files) {
            Ok(contents) => (
                contents.stamp(),
                TlsMaterial::from_contents(&self.files, &contents),
            ),
            Err(error) => (
                xxhash_rust::xxh3::xxh3_64(error.to_string().as_bytes()),
                Err(error),
            ),
        }
    }
}

/// The reloader: looks at the files every `interval` while the handle lives.
async fn reload_every(shared: Weak<Shared>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // File reads block; a slow volume must not hold up an async worker.
        if tokio::task::spawn_blocking(move || shared.reload())
            .await
            .is_err()
        {
            return; // the runtime is shutting down
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use convoy_testkit::certs::{SecretDir, TestCa};

    use super::*;

    /// A handle whose reloader never runs during the test: each test looks itself.
    fn handle(dir: &Path, ca: &TestCa) -> (SecretDir, MeshTls) {
        let secret = SecretDir::create(dir, &ca.leaf(), &[ca]).unwrap();
        let files = TlsFiles::secret_dir(secret.root());
        let options = TlsOptions {
            reload_interval: Duration::from_secs(3600),
            ..TlsOptions::default()
        };
        (secret, MeshTls::load(files, options).unwrap())
    }

    #[tokio::test]
    async fn new_files_that_load_replace_the_material() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, tls) = handle(dir.path(), &ca);
        let before = tls.current();
        assert!(matches!(tls.reload(), Reload::Unchanged));

        secret.update(&ca.leaf(), &[&ca]).unwrap();
        assert!(matches!(tls.reload(), Reload::Reloaded));
        assert!(!Arc::ptr_eq(&before, &tls.current()));
        assert!(matches!(tls.reload(), Reload::Unchanged));
        assert_eq!(
            tls.counts(),
            ReloadCounts {
                reloaded: 1,
                refused: 0
            }
        );
    }

    #[tokio::test]
    async fn a_bad_update_keeps_the_material_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, tls) = handle(dir.path(), &ca);
        let before = tls.current();

        let leaf = ca.leaf();
        secret
            .update_raw(&leaf.cert_pem, &ca.leaf().key_pem, ca.cert_pem())
            .unwrap();
        assert!(matches!(
            tls.reload(),
            Reload::Refused(TlsError::KeyMismatch { .. })
        ));
        assert!(matches!(tls.reload(), Reload::Unchanged), "reported once");
        assert!(
            Arc::ptr_eq(&before, &tls.current()),
            "the old material stays"
        );

        // Fixed files are taken up.
        secret.update(&leaf, &[&ca]).unwrap();
        assert!(matches!(tls.reload(), Reload::Reloaded));
        assert_eq!(
            tls.counts(),
            ReloadCounts {
                reloaded: 1,
                refused: 1
            }
        );
    }

    #[tokio::test]
    async fn vanished_files_keep_the_material() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, tls) = handle(dir.path(), &ca);
        std::fs::remove_file(secret.ca()).unwrap();
        assert!(matches!(
            tls.reload(),
            Reload::Refused(TlsError::Read {
                what: "CA bundle",
                ..
            })
        ));
        assert!(matches!(tls.reload(), Reload::Unchanged), "reported once");
    }

    #[tokio::test]
    async fn the_server_name_is_the_host_dialled_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let (_secret, tls) = handle(dir.path(), &TestCa::new("one"));
        assert_eq!(
            tls.server_name("127.0.0.1").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            tls.server_name("[::1]").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        let named = MeshTls::load(
            tls.files().clone(),
            TlsOptions {
                server_name: Some("convoy.mesh".into()),
                ..TlsOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            named.server_name("10.0.0.7").unwrap(),
            ServerName::try_from("convoy.mesh").unwrap()
        );
    }
}
