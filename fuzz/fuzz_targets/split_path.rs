//! `split_path`: the path and query always put back together into the input, the path never
//! holds a `?`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::request::split_path;

fuzz_target!(|data: &[u8]| {
    let (path, query) = split_path(data);
    assert!(!path.contains(&b'?'));
    match query {
        Some(q) => {
            assert_eq!(path.len() + 1 + q.len(), data.len());
            assert_eq!(data[path.len()], b'?');
            assert_eq!(&data[path.len() + 1..], q);
        }
        None => assert_eq!(path, data),
    }
});
