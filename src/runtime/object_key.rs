//! The key of the operator's per-object maps: `namespace/name` in one
//! allocation rather than two Strings, which at scale is megabytes.
//! Neither part of a Kubernetes object's name contains a slash, so the key
//! splits back.

use kube::Resource;

pub type Key = Box<str>;

pub fn key(namespace: &str, name: &str) -> Key {
    format!("{namespace}/{name}").into_boxed_str()
}

pub fn key_of(object: &impl Resource) -> Key {
    key(
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default(),
    )
}

/// The namespace and the name of `key`.
pub fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_splits_back_into_namespace_and_name() {
        assert_eq!(
            split(&key("data", "crm-credentials")),
            ("data", "crm-credentials")
        );
        assert_eq!(split(&key("", "cluster-wide")), ("", "cluster-wide"));
    }
}
