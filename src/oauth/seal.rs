//! The refresh token travels in the target Secret, sealed: AES-256-GCM
//! under a key that only the operator reads (a Secret in its own
//! namespace), bound to the connection and to what the grant was given for.
//!
//! Why there: with rotating refresh tokens every refresh yields a new
//! refresh token and a new access token, and both must be persisted in the
//! same write. Kept in one Secret, a refresh costs exactly one API write.
//! Pods that mount the target Secret see only ciphertext (in an
//! annotation, so not even as a file or environment variable), and people
//! who may read Secrets in the connection's namespace cannot use it either.
//!
//! A seal names what it may be used for (the connection's UID, the origins
//! of the token and revocation endpoints, the client id) in a header that
//! is authenticated with it: someone who may edit a connection but not read
//! its grant cannot redirect the grant to an endpoint of theirs.
//!
//! `kubectl tokenkeeper authorize` runs with the user's credentials and
//! holds no sealing key, so it seals to the operator's X25519 public key
//! (published in each connection's status); only the operator opens that.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::api::OAuth2Auth;

/// The annotation of the target Secret that carries the sealed grant.
pub const ANNOTATION_SEALED_GRANT: &str = "tokenkeeper.dev/sealed-grant";
/// The first sealing key's entry in the key Secret; rotated keys are
/// `key-2`, `key-3`, ... and the highest number seals.
pub const KEY_FIELD: &str = "key";
/// The key Secret's entry holding the X25519 secret that opens what
/// `kubectl tokenkeeper authorize` sealed.
pub const EXCHANGE_KEY_FIELD: &str = "x25519";
const LEGACY_FORMAT: &str = "v1";
const FORMAT: &str = "v2";
const PUBLIC_FORMAT: &str = "x1";
const TEXT_FORMAT: &str = "t1";
const PUBLIC_KEY_PREFIX: &str = "x25519:";
const HKDF_INFO: &[u8] = b"tokenkeeper sealed grant x1";

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
    /// The provider account the grant is for, when the provider named it
    /// at consent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Fingerprint of the consent this grant was adopted from, so that a
    /// consent is adopted once, and a later one always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    /// When the grant was given (consent) or its refresh token imported:
    /// where a provider's absolute grant lifetime counts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<Timestamp>,
    /// What the provider sent in the consent's redirect (`redirectFields`),
    /// written into the target Secret with every token.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redirect_values: BTreeMap<String, String>,
}

impl fmt::Debug for SealedGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedGrant")
            .field("refresh_token", &"<redacted>")
            .field("refresh_token_expires_at", &self.refresh_token_expires_at)
            .finish()
    }
}

/// What a sealed grant was given for. The refresh token is only ever sent
/// to endpoints with these origins, by this client, for this connection,
/// and the access tokens it yields only to the verification endpoint named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub uid: String,
    pub token_origin: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introspection_origin: Option<String>,
}

impl Binding {
    pub fn new(uid: &str, oauth: &OAuth2Auth, client_id: &str) -> Self {
        Binding {
            uid: uid.to_owned(),
            token_origin: origin_of(&oauth.token_url),
            client_id: client_id.to_owned(),
            revocation_origin: oauth.revocation_url.as_deref().map(origin_of),
            verification_origin: oauth.verification.as_ref().map(|v| origin_of(&v.url)),
            introspection_origin: oauth.introspection_url.as_deref().map(origin_of),
        }
    }

    /// What differs between the binding a grant was sealed with (`self`)
    /// and the connection's now, in words; empty when the grant may be used.
    pub fn changes_to(&self, now: &Binding) -> Vec<String> {
        let mut changes = Vec::new();
        if self.uid != now.uid {
            changes.push("it belongs to another SourceConnection".to_owned());
        }
        if self.token_origin != now.token_origin {
            changes.push(format!(
                "it was granted for the token endpoint {}, and spec.oauth2.tokenUrl now names {}",
                self.token_origin, now.token_origin
            ));
        }
        if self.client_id != now.client_id {
            changes.push(format!(
                "it was granted to client id {:?}, and the client Secret now holds {:?}",
                self.client_id, now.client_id
            ));
        }
        let name = |origin: &Option<String>| origin.clone().unwrap_or_else(|| "none".to_owned());
        if self.revocation_origin != now.revocation_origin {
            changes.push(format!(
                "it was granted with revocation endpoint {}, and spec.oauth2.revocationUrl now \
                 names {}",
                name(&self.revocation_origin),
                name(&now.revocation_origin)
            ));
        }
        if self.introspection_origin != now.introspection_origin {
            changes.push(format!(
                "it was granted with introspection endpoint {}, and \
                 spec.oauth2.introspectionUrl now names {}",
                name(&self.introspection_origin),
                name(&now.introspection_origin)
            ));
        }
        if self.verification_origin != now.verification_origin {
            changes.push(format!(
                "it was granted with verification endpoint {}, and \
                 spec.oauth2.verification.url now names {}",
                name(&self.verification_origin),
                name(&now.verification_origin)
            ));
        }
        changes
    }
}

/// The origin (scheme, host, port) of `url`; the text itself when it does
/// not parse, which then matches only the same text.
pub fn origin_of(url: &str) -> String {
    match Url::parse(url) {
        Ok(parsed) if parsed.has_host() => parsed.origin().ascii_serialization(),
        _ => url.to_owned(),
    }
}

/// An opened seal.
#[derive(Debug, PartialEq)]
pub struct Opened {
    pub grant: SealedGrant,
    /// `None` for a seal made before seals carried a binding: it is bound
    /// to the connection's UID only, and sealed anew on the next write.
    pub binding: Option<Binding>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpenError {
    #[error(
        "it was sealed with key {0}, which the operator's key Secret does not hold (was the \
         Secret deleted or replaced? restore it from a backup)"
    )]
    OtherKey(String),
    #[error("it does not open for this connection (copied from another one, or altered)")]
    Rejected,
    #[error("it is not in tokenkeeper's format")]
    Malformed,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyringError {
    #[error("entry {0:?} does not hold a 32-byte key")]
    BadKey(String),
    #[error("it holds no sealing key (an entry {KEY_FIELD:?} or \"key-N\")")]
    NoKey,
}

struct SymmetricKey {
    id: String,
    key: LessSafeKey,
}

/// The operator's keys: every sealing key it has had (the newest seals,
/// all open) and the X25519 key that opens seals made by the kubectl plugin.
pub struct Keyring {
    /// Oldest first.
    symmetric: Vec<SymmetricKey>,
    exchange: Option<StaticSecret>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "keys",
                &self.symmetric.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .field("exchange", &self.exchange.is_some())
            .finish()
    }
}

/// The order of a key Secret's entry among sealing keys: `key` is 1,
/// `key-N` is N; other entries are not sealing keys.
pub fn key_number(entry: &str) -> Option<u32> {
    if entry == KEY_FIELD {
        return Some(1);
    }
    entry
        .strip_prefix("key-")
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
}

fn key_id(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn aes_key(bytes: &[u8]) -> Option<LessSafeKey> {
    Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).ok()?))
}

impl Keyring {
    /// The keys of the key Secret's `data`.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<Self, KeyringError> {
        let mut numbered: Vec<(u32, &String, &ByteString)> = data
            .iter()
            .filter_map(|(entry, value)| Some((key_number(entry)?, entry, value)))
            .collect();
        numbered.sort_by_key(|(n, _, _)| *n);
        let symmetric = numbered
            .into_iter()
            .map(|(_, entry, value)| {
                let key = aes_key(&value.0).ok_or_else(|| KeyringError::BadKey(entry.clone()))?;
                Ok(SymmetricKey {
                    id: key_id(&value.0),
                    key,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if symmetric.is_empty() {
            return Err(KeyringError::NoKey);
        }
        let exchange = match data.get(EXCHANGE_KEY_FIELD) {
            None => None,
            Some(value) => {
                let bytes: [u8; 32] = value
                    .0
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyringError::BadKey(EXCHANGE_KEY_FIELD.to_owned()))?;
                Some(StaticSecret::from(bytes))
            }
        };
        Ok(Keyring {
            symmetric,
            exchange,
        })
    }

    /// A keyring of one new sealing key and a new X25519 key, as the data
    /// of a new key Secret.
    pub fn generate_data() -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (KEY_FIELD.to_owned(), ByteString(random::<32>().to_vec())),
            (
                EXCHANGE_KEY_FIELD.to_owned(),
                ByteString(random::<32>().to_vec()),
            ),
        ])
    }

    fn newest(&self) -> &SymmetricKey {
        self.symmetric.last().expect("a keyring has a sealing key")
    }

    /// The id of the key that seals.
    pub fn sealing_key_id(&self) -> &str {
        &self.newest().id
    }

    pub fn key_ids(&self) -> Vec<String> {
        self.symmetric.iter().map(|k| k.id.clone()).collect()
    }

    /// The public key the kubectl plugin seals to, as published.
    pub fn public_key(&self) -> Option<String> {
        let public = PublicKey::from(self.exchange.as_ref()?);
        Some(format!(
            "{PUBLIC_KEY_PREFIX}{}",
            STANDARD_NO_PAD.encode(public.as_bytes())
        ))
    }

    /// Seals `grant` with the newest key, for what `binding` names.
    pub fn seal(&self, grant: &SealedGrant, binding: &Binding) -> String {
        let key = self.newest();
        let header = STANDARD_NO_PAD.encode(serde_json::to_vec(binding).expect("serializes"));
        let plain = serde_json::to_vec(grant).expect("a grant serializes");
        let payload = seal_aes(&key.key, header.as_bytes(), plain);
        format!(
            "{FORMAT}.{}.{header}.{}",
            key.id,
            STANDARD_NO_PAD.encode(payload)
        )
    }

    /// Seals a short secret of the operator's own (a PKCE verifier) for
    /// `purpose` and the connection with UID `uid`.
    pub fn seal_text(&self, purpose: &str, uid: &str, text: &str) -> String {
        let key = self.newest();
        let payload = seal_aes(&key.key, &text_aad(purpose, uid), text.as_bytes().to_vec());
        format!(
            "{TEXT_FORMAT}.{}.{}",
            key.id,
            STANDARD_NO_PAD.encode(payload)
        )
    }

    /// Opens what `seal_text` sealed for the same purpose and UID.
    pub fn open_text(&self, purpose: &str, uid: &str, sealed: &str) -> Option<String> {
        let [TEXT_FORMAT, id, body] = sealed.split('.').collect::<Vec<_>>()[..] else {
            return None;
        };
        let plain = self
            .open_symmetric(id, &text_aad(purpose, uid), body)
            .ok()?;
        String::from_utf8(plain).ok()
    }

    /// Whether `sealed` is a seal of today's format by the newest key: an
    /// unchanged grant keeps such a seal, any other is sealed anew.
    pub fn is_current(&self, sealed: &str) -> bool {
        let mut parts = sealed.splitn(3, '.');
        parts.next() == Some(FORMAT) && parts.next() == Some(self.newest().id.as_str())
    }

    /// The grant sealed in `target`'s annotation; `None` when it carries
    /// none.
    pub fn open_grant(&self, target: &Secret, uid: &str) -> Result<Option<Opened>, OpenError> {
        match target.annotations().get(ANNOTATION_SEALED_GRANT) {
            Some(sealed) => self.open(sealed, uid).map(Some),
            None => Ok(None),
        }
    }

    /// Opens a seal of any format. `uid` is the connection's, for seals
    /// made before they named what they are bound to.
    pub fn open(&self, sealed: &str, uid: &str) -> Result<Opened, OpenError> {
        let parts: Vec<&str> = sealed.split('.').collect();
        match parts.as_slice() {
            [LEGACY_FORMAT, id, body] => {
                let plain = self.open_symmetric(id, uid.as_bytes(), body)?;
                Ok(Opened {
                    grant: serde_json::from_slice(&plain).map_err(|_| OpenError::Malformed)?,
                    binding: None,
                })
            }
            [FORMAT, id, header, body] => {
                let plain = self.open_symmetric(id, header.as_bytes(), body)?;
                opened(header, &plain)
            }
            [PUBLIC_FORMAT, id, header, body] => {
                let plain = self.open_exchanged(id, header, body)?;
                opened(header, &plain)
            }
            _ => Err(OpenError::Malformed),
        }
    }

    fn open_symmetric(&self, id: &str, aad: &[u8], body: &str) -> Result<Vec<u8>, OpenError> {
        let key = self
            .symmetric
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| OpenError::OtherKey(id.to_owned()))?;
        let payload = STANDARD_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Malformed)?;
        open_aes(&key.key, aad, payload)
    }

    fn open_exchanged(&self, id: &str, header: &str, body: &str) -> Result<Vec<u8>, OpenError> {
        let secret = self
            .exchange
            .as_ref()
            .ok_or_else(|| OpenError::OtherKey(id.to_owned()))?;
        let public = PublicKey::from(secret);
        if key_id(public.as_bytes()) != id {
            return Err(OpenError::OtherKey(id.to_owned()));
        }
        let mut payload = STANDARD_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Malformed)?;
        if payload.len() < 32 {
            return Err(OpenError::Malformed);
        }
        let rest = payload.split_off(32);
        let ephemeral: [u8; 32] = payload.try_into().map_err(|_| OpenError::Malformed)?;
        let ephemeral = PublicKey::from(ephemeral);
        let shared = secret.diffie_hellman(&ephemeral);
        let key = exchange_key(shared.as_bytes(), &ephemeral, &public)?;
        open_aes(&key, header.as_bytes(), rest)
    }
}

fn text_aad(purpose: &str, uid: &str) -> Vec<u8> {
    let mut aad = purpose.as_bytes().to_vec();
    aad.push(0);
    aad.extend_from_slice(uid.as_bytes());
    aad
}

fn opened(header: &str, plain: &[u8]) -> Result<Opened, OpenError> {
    let binding = STANDARD_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(OpenError::Malformed)?;
    Ok(Opened {
        grant: serde_json::from_slice(plain).map_err(|_| OpenError::Malformed)?,
        binding: Some(binding),
    })
}

/// `plain` sealed with a fresh nonce, the nonce first: what `open_aes`
/// opens.
fn seal_aes(key: &LessSafeKey, aad: &[u8], mut plain: Vec<u8>) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut plain,
    )
    .expect("sealing a small message cannot fail");
    let mut payload = nonce.to_vec();
    payload.extend(plain);
    payload
}

fn open_aes(key: &LessSafeKey, aad: &[u8], mut payload: Vec<u8>) -> Result<Vec<u8>, OpenError> {
    if payload.len() < NONCE_LEN {
        return Err(OpenError::Malformed);
    }
    let mut ciphertext = payload.split_off(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(&payload).map_err(|_| OpenError::Malformed)?;
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut ciphertext)
        .map_err(|_| OpenError::Rejected)?;
    Ok(plain.to_vec())
}

/// The AES key of an X25519 exchange: HKDF-SHA256 over the shared secret,
/// salted with both public keys.
fn exchange_key(
    shared: &[u8; 32],
    ephemeral: &PublicKey,
    recipient: &PublicKey,
) -> Result<LessSafeKey, OpenError> {
    // An all-zero shared secret means a low-order point was sent.
    if shared.iter().all(|b| *b == 0) {
        return Err(OpenError::Rejected);
    }
    let mut salt = ephemeral.as_bytes().to_vec();
    salt.extend_from_slice(recipient.as_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let okm = prk
        .expand(&[HKDF_INFO], &AES_256_GCM)
        .map_err(|_| OpenError::Rejected)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "the connection's status.grantSealingKey is not an X25519 public key in tokenkeeper's format \
     (is the operator older than this plugin?)"
)]
pub struct BadPublicKey;

/// Seals `grant` so that only the holder of the X25519 secret behind
/// `public_key` (as `Keyring::public_key` publishes it) can open it.
pub fn seal_to_public_key(
    public_key: &str,
    grant: &SealedGrant,
    binding: &Binding,
) -> Result<String, BadPublicKey> {
    let recipient: [u8; 32] = public_key
        .strip_prefix(PUBLIC_KEY_PREFIX)
        .and_then(|k| STANDARD_NO_PAD.decode(k).ok())
        .and_then(|k| k.try_into().ok())
        .ok_or(BadPublicKey)?;
    let recipient = PublicKey::from(recipient);
    let ephemeral_secret = StaticSecret::from(random::<32>());
    let ephemeral = PublicKey::from(&ephemeral_secret);
    let shared = ephemeral_secret.diffie_hellman(&recipient);
    let key = exchange_key(shared.as_bytes(), &ephemeral, &recipient).map_err(|_| BadPublicKey)?;
    let header = STANDARD_NO_PAD.encode(serde_json::to_vec(binding).expect("serializes"));
    let plain = serde_json::to_vec(grant).expect("a grant serializes");
    let mut payload = ephemeral.as_bytes().to_vec();
    payload.extend(seal_aes(&key, header.as_bytes(), plain));
    Ok(format!(
        "{PUBLIC_FORMAT}.{}.{header}.{}",
        key_id(recipient.as_bytes()),
        STANDARD_NO_PAD.encode(payload)
    ))
}

/// The keyring in use, replaced when the key Secret changes (a rotation).
#[derive(Clone)]
pub struct SharedKeyring(Arc<RwLock<Arc<Keyring>>>);

impl SharedKeyring {
    pub fn new(keyring: Keyring) -> Self {
        SharedKeyring(Arc::new(RwLock::new(Arc::new(keyring))))
    }

    pub fn current(&self) -> Arc<Keyring> {
        match self.0.read() {
            Ok(keyring) => keyring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, keyring: Keyring) {
        let keyring = Arc::new(keyring);
        match self.0.write() {
            Ok(mut current) => *current = keyring,
            Err(poisoned) => *poisoned.into_inner() = keyring,
        }
    }
}

impl fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.current().fmt(f)
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
            account: Some("ann@example.com".into()),
            consent: None,
            granted_at: None,
            redirect_values: BTreeMap::new(),
        }
    }

    fn binding(uid: &str) -> Binding {
        Binding {
            uid: uid.into(),
            token_origin: "https://idp.example".into(),
            client_id: "client".into(),
            revocation_origin: None,
            verification_origin: None,
            introspection_origin: None,
        }
    }

    fn keyring() -> (BTreeMap<String, ByteString>, Keyring) {
        let data = Keyring::generate_data();
        let keyring = Keyring::from_data(&data).unwrap();
        (data, keyring)
    }

    #[test]
    fn a_grant_opens_with_the_binding_it_was_sealed_for() {
        let (_, keys) = keyring();
        let sealed = keys.seal(&grant(), &binding("uid-a"));
        assert!(!sealed.contains("rt-secret-value"));
        let opened = keys.open(&sealed, "uid-a").unwrap();
        assert_eq!(opened.grant, grant());
        assert_eq!(opened.binding, Some(binding("uid-a")));
    }

    #[test]
    fn an_edited_binding_does_not_open() {
        let (_, keys) = keyring();
        let sealed = keys.seal(&grant(), &binding("uid-a"));
        let parts: Vec<&str> = sealed.split('.').collect();
        let forged = STANDARD_NO_PAD.encode(serde_json::to_vec(&binding("uid-b")).unwrap());
        let edited = format!("{}.{}.{forged}.{}", parts[0], parts[1], parts[3]);
        assert_eq!(keys.open(&edited, "uid-b"), Err(OpenError::Rejected));
    }

    #[test]
    fn changes_name_each_difference() {
        let sealed_for = binding("uid");
        assert!(sealed_for.changes_to(&binding("uid")).is_empty());
        let now = Binding {
            token_origin: "https://attacker.example".into(),
            client_id: "other".into(),
            revocation_origin: Some("https://attacker.example".into()),
            verification_origin: Some("https://attacker.example".into()),
            ..binding("uid")
        };
        let changes = sealed_for.changes_to(&now);
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert!(changes[0].contains("https://attacker.example"));
    }

    #[test]
    fn origins_ignore_paths_and_default_ports() {
        assert_eq!(
            origin_of("https://IdP.example:443/oauth/token?x=1"),
            "https://idp.example"
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080/token"),
            "http://127.0.0.1:8080"
        );
        assert_ne!(
            origin_of("https://idp.example.evil.test/token"),
            "https://idp.example"
        );
        assert_eq!(origin_of("not a url"), "not a url");
    }

    #[test]
    fn older_keys_open_and_the_newest_seals() {
        let (mut data, old) = keyring();
        let sealed_before = old.seal(&grant(), &binding("uid"));
        data.insert("key-2".into(), ByteString(random::<32>().to_vec()));
        let rotated = Keyring::from_data(&data).unwrap();
        assert_ne!(rotated.sealing_key_id(), old.sealing_key_id());
        assert_eq!(rotated.open(&sealed_before, "uid").unwrap().grant, grant());
        assert!(!rotated.is_current(&sealed_before));
        let sealed_after = rotated.seal(&grant(), &binding("uid"));
        assert!(rotated.is_current(&sealed_after));
        assert!(matches!(
            old.open(&sealed_after, "uid"),
            Err(OpenError::OtherKey(_))
        ));
    }

    #[test]
    fn key_entries_are_numbered() {
        assert_eq!(key_number("key"), Some(1));
        assert_eq!(key_number("key-12"), Some(12));
        assert_eq!(key_number("key-0"), None);
        assert_eq!(key_number("x25519"), None);
        let short = BTreeMap::from([("key".to_owned(), ByteString(vec![1; 5]))]);
        assert_eq!(
            Keyring::from_data(&short).unwrap_err(),
            KeyringError::BadKey("key".into())
        );
        assert_eq!(
            Keyring::from_data(&BTreeMap::new()).unwrap_err(),
            KeyringError::NoKey
        );
    }

    #[test]
    fn a_seal_to_the_public_key_opens_with_the_keyring_only() {
        let (_, keys) = keyring();
        let public = keys.public_key().unwrap();
        let sealed = seal_to_public_key(&public, &grant(), &binding("uid")).unwrap();
        assert!(!sealed.contains("rt-secret-value"));
        let opened = keys.open(&sealed, "uid").unwrap();
        assert_eq!(opened.grant, grant());
        assert_eq!(opened.binding, Some(binding("uid")));
        let (_, other) = keyring();
        assert!(matches!(
            other.open(&sealed, "uid"),
            Err(OpenError::OtherKey(_))
        ));
        assert_eq!(
            seal_to_public_key("x25519:short", &grant(), &binding("uid")),
            Err(BadPublicKey)
        );
    }

    #[test]
    fn legacy_seals_open_bound_to_the_uid() {
        let (data, keys) = keyring();
        let key = aes_key(&data[KEY_FIELD].0).unwrap();
        let payload = seal_aes(&key, b"uid", serde_json::to_vec(&grant()).unwrap());
        let legacy = format!(
            "v1.{}.{}",
            keys.sealing_key_id(),
            STANDARD_NO_PAD.encode(payload)
        );
        let opened = keys.open(&legacy, "uid").unwrap();
        assert_eq!((opened.grant, opened.binding), (grant(), None));
        assert_eq!(keys.open(&legacy, "other"), Err(OpenError::Rejected));
        assert!(!keys.is_current(&legacy));
    }

    #[test]
    fn a_sealed_text_opens_for_its_purpose_and_connection_only() {
        let (_, keys) = keyring();
        let sealed = keys.seal_text("pkce", "uid", "verifier-value");
        assert!(!sealed.contains("verifier-value"));
        assert_eq!(
            keys.open_text("pkce", "uid", &sealed).as_deref(),
            Some("verifier-value")
        );
        assert_eq!(keys.open_text("pkce", "other", &sealed), None);
        assert_eq!(keys.open_text("grant", "uid", &sealed), None);
        assert_eq!(keys.open_text("pkce", "uid", "verifier-value"), None);
        // Neither format opens as the other.
        assert!(keys.open(&sealed, "uid").is_err());
    }

    #[test]
    fn altered_or_foreign_text_is_refused() {
        let (_, keys) = keyring();
        let sealed = keys.seal(&grant(), &binding("uid"));
        let mut altered = sealed.clone();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(keys.open(&altered, "uid").is_err());
        for text in ["plain", "v2.a.b", "x1.a.b.c", "v2...", ""] {
            assert!(keys.open(text, "uid").is_err(), "{text}");
        }
        assert_ne!(
            keys.seal(&grant(), &binding("uid")),
            keys.seal(&grant(), &binding("uid"))
        );
    }
}
