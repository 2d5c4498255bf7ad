//! `HeaderBlock`: arbitrary bytes as the serialized header map a host returns. Iterating never
//! panics and never yields more pairs than the count; what was read serializes back to a block
//! that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::port::HeaderBlock;

fuzz_target!(|data: &[u8]| {
    let block = HeaderBlock::from_bytes(data.to_vec());
    let pairs: Vec<(&[u8], &[u8])> = block.iter().collect();
    let count = data
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    assert!(pairs.len() as u64 <= u64::from(count));
    // What the engine does with a block: every distinct spelling of its header, once.
    let spellings: Vec<&[u8]> = block.spellings("x-user-identifier").collect();
    for (i, s) in spellings.iter().enumerate() {
        assert!(s.eq_ignore_ascii_case(b"x-user-identifier"));
        assert!(!spellings[..i].contains(s));
    }
    if let Ok(named) = pairs
        .iter()
        .map(|(n, v)| std::str::from_utf8(n).map(|n| (n, *v)))
        .collect::<Result<Vec<_>, _>>()
    {
        let again = HeaderBlock::serialize(&named);
        assert!(again.iter().eq(pairs.iter().copied()));
    }
});
