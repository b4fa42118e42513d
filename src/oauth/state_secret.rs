//! The operator-private state Secret of an OAuth 2.0 connection
//! (`<name>-tokenkeeper-state`): a consent in progress (the pending
//! authorization) and a grant just given on the consent page or by `kubectl
//! tokenkeeper authorize`, until the leader moves it, sealed, into the
//! target Secret. Pure: Secret data in and out, and the callback's checks.

use std::collections::BTreeMap;
use std::fmt;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;

use crate::api::OAuth2Auth;
use crate::decide::refresh::Limits;
use crate::decide::validate::oauth_settings;
use crate::error::Error;
use crate::oauth::seal::SealedGrant;
use crate::oauth::token::{
    ANNOTATION_ISSUED_AT, ANNOTATION_LIFETIME_ASSUMED, ANNOTATION_ODDITIES,
    ANNOTATION_REQUEST_HASH, ANNOTATION_VERIFICATION_DENIED, IssuedToken, KEY_ISSUED_AT,
    KEY_LIFETIME_ASSUMED, KEY_ODDITIES, KEY_REQUEST_HASH, KEY_VERIFICATION_DENIED, TokenRecord,
    fingerprint, get, put, request_fingerprint,
};
use crate::time::rfc3339;

/// The state Secret's key holding a consented grant, sealed.
pub const KEY_SEALED_GRANT: &str = "sealed_grant";
/// Keys of the state Secret that belong to a pending authorization.
pub const PENDING_PREFIX: &str = "pending_authorization_";
const PENDING_STATE_HASH: &str = "pending_authorization_state_sha256";
const PENDING_VERIFIER: &str = "pending_authorization_pkce_verifier";
const PENDING_EXPIRES_AT: &str = "pending_authorization_expires_at";
const PENDING_UID: &str = "pending_authorization_uid";
/// Hash of the cookie of the browser that started the authorization.
const PENDING_BROWSER_HASH: &str = "pending_authorization_browser_sha256";
const PENDING_KEYS: [&str; 5] = [
    PENDING_STATE_HASH,
    PENDING_VERIFIER,
    PENDING_EXPIRES_AT,
    PENDING_UID,
    PENDING_BROWSER_HASH,
];
/// Keys of the link ticket: the hash of the single-use secret in the
/// authorization link that the connection's status shows, and its expiry.
const TICKET_PREFIX: &str = "authorization_ticket_";
const TICKET_HASH: &str = "authorization_ticket_sha256";
const TICKET_EXPIRES_AT: &str = "authorization_ticket_expires_at";
/// The ticket itself, sealed with the operator's key, so that a reconcile
/// that does not see the status with the link yet shows the same link
/// instead of a new one that would void it.
const TICKET_SEALED: &str = "authorization_ticket_sealed";

/// What the operator keeps for a grant with a refresh token.
#[derive(Clone, Default, PartialEq)]
pub struct GrantState {
    pub refresh_token: Option<String>,
    pub refresh_token_expires_at: Option<Timestamp>,
    /// Fingerprint of the user-supplied refresh token last imported, so a
    /// new one supplied later replaces the grant.
    pub imported_hash: Option<String>,
    /// The provider account the grant is for, when it said so.
    pub account: Option<String>,
    /// Fingerprint of the sealed grant as stored (`from_data`): which
    /// consent this is.
    pub consent_id: Option<String>,
    /// What the provider sent in the consent's redirect (`redirectFields`).
    pub redirect_values: BTreeMap<String, String>,
    /// The newest access token, persisted together with the refresh token.
    pub token: Option<TokenRecord>,
}

impl fmt::Debug for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantState")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("refresh_token_expires_at", &self.refresh_token_expires_at)
            .field("token", &self.token)
            .finish()
    }
}

impl GrantState {
    /// The grant part, as it is sealed.
    pub fn grant(&self) -> Option<SealedGrant> {
        Some(SealedGrant {
            refresh_token: self.refresh_token.clone()?,
            refresh_token_expires_at: self.refresh_token_expires_at,
            imported_hash: self.imported_hash.clone(),
            account: self.account.clone(),
            consent: None,
            granted_at: None,
            redirect_values: self.redirect_values.clone(),
        })
    }

    /// The state Secret's data; the grant goes in sealed by `seal`, never
    /// in plaintext.
    pub fn to_data(
        &self,
        seal: impl FnOnce(&SealedGrant) -> String,
    ) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        if let Some(grant) = self.grant() {
            put(&mut data, KEY_SEALED_GRANT, &seal(&grant));
        }
        if let Some(token) = &self.token {
            data.extend(token.target_data());
            put(&mut data, KEY_ISSUED_AT, &rfc3339(token.issued_at));
            put(&mut data, KEY_REQUEST_HASH, &token.request_hash);
            if token.lifetime_assumed {
                put(&mut data, KEY_LIFETIME_ASSUMED, "true");
            }
            if let Some(denied) = &token.verification_denied {
                put(&mut data, KEY_VERIFICATION_DENIED, denied);
            }
            if let Some(oddities) = &token.oddities {
                put(&mut data, KEY_ODDITIES, oddities);
            }
        }
        data
    }

    /// What the state Secret's `data` holds; the sealed grant counts only
    /// when `open` opens it (and finds it bound to this connection as it is).
    pub fn from_data(
        data: &BTreeMap<String, ByteString>,
        field_names: &[String],
        open: impl FnOnce(&str) -> Option<SealedGrant>,
    ) -> Self {
        let token = (|| {
            let mut annotations = BTreeMap::new();
            annotations.insert(ANNOTATION_ISSUED_AT.to_owned(), get(data, KEY_ISSUED_AT)?);
            annotations.insert(
                ANNOTATION_REQUEST_HASH.to_owned(),
                get(data, KEY_REQUEST_HASH)?,
            );
            if let Some(assumed) = get(data, KEY_LIFETIME_ASSUMED) {
                annotations.insert(ANNOTATION_LIFETIME_ASSUMED.to_owned(), assumed);
            }
            if let Some(denied) = get(data, KEY_VERIFICATION_DENIED) {
                annotations.insert(ANNOTATION_VERIFICATION_DENIED.to_owned(), denied);
            }
            if let Some(oddities) = get(data, KEY_ODDITIES) {
                annotations.insert(ANNOTATION_ODDITIES.to_owned(), oddities);
            }
            TokenRecord::from_target(data, &annotations, field_names)
        })();
        let sealed = get(data, KEY_SEALED_GRANT);
        let consent_id = sealed.as_deref().map(|s| fingerprint(&[s]));
        let grant = sealed
            .and_then(|sealed| open(&sealed))
            .filter(|g| !g.refresh_token.is_empty());
        GrantState {
            refresh_token: grant.as_ref().map(|g| g.refresh_token.clone()),
            refresh_token_expires_at: grant.as_ref().and_then(|g| g.refresh_token_expires_at),
            imported_hash: grant.as_ref().and_then(|g| g.imported_hash.clone()),
            account: grant.as_ref().and_then(|g| g.account.clone()),
            redirect_values: grant
                .as_ref()
                .map(|g| g.redirect_values.clone())
                .unwrap_or_default(),
            consent_id: grant.and(consent_id),
            token,
        }
    }
}

/// The grant a person just gave on the consent page (through the
/// operator's callback or `kubectl tokenkeeper authorize`), ready to be
/// stored in the state Secret.
pub fn consented_grant(
    oauth: &OAuth2Auth,
    limits: &Limits,
    issued: &IssuedToken,
    refresh_token: String,
    client_id: &str,
    now: Timestamp,
) -> Result<GrantState, Error> {
    let settings = oauth_settings(oauth, limits)?;
    let record = TokenRecord::issued(
        now,
        issued,
        settings.lifetimes(),
        (!oauth.scopes.is_empty()).then(|| oauth.scopes.join(" ")),
        &oauth.response_fields,
        &request_fingerprint(oauth, client_id),
    );
    Ok(GrantState {
        refresh_token: Some(refresh_token),
        refresh_token_expires_at: issued.refresh_token_expires_at(record.issued_at),
        imported_hash: None,
        account: issued.account(),
        consent_id: None,
        redirect_values: BTreeMap::new(),
        token: Some(record),
    })
}

/// The longest value kept of what a redirect carried.
const REDIRECT_VALUE_MAX: usize = 256;

/// The values of `fields` a consent's redirect carried in its `query`:
/// bounded, without control characters.
pub fn redirect_values(
    fields: &[String],
    query: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    fields
        .iter()
        .filter_map(|field| {
            let value: String = query
                .get(field)?
                .chars()
                .filter(|c| !c.is_control())
                .take(REDIRECT_VALUE_MAX)
                .collect();
            (!value.is_empty()).then(|| (field.clone(), value))
        })
        .collect()
}

/// The state Secret's data less any pending authorization.
pub fn without_pending(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    data.iter()
        .filter(|(key, _)| !key.starts_with(PENDING_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Only the pending authorization and the link ticket of the state
/// Secret's data: what stays once a consented grant is adopted.
pub fn only_pending(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    data.iter()
        .filter(|(key, _)| key.starts_with(PENDING_PREFIX) || key.starts_with(TICKET_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// A consent in progress: started at `/authorize`, answered at `/callback`.
/// Only a hash of `state` is kept.
#[derive(Clone, PartialEq)]
pub struct PendingAuthorization {
    state_hash: String,
    pub pkce_verifier: String,
    expires_at: Option<Timestamp>,
    uid: Option<String>,
    browser_hash: Option<String>,
}

impl fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("expires_at", &self.expires_at)
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

impl PendingAuthorization {
    /// An authorization started by the browser holding cookie `browser`.
    pub fn new(
        state: &str,
        pkce_verifier: String,
        expires_at: Timestamp,
        uid: String,
        browser: &str,
    ) -> Self {
        PendingAuthorization {
            state_hash: fingerprint(&[state]),
            pkce_verifier,
            expires_at: Some(expires_at),
            uid: Some(uid),
            browser_hash: Some(fingerprint(&[browser])),
        }
    }

    /// `data` with this authorization in place of any earlier one.
    pub fn store_in(&self, data: &mut BTreeMap<String, ByteString>) {
        put(data, PENDING_STATE_HASH, &self.state_hash);
        put(data, PENDING_VERIFIER, &self.pkce_verifier);
        if let Some(at) = self.expires_at {
            put(data, PENDING_EXPIRES_AT, &rfc3339(at));
        }
        put(data, PENDING_UID, self.uid.as_deref().unwrap_or_default());
        put(
            data,
            PENDING_BROWSER_HASH,
            self.browser_hash.as_deref().unwrap_or_default(),
        );
    }

    fn read(data: &BTreeMap<String, ByteString>) -> Option<Self> {
        Some(PendingAuthorization {
            state_hash: get(data, PENDING_STATE_HASH)?,
            pkce_verifier: get(data, PENDING_VERIFIER).unwrap_or_default(),
            expires_at: get(data, PENDING_EXPIRES_AT).and_then(|t| t.parse().ok()),
            uid: get(data, PENDING_UID),
            browser_hash: get(data, PENDING_BROWSER_HASH),
        })
    }
}

/// Removes the pending authorization from the state Secret's data.
pub fn clear_pending(data: &mut BTreeMap<String, ByteString>) {
    for key in PENDING_KEYS {
        data.remove(key);
    }
}

/// Why a callback cannot complete the authorization in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackRefusal {
    /// Nothing is pending: completed already, or never started.
    NothingPending,
    /// `state` is not the one this authorization was started with.
    StateMismatch,
    /// The connection was deleted and made again under its name.
    ConnectionReplaced,
    /// Started longer ago than the authorization's time to live; the
    /// pending authorization is to be cleared.
    Expired,
    /// The answer came to a browser other than the one that started the
    /// authorization (no cookie, or another one): a replayed or planted
    /// code.
    OtherBrowser,
}

impl fmt::Display for CallbackRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallbackRefusal::NothingPending => {
                "This authorization was already completed, or was never started."
            }
            CallbackRefusal::StateMismatch => {
                "This answer does not match the authorization in progress (a forged or outdated \
                 link)."
            }
            CallbackRefusal::ConnectionReplaced => {
                "The SourceConnection was replaced since this authorization started."
            }
            CallbackRefusal::Expired => "This authorization took too long and expired.",
            CallbackRefusal::OtherBrowser => {
                "This answer did not come back to the browser that started the authorization."
            }
        })
    }
}

/// Checks a callback's `state` against the pending authorization in the
/// state Secret's `data`, for the connection whose UID is `uid` now and
/// the browser that sent cookie `browser`.
pub fn check_callback(
    data: &BTreeMap<String, ByteString>,
    state: &str,
    uid: Option<&str>,
    browser: Option<&str>,
    now: Timestamp,
) -> Result<PendingAuthorization, CallbackRefusal> {
    let pending = PendingAuthorization::read(data).ok_or(CallbackRefusal::NothingPending)?;
    if pending.state_hash != fingerprint(&[state]) {
        return Err(CallbackRefusal::StateMismatch);
    }
    let same_browser = match (&pending.browser_hash, browser) {
        (Some(hash), Some(cookie)) => *hash == fingerprint(&[cookie]),
        _ => false,
    };
    if !same_browser {
        return Err(CallbackRefusal::OtherBrowser);
    }
    if pending.uid.as_deref() != uid {
        return Err(CallbackRefusal::ConnectionReplaced);
    }
    if pending.expires_at.is_none_or(|at| at <= now) {
        return Err(CallbackRefusal::Expired);
    }
    Ok(pending)
}

/// A secret for an authorization link: 32 random bytes, URL-safe.
pub fn new_ticket() -> String {
    oauth2::CsrfToken::new_random_len(32).secret().clone()
}

/// Keeps `ticket` as the connection's link ticket until `expires_at`.
pub fn store_ticket(
    data: &mut BTreeMap<String, ByteString>,
    ticket: &str,
    sealed: &str,
    expires_at: Timestamp,
) {
    put(
        data,
        TICKET_HASH,
        &fingerprint(&["authorization-ticket", ticket]),
    );
    put(data, TICKET_SEALED, sealed);
    put(data, TICKET_EXPIRES_AT, &rfc3339(expires_at));
}

/// The sealed ticket `store_ticket` kept.
pub fn sealed_ticket(data: &BTreeMap<String, ByteString>) -> Option<String> {
    get(data, TICKET_SEALED)
}

/// Whether `ticket` is the connection's link ticket and valid for at
/// least `margin` after `now`.
pub fn ticket_valid(
    data: &BTreeMap<String, ByteString>,
    ticket: &str,
    now: Timestamp,
    margin: SignedDuration,
) -> bool {
    let stored = get(data, TICKET_HASH);
    let expires_at: Option<Timestamp> = get(data, TICKET_EXPIRES_AT).and_then(|t| t.parse().ok());
    let hash = fingerprint(&["authorization-ticket", ticket]);
    stored.is_some_and(|stored| constant_time_eq(stored.as_bytes(), hash.as_bytes()))
        && expires_at
            .zip(now.checked_add(margin).ok())
            .is_some_and(|(at, until)| at > until)
}

/// Uses the link ticket up: a link opens one authorization.
pub fn remove_ticket(data: &mut BTreeMap<String, ByteString>) {
    data.remove(TICKET_HASH);
    data.remove(TICKET_EXPIRES_AT);
    data.remove(TICKET_SEALED);
}

/// Compares without telling, by its timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn started(state: &str) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        put(&mut data, KEY_SEALED_GRANT, "kept");
        PendingAuthorization::new(
            state,
            "verifier".into(),
            at(600),
            "uid-1".into(),
            "cookie-1",
        )
        .store_in(&mut data);
        data
    }

    #[test]
    fn the_callback_of_the_pending_authorization_passes() {
        let pending = check_callback(
            &started("ns:c:r1"),
            "ns:c:r1",
            Some("uid-1"),
            Some("cookie-1"),
            at(10),
        );
        assert_eq!(pending.unwrap().pkce_verifier, "verifier");
    }

    #[test]
    fn each_refusal_has_its_own_cause() {
        let data = started("ns:c:r1");
        let check = |state, uid, now| check_callback(&data, state, uid, Some("cookie-1"), at(now));
        assert_eq!(
            check("ns:c:forged", Some("uid-1"), 10),
            Err(CallbackRefusal::StateMismatch)
        );
        assert_eq!(
            check("ns:c:r1", Some("uid-2"), 10),
            Err(CallbackRefusal::ConnectionReplaced)
        );
        assert_eq!(
            check("ns:c:r1", None, 10),
            Err(CallbackRefusal::ConnectionReplaced)
        );
        assert_eq!(
            check("ns:c:r1", Some("uid-1"), 600),
            Err(CallbackRefusal::Expired)
        );
        let mut done = data.clone();
        clear_pending(&mut done);
        assert_eq!(
            check_callback(&done, "ns:c:r1", Some("uid-1"), Some("cookie-1"), at(10)),
            Err(CallbackRefusal::NothingPending)
        );
        assert_eq!(get(&done, KEY_SEALED_GRANT).as_deref(), Some("kept"));
    }

    #[test]
    fn only_the_named_redirect_values_are_kept_bounded() {
        let query = BTreeMap::from([
            ("realmId".to_owned(), "9130\u{1b}3".to_owned()),
            ("code".to_owned(), "secret-code".to_owned()),
            ("long".to_owned(), "x".repeat(1000)),
        ]);
        let kept = redirect_values(&["realmId".into(), "long".into(), "absent".into()], &query);
        assert_eq!(kept["realmId"], "91303");
        assert_eq!(kept["long"].len(), 256);
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn a_forgery_is_checked_before_anything_else_is_told() {
        // A forged state on an expired authorization of a replaced
        // connection learns only that it does not match.
        let data = started("ns:c:r1");
        assert_eq!(
            check_callback(&data, "ns:c:guess", Some("other"), None, at(10_000)),
            Err(CallbackRefusal::StateMismatch)
        );
    }

    #[test]
    fn an_answer_to_another_browser_stores_nothing() {
        let data = started("ns:c:r1");
        for browser in [None, Some("cookie-2"), Some("")] {
            assert_eq!(
                check_callback(&data, "ns:c:r1", Some("uid-1"), browser, at(10)),
                Err(CallbackRefusal::OtherBrowser),
                "{browser:?}"
            );
        }
    }

    #[test]
    fn a_link_ticket_is_valid_until_it_expires_or_is_used() {
        let mut data = started("s");
        let hour = SignedDuration::from_hours(1);
        assert!(!ticket_valid(&data, "t-1", at(0), hour), "none stored");
        store_ticket(&mut data, "t-1", "sealed-t-1", at(7_200));
        assert!(ticket_valid(&data, "t-1", at(0), hour));
        assert!(!ticket_valid(&data, "t-2", at(0), hour));
        assert!(
            !ticket_valid(&data, "t-1", at(3_600), hour),
            "within the margin"
        );
        assert!(ticket_valid(&data, "t-1", at(3_600), SignedDuration::ZERO));
        assert!(!ticket_valid(&data, "t-1", at(7_200), SignedDuration::ZERO));
        assert_eq!(sealed_ticket(&data).as_deref(), Some("sealed-t-1"));
        assert_eq!(only_pending(&data).len(), PENDING_KEYS.len() + 3);
        remove_ticket(&mut data);
        assert!(!ticket_valid(&data, "t-1", at(0), hour), "used");
        assert_ne!(new_ticket(), new_ticket());
        assert!(new_ticket().len() >= 40);
    }

    #[test]
    fn pending_and_grant_keys_split_apart() {
        let data = started("s");
        assert_eq!(
            without_pending(&data).keys().collect::<Vec<_>>(),
            [KEY_SEALED_GRANT]
        );
        assert_eq!(only_pending(&data).len(), PENDING_KEYS.len());
    }
}
