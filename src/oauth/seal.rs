//! The refresh token travels in the target Secret, sealed: AES-256-GCM
//! under a key that only the operator reads (a Secret in its own
//! namespace), bound to the connection's UID.
//!
//! Why there: with rotating refresh tokens every refresh yields a new
//! refresh token and a new access token, and both must be persisted in the
//! same write. Kept in one Secret, a refresh costs exactly one API write.
//! Pods that mount the target Secret see only ciphertext (in an
//! annotation, so not even as a file or environment variable), and people
//! who may read Secrets in the connection's namespace cannot use it either.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The annotation of the target Secret that carries the sealed grant.
pub const ANNOTATION_SEALED_GRANT: &str = "tokenkeeper.dev/sealed-grant";
/// The key of the sealing key Secret that holds the key's 32 bytes.
pub const KEY_FIELD: &str = "key";
const FORMAT: &str = "v1";

/// What the operator needs to continue a grant after a restart.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SealedGrant {
    pub refresh_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_at: Option<Timestamp>,
    /// Fingerprint of the user-supplied refresh token last imported, so a
    /// new one supplied later replaces the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_hash: Option<String>,
}

impl fmt::Debug for SealedGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedGrant")
            .field("refresh_token", &"<redacted>")
            .field("refresh_token_expires_at", &self.refresh_token_expires_at)
            .finish()
    }
}

pub struct SealingKey {
    id: String,
    key: LessSafeKey,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey").field("id", &self.id).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("it was sealed with key {0}, not with the operator's key")]
    OtherKey(String),
    #[error("it does not open for this connection (copied from another one, or altered)")]
    Rejected,
    #[error("it is not in tokenkeeper's format")]
    Malformed,
}

impl SealingKey {
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).ok()?);
        let digest = Sha256::digest(bytes);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Some(SealingKey { id, key })
    }

    pub fn generate() -> Self {
        Self::from_bytes(&random::<32>()).expect("32 bytes make an AES-256 key")
    }

    /// Seals `grant` for the connection with UID `uid`.
    pub fn seal(&self, grant: &SealedGrant, uid: &str) -> String {
        let nonce = random::<NONCE_LEN>();
        let mut sealed = serde_json::to_vec(grant).expect("a grant serializes");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(uid.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a small message cannot fail");
        let mut payload = nonce.to_vec();
        payload.extend(sealed);
        format!("{FORMAT}.{}.{}", self.id, STANDARD_NO_PAD.encode(payload))
    }

    /// The grant sealed in `target`'s annotation for the connection with
    /// UID `uid`; `None` when it carries none.
    pub fn open_grant(&self, target: &Secret, uid: &str) -> Result<Option<SealedGrant>, OpenError> {
        match target.annotations().get(ANNOTATION_SEALED_GRANT) {
            Some(sealed) => self.open(sealed, uid).map(Some),
            None => Ok(None),
        }
    }

    /// Opens what `seal` produced for the same UID.
    pub fn open(&self, sealed: &str, uid: &str) -> Result<SealedGrant, OpenError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(FORMAT), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(OpenError::Malformed);
        };
        if id != self.id {
            return Err(OpenError::OtherKey(id.to_owned()));
        }
        let mut payload = STANDARD_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Malformed)?;
        if payload.len() < NONCE_LEN {
            return Err(OpenError::Malformed);
        }
        let mut ciphertext = payload.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&payload).map_err(|_| OpenError::Malformed)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(uid.as_bytes()), &mut ciphertext)
            .map_err(|_| OpenError::Rejected)?;
        serde_json::from_slice(plain).map_err(|_| OpenError::Malformed)
    }
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> SealedGrant {
        SealedGrant {
            refresh_token: "rt-secret-value".into(),
            refresh_token_expires_at: Some(Timestamp::from_second(9_000).unwrap()),
            imported_hash: None,
        }
    }

    #[test]
    fn a_grant_opens_for_its_connection_only() {
        let key = SealingKey::generate();
        let sealed = key.seal(&grant(), "uid-a");
        assert!(!sealed.contains("rt-secret-value"));
        assert_eq!(key.open(&sealed, "uid-a").unwrap(), grant());
        assert!(matches!(
            key.open(&sealed, "uid-b"),
            Err(OpenError::Rejected)
        ));
    }

    #[test]
    fn another_key_or_an_altered_seal_is_refused() {
        let key = SealingKey::generate();
        let sealed = key.seal(&grant(), "uid");
        assert!(matches!(
            SealingKey::generate().open(&sealed, "uid"),
            Err(OpenError::OtherKey(_))
        ));
        let mut altered = sealed.clone();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(key.open(&altered, "uid").is_err());
        assert!(matches!(
            key.open("plain", "uid"),
            Err(OpenError::Malformed)
        ));
    }

    #[test]
    fn seals_differ_each_time() {
        let key = SealingKey::generate();
        assert_ne!(key.seal(&grant(), "uid"), key.seal(&grant(), "uid"));
    }
}
