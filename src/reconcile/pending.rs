//! Grants that exist only in this process: the provider issued them (a
//! rotated refresh token, often with a new access token), and the write that
//! would store them has not succeeded yet, for example because the API
//! server is down. The provider may already have revoked the refresh token
//! they replace, so losing one loses the grant. They are kept until a write
//! stores them, retried with the reconcile's backoff for as long as the
//! process lives; meanwhile the connection sends no token request.

use std::collections::HashMap;
use std::sync::Mutex;

use jiff::Timestamp;

use crate::oauth::seal::SealedGrant;
use crate::oauth::token::TokenRecord;
use crate::runtime::object_key::Key;

/// A grant to store, with what goes into the same write.
#[derive(Clone, Debug)]
pub struct PendingGrant {
    /// The connection it belongs to: a connection made again under the
    /// same name does not inherit it.
    pub uid: String,
    pub grant: SealedGrant,
    /// The token issued with it, if any.
    pub record: Option<TokenRecord>,
    /// When `record` is due for refresh.
    pub due: Option<Timestamp>,
}

#[derive(Default)]
pub struct PendingGrants(Mutex<HashMap<Key, PendingGrant>>);

impl PendingGrants {
    pub fn keep(&self, key: Key, pending: PendingGrant) {
        self.lock().insert(key, pending);
    }

    /// The grant waiting for `key`'s connection (whose UID is `uid`).
    pub fn get(&self, key: &Key, uid: &str) -> Option<PendingGrant> {
        self.lock().get(key).filter(|p| p.uid == uid).cloned()
    }

    pub fn has(&self, key: &Key) -> bool {
        self.lock().contains_key(key)
    }

    /// A write stored `key`'s grant.
    pub fn stored(&self, key: &Key) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, PendingGrant>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(uid: &str, refresh_token: &str) -> PendingGrant {
        PendingGrant {
            uid: uid.into(),
            grant: SealedGrant {
                refresh_token: refresh_token.into(),
                ..SealedGrant::default()
            },
            record: None,
            due: None,
        }
    }

    #[test]
    fn a_pending_grant_is_kept_until_stored_and_only_for_its_connection() {
        let grants = PendingGrants::default();
        let key = Key::from("data/crm");
        grants.keep(key.clone(), pending("uid-1", "rt-1"));
        grants.keep(key.clone(), pending("uid-1", "rt-2"));
        let kept = grants.get(&key, "uid-1").unwrap();
        assert_eq!(kept.grant.refresh_token, "rt-2", "the newest one");
        assert!(grants.get(&key, "uid-2").is_none(), "another connection");
        grants.stored(&key);
        assert!(grants.get(&key, "uid-1").is_none());
    }
}
