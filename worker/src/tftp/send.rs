//! A read request served: the file goes out in DATA blocks, `windowsize` of them at a time
//! (RFC 7440), each window acknowledged before the next.
//!
//! The rule that keeps this honest under loss is RFC 1123's cure for the Sorcerer's
//! Apprentice: only an ACK that moves the window forward sends anything; a duplicate or stale
//! ACK is ignored, and lost packets are recovered by the timer alone. An ACK for a block in
//! the middle of the window (the client saw a gap) restarts the window after that block.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::time::Instant;

use protocol::stats::Counters;

use super::link::Link;
use super::packet::{self, Code, Packet, Refusal};
use crate::service::Step;

/// A download in progress.
pub struct Sending {
    link: Link,
    source: Box<dyn Read + Send>,
    blksize: usize,
    window_max: usize,
    /// The OACK, while it awaits its ACK 0.
    oack: Option<Vec<u8>>,
    /// DATA packets sent and not yet acknowledged, oldest first.
    window: VecDeque<Vec<u8>>,
    /// Buffers of acknowledged packets, reused.
    spare: Vec<Vec<u8>>,
    /// The highest block the client acknowledged (blocks count from 1; numbers on the wire
    /// are this modulo 65,536, so files of any length go through).
    acked: u64,
    /// The short block that ends the file has been read.
    at_end: bool,
    started: bool,
}

impl std::fmt::Debug for Sending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending")
            .field("peer", &self.link.peer)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

/// Reads until `buf` is full or the source ends.
fn fill_block(source: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Sending {
    /// A download of `source` over `link`; `oack` is sent first when options were taken.
    pub fn new(
        link: Link,
        source: Box<dyn Read + Send>,
        (blksize, window_max): (usize, usize),
        oack: Option<Vec<u8>>,
    ) -> Sending {
        Sending {
            link,
            source,
            blksize,
            window_max,
            oack,
            window: VecDeque::with_capacity(window_max),
            spare: Vec::new(),
            acked: 0,
            at_end: false,
            started: false,
        }
    }

    /// The transfer's socket.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Reads blocks until the window is full or the file ends.
    fn fill(&mut self, counters: &mut Counters) -> io::Result<()> {
        while self.window.len() < self.window_max && !self.at_end {
            let number = (self.acked + self.window.len() as u64 + 1) as u16;
            // The block is read straight into the packet, after its 4-byte header.
            let mut p = self.spare.pop().unwrap_or_default();
            packet::data(number, &[], &mut p);
            p.resize(4 + self.blksize, 0);
            let n = fill_block(&mut self.source, &mut p[4..])?;
            p.truncate(4 + n);
            self.window.push_back(p);
            counters.transfer_bytes += n as u64;
            self.at_end = n < self.blksize;
        }
        Ok(())
    }

    /// Sends every packet of the window (in one call where the kernel allows).
    fn send_window(&self, counters: &mut Counters) -> u64 {
        let packets: Vec<&[u8]> = self.window.iter().map(Vec::as_slice).collect();
        self.link
            .send_segments(&packets, 4 + self.blksize, counters);
        self.window.len() as u64
    }

    /// Fills the window and sends it; a file that cannot be read ends the transfer.
    fn advance(&mut self, now: Instant, counters: &mut Counters) -> Step {
        if let Err(e) = self.fill(counters) {
            let msg = format!("cannot read the file: {e}");
            self.link
                .send(&packet::error(Code::Undefined, &msg), counters);
            return Step::Failed;
        }
        self.send_window(counters);
        self.link.progressed(now);
        Step::Going
    }

    /// The first packet, or a retransmission when the deadline passed.
    pub fn on_time(&mut self, now: Instant, counters: &mut Counters) -> Step {
        if !std::mem::replace(&mut self.started, true) {
            return match &self.oack {
                Some(oack) => {
                    self.link.send(oack, counters);
                    self.link.progressed(now);
                    Step::Going
                }
                None => self.advance(now, counters),
            };
        }
        if self.link.is_gone() || !self.link.retry(now) {
            return Step::Failed;
        }
        counters.retransmits += match &self.oack {
            Some(oack) => {
                self.link.send(oack, counters);
                1
            }
            None => self.send_window(counters),
        };
        Step::Going
    }

    /// Acknowledgements (and anything else the client sends).
    pub fn on_readable(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Step {
        while let Some(n) = self.link.recv(scratch, counters) {
            let block = match packet::packet(&scratch[..n]) {
                Packet::Ack(block) => block,
                Packet::Error(_) => return Step::Failed,
                Packet::Data(..) | Packet::Other => continue,
            };
            let now = Instant::now();
            if self.oack.is_some() {
                if block == 0 {
                    self.oack = None;
                    if self.advance(now, counters) == Step::Failed {
                        return Step::Failed;
                    }
                }
                continue;
            }
            let ahead = usize::from(block.wrapping_sub(self.acked as u16));
            if ahead == 0 || ahead > self.window.len() {
                continue; // a duplicate or stale ACK: never answered (Sorcerer's Apprentice)
            }
            self.acked += ahead as u64;
            for p in self.window.drain(..ahead) {
                self.spare.push(p);
            }
            if self.window.is_empty() && self.at_end {
                return Step::Done;
            }
            if self.advance(now, counters) == Step::Failed {
                return Step::Failed;
            }
        }
        if self.link.is_gone() {
            return Step::Failed;
        }
        Step::Going
    }

    /// Ends the transfer early, telling the client why (`None`: silently).
    pub fn abort(&mut self, why: Option<Refusal>, counters: &mut Counters) -> Step {
        if let Some(why) = why {
            self.link.send(&why.packet(), counters);
        }
        Step::Failed
    }
}
