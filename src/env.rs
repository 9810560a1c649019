//! The environment new processes get: variables the daemon sets itself (internal) and those
//! the control plane sends in `/init` (user), as envd keeps them (reference §1.7).

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Internal variable telling programs they run inside a sandbox.
pub const SANDBOX_VAR: &str = "E2B_SANDBOX";

#[derive(Debug, Default)]
struct Vars {
    internal: BTreeMap<String, String>,
    user: BTreeMap<String, String>,
}

/// Internal and user variables. Internal ones win: a user variable with an internal name is
/// ignored.
#[derive(Debug, Default)]
pub struct EnvStore {
    vars: RwLock<Vars>,
}

impl EnvStore {
    /// A store holding the daemon's internal variables.
    pub fn new() -> Self {
        let store = EnvStore::default();
        store.set_internal(SANDBOX_VAR, "true");
        store
    }

    /// Sets an internal variable (promoting a user variable of the same name).
    pub fn set_internal(&self, key: &str, value: &str) {
        let mut vars = self
            .vars
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        vars.user.remove(key);
        vars.internal.insert(key.to_owned(), value.to_owned());
    }

    /// Replaces every user variable with `vars` (keys absent from it are deleted); keys
    /// that name internal variables are ignored.
    pub fn replace_user(&self, new: &BTreeMap<String, String>) {
        let mut vars = self
            .vars
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let user = new
            .iter()
            .filter(|(key, _)| !vars.internal.contains_key(*key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.user = user;
    }

    /// The user variables alone (what `/init` set).
    pub fn user_vars(&self) -> BTreeMap<String, String> {
        self.vars
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .user
            .clone()
    }

    /// Every variable, internal and user, sorted by name.
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        let vars = self
            .vars
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all = vars.user.clone();
        all.extend(vars.internal.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_vars_are_replaced_and_never_shadow_internal_ones() {
        let store = EnvStore::new();
        let first: BTreeMap<_, _> = [("A", "1"), ("B", "2"), (SANDBOX_VAR, "false")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        store.replace_user(&first);
        let snapshot = store.snapshot();
        assert_eq!(snapshot.get("A").map(String::as_str), Some("1"));
        assert_eq!(snapshot.get(SANDBOX_VAR).map(String::as_str), Some("true"));
        store.replace_user(&[("C".to_owned(), "3".to_owned())].into());
        let snapshot = store.snapshot();
        assert!(!snapshot.contains_key("A"), "replace, not merge");
        assert_eq!(snapshot.get("C").map(String::as_str), Some("3"));
    }
}
