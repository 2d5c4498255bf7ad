//! Matrix vocabulary shared by the whoami client, the cache codec and the engine: the user-ID
//! grammar, the error codes a rejected token is answered with, and `Rejection`. A leaf: it
//! imports nothing from the crate.

/// A Matrix user ID: `@localpart:server_name`, at most 255 bytes. Historical localparts allow any
/// visible ASCII but `:`; the server name is a DNS name, IPv4 or `[IPv6]`, with an optional port.
pub fn is_user_id(id: &str) -> bool {
    if id.len() > 255 {
        return false;
    }
    let Some(rest) = id.strip_prefix('@') else {
        return false;
    };
    let Some((local, server)) = rest.split_once(':') else {
        return false;
    };
    !local.is_empty() && local.bytes().all(|b| (0x21..=0x7e).contains(&b)) && is_server_name(server)
}

fn is_server_name(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let (ip6, after) = (&rest[..end], &rest[end + 1..]);
        if ip6.is_empty()
            || !ip6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match after.strip_prefix(':') {
            Some(port) => ("ok", Some(port)),
            None if after.is_empty() => ("ok", None),
            None => return false,
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok = !host.is_empty()
        && host.len() <= 230
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// The Matrix error codes whoami answers a rejected token with. Only the code is kept, never
/// Synapse's body (which could echo the token): the edge answer is rebuilt from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errcode {
    UnknownToken,
    MissingToken,
    UserLocked,
    UserDeactivated,
    ExpiredAccount,
    Forbidden,
}

impl Errcode {
    pub const ALL: [Errcode; 6] = [
        Errcode::UnknownToken,
        Errcode::MissingToken,
        Errcode::UserLocked,
        Errcode::UserDeactivated,
        Errcode::ExpiredAccount,
        Errcode::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Errcode::UnknownToken => "M_UNKNOWN_TOKEN",
            Errcode::MissingToken => "M_MISSING_TOKEN",
            Errcode::UserLocked => "M_USER_LOCKED",
            Errcode::UserDeactivated => "M_USER_DEACTIVATED",
            Errcode::ExpiredAccount => "M_EXPIRED_ACCOUNT",
            Errcode::Forbidden => "M_FORBIDDEN",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Errcode::UnknownToken => "Invalid access token passed.",
            Errcode::MissingToken => "Missing access token.",
            Errcode::UserLocked => "User account has been locked",
            Errcode::UserDeactivated => "User account has been deactivated",
            Errcode::ExpiredAccount => "User account has expired",
            Errcode::Forbidden => "Forbidden",
        }
    }

    /// The code of a stored byte (unknown bytes read as `M_UNKNOWN_TOKEN`).
    pub fn from_byte(b: u8) -> Errcode {
        Errcode::ALL
            .get(usize::from(b))
            .copied()
            .unwrap_or(Errcode::UnknownToken)
    }

    pub fn to_byte(self) -> u8 {
        self as u8
    }

    pub fn parse(code: &str) -> Option<Errcode> {
        Errcode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

/// A rejected token: what the edge answer (`reject_invalid_tokens`) needs, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// 401 or 403.
    pub status: u16,
    pub errcode: Errcode,
    /// Synapse's `soft_logout` (an expired token whose device may log in again).
    pub soft_logout: bool,
}

impl Rejection {
    /// The JSON body of the edge answer: the same bytes every time for the same rejection.
    pub fn body(&self) -> String {
        // Synapse includes `soft_logout` with these two codes (as clients expect), not others.
        let soft = match (self.errcode, self.soft_logout) {
            (Errcode::UnknownToken | Errcode::UserLocked, true) => ",\"soft_logout\":true",
            (Errcode::UnknownToken | Errcode::UserLocked, false) => ",\"soft_logout\":false",
            _ => "",
        };
        format!(
            "{{\"errcode\":\"{}\",\"error\":\"{}\"{soft}}}",
            self.errcode.as_str(),
            self.errcode.message()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_through_their_stored_byte() {
        for code in Errcode::ALL {
            assert_eq!(Errcode::from_byte(code.to_byte()), code);
        }
        assert_eq!(Errcode::from_byte(200), Errcode::UnknownToken);
    }

    #[test]
    fn user_ids() {
        for id in [
            "@alice:example.org",
            "@a.b_c=d-e/f+g:matrix.example.org:8448",
            "@Historic!User:example.org",
            "@x:[2001:db8::1]:8448",
            "@x:127.0.0.1",
        ] {
            assert!(is_user_id(id), "{id}");
        }
        let long = format!("@{}:example.org", "a".repeat(250));
        for id in [
            "alice:example.org",
            "@:example.org",
            "@alice",
            "@alice:",
            "@ali ce:example.org",
            "@alice:exa mple.org",
            "@alice:example.org:port",
            "@alice:example.org\r\nx: y",
            "@alice:[::1",
            long.as_str(),
        ] {
            assert!(!is_user_id(id), "{id}");
        }
    }
}
