//! Splitting a byte stream into chat lines, each at most `--max-line` bytes (not counting its
//! line end, `\n` or `\r\n`): a longer one is reported once and skipped to its end, so a
//! client that never sends a newline costs a bounded buffer, never unbounded memory.
//!
//! Lines are taken one at a time ([`LineReader::next_line`]), so a session can stop between
//! two of them (its turn is over, the room is holding senders, it was disconnected) and leave
//! the rest unread: no command runs after its client was dropped.

use std::io::{self, Read};

/// One line as the reader found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A whole line, without its `\n` (or `\r\n`).
    Whole(&'a [u8]),
    /// A line longer than the limit began; the rest of it is skipped.
    TooLong,
}

/// Reassembles lines across reads.
#[derive(Debug)]
pub struct LineReader {
    /// Bytes read and not yet taken as lines, from `start`.
    buf: Vec<u8>,
    start: usize,
    /// `buf[start..scanned]` holds no newline.
    scanned: usize,
    max: usize,
    /// Inside a line that was too long: drop bytes up to its newline.
    skipping: bool,
}

impl LineReader {
    /// A reader for lines of at most `max` bytes.
    pub fn new(max: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
            skipping: false,
        }
    }

    /// Bytes read and not yet taken as lines.
    pub fn held(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends bytes read elsewhere.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// One read of at most `chunk` bytes from `r` into the buffer; what `read` returned.
    pub fn read_from(&mut self, r: &mut impl Read, chunk: usize) -> io::Result<usize> {
        self.compact();
        let at = self.buf.len();
        self.buf.resize(at + chunk, 0);
        let got = r.read(&mut self.buf[at..]);
        self.buf.truncate(at + *got.as_ref().unwrap_or(&0));
        got
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
    }

    /// The next line among the bytes held, if a whole one (or the news of a long one) is there.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|at| self.scanned + at);
            let Some(end) = newline else {
                self.scanned = self.buf.len();
                let held = &self.buf[self.start..];
                if self.skipping {
                    self.start = self.buf.len();
                    return None;
                }
                // One byte more may be the CR of a line end still to come.
                let over = held.len() > self.max + 1
                    || (held.len() == self.max + 1 && held.last() != Some(&b'\r'));
                if over {
                    self.start = self.buf.len();
                    self.skipping = true;
                    return Some(Line::TooLong);
                }
                return None;
            };
            let from = self.start;
            self.start = end + 1;
            self.scanned = self.start;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            let line = &self.buf[from..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > self.max {
                return Some(Line::TooLong);
            }
            return Some(Line::Whole(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut r = LineReader::new(max);
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c);
            while let Some(l) = r.next_line() {
                out.push(match l {
                    Line::Whole(b) => String::from_utf8_lossy(b).into_owned(),
                    Line::TooLong => "<too long>".into(),
                });
            }
        }
        out
    }

    #[test]
    fn lines_are_whole_across_reads_without_their_line_ends() {
        assert_eq!(
            lines(100, &[b"he", b"llo\r\nwor", b"ld\n\n", b"tail"]),
            ["hello", "world", ""]
        );
    }

    #[test]
    fn a_line_over_the_limit_is_reported_once_and_skipped_to_its_end() {
        assert_eq!(
            lines(
                4,
                &[b"abcd\n", b"abcde", b"fgh", b"ij\nok\n", b"toolong\nx\n"]
            ),
            ["abcd", "<too long>", "ok", "<too long>", "x"]
        );
    }

    #[test]
    fn the_limit_counts_the_line_without_its_line_end() {
        assert_eq!(
            lines(
                4,
                &[b"abcd\r\n", b"abcd\r", b"\n", b"abc\r\r\n", b"abcd\rx\n"]
            ),
            ["abcd", "abcd", "abc\r", "<too long>"]
        );
    }

    #[test]
    fn an_endless_line_holds_at_most_the_limit() {
        let mut r = LineReader::new(8);
        let mut too_long = 0;
        for _ in 0..1000 {
            r.feed(b"xxxxx");
            while r.next_line().is_some() {
                too_long += 1;
            }
            assert!(r.held() <= 9);
        }
        assert_eq!(too_long, 1);
    }

    #[test]
    fn lines_can_be_taken_one_at_a_time_and_the_rest_kept() {
        let mut r = LineReader::new(10);
        r.read_from(&mut &b"a\nb\nc"[..], 64).unwrap();
        assert_eq!(r.next_line(), Some(Line::Whole(b"a")));
        r.feed(b"d\n");
        assert_eq!(r.next_line(), Some(Line::Whole(b"b")));
        assert_eq!(r.next_line(), Some(Line::Whole(b"cd")));
        assert_eq!(r.next_line(), None);
        assert_eq!(r.held(), 0);
    }
}
