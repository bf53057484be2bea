//! The bus between a service's processes: how a chat message said to one worker reaches the
//! clients every other worker holds.
//!
//! A hub (the master, or fork-per-conn's parent) holds one Unix stream socket per member
//! process. A member sends frames; the hub stamps each with the sender's pid and passes it to
//! every other member, in the order received, so each sender's frames arrive everywhere in the
//! order it sent them. `State` frames are also kept by the hub under (sender, key), so a member
//! that joins later is first sent the state of everyone already there (who is in the room);
//! when a member's socket ends, the hub drops its state and sends `Gone`. The hub never looks
//! inside a body: what the bodies mean is the service's business.
//!
//! One request has an answer: a member `Claim`s an opaque token (a chat name) for one of its
//! keys, and the hub, which alone sees every member, answers that member alone `Granted` or
//! `Refused` (held by another key). A key holds one token at a time: a granted claim releases
//! the key's previous one, an empty claim releases it, and a member's tokens are released
//! when it leaves the bus.
//!
//! Frame: `u32` little-endian length of what follows, `u8` version, `u8` kind, `u32` origin
//! (the sender's pid; 0 from a member, stamped by the hub), a `u64` key (`State`, `Claim`,
//! `Granted`, `Refused`; 0 otherwise); then the body.

use std::io::{self, Write};

use thiserror::Error;

/// Bus protocol version; a frame of another version is refused.
pub const VERSION: u8 = 2;
/// Largest frame body (a chat line and its sender's name fit with room to spare).
pub const MAX_BODY: usize = 64 * 1024;
/// Bytes before the body: length, version, kind, origin, key.
const HEAD: usize = 4 + 1 + 1 + 4 + 8;

const KIND_CAST: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_GONE: u8 = 3;
const KIND_CLAIM: u8 = 4;
const KIND_GRANTED: u8 = 5;
const KIND_REFUSED: u8 = 6;

/// One bus frame, borrowing its body from the decoder's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// For every other member.
    Cast {
        /// The sender's pid (0 until the hub stamps it).
        origin: u32,
        /// What the service says.
        body: &'a [u8],
    },
    /// For every other member, and kept by the hub for later members; an empty body deletes.
    State {
        /// The sender's pid (0 until the hub stamps it).
        origin: u32,
        /// Which of the sender's states (a chat client, say).
        key: u64,
        /// Its new value.
        body: &'a [u8],
    },
    /// From the hub only: the member `origin` left the bus; forget all its state.
    Gone {
        /// The pid of the member that left.
        origin: u32,
    },
    /// To the hub only: hold the token `body` for `key` alone (empty: release the key's).
    Claim {
        /// The sender's pid (0 until the hub stamps it).
        origin: u32,
        /// Which of the sender's keys claims it.
        key: u64,
        /// The token (opaque to the hub).
        body: &'a [u8],
    },
    /// From the hub, to the claimant only: `key` now holds `body`.
    Granted {
        /// 0: the hub.
        origin: u32,
        /// The key that claimed it.
        key: u64,
        /// The token.
        body: &'a [u8],
    },
    /// From the hub, to the claimant only: another key holds `body`.
    Refused {
        /// 0: the hub.
        origin: u32,
        /// The key that claimed it.
        key: u64,
        /// The token.
        body: &'a [u8],
    },
}

/// Why a frame could not be decoded: the peer is broken or hostile, and is dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The length prefix exceeds the limit.
    #[error("bus frame of {0} bytes exceeds the limit")]
    Oversize(usize),
    /// The length cannot hold the header its kind needs.
    #[error("bus frame of {0} bytes is too short")]
    Short(usize),
    /// Another protocol version.
    #[error("unsupported bus version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown bus frame kind {0}")]
    Kind(u8),
}

impl Frame<'_> {
    /// Appends this frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, origin, key, body): (u8, u32, u64, &[u8]) = match *self {
            Frame::Cast { origin, body } => (KIND_CAST, origin, 0, body),
            Frame::State { origin, key, body } => (KIND_STATE, origin, key, body),
            Frame::Gone { origin } => (KIND_GONE, origin, 0, &[]),
            Frame::Claim { origin, key, body } => (KIND_CLAIM, origin, key, body),
            Frame::Granted { origin, key, body } => (KIND_GRANTED, origin, key, body),
            Frame::Refused { origin, key, body } => (KIND_REFUSED, origin, key, body),
        };
        out.extend_from_slice(&((HEAD - 4 + body.len()) as u32).to_le_bytes());
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&origin.to_le_bytes());
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(body);
    }

    /// The same frame from `origin` (the hub stamps what a member sent).
    pub fn from(self, origin: u32) -> Self {
        match self {
            Frame::Cast { body, .. } => Frame::Cast { origin, body },
            Frame::State { key, body, .. } => Frame::State { origin, key, body },
            Frame::Gone { .. } => Frame::Gone { origin },
            Frame::Claim { key, body, .. } => Frame::Claim { origin, key, body },
            Frame::Granted { key, body, .. } => Frame::Granted { origin, key, body },
            Frame::Refused { key, body, .. } => Frame::Refused { origin, key, body },
        }
    }

    /// Bytes it takes on the wire.
    pub fn wire_len(&self) -> usize {
        HEAD + match self {
            Frame::Cast { body, .. }
            | Frame::State { body, .. }
            | Frame::Claim { body, .. }
            | Frame::Granted { body, .. }
            | Frame::Refused { body, .. } => body.len(),
            Frame::Gone { .. } => 0,
        }
    }
}

/// Frames waiting for a bus socket, written as far as it takes them without blocking.
#[derive(Debug, Default)]
pub struct Outgoing {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
}

impl Outgoing {
    /// Queues a frame.
    pub fn push(&mut self, frame: Frame<'_>) {
        frame.encode(&mut self.buf);
    }

    /// Bytes queued and not yet written.
    pub fn backlog(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Writes what `w` takes now; `Err` when the peer is gone.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match w.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Written bytes are dropped once all is sent, or once they are many.
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.sent >= 256 * 1024 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf` (consumed bytes are dropped on the next push).
    start: usize,
}

impl Decoder {
    /// Appends bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes waiting to be decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, BusError> {
        let rest = &self.buf[self.start..];
        let Some(len) = rest.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > HEAD - 4 + MAX_BODY {
            return Err(BusError::Oversize(len));
        }
        if len < HEAD - 4 {
            return Err(BusError::Short(len));
        }
        if rest.len() < 4 + len {
            return Ok(None);
        }
        let at = self.start;
        self.start += 4 + len;
        let f = &self.buf[at + 4..at + 4 + len];
        if f[0] != VERSION {
            return Err(BusError::Version(f[0]));
        }
        let origin = u32::from_le_bytes([f[2], f[3], f[4], f[5]]);
        let mut key = [0u8; 8];
        key.copy_from_slice(&f[6..14]);
        let body = &f[14..];
        let key = u64::from_le_bytes(key);
        match f[1] {
            KIND_CAST => Ok(Some(Frame::Cast { origin, body })),
            KIND_STATE => Ok(Some(Frame::State { origin, key, body })),
            KIND_GONE => Ok(Some(Frame::Gone { origin })),
            KIND_CLAIM => Ok(Some(Frame::Claim { origin, key, body })),
            KIND_GRANTED => Ok(Some(Frame::Granted { origin, key, body })),
            KIND_REFUSED => Ok(Some(Frame::Refused { origin, key, body })),
            other => Err(BusError::Kind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_or_a_byte_at_a_time() {
        let frames = [
            Frame::Cast {
                origin: 7,
                body: b"alice: hi\n",
            },
            Frame::State {
                origin: 0,
                key: u64::MAX,
                body: b"bob",
            },
            Frame::Gone { origin: 42 },
            Frame::Cast {
                origin: 1,
                body: b"",
            },
            Frame::Claim {
                origin: 0,
                key: 5,
                body: b"ann",
            },
            Frame::Granted {
                origin: 0,
                key: 5,
                body: b"ann",
            },
            Frame::Refused {
                origin: 0,
                key: 6,
                body: b"ann",
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        assert_eq!(
            wire.len(),
            frames.iter().map(Frame::wire_len).sum::<usize>()
        );
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(format!("{f:?}"));
            }
        }
        let want: Vec<String> = frames.iter().map(|f| format!("{f:?}")).collect();
        assert_eq!(got, want);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn hostile_lengths_versions_and_kinds_are_refused() {
        let mut d = Decoder::default();
        d.push(&u32::MAX.to_le_bytes());
        assert!(matches!(d.next_frame(), Err(BusError::Oversize(_))));
        let mut d = Decoder::default();
        d.push(&3u32.to_le_bytes());
        assert_eq!(d.next_frame(), Err(BusError::Short(3)));
        let mut wire = Vec::new();
        Frame::Gone { origin: 1 }.encode(&mut wire);
        let mut bad = wire.clone();
        bad[4] = 99;
        let mut d = Decoder::default();
        d.push(&bad);
        assert_eq!(d.next_frame(), Err(BusError::Version(99)));
        wire[5] = 9;
        let mut d = Decoder::default();
        d.push(&wire);
        assert_eq!(d.next_frame(), Err(BusError::Kind(9)));
    }

    #[test]
    fn the_hub_stamps_the_origin() {
        let f = Frame::State {
            origin: 0,
            key: 3,
            body: b"x",
        };
        assert_eq!(
            f.from(9),
            Frame::State {
                origin: 9,
                key: 3,
                body: b"x"
            }
        );
    }
}
