//! One client's queue of lines to write: shared line buffers (a message to a thousand
//! clients is one allocation), a byte bound, and vectored writes that send many queued lines
//! in one system call.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

/// Lines handed to one `writev`.
const SLICES_PER_WRITE: usize = 64;

/// The bound was reached: the client is too slow to keep.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Lines owed to one client, in the order they must arrive.
#[derive(Debug, Default)]
pub struct Outbox {
    lines: VecDeque<Arc<[u8]>>,
    /// Bytes of the front line already written.
    front_done: usize,
    /// Bytes owed in all.
    owed: usize,
}

impl Outbox {
    /// Bytes owed.
    pub fn owed(&self) -> usize {
        self.owed
    }

    /// Queues a whole line, unless that would make more than `max` bytes owed.
    pub fn push(&mut self, line: Arc<[u8]>, max: usize) -> Result<(), Full> {
        if self.owed + line.len() > max {
            return Err(Full);
        }
        self.owed += line.len();
        self.lines.push_back(line);
        Ok(())
    }

    /// Forgets everything owed (a client being dropped).
    pub fn clear(&mut self) {
        *self = Outbox::default();
    }

    /// Writes until everything is sent or `w` would block; returns the bytes written.
    /// `WouldBlock` is not an error here: what is left stays queued.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<u64> {
        let mut total = 0u64;
        while self.owed > 0 {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let mut n = 0;
            for (i, line) in self.lines.iter().take(SLICES_PER_WRITE).enumerate() {
                let from = if i == 0 { self.front_done } else { 0 };
                slices[i] = IoSlice::new(&line[from..]);
                n += 1;
            }
            match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    total += written as u64;
                    self.consume(written);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    fn consume(&mut self, mut written: usize) {
        self.owed -= written;
        while let Some(front) = self.lines.front() {
            let left = front.len() - self.front_done;
            if written < left {
                self.front_done += written;
                return;
            }
            written -= left;
            self.front_done = 0;
            self.lines.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `room` bytes per call, then would block.
    struct Trickle {
        got: Vec<u8>,
        room: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_every_line_whole_and_in_order() {
        let mut o = Outbox::default();
        let mut want = Vec::new();
        for i in 0..200 {
            let line: Arc<[u8]> = format!("line {i}\n").into_bytes().into();
            want.extend_from_slice(&line);
            o.push(line, usize::MAX).unwrap();
        }
        let mut w = Trickle {
            got: Vec::new(),
            room: 7,
            calls: 0,
        };
        while o.owed() > 0 {
            o.write_to(&mut w).unwrap();
        }
        assert_eq!(w.got, want);
    }

    #[test]
    fn the_bound_refuses_what_would_exceed_it() {
        let mut o = Outbox::default();
        let line: Arc<[u8]> = Arc::from(&b"12345"[..]);
        assert_eq!(o.push(line.clone(), 10), Ok(()));
        assert_eq!(o.push(line.clone(), 10), Ok(()));
        assert_eq!(o.push(line, 10), Err(Full));
        assert_eq!(o.owed(), 10);
    }
}
