//! Each VM's own memory of recent answers: a hit costs no shared-data read (each data-returning
//! host call costs about a microsecond in Envoy). Entries live until the shared entry's refresh
//! window opens, so a refresh, a logout or a new secret is seen by every VM within one TTL tenth.

use crate::cache::TokenHash;
use std::cell::RefCell;

/// Size of the table (a power of two). 4096 slots of ~40 bytes plus the user IDs.
pub const LOCAL_SLOTS: usize = 4096;

struct Local {
    hash: TokenHash,
    refresh_at: u64,
    user: Box<str>,
}

pub struct Memory {
    slots: RefCell<Vec<Option<Local>>>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            slots: RefCell::new((0..LOCAL_SLOTS).map(|_| None).collect()),
        }
    }
}

impl Memory {
    /// The user remembered for `hash`, while `now` is before its refresh window; `f` sees it
    /// without a copy.
    pub fn with_user<R>(&self, hash: &TokenHash, now: u64, f: impl FnOnce(&str) -> R) -> Option<R> {
        let slots = self.slots.try_borrow().ok()?;
        match slots.get(hash.local_index(LOCAL_SLOTS)) {
            Some(Some(e)) if e.hash == *hash && now < e.refresh_at => Some(f(&e.user)),
            _ => None,
        }
    }

    pub fn remember(&self, hash: &TokenHash, refresh_at: u64, user: &str, now: u64) {
        if now >= refresh_at {
            return;
        }
        if let Ok(mut slots) = self.slots.try_borrow_mut() {
            if let Some(slot) = slots.get_mut(hash.local_index(LOCAL_SLOTS)) {
                *slot = Some(Local {
                    hash: *hash,
                    refresh_at,
                    user: user.into(),
                });
            }
        }
    }

    pub fn forget(&self, hash: &TokenHash) {
        if let Ok(mut slots) = self.slots.try_borrow_mut() {
            if let Some(slot) = slots.get_mut(hash.local_index(LOCAL_SLOTS)) {
                if slot.as_ref().is_some_and(|e| e.hash == *hash) {
                    *slot = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Secret;

    #[test]
    fn remembers_until_the_refresh_window() {
        let secret = Secret::from_bytes(&[3; 16]).unwrap();
        let (a, b) = (secret.hash(b"a"), secret.hash(b"b"));
        let m = Memory::default();
        m.remember(&a, 100, "@a:x", 10);
        assert_eq!(m.with_user(&a, 99, str::to_string), Some("@a:x".into()));
        assert_eq!(m.with_user(&a, 100, str::to_string), None);
        assert_eq!(m.with_user(&b, 10, str::to_string), None);
        m.forget(&b);
        assert!(m.with_user(&a, 50, |_| ()).is_some());
        m.forget(&a);
        assert!(m.with_user(&a, 50, |_| ()).is_none());
        m.remember(&a, 100, "@a:x", 100);
        assert!(m.with_user(&a, 50, |_| ()).is_none());
    }
}
