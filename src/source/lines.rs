//! Cutting a byte stream into whole lines, shared by every source.
//!
//! This module owns the line boundaries and the byte and line accounting behind checkpoints:
//! how far into the input the last complete line ends, and how many lines came before it. It
//! never looks inside a line: it does not parse, validate, decode or count anything but
//! newlines, and it does no I/O. Memory stays bounded whatever the input: a line longer than
//! [`MAX_LINE_BYTES`] is cut instead of held whole.

use crate::event::MAX_LINE_BYTES;

/// Splits blocks of bytes into complete lines, buffering the incomplete last one.
///
/// Emitted lines keep their `\n`. A line longer than [`MAX_LINE_BYTES`] (not counting its
/// `\n`) is emitted as its first `MAX_LINE_BYTES + 1` bytes followed by `\n`, so the parser
/// sees it is too long without the splitter ever holding more than that; the rest of it is
/// dropped. Offsets always count the real bytes of the input, cut or not.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    /// The start of the incomplete current line, at most `keep_cap()` bytes of it.
    partial: Vec<u8>,
    /// Real length of the incomplete current line, including the bytes not kept.
    partial_len: u64,
    /// Input offset just after the last complete line.
    offset: u64,
    /// Complete lines so far, including those counted before `new` (for resuming).
    lines: u64,
    /// Longest line (without its `\n`) emitted uncut; [`MAX_LINE_BYTES`] outside tests.
    max_line: usize,
}

impl LineSplitter {
    /// A splitter for input that starts at byte `offset` of the underlying stream, after
    /// `lines` lines already counted elsewhere (both 0 for a fresh stream).
    pub fn new(offset: u64, lines: u64) -> Self {
        Self::with_max_line(offset, lines, MAX_LINE_BYTES)
    }

    /// Like [`LineSplitter::new`] with a smaller line limit, so tests can exercise cutting
    /// without megabytes of input.
    fn with_max_line(offset: u64, lines: u64, max_line: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            partial_len: 0,
            offset,
            lines,
            max_line,
        }
    }

    /// Input offset just after the last complete line emitted (the resume point).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of complete lines so far, counting those before the starting point.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Consumes `block`, appends every line it completes to `out`, and returns how many it
    /// completed. The incomplete tail stays buffered for the next call.
    pub fn push(&mut self, mut block: &[u8], out: &mut Vec<u8>) -> u64 {
        let before = self.lines;
        while let Some(i) = memchr::memchr(b'\n', block) {
            let body = &block[..i];
            if self.partial_len == 0 && body.len() <= self.max_line {
                // The common case: a whole short line inside one block goes out in one copy.
                out.extend_from_slice(&block[..=i]);
                self.complete_line(i as u64 + 1);
            } else {
                self.keep(body);
                self.partial_len += body.len() as u64;
                self.emit_partial(out);
                out.push(b'\n');
                self.complete_line(1);
            }
            block = &block[i + 1..];
        }
        if !block.is_empty() {
            self.keep(block);
            self.partial_len += block.len() as u64;
        }
        self.lines - before
    }

    /// Emits the buffered incomplete line, if any, as a final line without a `\n`: for the
    /// end of an input that will not grow (batch mode at EOF, a file rotated away, stdin
    /// closed). Returns whether there was one.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> bool {
        if self.partial_len == 0 {
            return false;
        }
        self.emit_partial(out);
        self.complete_line(0);
        true
    }

    /// How much of a line is kept: one byte over the limit shows it is too long, and one more
    /// lets a cut that happens to end in `\r` survive the parser stripping that `\r`.
    fn keep_cap(&self) -> usize {
        self.max_line + 2
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = self.keep_cap().saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Appends the buffered line body (no `\n`), cut if it was longer than we kept.
    fn emit_partial(&mut self, out: &mut Vec<u8>) {
        let len = if self.partial_len <= self.max_line as u64 + 1 {
            self.partial.len()
        } else if self.partial.get(self.max_line) == Some(&b'\r') {
            // The parser strips one trailing `\r`; keep a byte more so it still sees more
            // than the limit.
            self.max_line + 2
        } else {
            self.max_line + 1
        };
        out.extend_from_slice(&self.partial[..len]);
        self.partial.clear();
    }

    /// Books a finished line whose last `tail` bytes were not yet counted in `partial_len`.
    fn complete_line(&mut self, tail: u64) {
        self.offset += self.partial_len + tail;
        self.partial_len = 0;
        self.lines += 1;
        if self.partial.capacity() > 4 * 1024 {
            // Do not keep an overlong line's 64 KiB alive for the life of the source.
            self.partial = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `input` in one push and returns (output, offset, lines).
    fn split_whole(input: &[u8], max: usize, finish: bool) -> (Vec<u8>, u64, u64) {
        let mut s = LineSplitter::with_max_line(0, 0, max);
        let mut out = Vec::new();
        s.push(input, &mut out);
        if finish {
            s.finish(&mut out);
        }
        (out, s.offset(), s.lines())
    }

    #[test]
    fn splits_complete_lines_and_buffers_the_rest() {
        let mut s = LineSplitter::new(0, 0);
        let mut out = Vec::new();
        assert_eq!(s.push(b"a\nbb\ncc", &mut out), 2);
        assert_eq!(out, b"a\nbb\n");
        assert_eq!((s.offset(), s.lines(), s.partial_len), (5, 2, 2));
        out.clear();
        assert_eq!(s.push(b"c\n", &mut out), 1);
        assert_eq!(out, b"ccc\n");
        assert_eq!((s.offset(), s.lines(), s.partial_len), (9, 3, 0));
    }

    #[test]
    fn empty_lines_count() {
        let (out, offset, lines) = split_whole(b"\n\nx\n", 10, false);
        assert_eq!(out, b"\n\nx\n");
        assert_eq!((offset, lines), (4, 3));
    }

    #[test]
    fn resumes_accounting_from_a_starting_point() {
        let mut s = LineSplitter::new(100, 7);
        let mut out = Vec::new();
        s.push(b"x\n", &mut out);
        assert_eq!((s.offset(), s.lines()), (102, 8));
    }

    #[test]
    fn finish_emits_an_unterminated_last_line_once() {
        let mut s = LineSplitter::new(0, 0);
        let mut out = Vec::new();
        s.push(b"a\nlast", &mut out);
        assert!(s.finish(&mut out));
        assert_eq!(out, b"a\nlast");
        assert_eq!((s.offset(), s.lines()), (6, 2));
        assert!(!s.finish(&mut out));
        assert_eq!(out, b"a\nlast");
    }

    #[test]
    fn finish_without_pending_bytes_emits_nothing() {
        let (out, offset, lines) = split_whole(b"a\n", 10, true);
        assert_eq!((out.as_slice(), offset, lines), (&b"a\n"[..], 2, 1));
    }

    #[test]
    fn line_at_the_limit_is_kept_whole() {
        let line = [b"x".repeat(10), b"\n".to_vec()].concat();
        let (out, offset, lines) = split_whole(&line, 10, false);
        assert_eq!(out, line);
        assert_eq!((offset, lines), (11, 1));
        // One byte over, and `\r\n` endings at the limit, are not cut either.
        let line = [b"x".repeat(10), b"\r\n".to_vec()].concat();
        assert_eq!(split_whole(&line, 10, false).0, line);
        let line = [b"x".repeat(11), b"\n".to_vec()].concat();
        assert_eq!(split_whole(&line, 10, false).0, line);
    }

    #[test]
    fn overlong_line_is_cut_to_one_byte_over_the_limit() {
        let mut input = b"x".repeat(50);
        input.extend_from_slice(b"\nnext\n");
        let (out, offset, lines) = split_whole(&input, 10, false);
        assert_eq!(out, [b"x".repeat(11), b"\nnext\n".to_vec()].concat());
        assert_eq!((offset, lines), (56, 2));
    }

    #[test]
    fn overlong_line_is_cut_across_blocks_and_at_finish() {
        let mut s = LineSplitter::with_max_line(0, 0, 10);
        let mut out = Vec::new();
        for _ in 0..5 {
            s.push(&b"y".repeat(7), &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(s.partial_len, 35);
        assert!(s.partial.len() <= 12, "kept {} bytes", s.partial.len());
        s.finish(&mut out);
        assert_eq!(out, b"y".repeat(11));
        assert_eq!((s.offset(), s.lines()), (35, 1));
    }

    #[test]
    fn cut_ending_in_carriage_return_keeps_one_more_byte() {
        let mut input = b"x".repeat(10);
        input.extend_from_slice(b"\rzzzzzz\n");
        let (out, _, _) = split_whole(&input, 10, false);
        assert_eq!(out, [b"x".repeat(10), b"\rz\n".to_vec()].concat());
    }

    #[test]
    fn real_limit_cuts_a_long_line() {
        let mut input = b"a".repeat(MAX_LINE_BYTES * 3);
        input.push(b'\n');
        let (out, offset, lines) = split_whole(&input, MAX_LINE_BYTES, false);
        assert_eq!(out.len(), MAX_LINE_BYTES + 2);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!((offset, lines), (input.len() as u64, 1));
    }

    /// xorshift64*: deterministic, dependency-free randomness for the property test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn any_block_split_gives_the_same_lines() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..300 {
            let max = 1 + rng.below(40) as usize;
            let len = rng.below(600) as usize;
            // Mostly short lines, some longer than the limit, a few `\r`s.
            let input: Vec<u8> = (0..len)
                .map(|_| match rng.below(20) {
                    0..=1 => b'\n',
                    2 => b'\r',
                    _ => b'a' + rng.below(26) as u8,
                })
                .collect();
            let finish = case % 2 == 0;
            let expected = split_whole(&input, max, finish);

            let mut s = LineSplitter::with_max_line(0, 0, max);
            let mut out = Vec::new();
            let mut rest = input.as_slice();
            let mut counted = 0;
            while !rest.is_empty() {
                let n = (1 + rng.below(50) as usize).min(rest.len());
                counted += s.push(&rest[..n], &mut out);
                rest = &rest[n..];
                assert_eq!(s.offset() + s.partial_len, (len - rest.len()) as u64);
            }
            if finish {
                counted += u64::from(s.finish(&mut out));
            }
            assert_eq!((out, s.offset(), s.lines()), expected, "case {case}");
            assert_eq!(counted, expected.2);
            if finish {
                assert_eq!(expected.1, len as u64);
            }
        }
    }
}
