//! Keys rotate by files: a new key verifies once its file is there, an old one stops
//! verifying (cached tokens included) once its file is gone, and a broken file is skipped
//! while the keys that work stay in force.

use std::time::Duration;

use convoy_auth::{
    AUDIENCE, Claims, Reload, Role, Signer, TokenError, Verifier, generate_key_pair,
};

fn signer_in(dir: &std::path::Path, kid: &str) -> Signer {
    let pair = generate_key_pair().unwrap();
    std::fs::write(dir.join(format!("{kid}.pem")), &pair.public_pem).unwrap();
    Signer::from_pem(kid, pair.private_pem.as_bytes()).unwrap()
}

fn token(signer: &Signer) -> String {
    signer
        .mint(
            "u",
            &["acme".to_owned()],
            Role::Reader,
            Duration::from_secs(600),
        )
        .unwrap()
}

#[test]
fn keys_rotate_by_adding_and_removing_files() {
    let dir = tempfile::tempdir().unwrap();
    let old = signer_in(dir.path(), "old");
    let verifier = Verifier::from_dir(dir.path()).unwrap();
    let old_token = token(&old);
    assert_eq!(verifier.verify(&old_token).unwrap().teams, vec!["acme"]);
    // Unchanged files: nothing to do.
    assert!(matches!(verifier.reload(), Reload::Unchanged));

    let new = signer_in(dir.path(), "new");
    let new_token = token(&new);
    assert_eq!(
        verifier.verify(&new_token),
        Err(TokenError::UnknownKey("new".into()))
    );
    assert!(matches!(verifier.reload(), Reload::Changed));
    verifier.verify(&new_token).unwrap();
    verifier.verify(&old_token).unwrap();

    std::fs::remove_file(dir.path().join("old.pem")).unwrap();
    assert!(matches!(verifier.reload(), Reload::Changed));
    // Verified (and cached) before, refused now.
    assert_eq!(
        verifier.verify(&old_token),
        Err(TokenError::UnknownKey("old".into()))
    );
    verifier.verify(&new_token).unwrap();

    // A broken file is skipped: the keys that work stay in force.
    std::fs::write(dir.path().join("broken.pem"), "not a key").unwrap();
    assert!(matches!(verifier.reload(), Reload::Changed));
    verifier.verify(&new_token).unwrap();
}

#[test]
fn expired_tampered_and_unsigned_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer_in(dir.path(), "k");
    let verifier = Verifier::from_dir(dir.path()).unwrap();
    let expired = signer
        .sign(&Claims {
            sub: "u".into(),
            teams: vec!["acme".into()],
            role: Role::Admin,
            exp: 1_000,
            iat: 0,
            aud: AUDIENCE.into(),
            fleet: true,
        })
        .unwrap();
    assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));

    // The payload changed after signing: a reader who made itself admin.
    let good = token(&signer);
    let mut parts: Vec<&str> = good.split('.').collect();
    let admin =
        base64_url(br#"{"sub":"u","teams":["*"],"role":"admin","exp":99999999999,"aud":"convoy"}"#);
    parts[1] = &admin;
    assert!(matches!(
        verifier.verify(&parts.join(".")),
        Err(TokenError::Invalid(_))
    ));
    // `alg: none`.
    let none = format!("{}.{}.", base64_url(br#"{"alg":"none","kid":"k"}"#), admin);
    assert!(matches!(
        verifier.verify(&none),
        Err(TokenError::Invalid(_))
    ));
    assert!(matches!(
        verifier.verify(&"x".repeat(convoy_auth::MAX_TOKEN_BYTES + 1)),
        Err(TokenError::Invalid(_))
    ));
    assert!(Verifier::from_dir(tempfile::tempdir().unwrap().path()).is_err());
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
