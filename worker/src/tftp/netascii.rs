//! Netascii (RFC 764's NVT ASCII, as RFC 1350 uses it): on the wire a line ends in CR LF and
//! a lone CR is sent as CR NUL. Both directions keep state across blocks, since a CR LF pair
//! may straddle two DATA packets.

use std::io::{self, Read};

/// Reads a local file as netascii.
#[derive(Debug)]
pub struct Encoder<R> {
    inner: R,
    /// The second byte of a pair whose first byte ended the previous read.
    pending: Option<u8>,
    buf: Vec<u8>,
}

impl<R: Read> Encoder<R> {
    /// Encodes what `inner` yields.
    pub fn new(inner: R) -> Encoder<R> {
        Encoder {
            inner,
            pending: None,
            buf: Vec::new(),
        }
    }
}

impl<R: Read> Read for Encoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        if n < out.len() {
            if let Some(b) = self.pending.take() {
                out[n] = b;
                n += 1;
            }
        }
        if n == out.len() {
            return Ok(n);
        }
        // Each input byte makes at most two: read at most half of what is left (at least
        // one; its second half, if any, waits in `pending`).
        let want = ((out.len() - n) / 2).max(1);
        self.buf.resize(want, 0);
        let got = self.inner.read(&mut self.buf)?;
        for &b in &self.buf[..got] {
            let pair = match b {
                b'\n' => Some([b'\r', b'\n']),
                b'\r' => Some([b'\r', 0]),
                _ => None,
            };
            match pair {
                Some([a, c]) => {
                    out[n] = a;
                    n += 1;
                    if n < out.len() {
                        out[n] = c;
                        n += 1;
                    } else {
                        self.pending = Some(c);
                    }
                }
                None => {
                    out[n] = b;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Turns netascii from the wire back into local text.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The last byte seen was a CR whose meaning the next byte decides.
    cr: bool,
}

impl Decoder {
    /// Decodes `wire` into `out` (appending).
    pub fn decode(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        for &b in wire {
            if std::mem::take(&mut self.cr) {
                match b {
                    b'\n' => out.push(b'\n'),
                    0 => out.push(b'\r'),
                    b'\r' => {
                        out.push(b'\r');
                        self.cr = true;
                    }
                    other => out.extend_from_slice(&[b'\r', other]),
                }
            } else if b == b'\r' {
                self.cr = true;
            } else {
                out.push(b);
            }
        }
    }

    /// The bytes still held at the end of the transfer (a final lone CR).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.cr) {
            out.push(b'\r');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(text: &[u8], block: usize) -> Vec<u8> {
        let mut e = Encoder::new(text);
        let mut wire = Vec::new();
        let mut buf = vec![0; block];
        loop {
            let n = e.read(&mut buf).unwrap();
            if n == 0 {
                return wire;
            }
            wire.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn lines_end_in_cr_lf_on_the_wire() {
        assert_eq!(encode(b"a\nb\rc", 512), b"a\r\nb\r\0c");
        let mut d = Decoder::default();
        let mut out = Vec::new();
        d.decode(b"a\r", &mut out);
        d.decode(b"\nb\r\0c\r", &mut out);
        d.finish(&mut out);
        assert_eq!(out, b"a\nb\rc\r");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn round_trips_whatever_the_block_boundaries(
            text in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(0u8), any::<u8>()], 0..400),
            block in 2usize..9,
            cut in 1usize..7,
        ) {
            let wire = encode(&text, block);
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                d.decode(chunk, &mut out);
            }
            d.finish(&mut out);
            prop_assert_eq!(out, text);
        }
    }
}
