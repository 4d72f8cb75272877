//! The TLS flags every convoy binary takes, and loading with them.
//!
//! One definition (a clap `Args` group that binaries flatten into their own configuration),
//! so `--tls-cert`, `--tls-key`, `--tls-ca` and their `CONVOY_TLS_*` variables mean the
//! same everywhere: given (all three), the process serves only mutual TLS and its clients
//! open only mutual TLS; not given, everything is plain text, as in local runs and tests.
//! The flags are global, so `convoyctl` takes them after its subcommand too.

use std::path::PathBuf;
use std::time::Duration;

use super::{MeshTls, TlsError, TlsFiles, TlsOptions};

/// Mutual-TLS flags, with `CONVOY_TLS_*` environment fallbacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate chain (PEM, leaf first), presented to clients and to
    /// servers alike. With --tls-key and --tls-ca; none of the three: plain text.
    #[arg(long, env = "CONVOY_TLS_CERT", requires_all = ["tls_key", "tls_ca"], global = true)]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "CONVOY_TLS_KEY", requires_all = ["tls_cert", "tls_ca"], global = true)]
    pub tls_key: Option<PathBuf>,

    /// The CA certificates (PEM) that peers' certificates must chain to, clients' and
    /// servers' alike; during a CA rotation, the old CA and the new one.
    #[arg(long, env = "CONVOY_TLS_CA", requires_all = ["tls_cert", "tls_key"], global = true)]
    pub tls_ca: Option<PathBuf>,

    /// The name servers' certificates must carry. Default: the host dialled. Set it where
    /// peers are dialled by pod IPs (from discovery) and share one certificate naming the
    /// fleet.
    #[arg(
        long,
        env = "CONVOY_TLS_SERVER_NAME",
        requires = "tls_cert",
        global = true
    )]
    pub tls_server_name: Option<String>,

    /// How often the three files are read again, in seconds; new material that loads is
    /// used from the next connection on. 10: the kubelet updates a mounted Secret within
    /// about a minute.
    #[arg(
        long,
        env = "CONVOY_TLS_RELOAD_SECS",
        default_value_t = 10,
        global = true
    )]
    pub tls_reload_secs: u64,
}

impl TlsArgs {
    /// The files, when TLS is configured.
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }

    /// Loads the material and starts its reloader, when TLS is configured; share the one
    /// handle between the process's server and its clients. Call it inside the tokio
    /// runtime, once.
    pub fn load(&self) -> Result<Option<MeshTls>, TlsError> {
        self.files()
            .map(|files| {
                MeshTls::load(
                    files,
                    TlsOptions {
                        reload_interval: Duration::from_secs(self.tls_reload_secs.max(1)),
                        server_name: self.tls_server_name.clone(),
                    },
                )
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn none_of_the_three_is_plain_text() {
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.tls.files(), None);
    }

    #[test]
    fn all_three_name_the_files() {
        let cli = Cli::try_parse_from([
            "test",
            "--tls-cert=/s/tls.crt",
            "--tls-key=/s/tls.key",
            "--tls-ca=/s/ca.crt",
        ])
        .unwrap();
        assert_eq!(
            cli.tls.files(),
            Some(TlsFiles {
                cert: "/s/tls.crt".into(),
                key: "/s/tls.key".into(),
                ca: "/s/ca.crt".into(),
            })
        );
    }

    #[test]
    fn some_but_not_all_three_are_refused() {
        for partial in [
            &["test", "--tls-cert=/s/tls.crt"][..],
            &["test", "--tls-cert=/s/tls.crt", "--tls-key=/s/tls.key"],
            &["test", "--tls-ca=/s/ca.crt"],
        ] {
            let error = Cli::try_parse_from(partial).unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{partial:?}"
            );
        }
    }
}
