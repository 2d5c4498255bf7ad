//! A header map that keeps insertion order and matches names the way each host does.

use crate::util::text;

/// How a host matches header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameCase {
    /// Envoy: every name is stored lower-cased, so every operation is case-insensitive.
    Lower,
    /// nginx + ngx_wasm_module: names keep the client's case; `get` is case-insensitive but
    /// `remove` and `replace` only touch headers whose name matches byte for byte (a client's
    /// `X-User-Identifier` survives removing `x-user-identifier`, and replacing adds a second one).
    Preserve,
}

/// An ordered list of (name, value) pairs with binary-safe values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMap {
    case: NameCase,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl HeaderMap {
    /// An empty map with the given name matching.
    pub fn new(case: NameCase) -> HeaderMap {
        HeaderMap {
            case,
            entries: Vec::new(),
        }
    }

    /// A map built from text pairs, in order.
    pub fn from_pairs(case: NameCase, pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new(case);
        for (name, value) in pairs {
            map.add(name.as_bytes(), value.as_bytes());
        }
        map
    }

    /// The name matching of this map.
    pub fn case(&self) -> NameCase {
        self.case
    }

    fn stored_name(&self, name: &[u8]) -> Vec<u8> {
        match self.case {
            NameCase::Lower => name.to_ascii_lowercase(),
            NameCase::Preserve => name.to_vec(),
        }
    }

    fn exact(&self, stored: &[u8], name: &[u8]) -> bool {
        match self.case {
            NameCase::Lower => stored.eq_ignore_ascii_case(name),
            NameCase::Preserve => stored == name,
        }
    }

    /// Appends a header (a second header of the same name is kept).
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        let name = self.stored_name(name);
        self.entries.push((name, value.to_vec()));
    }

    /// The first value whose name matches case-insensitively.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(stored, _)| stored.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }

    /// The first value as (lossy) text.
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name.as_bytes()).map(text)
    }

    /// Every value whose name matches case-insensitively, in order.
    pub fn get_all(&self, name: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(stored, _)| stored.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| text(value))
            .collect()
    }

    /// Removes the headers the host's `remove` would remove (see [`NameCase`]).
    pub fn remove(&mut self, name: &[u8]) {
        let case = self.case;
        self.entries.retain(|(stored, _)| !match case {
            NameCase::Lower => stored.eq_ignore_ascii_case(name),
            NameCase::Preserve => stored.as_slice() == name,
        });
    }

    /// The host's `replace`: Envoy drops every copy and appends one; ngx_wasm_module overwrites the
    /// first header whose name matches exactly (dropping further exact matches) or appends.
    pub fn replace(&mut self, name: &[u8], value: &[u8]) {
        match self.case {
            NameCase::Lower => {
                self.remove(name);
                self.add(name, value);
            }
            NameCase::Preserve => {
                let mut replaced = false;
                let mut index = 0;
                while index < self.entries.len() {
                    if self.exact(&self.entries[index].0, name) {
                        if replaced {
                            self.entries.remove(index);
                            continue;
                        }
                        self.entries[index].1 = value.to_vec();
                        replaced = true;
                    }
                    index += 1;
                }
                if !replaced {
                    self.add(name, value);
                }
            }
        }
    }

    /// Replaces the whole map (`proxy_set_header_map_pairs`).
    pub fn set_all(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) {
        self.entries.clear();
        for (name, value) in pairs {
            self.add(&name, &value);
        }
    }

    /// Every pair, in order.
    pub fn pairs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.entries
    }

    /// Every pair as (lossy) text, in order.
    pub fn to_text_pairs(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(name, value)| (text(name), text(value)))
            .collect()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no header.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_lower_cases_and_matches_any_case() {
        let mut map = HeaderMap::from_pairs(NameCase::Lower, &[("X-User-Identifier", "client")]);
        assert_eq!(map.pairs()[0].0, b"x-user-identifier".to_vec());
        map.replace(b"x-user-identifier", b"@a:b");
        assert_eq!(map.get_all("x-user-identifier"), vec!["@a:b".to_string()]);
        map.remove(b"X-USER-IDENTIFIER");
        assert!(map.is_empty());
    }

    #[test]
    fn ngx_remove_and_replace_match_case_sensitively() {
        let mut map = HeaderMap::from_pairs(
            NameCase::Preserve,
            &[("X-User-Identifier", "client"), ("host", "h")],
        );
        map.remove(b"x-user-identifier");
        assert_eq!(map.get_str("x-user-identifier").as_deref(), Some("client"));
        map.replace(b"x-user-identifier", b"@a:b");
        // The client's copy is still first, so `$http_x_user_identifier` would see it.
        assert_eq!(
            map.get_all("x-user-identifier"),
            vec!["client".to_string(), "@a:b".to_string()]
        );
        map.remove(b"X-User-Identifier");
        assert_eq!(map.get_all("x-user-identifier"), vec!["@a:b".to_string()]);
    }

    #[test]
    fn ngx_replace_keeps_position_and_drops_exact_duplicates() {
        let mut map =
            HeaderMap::from_pairs(NameCase::Preserve, &[("a", "1"), ("b", "2"), ("a", "3")]);
        map.replace(b"a", b"9");
        assert_eq!(
            map.to_text_pairs(),
            vec![
                ("a".to_string(), "9".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
    }
}
