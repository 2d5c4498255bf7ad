//! What can be read from a token without asking anyone: Synapse's native tokens name their user,
//! MAS tokens carry a checksum.
//!
//! - Synapse: `syt_<unpadded base64 of the localpart>_<20 letters>_<CRC-32 of the rest, base62,
//!   6 digits, most significant first>` (synapse/handlers/auth.py, `generate_access_token`).
//! - MAS: `mat_`/`mar_`/`mct_`/`mcr_` + 30 alphanumerics + `_` + the CRC-32 of the rest in base62
//!   with the least significant digit first, left-padded with `0` to 6 (mas-data-model
//!   `TokenType::check`).
//!
//! A checksum only says the token is well-formed, not that it is valid: only routing relies on
//! it; the worker still authenticates every request.

use base64::Engine;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// CRC-32 (IEEE 802.3, as zlib's and `crc`'s CRC_32_ISO_HDLC). A 1 KB table built at compile
/// time: the `crc32fast` crate's 16 KB of tables would be a tenth of the module.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| {
        let index = usize::from((c as u8) ^ b);
        CRC_TABLE.get(index).copied().unwrap_or(0) ^ (c >> 8)
    })
}

/// Base62 digits of `n`, least significant first, as 6 digits (a u32 needs at most 6).
fn base62_digits(mut n: u32) -> [u8; 6] {
    let mut out = [b'0'; 6];
    for d in out.iter_mut() {
        *d = BASE62.get((n % 62) as usize).copied().unwrap_or(b'0');
        n /= 62;
    }
    out
}

/// MAS's rendering: the significant digits least significant first, left-padded with `0`.
fn mas_base62(n: u32) -> [u8; 6] {
    let digits = base62_digits(n);
    let mut len = 0;
    let mut m = n;
    while m > 0 {
        len += 1;
        m /= 62;
    }
    let mut out = [b'0'; 6];
    for (slot, d) in out.iter_mut().skip(6 - len).zip(digits) {
        *slot = d;
    }
    out
}

/// Splits `<prefix>_<a>_<b>_<crc>` style tokens: the part before the last `_` and the checksum.
fn body_and_crc(token: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = token.iter().rposition(|&b| b == b'_')?;
    let (body, crc) = token.split_at(i);
    Some((body, crc.get(1..)?))
}

/// Whether a Synapse token's checksum is right (`syt_`, `syr_`).
fn synapse_crc_ok(body: &[u8], crc: &[u8]) -> bool {
    let mut expected = base62_digits(crc32(body));
    expected.reverse();
    crc == expected
}

/// What a native Synapse token says about its user.
#[derive(Debug, PartialEq, Eq)]
pub enum Native {
    /// Not a `syt_` token: ask whoami.
    Other,
    /// Shaped like one but its checksum or localpart is wrong: never trusted.
    Broken,
    /// The token's localpart (checksum verified).
    Localpart(String),
}

pub fn native(token: &[u8]) -> Native {
    let Some(rest) = token.strip_prefix(b"syt_") else {
        return Native::Other;
    };
    let Some((body, crc)) = body_and_crc(token) else {
        return Native::Broken;
    };
    let mut parts = rest.split(|&b| b == b'_');
    let (Some(b64), Some(random), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Native::Broken;
    };
    if random.len() != 20
        || !random.iter().all(u8::is_ascii_alphabetic)
        || !synapse_crc_ok(body, crc)
    {
        return Native::Broken;
    }
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|l| !l.is_empty())
        .map_or(Native::Broken, Native::Localpart)
}

/// For a token with a MAS prefix: whether its checksum is right (None: not a MAS token).
pub fn mas_checksum_ok(token: &[u8]) -> Option<bool> {
    let prefix = token.get(..4)?;
    if !matches!(prefix, b"mat_" | b"mar_" | b"mct_" | b"mcr_") {
        return None;
    }
    let Some((body, crc)) = body_and_crc(token) else {
        return Some(false);
    };
    let random = body.get(4..).unwrap_or_default();
    Some(
        random.len() == 30
            && random.iter().all(u8::is_ascii_alphanumeric)
            && crc == mas_base62(crc32(body)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// A token made the way Synapse makes one (the e2e tests check real ones).
    fn synapse_token(localpart: &str, random: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(localpart);
        let base = format!("syt_{b64}_{random}");
        let mut crc = base62_digits(crc32(base.as_bytes()));
        crc.reverse();
        format!("{base}_{}", String::from_utf8(crc.to_vec()).unwrap())
    }

    #[test]
    fn native_tokens_name_their_user_when_the_checksum_holds() {
        let t = synapse_token("alice", "AbCdEfGhIjKlMnOpQrSt");
        assert_eq!(native(t.as_bytes()), Native::Localpart("alice".into()));
        let odd = synapse_token("a/b+c=d_e", "xxxxxxxxxxyyyyyyyyyy");
        assert_eq!(
            native(odd.as_bytes()),
            Native::Localpart("a/b+c=d_e".into())
        );
        let mut broken = t.clone().into_bytes();
        broken[6] ^= 1;
        assert_eq!(native(&broken), Native::Broken);
        assert_eq!(native(b"syt_YWxpY2U_short_000000"), Native::Broken);
        assert_eq!(native(b"syt_"), Native::Broken);
        assert_eq!(native(b"mat_abc"), Native::Other);
        assert_eq!(native(b"some_appservice_token"), Native::Other);
    }

    #[test]
    fn mas_checksums() {
        // The examples in mas-data-model's `TokenType::check` documentation.
        assert_eq!(
            mas_checksum_ok(b"mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yb"),
            Some(true)
        );
        assert_eq!(
            mas_checksum_ok(b"mar_PkpplxPkfjsqvtdfUlYR1Afg2TpaHF_GaTQd2"),
            Some(true)
        );
        assert_eq!(
            mas_checksum_ok(b"mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yc"),
            Some(false)
        );
        assert_eq!(mas_checksum_ok(b"mct_short_0Lg9yb"), Some(false));
        assert_eq!(mas_checksum_ok(b"syt_YWxpY2U_x_y"), None);
        assert_eq!(mas_checksum_ok(b"mat"), None);
    }
}
