//! What a watch listed since it (re)started. A watch that restarts lists
//! every object again between `Init` and `InitDone`, and sends no `Delete`
//! for objects deleted while it was down: whatever the new listing lacks is
//! gone. Each map the operator keeps per object follows its watch this way.

use std::collections::HashMap;

use kube::Resource;
use kube::runtime::watcher;

use crate::runtime::object_key::{Key, key_of};

/// The keys (with a value taken from each object) listed since the last
/// `Init`; `None` between listings.
pub struct Relisting<V> {
    listing: Option<HashMap<Key, V>>,
}

impl<V> Default for Relisting<V> {
    fn default() -> Self {
        Relisting { listing: None }
    }
}

impl<V> Relisting<V> {
    /// Follows `event`; at `InitDone`, returns everything listed since
    /// `Init` (`value` picks what to remember of each object, `None` skips
    /// it). A watch whose `Init` was not seen returns nothing.
    pub fn observe<K: Resource>(
        &mut self,
        event: &watcher::Event<K>,
        value: impl FnOnce(&K) -> Option<V>,
    ) -> Option<HashMap<Key, V>> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                None
            }
            watcher::Event::InitApply(object) => {
                if let Some(listing) = self.listing.as_mut()
                    && let Some(value) = value(object)
                {
                    listing.insert(key_of(object), value);
                }
                None
            }
            watcher::Event::InitDone => self.listing.take(),
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    fn named(name: &str) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.into());
        secret.metadata.namespace = Some("data".into());
        secret
    }

    #[test]
    fn a_listing_returns_what_it_listed_once_done() {
        let mut relisting = Relisting::default();
        let unit = |_: &Secret| Some(());
        assert!(
            relisting
                .observe(&watcher::Event::InitApply(named("early")), unit)
                .is_none()
        );
        assert!(
            relisting
                .observe(&watcher::Event::<Secret>::Init, unit)
                .is_none()
        );
        relisting.observe(&watcher::Event::InitApply(named("a")), unit);
        relisting.observe(&watcher::Event::InitApply(named("b")), |_| None);
        let listed = relisting
            .observe(&watcher::Event::<Secret>::InitDone, unit)
            .unwrap();
        assert_eq!(
            listed.into_keys().collect::<Vec<_>>(),
            [Key::from("data/a")]
        );
        assert!(
            relisting
                .observe(&watcher::Event::<Secret>::InitDone, unit)
                .is_none(),
            "a second InitDone without Init lists nothing"
        );
    }
}
