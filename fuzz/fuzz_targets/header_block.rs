//! `HeaderBlock`: arbitrary bytes as the serialized header map a host returns. Iterating never
//! panics and never yields more pairs than the count; what was read serializes back to a block
//! that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::port::HeaderBlock;
use matrix_sync_router::request::request_token;

fuzz_target!(|data: &[u8]| {
    let block = HeaderBlock::from_bytes(data.to_vec());
    let pairs: Vec<(&[u8], &[u8])> = block.iter().collect();
    let count = data
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    assert!(pairs.len() as u64 <= u64::from(count));
    let _ = block.get("authorization");
    let _ = block.spellings("x-user-identifier");
    let _ = request_token(&block, Some(b"access_token=x"));
    if let Ok(named) = pairs
        .iter()
        .map(|(n, v)| std::str::from_utf8(n).map(|n| (n, *v)))
        .collect::<Result<Vec<_>, _>>()
    {
        let again = HeaderBlock::serialize(&named);
        assert!(again.iter().eq(pairs.iter().copied()));
    }
});
