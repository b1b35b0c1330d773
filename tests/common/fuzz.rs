//! Mutations of valid inputs, shared by the property tests (`tests/fuzz.rs`, where proptest
//! draws and shrinks them) and the hostile-log test (`tests/hostile.rs`, where a seeded RNG
//! draws them), so both exercise the same hostile shapes.

use proptest::prelude::*;

/// Pieces that make mutations interesting to a JSON or TOML parser.
pub const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\0",
    b"\xff\xfe",
    b"\xc3\x28",
    b"99999999999999999999999",
    b"-1",
    b"1e308",
    b"NaN",
    b"null",
    b"9999-12-31T23:59:59Z",
    b"1970-01-01T00:00:00Z",
    b"::ffff:81.2.69.160",
    b"2001:db8::1",
    b",\"http_status_code\":500",
    b"pmcp_01",
    b"\n",
    b"=",
    b"[[",
    b"]]",
    b"'''",
];

/// One edit of an input; positions are taken modulo the input's length, so any value is valid.
#[derive(Debug, Clone)]
pub enum Op {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, usize),
    Delete(usize, u8),
    Truncate(usize),
    /// Copies a slice of the seed itself in (duplicate fields, nesting).
    Splice(usize, usize, u8),
}

/// Any edit.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(a, b)| Op::FlipBit(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Op::SetByte(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, t)| Op::Insert(a, t)),
        (any::<usize>(), 1u8..16).prop_map(|(a, n)| Op::Delete(a, n)),
        any::<usize>().prop_map(Op::Truncate),
        (any::<usize>(), any::<usize>(), any::<u8>()).prop_map(|(a, b, n)| Op::Splice(a, b, n)),
    ]
}

/// `seed` with `ops` applied in order.
pub fn apply(seed: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for o in ops {
        let at = |p: usize, len: usize| p % (len + 1);
        match *o {
            Op::FlipBit(p, b) if !v.is_empty() => {
                let i = p % v.len();
                v[i] ^= 1 << b;
            }
            Op::SetByte(p, b) if !v.is_empty() => {
                let i = p % v.len();
                v[i] = b;
            }
            Op::Insert(p, t) => {
                let i = at(p, v.len());
                v.splice(i..i, TOKENS[t % TOKENS.len()].iter().copied());
            }
            Op::Delete(p, n) => {
                let i = at(p, v.len());
                let end = (i + usize::from(n)).min(v.len());
                v.drain(i..end);
            }
            Op::Truncate(p) => v.truncate(at(p, v.len())),
            Op::Splice(p, from, n) if !seed.is_empty() => {
                let a = from % seed.len();
                let b = (a + usize::from(n) % 64).min(seed.len());
                let i = at(p, v.len());
                v.splice(i..i, seed[a..b].iter().copied());
            }
            _ => {}
        }
    }
    v
}

/// Draws 1 to 4 edits with a seeded RNG, for tests that need many mutated inputs at once.
pub fn random_ops(rng: &mut super::Rng) -> Vec<Op> {
    (0..1 + rng.below_usize(4))
        .map(|_| {
            let (a, b) = (rng.next() as usize, rng.next() as usize);
            match rng.below_usize(6) {
                0 => Op::FlipBit(a, (b % 8) as u8),
                1 => Op::SetByte(a, b as u8),
                2 => Op::Insert(a, b),
                3 => Op::Delete(a, 1 + (b % 15) as u8),
                4 => Op::Truncate(a),
                _ => Op::Splice(a, b, rng.next() as u8),
            }
        })
        .collect()
}
