//! A write request served (`--tftp-write`): DATA blocks come in, each window acknowledged,
//! into an unnamed file created for this upload alone, linked into place under its name when
//! the last block is in. An upload that does not complete — timed out, aborted, over
//! `--tftp-max-file`, its process killed — leaves nothing behind.

use std::fs::File;
use std::io::Write;
use std::time::Instant;

use protocol::stats::Counters;

use super::link::Link;
use super::netascii::Decoder;
use super::packet::{self, Code, Packet, Refusal};
use super::root::Created;
use crate::service::Step;

/// Bytes written between two looks at the free space (one `fstatvfs` each).
const FREE_CHECK: u64 = 64 << 10;

/// An upload in progress.
#[derive(Debug)]
pub struct Receiving {
    link: Link,
    file: File,
    created: Created,
    blksize: usize,
    window: usize,
    /// The OACK, until the first DATA block shows the client took it.
    oack: Option<Vec<u8>>,
    /// The last block received in order (0: none yet).
    received: u64,
    /// Blocks received since the last ACK.
    unacked: usize,
    written: u64,
    max_file: u64,
    /// Bytes the upload must leave free on the file system (`--tftp-min-free`).
    min_free: u64,
    /// Netascii uploads are decoded on the way to disk.
    decoder: Option<Decoder>,
    decoded: Vec<u8>,
    /// The last block is in and acknowledged; the ACK is repeated if the client, having
    /// lost it, sends the block again, until the deadline (RFC 1350's "dally").
    dallying: bool,
    started: bool,
}

impl Receiving {
    /// An upload into `file` (which `created` removes on failure).
    pub fn new(
        link: Link,
        (file, created): (File, Created),
        (blksize, window): (usize, usize),
        oack: Option<Vec<u8>>,
        (netascii, max_file, min_free): (bool, u64, u64),
    ) -> Receiving {
        Receiving {
            link,
            file,
            created,
            blksize,
            window,
            oack,
            received: 0,
            unacked: 0,
            written: 0,
            max_file,
            min_free,
            decoder: netascii.then(Decoder::default),
            decoded: Vec::new(),
            dallying: false,
            started: false,
        }
    }

    /// The transfer's socket.
    pub fn link(&self) -> &Link {
        &self.link
    }

    fn ack_received(&self, counters: &mut Counters) {
        self.link.send(&packet::ack(self.received as u16), counters);
    }

    /// Gives up: tells the client why and removes the partial file.
    fn refuse(&mut self, why: Refusal, counters: &mut Counters) -> Step {
        self.link.send(&why.packet(), counters);
        self.created.remove();
        Step::Failed
    }

    /// Writes one block's payload to the file.
    fn store(&mut self, payload: &[u8], last: bool) -> Result<(), Refusal> {
        let bytes: &[u8] = match self.decoder.as_mut() {
            Some(d) => {
                self.decoded.clear();
                d.decode(payload, &mut self.decoded);
                if last {
                    d.finish(&mut self.decoded);
                }
                &self.decoded
            }
            None => payload,
        };
        if self.written + bytes.len() as u64 > self.max_file {
            return Err(Refusal::new(Code::DiskFull, "file larger than allowed"));
        }
        // The floor of free space, looked at before each stretch of FREE_CHECK bytes (the
        // first block included): there must be room for the stretch above the floor.
        let after = self.written + bytes.len() as u64;
        if self.written == 0 || after / FREE_CHECK != self.written / FREE_CHECK {
            let free = self.created.free_bytes()?;
            let stretch = FREE_CHECK.max(bytes.len() as u64);
            if free < self.min_free.saturating_add(stretch) {
                return Err(Refusal::new(Code::DiskFull, "not enough free space"));
            }
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Refusal::new(Code::DiskFull, format!("cannot write: {e}")))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// The first answer (ACK 0 or the OACK), or a retransmission when the deadline passed.
    pub fn on_time(&mut self, now: Instant, counters: &mut Counters) -> Step {
        if !std::mem::replace(&mut self.started, true) {
            match &self.oack {
                Some(oack) => self.link.send(oack, counters),
                None => self.ack_received(counters),
            }
            self.link.progressed(now);
            return Step::Going;
        }
        if self.dallying {
            return Step::Done;
        }
        if self.link.is_gone() || !self.link.retry(now) {
            self.created.remove();
            return Step::Failed;
        }
        counters.retransmits += 1;
        match &self.oack {
            Some(oack) => self.link.send(oack, counters),
            // RFC 7440: on a timeout the receiver acknowledges the last block it has in order.
            None => self.ack_received(counters),
        }
        Step::Going
    }

    /// DATA blocks (and anything else the client sends).
    pub fn on_readable(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Step {
        while let Some(n) = self.link.recv(scratch, counters) {
            let (block, payload) = match packet::packet(&scratch[..n]) {
                Packet::Data(block, payload) => (block, payload),
                Packet::Error(_) if !self.dallying => {
                    self.created.remove();
                    return Step::Failed;
                }
                _ => continue,
            };
            if self.dallying || block != (self.received + 1) as u16 {
                // A block sent again (our ACK was lost) or out of order: say where we are.
                // The sender ignores an ACK that does not move it on, so this cannot storm.
                self.ack_received(counters);
                continue;
            }
            if payload.len() > self.blksize {
                let r = Refusal::new(Code::Illegal, "block larger than negotiated");
                return self.refuse(r, counters);
            }
            let last = payload.len() < self.blksize;
            if let Err(r) = self.store(payload, last) {
                return self.refuse(r, counters);
            }
            // Complete: only now does the file appear under its name.
            if last {
                if let Err(r) = self.created.publish(&self.file) {
                    return self.refuse(r, counters);
                }
            }
            self.oack = None;
            self.received += 1;
            self.unacked += 1;
            counters.transfer_bytes += payload.len() as u64;
            let now = Instant::now();
            if last {
                self.ack_received(counters);
                self.dallying = true;
                self.link.progressed(now);
                self.link.wait(now, self.link.timeout * 2);
            } else {
                if self.unacked == self.window {
                    self.ack_received(counters);
                    self.unacked = 0;
                }
                self.link.progressed(now);
            }
        }
        if self.link.is_gone() && !self.dallying {
            self.created.remove();
            return Step::Failed;
        }
        Step::Going
    }

    /// Ends the upload early, telling the client why (`None`: silently); the partial
    /// file goes.
    pub fn abort(&mut self, why: Option<Refusal>, counters: &mut Counters) -> Step {
        if self.dallying {
            return Step::Done;
        }
        match why {
            Some(why) => self.refuse(why, counters),
            None => {
                self.created.remove();
                Step::Failed
            }
        }
    }
}
