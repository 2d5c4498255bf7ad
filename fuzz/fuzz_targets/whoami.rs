//! `whoami::interpret` on an arbitrary status and body. Input: `status \n body`, flags in the
//! first byte say which of the two the host delivered. A user is always a valid Matrix user ID
//! that the body contains; only 200 yields a user, only 401/403 a denial.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::matrix::is_user_id;
use matrix_sync_router::whoami::{interpret, Outcome};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (status, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let status = (flags & 1 == 0).then_some(status);
    let body = (flags & 2 == 0).then_some(body);
    let code = status
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.trim().parse::<u16>().ok());
    match interpret(status, body) {
        Outcome::User(user) => {
            assert_eq!(code, Some(200));
            assert!(is_user_id(&user), "{user:?}");
            assert!(user.starts_with('@'));
        }
        Outcome::Denied(r) => {
            assert!(r.status == 401 || r.status == 403);
            assert_eq!(code, Some(r.status));
            // The edge answer is rebuilt from the code: a fixed, short text, never the body.
            let answer = r.body();
            assert!(
                answer.starts_with("{\"errcode\":\"M_") && answer.len() < 160,
                "{answer}"
            );
        }
        Outcome::Failed(_) => {}
    }
});
