//! Splitting a byte stream into chat lines, each at most `--max-line` bytes: a longer one is
//! reported once and skipped to its end, so a client that never sends a newline costs a
//! bounded buffer, never unbounded memory.

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
    partial: Vec<u8>,
    max: usize,
    /// Inside a line that was too long: drop bytes up to its newline.
    skipping: bool,
}

impl LineReader {
    /// A reader for lines of at most `max` bytes.
    pub fn new(max: usize) -> LineReader {
        LineReader {
            partial: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// Bytes of an unfinished line held.
    pub fn held(&self) -> usize {
        self.partial.len()
    }

    /// Feeds bytes read; calls `each` for every line they complete, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(Line<'_>)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let piece = &bytes[..newline.unwrap_or(bytes.len())];
            bytes = newline.map_or(&[][..], |at| &bytes[at + 1..]);
            if self.skipping {
                self.skipping = newline.is_none();
                continue;
            }
            if self.partial.len() + piece.len() > self.max {
                self.partial = Vec::new();
                self.skipping = newline.is_none();
                each(Line::TooLong);
                continue;
            }
            if newline.is_none() {
                self.partial.extend_from_slice(piece);
                continue;
            }
            let line = if self.partial.is_empty() {
                piece
            } else {
                self.partial.extend_from_slice(piece);
                &self.partial[..]
            };
            each(Line::Whole(line.strip_suffix(b"\r").unwrap_or(line)));
            self.partial.clear();
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
            r.feed(c, |l| {
                out.push(match l {
                    Line::Whole(b) => String::from_utf8_lossy(b).into_owned(),
                    Line::TooLong => "<too long>".into(),
                })
            });
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
    fn an_endless_line_holds_at_most_the_limit() {
        let mut r = LineReader::new(8);
        let mut too_long = 0;
        for _ in 0..1000 {
            r.feed(b"xxxxx", |_| too_long += 1);
            assert!(r.held() <= 8);
        }
        assert_eq!(too_long, 1);
    }
}
