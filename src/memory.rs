//! Each VM's own memory of recent answers: a hit costs no shared-data read (each data-returning
//! host call costs about a microsecond in Envoy). Entries live until the shared entry's refresh
//! window opens, so a refresh, a logout or a new secret is seen by every VM within one TTL tenth.

use crate::cache::TokenHash;

/// Size of the table (a power of two). 4096 slots of ~40 bytes plus the user IDs.
pub const LOCAL_SLOTS: usize = 4096;

struct Local {
    hash: TokenHash,
    refresh_at: u64,
    user: Box<str>,
}

pub struct Memory {
    slots: Vec<Option<Local>>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            slots: (0..LOCAL_SLOTS).map(|_| None).collect(),
        }
    }
}

impl Memory {
    fn slot(&mut self, hash: &TokenHash) -> Option<&mut Option<Local>> {
        self.slots.get_mut(hash.local_index(LOCAL_SLOTS))
    }

    /// The user remembered for `hash`, while `now` is before its refresh window (no copy).
    pub fn user(&self, hash: &TokenHash, now: u64) -> Option<&str> {
        match self.slots.get(hash.local_index(LOCAL_SLOTS)) {
            Some(Some(e)) if e.hash == *hash && now < e.refresh_at => Some(&e.user),
            _ => None,
        }
    }

    /// Remembers an answer until `refresh_at` (replacing whatever shared its slot).
    pub fn remember(&mut self, hash: &TokenHash, refresh_at: u64, user: &str, now: u64) {
        if now >= refresh_at {
            return;
        }
        if let Some(slot) = self.slot(hash) {
            *slot = Some(Local {
                hash: *hash,
                refresh_at,
                user: user.into(),
            });
        }
    }

    pub fn forget(&mut self, hash: &TokenHash) {
        if let Some(slot) = self.slot(hash) {
            if slot.as_ref().is_some_and(|e| e.hash == *hash) {
                *slot = None;
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
        let mut m = Memory::default();
        m.remember(&a, 100, "@a:x", 10);
        assert_eq!(m.user(&a, 99), Some("@a:x"));
        assert_eq!(m.user(&a, 100), None);
        assert_eq!(m.user(&b, 10), None);
        m.forget(&b);
        assert!(m.user(&a, 50).is_some());
        m.forget(&a);
        assert!(m.user(&a, 50).is_none());
        m.remember(&a, 100, "@a:x", 100);
        assert!(m.user(&a, 50).is_none());
    }
}
