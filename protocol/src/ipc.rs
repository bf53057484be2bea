//! The worker-to-master channel: a Unix stream socket carrying length-prefixed, versioned
//! frames of one message enum.
//!
//! The master makes a socket pair per worker before it forks; the worker inherits its end.
//! An inherited pair needs no name to guess or authenticate, and its end-of-file tells the
//! master the worker is gone (and the worker that the master is).
//!
//! Frame: `u32` little-endian body length, then the body: `u8` version, `u8` kind, payload.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use interprocess::local_socket::traits::Stream as _;
use interprocess::os::unix::uds_local_socket::Stream;
use thiserror::Error;

use crate::stats::Counters;

/// Protocol version; a frame of another version is refused, never guessed at.
pub const VERSION: u8 = 6;
/// Largest body accepted; anything longer is a broken or hostile peer.
pub const MAX_FRAME: usize = 256;

const KIND_READY: u8 = 1;
const KIND_REPORT: u8 = 2;
const KIND_FINAL: u8 = 3;
const KIND_DRAINING: u8 = 4;

/// A message from a worker to its master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// The worker is accepting connections.
    Ready,
    /// Periodic counters; doubles as a heartbeat.
    Report(Counters),
    /// Last counters, sent as the worker exits.
    Final(Counters),
    /// The worker stopped accepting (it was sent SIGTERM): its slot needs a replacement.
    Draining,
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversize(usize),
    /// The body is too short to hold a version and a kind.
    #[error("frame of {0} bytes is too short")]
    Short(usize),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// The kind byte names no message.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// The payload length does not fit the kind.
    #[error("message kind {kind} with a {len}-byte payload")]
    Payload {
        /// Kind byte.
        kind: u8,
        /// Payload length found.
        len: usize,
    },
}

impl Message {
    /// Appends this message's frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, counters) = match self {
            Message::Ready => (KIND_READY, None),
            Message::Draining => (KIND_DRAINING, None),
            Message::Report(c) => (KIND_REPORT, Some(c)),
            Message::Final(c) => (KIND_FINAL, Some(c)),
        };
        let payload_len = counters.map_or(0, |_| Counters::FIELDS * 8);
        out.extend_from_slice(&((2 + payload_len) as u32).to_le_bytes());
        out.push(VERSION);
        out.push(kind);
        if let Some(c) = counters {
            for v in c.to_array() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
        let [version, kind, payload @ ..] = body else {
            return Err(DecodeError::Short(body.len()));
        };
        if *version != VERSION {
            return Err(DecodeError::Version(*version));
        }
        let counters = || -> Result<Counters, DecodeError> {
            if payload.len() != Counters::FIELDS * 8 {
                return Err(DecodeError::Payload {
                    kind: *kind,
                    len: payload.len(),
                });
            }
            let mut a = [0u64; Counters::FIELDS];
            for (slot, chunk) in a.iter_mut().zip(payload.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                *slot = u64::from_le_bytes(b);
            }
            Ok(Counters::from_array(a))
        };
        match *kind {
            KIND_READY if payload.is_empty() => Ok(Message::Ready),
            KIND_DRAINING if payload.is_empty() => Ok(Message::Draining),
            KIND_READY | KIND_DRAINING => Err(DecodeError::Payload {
                kind: *kind,
                len: payload.len(),
            }),
            KIND_REPORT => counters().map(Message::Report),
            KIND_FINAL => counters().map(Message::Final),
            other => Err(DecodeError::Kind(other)),
        }
    }
}

/// Reassembles frames from a byte stream that may split or join them anywhere.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Adds bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the
    /// stream cannot be resynchronised: the caller drops the channel.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        let Some(prefix) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::Oversize(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = Message::decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

/// The worker's sending end. It never blocks the echo path: when the master is slow, a
/// report that cannot be written whole is kept, and newer reports are dropped until it is
/// out (they are cumulative, so the next one makes up for them).
#[derive(Debug)]
pub struct Reporter {
    stream: Stream,
    unsent: Vec<u8>,
}

impl Reporter {
    /// Wraps the inherited end of the socket pair and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let stream = Stream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Reporter {
            stream,
            unsent: Vec::new(),
        })
    }

    /// The socket, to watch for the master's end-of-file.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Queues `msg` unless an older frame is still stuck, then writes what it can.
    /// `Err` means the master is gone.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        self.flush()?;
        if self.unsent.is_empty() {
            msg.encode(&mut self.unsent);
            self.flush()?;
        }
        Ok(())
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.unsent.is_empty() {
            match (&self.stream).write(&self.unsent) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.unsent.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a last message, waiting for room up to `timeout`: used once, at exit.
    pub fn send_last(&mut self, msg: &Message, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        // Drop a stale partial frame's successors only: finish it, then append ours.
        loop {
            self.flush()?;
            if self.unsent.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        msg.encode(&mut self.unsent);
        loop {
            self.flush()?;
            if self.unsent.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Counters {
        Counters {
            accepted: 1,
            active: 2,
            bytes_in: u64::MAX,
            bytes_out: 4,
            accept_errors: 5,
            io_errors: 6,
            closed_by_limit: 7,
            datagrams_in: 8,
            datagrams_out: 9,
            datagrams_refused: 10,
            proxy_errors: 11,
            transfers: 12,
            transfers_done: 13,
            transfers_failed: 14,
            transfer_bytes: 15,
            retransmits: 16,
            chat_lines: 17,
            chat_deliveries: 18,
            slow_consumers: 19,
            bus_out: 20,
            bus_in: 21,
        }
    }

    #[test]
    fn round_trips_every_message_split_at_every_byte() {
        let msgs = [
            Message::Ready,
            Message::Draining,
            Message::Report(sample()),
            Message::Final(sample()),
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        for split in 0..wire.len() {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                d.push(part);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "split at {split}");
        }
    }

    #[test]
    fn refuses_oversize_versions_kinds_and_bad_payloads() {
        let mut d = FrameDecoder::default();
        d.push(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert_eq!(d.next_message(), Err(DecodeError::Oversize(MAX_FRAME + 1)));

        let cases: [(&[u8], DecodeError); 4] = [
            (&[1, 0, 0, 0, 9], DecodeError::Short(1)),
            (&[2, 0, 0, 0, 9, 1], DecodeError::Version(9)),
            (&[2, 0, 0, 0, VERSION, 77], DecodeError::Kind(77)),
            (
                &[3, 0, 0, 0, VERSION, KIND_REPORT, 0],
                DecodeError::Payload {
                    kind: KIND_REPORT,
                    len: 1,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut d = FrameDecoder::default();
            d.push(bytes);
            assert_eq!(d.next_message(), Err(want));
        }
    }

    #[test]
    fn reporter_coalesces_instead_of_blocking_when_the_master_is_slow() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = Reporter::new(OwnedFd::from(ours)).unwrap();
        // Nobody reads `theirs`: the socket buffer fills, and a blocking send would hang here.
        for i in 0..200_000u64 {
            let c = Counters {
                accepted: i,
                ..Counters::default()
            };
            r.send(&Message::Report(c)).unwrap();
        }
        assert!(!r.unsent.is_empty(), "the buffer should have filled");
        // Whatever arrived decodes cleanly and is in order.
        theirs.set_nonblocking(true).unwrap();
        let mut d = FrameDecoder::default();
        let mut buf = vec![0u8; 1 << 16];
        let mut last = None;
        loop {
            match std::io::Read::read(&mut &theirs, &mut buf) {
                Ok(0) => break,
                Ok(n) => d.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            while let Some(Message::Report(c)) = d.next_message().unwrap() {
                assert!(last.is_none_or(|l| c.accepted > l));
                last = Some(c.accepted);
            }
        }
        assert!(last.is_some());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever a broken or hostile peer sends, in whatever pieces, decoding ends in
            /// messages, "need more", or a typed error: never a panic, never unbounded growth.
            #[test]
            fn the_decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
                let mut d = FrameDecoder::default();
                for chunk in chunks {
                    d.push(&chunk);
                    while let Ok(Some(_)) = d.next_message() {}
                }
            }

            #[test]
            fn reports_round_trip(a in any::<[u64; Counters::FIELDS]>()) {
                let msg = Message::Report(Counters::from_array(a));
                let mut wire = Vec::new();
                msg.encode(&mut wire);
                let mut d = FrameDecoder::default();
                d.push(&wire);
                prop_assert_eq!(d.next_message(), Ok(Some(msg)));
            }
        }
    }
}
