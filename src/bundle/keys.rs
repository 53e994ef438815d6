//! Ed25519 signing keys: key files, key ids, and signing/verifying the
//! manifest.
//!
//! Key files are one line of text, so they survive copy and paste and are
//! easy to inspect:
//!
//! ```text
//! abup-ed25519-secret <64 hex digits: the 32-byte secret seed>
//! abup-ed25519-public <64 hex digits: the 32-byte public key>
//! ```
//!
//! A key id is the hex of the first 8 bytes of SHA-256 over the 32 public key
//! bytes. It is a hint that lets a device pick the right trusted key and lets
//! error messages name the signer; it is not trusted on its own.

use anyhow::{anyhow, bail, ensure, Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// First word of a secret key file.
const SECRET_TAG: &str = "abup-ed25519-secret";
/// First word of a public key file.
const PUBLIC_TAG: &str = "abup-ed25519-public";

/// Domain separation prefix: the signed message is this followed by the exact
/// manifest bytes, so an abup signature can never be mistaken for a
/// signature over anything else made with the same key.
pub const SIGNATURE_DOMAIN: &[u8] = b"abup-manifest-v1\0";

/// Generates a new key pair from the OS random source and writes the secret
/// key to `secret_path` (mode 0600) and the public key to `public_path`
/// (mode 0644). Refuses to overwrite either file. Returns the key id.
pub fn generate(secret_path: &Path, public_path: &Path) -> Result<String> {
    for path in [secret_path, public_path] {
        if fs::symlink_metadata(path).is_ok() {
            bail!(
                "{} already exists; refusing to overwrite a key file (move it away first)",
                path.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow!("reading 32 random bytes from the OS: {e}"))?;
    let signing = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let verifying = signing.verifying_key();

    let secret_line = format!("{SECRET_TAG} {}\n", hex::encode(signing.to_bytes()));
    write_new(secret_path, 0o600, &secret_line)
        .with_context(|| format!("writing secret key {}", secret_path.display()))?;
    let public_line = format!("{PUBLIC_TAG} {}\n", hex::encode(verifying.as_bytes()));
    if let Err(e) = write_new(public_path, 0o644, &public_line) {
        // Do not leave half a key pair behind.
        let _ = fs::remove_file(secret_path);
        return Err(e).with_context(|| format!("writing public key {}", public_path.display()));
    }
    Ok(key_id(&verifying))
}

/// Creates `path` (which must not exist) with `mode` and writes `text`.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .context("creating the file")?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .context("writing the file")?;
    Ok(())
}

/// Loads a secret key file written by [`generate`].
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let bytes = read_key_file(path, SECRET_TAG)
        .with_context(|| format!("reading signing key {}", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Loads a public key file written by [`generate`].
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey> {
    let bytes = read_key_file(path, PUBLIC_TAG)
        .with_context(|| format!("reading public key {}", path.display()))?;
    VerifyingKey::from_bytes(&bytes).with_context(|| {
        format!(
            "reading public key {}: not a valid ed25519 key",
            path.display()
        )
    })
}

/// Loads every public key file in `paths` (the trusted keys of a config or
/// the `--key` flags of `bundle info`).
pub fn load_verifying_keys(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>> {
    paths.iter().map(|p| load_verifying_key(p)).collect()
}

/// Reads a one-line key file and returns its 32 key bytes, checking the tag.
fn read_key_file(path: &Path, want_tag: &str) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path)?;
    let line = text.trim();
    let (tag, hex_key) = line
        .split_once(' ')
        .with_context(|| format!("not an abup key file (expected \"{want_tag} <hex>\")"))?;
    if tag != want_tag {
        match tag {
            SECRET_TAG => bail!("this is a secret key; pass the public key file instead"),
            PUBLIC_TAG => bail!("this is a public key; signing needs the secret key file"),
            _ => bail!("not an abup key file (expected \"{want_tag} <hex>\")"),
        }
    }
    let bytes = hex::decode(hex_key.trim()).context("decoding the key hex")?;
    ensure!(
        bytes.len() == 32,
        "the key is {} bytes, expected 32",
        bytes.len()
    );
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// The key id of `key`: hex of the first 8 bytes of SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The message actually signed: [`SIGNATURE_DOMAIN`] followed by the
/// manifest bytes.
fn signed_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNATURE_DOMAIN.len() + manifest_bytes.len());
    msg.extend_from_slice(SIGNATURE_DOMAIN);
    msg.extend_from_slice(manifest_bytes);
    msg
}

/// Signs the exact manifest bytes (domain-separated).
pub fn sign_manifest(key: &SigningKey, manifest_bytes: &[u8]) -> Signature {
    key.sign(&signed_message(manifest_bytes))
}

/// Checks `signature` over the exact manifest bytes against `key`, using
/// strict verification (no malleable or small-order signatures).
pub fn verify_manifest(key: &VerifyingKey, manifest_bytes: &[u8], signature: &Signature) -> bool {
    key.verify_strict(&signed_message(manifest_bytes), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.secret"), dir.path().join("k.pub"));
        let id = generate(&sk, &pk).unwrap();
        assert_eq!(id.len(), 16);

        let signing = load_signing_key(&sk).unwrap();
        let verifying = load_verifying_key(&pk).unwrap();
        assert_eq!(signing.verifying_key(), verifying);
        assert_eq!(key_id(&verifying), id);

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sk), 0o600);
        assert_eq!(mode(&pk) & 0o600, 0o600);
        let text = fs::read_to_string(&pk).unwrap();
        assert!(text.starts_with("abup-ed25519-public ") && text.ends_with('\n'));
        assert_eq!(text.len(), "abup-ed25519-public ".len() + 64 + 1);

        let msg = b"{\"format\":1}";
        let sig = sign_manifest(&signing, msg);
        assert!(verify_manifest(&verifying, msg, &sig));
        assert!(!verify_manifest(&verifying, b"{\"format\":2}", &sig));
        // The domain prefix is part of the signed message.
        assert!(verifying.verify_strict(msg, &sig).is_err());
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.secret"), dir.path().join("k.pub"));
        fs::write(&pk, "keep me").unwrap();
        let err = format!("{:#}", generate(&sk, &pk).unwrap_err());
        assert!(err.contains("already exists"), "{err}");
        assert!(!sk.exists());
        assert_eq!(fs::read_to_string(&pk).unwrap(), "keep me");
    }

    #[test]
    fn swapped_or_bad_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.secret"), dir.path().join("k.pub"));
        generate(&sk, &pk).unwrap();
        let err = format!("{:#}", load_signing_key(&pk).unwrap_err());
        assert!(err.contains("is a public key"), "{err}");
        let err = format!("{:#}", load_verifying_key(&sk).unwrap_err());
        assert!(err.contains("is a secret key"), "{err}");

        let bad = dir.path().join("bad");
        fs::write(&bad, "abup-ed25519-public 1234\n").unwrap();
        let err = format!("{:#}", load_verifying_key(&bad).unwrap_err());
        assert!(err.contains("2 bytes, expected 32"), "{err}");
        fs::write(&bad, "hello").unwrap();
        assert!(load_verifying_key(&bad).is_err());
        let err = format!(
            "{:#}",
            load_verifying_key(&dir.path().join("none")).unwrap_err()
        );
        assert!(err.starts_with("reading public key "), "{err}");
    }
}
