//! A small serde deserializer for the two JSON documents the filter reads: its configuration
//! (one flat object) and whoami's answers. It exists for the module's size: serde_json brought
//! about 45 KB into the module (float parsing and formatting, position-tracking errors), a third
//! of it. This one reads strictly RFC 8259 JSON, refuses non-integer numbers (neither document
//! has any), bounds nesting, and names the top-level field an error is about.

use serde::de::{self, DeserializeSeed, Expected, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// Deepest nesting accepted (the configuration needs 2).
const MAX_DEPTH: u32 = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The top-level field the error is about (None: the document as a whole).
    pub field: Option<String>,
    pub message: String,
    /// Broken JSON rather than a wrong value: never attributed to a field.
    syntax: bool,
}

impl Error {
    fn syntax(message: impl Into<String>) -> Error {
        Error {
            field: None,
            message: message.into(),
            syntax: true,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Describes what was found without printing its value (no float formatting in the module).
fn found(unexp: &Unexpected<'_>) -> &'static str {
    match unexp {
        Unexpected::Bool(_) => "a boolean",
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer",
        Unexpected::Float(_) => "a number",
        Unexpected::Char(_) | Unexpected::Str(_) => "a string",
        Unexpected::Bytes(_) => "bytes",
        Unexpected::Unit | Unexpected::Option => "null",
        Unexpected::Seq => "an array",
        Unexpected::Map => "an object",
        _ => "another kind of value",
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Error {
        Error {
            field: None,
            message: msg.to_string(),
            syntax: false,
        }
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Error {
        Error::custom(format_args!(
            "invalid type: {}, expected {exp}",
            found(&unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Error {
        let what = match unexp {
            Unexpected::Unsigned(n) => format!("{n}"),
            Unexpected::Signed(n) => format!("{n}"),
            Unexpected::Str(s) => format!("`{s}`"),
            other => found(&other).to_string(),
        };
        Error::custom(format_args!("invalid value: {what}, expected {exp}"))
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Error {
        Error::custom(format_args!("invalid length {len}, expected {exp}"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Error {
        Error::custom(format_args!(
            "unknown variant `{variant}`, expected one of {}",
            quoted(expected)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Error {
        Error::custom(format_args!(
            "unknown field `{field}`, expected one of {}",
            quoted(expected)
        ))
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads one JSON value of type `T` from `bytes`; only whitespace may follow it.
pub fn from_slice<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, Error> {
    let mut de = Deserializer {
        input: bytes,
        pos: 0,
        depth: 0,
    };
    let value = T::deserialize(&mut de)?;
    de.skip_ws();
    if de.pos < bytes.len() {
        return Err(Error::syntax("unexpected data after the value"));
    }
    Ok(value)
}

/// The start of a value.
enum Tok<'de> {
    Map,
    Seq,
    Str(Cow<'de, str>),
    Bool(bool),
    Null,
    Unsigned(u64),
    Signed(i64),
}

struct Deserializer<'de> {
    input: &'de [u8],
    pos: usize,
    depth: u32,
}

impl<'de> Deserializer<'de> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), Error> {
        self.skip_ws();
        if self.next() == Some(byte) {
            Ok(())
        } else {
            Err(Error::syntax(format!("expected {what}")))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Error> {
        let end = self.pos.saturating_add(word.len());
        if self.input.get(self.pos..end) == Some(word) {
            self.pos = end;
            Ok(())
        } else {
            Err(Error::syntax("invalid literal"))
        }
    }

    fn enter(&mut self) -> Result<(), Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Error::syntax("nested too deeply"));
        }
        Ok(())
    }

    /// A string (the opening quote already read): borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'de, str>, Error> {
        let start = self.pos;
        loop {
            match self.next() {
                None => return Err(Error::syntax("unterminated string")),
                Some(b'"') => {
                    let raw = self.input.get(start..self.pos - 1).unwrap_or_default();
                    return std::str::from_utf8(raw)
                        .map(Cow::Borrowed)
                        .map_err(|_| Error::syntax("a string that is not UTF-8"));
                }
                Some(b'\\') => {
                    let done = self.input.get(start..self.pos - 1).unwrap_or_default();
                    let mut out = String::from_utf8(done.to_vec())
                        .map_err(|_| Error::syntax("a string that is not UTF-8"))?;
                    self.pos -= 1;
                    self.escaped_rest(&mut out)?;
                    return Ok(Cow::Owned(out));
                }
                Some(0..=0x1f) => return Err(Error::syntax("a control character in a string")),
                Some(_) => {}
            }
        }
    }

    /// The rest of a string that has escapes, appended to `out`.
    fn escaped_rest(&mut self, out: &mut String) -> Result<(), Error> {
        let mut run = self.pos;
        loop {
            let b = self
                .next()
                .ok_or_else(|| Error::syntax("unterminated string"))?;
            if b != b'"' && b != b'\\' {
                if b < 0x20 {
                    return Err(Error::syntax("a control character in a string"));
                }
                continue;
            }
            let plain = self.input.get(run..self.pos - 1).unwrap_or_default();
            out.push_str(
                std::str::from_utf8(plain)
                    .map_err(|_| Error::syntax("a string that is not UTF-8"))?,
            );
            if b == b'"' {
                return Ok(());
            }
            let c = match self.next() {
                Some(b'"') => '"',
                Some(b'\\') => '\\',
                Some(b'/') => '/',
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(b'u') => self.unicode_escape()?,
                _ => return Err(Error::syntax("an invalid escape in a string")),
            };
            out.push(c);
            run = self.pos;
        }
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let mut n = 0;
        for _ in 0..4 {
            let d = self
                .next()
                .and_then(|b| char::from(b).to_digit(16))
                .ok_or_else(|| Error::syntax("an invalid \\u escape"))?;
            n = n * 16 + d;
        }
        Ok(n)
    }

    fn unicode_escape(&mut self) -> Result<char, Error> {
        let first = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&first) {
            self.literal(b"\\u")?;
            let second = self.hex4()?;
            if !(0xdc00..0xe000).contains(&second) {
                return Err(Error::syntax("an unpaired surrogate"));
            }
            0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| Error::syntax("an unpaired surrogate"))
    }

    /// An integer; fractions and exponents are refused.
    fn integer(&mut self) -> Result<Tok<'de>, Error> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        let digits = self.input.get(start..self.pos).unwrap_or_default();
        if digits.is_empty() || (digits.len() > 1 && digits.first() == Some(&b'0')) {
            return Err(Error::syntax("an invalid number"));
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(<Error as de::Error>::custom(
                "invalid type: a number with a fraction or exponent, expected an integer",
            ));
        }
        let magnitude = digits.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        });
        let out_of_range =
            || <Error as de::Error>::custom("invalid value: an integer out of range");
        let magnitude = magnitude.ok_or_else(out_of_range)?;
        if !negative {
            return Ok(Tok::Unsigned(magnitude));
        }
        i64::try_from(magnitude)
            .map(|n| Tok::Signed(-n))
            .map_err(|_| out_of_range())
    }

    /// The next value's first token (one non-generic function, so each visitor type adds only
    /// a small dispatch to the module). `{` and `[` are consumed and entered.
    fn token(&mut self) -> Result<Tok<'de>, Error> {
        self.skip_ws();
        let tok = match self.peek() {
            Some(b'{') => Tok::Map,
            Some(b'[') => Tok::Seq,
            Some(b'"') => {
                self.pos += 1;
                return Ok(Tok::Str(self.string()?));
            }
            Some(b't') => {
                self.literal(b"true")?;
                return Ok(Tok::Bool(true));
            }
            Some(b'f') => {
                self.literal(b"false")?;
                return Ok(Tok::Bool(false));
            }
            Some(b'n') => {
                self.literal(b"null")?;
                return Ok(Tok::Null);
            }
            Some(b'-' | b'0'..=b'9') => return self.integer(),
            _ => return Err(Error::syntax("expected a value")),
        };
        self.pos += 1;
        self.enter()?;
        Ok(tok)
    }

    /// Skips one value without building it.
    fn skip_value(&mut self) -> Result<(), Error> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') | Some(b'[') => {
                let close = if self.peek() == Some(b'{') {
                    b'}'
                } else {
                    b']'
                };
                self.pos += 1;
                self.enter()?;
                self.skip_ws();
                if self.peek() == Some(close) {
                    self.pos += 1;
                } else {
                    loop {
                        if close == b'}' {
                            self.expect(b'"', "a key")?;
                            self.string()?;
                            self.expect(b':', "`:`")?;
                        }
                        self.skip_value()?;
                        self.skip_ws();
                        match self.next() {
                            Some(b',') => continue,
                            Some(b) if b == close => break,
                            _ => return Err(Error::syntax("expected `,` or a closing bracket")),
                        }
                    }
                }
                self.depth -= 1;
                Ok(())
            }
            Some(b'"') => {
                self.pos += 1;
                self.string().map(drop)
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                self.pos += 1;
                while matches!(
                    self.peek(),
                    Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                ) {
                    self.pos += 1;
                }
                let text = self.input.get(start..self.pos).unwrap_or_default();
                if text.last().is_some_and(u8::is_ascii_digit) {
                    Ok(())
                } else {
                    Err(Error::syntax("an invalid number"))
                }
            }
            _ => Err(Error::syntax("expected a value")),
        }
    }
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.token()? {
            tok @ (Tok::Map | Tok::Seq) => {
                let entries = Entries {
                    de: &mut *self,
                    first: true,
                    key: None,
                };
                let value = if matches!(tok, Tok::Map) {
                    visitor.visit_map(entries)?
                } else {
                    visitor.visit_seq(entries)?
                };
                self.depth -= 1;
                Ok(value)
            }
            Tok::Str(Cow::Borrowed(s)) => visitor.visit_borrowed_str(s),
            Tok::Str(Cow::Owned(s)) => visitor.visit_string(s),
            Tok::Bool(b) => visitor.visit_bool(b),
            Tok::Null => visitor.visit_unit(),
            Tok::Unsigned(n) => visitor.visit_u64(n),
            Tok::Signed(n) => visitor.visit_i64(n),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip_ws();
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip_value()?;
        visitor.visit_unit()
    }

    /// Enums are unit variants written as strings (`"proxy": "envoy"`).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return self.deserialize_any(visitor);
        }
        self.pos += 1;
        match self.string()? {
            Cow::Borrowed(s) => visitor.visit_enum(de::value::BorrowedStrDeserializer::new(s)),
            Cow::Owned(s) => visitor.visit_enum(de::value::StringDeserializer::new(s)),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
    }
}

/// The entries of an object or an array.
struct Entries<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    first: bool,
    /// The key being read, for errors about its value (top-level object only).
    key: Option<String>,
}

impl Entries<'_, '_> {
    /// Moves to the next entry; false at the closing bracket.
    fn advance(&mut self, close: u8) -> Result<bool, Error> {
        self.de.skip_ws();
        if self.de.peek() == Some(close) {
            self.de.pos += 1;
            return Ok(false);
        }
        if !std::mem::replace(&mut self.first, false) {
            self.de.expect(b',', "`,` or a closing bracket")?;
        }
        Ok(true)
    }

    fn attribute(&self, mut e: Error) -> Error {
        if !e.syntax && e.field.is_none() && self.de.depth == 1 {
            e.field.clone_from(&self.key);
        }
        e
    }
}

impl<'de> MapAccess<'de> for Entries<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if !self.advance(b'}')? {
            return Ok(None);
        }
        self.de.expect(b'"', "a key")?;
        let key = self.de.string()?;
        self.key = (self.de.depth == 1).then(|| key.clone().into_owned());
        let value = match key {
            Cow::Borrowed(k) => seed.deserialize(de::value::BorrowedStrDeserializer::new(k)),
            Cow::Owned(k) => seed.deserialize(de::value::StringDeserializer::new(k)),
        };
        value.map(Some).map_err(|e| self.attribute(e))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        self.de.expect(b':', "`:`")?;
        let depth = self.de.depth;
        let value = seed.deserialize(&mut *self.de);
        self.de.depth = depth;
        value.map_err(|e| self.attribute(e))
    }
}

impl<'de> SeqAccess<'de> for Entries<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if !self.advance(b']')? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Flat {
        n: u32,
        s: String,
        list: Vec<String>,
        b: bool,
    }

    #[test]
    fn reads_a_flat_object() {
        let v: Flat = from_slice(
            br#" {"n": 7, "s": "a\"\u00e9\ud83d\ude00/", "list": ["x",""], "b": true} "#,
        )
        .unwrap();
        assert_eq!(
            v,
            Flat {
                n: 7,
                s: "a\"é😀/".into(),
                list: vec!["x".into(), "".into()],
                b: true
            }
        );
    }

    #[test]
    fn errors_name_the_field_and_never_print_values_they_need_not() {
        let e = from_slice::<Flat>(br#"{"n": "7"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("n"));
        assert_eq!(e.message, "invalid type: a string, expected u32");
        let e = from_slice::<Flat>(br#"{"n": -1}"#).unwrap_err();
        assert_eq!(
            (e.field.as_deref(), &e.message[..]),
            (Some("n"), "invalid value: -1, expected u32")
        );
        let e = from_slice::<Flat>(br#"{"n": 1.5}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("n"));
        let e = from_slice::<Flat>(br#"{"nope": 1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("nope"));
        assert!(e
            .message
            .starts_with("unknown field `nope`, expected one of `n`, `s`"));
        let e = from_slice::<Flat>(br#"{"n": 1, "s": "x", "list": [1], "b": true}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("list"));
        let e = from_slice::<Flat>(br#"{"n": 1"#).unwrap_err();
        assert_eq!(e.field, None);
        let e = from_slice::<Flat>(br#"{"n": 1, "s": "x", "list": [], "b": true} {}"#).unwrap_err();
        assert_eq!(e.field, None);
        let e = from_slice::<Flat>(br#"{"n": 99999999999999999999999}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("n"));
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in [
            &b"{\"s\": \"a\nb\"}"[..],
            b"{\"s\": \"\\x\"}",
            b"{\"s\": \"\\ud800\"}",
            b"{\"s\": \"\xff\"}",
            b"{\"n\": 01}",
            b"{\"n\": -}",
            b"{'n': 1}",
            b"{\"n\" 1}",
            b"{\"n\": 1,}",
            b"[1,]",
            b"tru",
            b"",
        ] {
            assert!(from_slice::<BTreeMap<String, u32>>(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(from_slice::<de::IgnoredAny>(deep.as_bytes()).is_err());
        let ok = format!("{}{}", "[".repeat(10), "]".repeat(10));
        assert!(from_slice::<de::IgnoredAny>(ok.as_bytes()).is_ok());
    }

    #[test]
    fn skips_unknown_values_of_any_shape() {
        #[derive(Deserialize)]
        struct Who<'a> {
            #[serde(borrow)]
            user_id: Cow<'a, str>,
        }
        let body = br#"{"a": {"b": [1, -2.5e3, true, null, "x\"y"]}, "user_id": "@a:x", "z": {}}"#;
        let who: Who<'_> = from_slice(body).unwrap();
        assert_eq!(who.user_id, "@a:x");
        assert!(matches!(who.user_id, Cow::Borrowed(_)));
        assert!(from_slice::<Who<'_>>(br#"{"user_id": 7}"#).is_err());
        assert!(from_slice::<Who<'_>>(br#"{"a": 1.}"#).is_err());
    }
}
