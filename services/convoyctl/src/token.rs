//! `convoyctl token`: key pairs and tokens for development set-ups and operators.
//!
//! `keygen` writes `<dir>/<kid>.key` (the private key, mode 0600) and `<dir>/<kid>.pem`
//! (the public key, for the services' `--auth-keys` directory); `mint` signs a token with a
//! private key whose file stem is its key id.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use convoy_auth::{Role, Signer};

/// `convoyctl token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Generates an Ed25519 key pair: `<out>/<kid>.key` (private) and `<keys>/<kid>.pem`.
    Keygen {
        /// The key id tokens signed with it carry.
        #[arg(long, default_value = "dev-1")]
        kid: String,
        /// Where the private key goes.
        #[arg(long)]
        out: PathBuf,
        /// The services' key directory, where the public key goes (default: `out`).
        #[arg(long)]
        keys: Option<PathBuf>,
    },
    /// Mints a token and prints it.
    Mint(MintArgs),
}

/// `convoyctl token mint`.
#[derive(Debug, clap::Args)]
pub struct MintArgs {
    /// The private key (`<kid>.key`, Ed25519 PKCS#8 or RSA PEM); its file stem is the kid.
    #[arg(long, env = "CONVOY_SIGNING_KEY")]
    pub key: PathBuf,
    /// A team the token reaches (repeat; `*` for every team).
    #[arg(long = "team", required = true)]
    pub teams: Vec<String>,
    /// What the bearer may do.
    #[arg(long, value_enum)]
    pub role: Role,
    /// Grant fleet-wide operations (shard map and its administration, cache statistics and
    /// flushes, the fleet overview) as far as the role allows: for fleet administrators
    /// and the services' own token. `--team '*'` alone does not grant them.
    #[arg(long)]
    pub fleet: bool,
    /// Who the bearer is.
    #[arg(long, default_value = "convoyctl")]
    pub subject: String,
    /// Lifetime, in hours.
    #[arg(long, default_value_t = 24)]
    pub ttl_hours: u64,
}

/// Runs a token subcommand, printing what it made.
pub fn run(command: &TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Keygen { kid, out, keys } => {
            let (private, public) = keygen(kid, out, keys.as_deref().unwrap_or(out))?;
            println!("private key: {}", private.display());
            println!("public key:  {}", public.display());
        }
        TokenCommand::Mint(args) => println!("{}", mint(args)?),
    }
    Ok(())
}

/// Writes a fresh key pair; returns the private and public key paths. Refuses to
/// overwrite an existing private key.
pub fn keygen(kid: &str, out: &Path, keys: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    if kid.is_empty() || kid.contains(['/', '.']) {
        anyhow::bail!("--kid {kid:?}: must be a plain file stem (no '/' or '.')");
    }
    let pair = convoy_auth::generate_key_pair()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::create_dir_all(keys).with_context(|| format!("creating {}", keys.display()))?;
    let private = out.join(format!("{kid}.key"));
    let public = keys.join(format!("{kid}.pem"));
    let mut file = open_private(&private)?;
    file.write_all(pair.private_pem.as_bytes())?;
    std::fs::write(&public, &pair.public_pem)
        .with_context(|| format!("writing {}", public.display()))?;
    Ok((private, public))
}

#[cfg(unix)]
fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))
}

/// Signs a token as `args` say.
pub fn mint(args: &MintArgs) -> anyhow::Result<String> {
    let signer = Signer::from_file(&args.key)?;
    let ttl = Duration::from_secs(args.ttl_hours.saturating_mul(3600));
    Ok(if args.fleet {
        signer.mint_fleet(&args.subject, &args.teams, args.role, ttl)?
    } else {
        signer.mint(&args.subject, &args.teams, args.role, ttl)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_against_the_generated_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let (private, _) = keygen("k1", dir.path(), &keys).unwrap();
        let token = mint(&MintArgs {
            key: private.clone(),
            teams: vec!["acme".into()],
            role: Role::Writer,
            fleet: false,
            subject: "dev".into(),
            ttl_hours: 1,
        })
        .unwrap();
        let verifier = convoy_auth::Verifier::from_dir(&keys).unwrap();
        let claims = verifier.verify(&token).unwrap();
        assert_eq!(
            (claims.role, claims.teams.clone(), claims.fleet),
            (Role::Writer, vec!["acme".to_owned()], false)
        );
        let fleet = mint(&MintArgs {
            key: private.clone(),
            teams: vec!["*".into()],
            role: Role::Admin,
            fleet: true,
            subject: "ops".into(),
            ttl_hours: 1,
        })
        .unwrap();
        assert!(verifier.verify(&fleet).unwrap().fleet);
        // The private key is not overwritten.
        assert!(keygen("k1", dir.path(), &keys).is_err());
        assert!(keygen("../k", dir.path(), &keys).is_err());
    }
}
