//! TFTP's wire format (RFC 1350, options RFC 2347): parsing what a peer sends, which may be
//! anything, and building what the server sends. Parsing never panics and never allocates
//! more than the packet it reads.

use std::borrow::Cow;

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;

/// Options a request may carry at most; more is not a client, it is a probe.
const MAX_OPTIONS: usize = 16;

/// TFTP's error codes (RFC 1350, 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Not defined, see the message.
    Undefined = 0,
    /// File not found.
    NotFound = 1,
    /// Access violation.
    Access = 2,
    /// Disk full or allocation exceeded.
    DiskFull = 3,
    /// Illegal TFTP operation.
    Illegal = 4,
    /// Unknown transfer ID.
    UnknownTid = 5,
    /// File already exists.
    Exists = 6,
    /// Option negotiation refused.
    Options = 8,
}

/// A TFTP error to send: a code and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: Code,
    /// What the peer is told.
    pub message: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with this code and message.
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// Its ERROR packet.
    pub fn packet(&self) -> Vec<u8> {
        error(self.code, &self.message)
    }
}

/// How the file's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes as they are.
    Octet,
    /// Text, lines ending in CR LF on the wire (RFC 764's NVT ASCII).
    Netascii,
}

/// A read or write request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// A write request (WRQ), else a read request (RRQ).
    pub write: bool,
    /// The file name as sent (any bytes but NUL).
    pub filename: &'a [u8],
    /// Transfer mode.
    pub mode: Mode,
    /// Options, names lower-cased, in the order sent.
    pub options: Vec<(String, &'a str)>,
}

/// A packet on a transfer's own socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A block of the file.
    Data(u16, &'a [u8]),
    /// An acknowledgement.
    Ack(u16),
    /// The peer gave up.
    Error(u16),
    /// Anything else (a request, an OACK, garbage).
    Other,
}

fn opcode(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*p.first()?, *p.get(1)?]))
}

/// Parses a packet that arrived on the shared socket, where only requests belong. `Err` is
/// the error to answer with; `Ok(None)` is a packet to drop without a word (a stray DATA,
/// ACK, ERROR or OACK: answering those could make two servers talk to each other forever).
pub fn request(p: &[u8]) -> Result<Option<Request<'_>>, Refusal> {
    let write = match opcode(p) {
        Some(RRQ) => false,
        Some(WRQ) => true,
        Some(DATA | ACK | ERROR | OACK) => return Ok(None),
        _ => return Err(Refusal::new(Code::Illegal, "unknown opcode")),
    };
    let body = &p[2..];
    let Some(body) = body.strip_suffix(&[0]) else {
        return Err(Refusal::new(Code::Illegal, "malformed request"));
    };
    let mut fields = body.split(|b| *b == 0);
    let filename = fields.next().unwrap_or_default();
    let mode = fields.next().unwrap_or_default();
    if filename.is_empty() {
        return Err(Refusal::new(
            Code::Illegal,
            "malformed request: no file name",
        ));
    }
    let mode = if mode.eq_ignore_ascii_case(b"octet") {
        Mode::Octet
    } else if mode.eq_ignore_ascii_case(b"netascii") {
        Mode::Netascii
    } else {
        return Err(Refusal::new(Code::Illegal, "unsupported mode"));
    };
    let mut options = Vec::new();
    // A name with no value (some clients pad with NULs) is dropped, as tftpd-hpa does.
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if name.is_empty() {
            continue;
        }
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return Err(Refusal::new(Code::Options, "option not ASCII"));
        };
        if options.len() == MAX_OPTIONS {
            return Err(Refusal::new(Code::Options, "too many options"));
        }
        options.push((name.to_ascii_lowercase(), value));
    }
    Ok(Some(Request {
        write,
        filename,
        mode,
        options,
    }))
}

/// Parses a packet that arrived on a transfer's socket.
pub fn packet(p: &[u8]) -> Packet<'_> {
    let block = || u16::from_be_bytes([p[2], p[3]]);
    match opcode(p) {
        Some(DATA) if p.len() >= 4 => Packet::Data(block(), &p[4..]),
        Some(ACK) if p.len() >= 4 => Packet::Ack(block()),
        Some(ERROR) if p.len() >= 4 => Packet::Error(block()),
        _ => Packet::Other,
    }
}

/// A DATA packet: `payload` after the header, written into `out` (cleared first).
pub fn data(block: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An ACK packet.
pub fn ack(block: u16) -> [u8; 4] {
    let [a, b] = ACK.to_be_bytes();
    let [c, d] = block.to_be_bytes();
    [a, b, c, d]
}

/// An ERROR packet.
pub fn error(code: Code, message: &str) -> Vec<u8> {
    let mut p = ERROR.to_be_bytes().to_vec();
    p.extend_from_slice(&(code as u16).to_be_bytes());
    p.extend(message.bytes().filter(|b| *b != 0));
    p.push(0);
    p
}

/// An OACK packet naming the options the server took, with the values it took.
pub fn oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut p = OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        p.extend_from_slice(name.as_bytes());
        p.push(0);
        p.extend_from_slice(value.as_bytes());
        p.push(0);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_tutorials_read_request() {
        // struct.pack("!H{}sb5sb", 1, name, 0, b"octet", 0), as the seed's downloader sends it.
        let p = b"\x00\x01hello.txt\x00octet\x00";
        let r = request(p).unwrap().unwrap();
        assert_eq!(r.filename, b"hello.txt");
        assert_eq!((r.write, r.mode), (false, Mode::Octet));
        assert!(r.options.is_empty());
    }

    #[test]
    fn parses_options_case_blind_and_drops_padding() {
        let p = b"\x00\x02f\x00NetASCII\x00BLKSIZE\x001468\x00tsize\x000\x00\x00";
        let r = request(p).unwrap().unwrap();
        assert!(r.write);
        assert_eq!(r.mode, Mode::Netascii);
        assert_eq!(
            r.options,
            vec![("blksize".to_string(), "1468"), ("tsize".to_string(), "0")]
        );
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        let code = |p: &[u8]| request(p).unwrap_err().code;
        assert_eq!(code(b""), Code::Illegal);
        assert_eq!(code(b"\x00"), Code::Illegal);
        assert_eq!(code(b"\x00\x09x\x00octet\x00"), Code::Illegal);
        assert_eq!(code(b"\x00\x01x\x00octet"), Code::Illegal); // no final NUL
        assert_eq!(code(b"\x00\x01\x00octet\x00"), Code::Illegal); // no name
        assert_eq!(code(b"\x00\x01x\x00mail\x00"), Code::Illegal);
        assert_eq!(
            code(b"\x00\x01x\x00octet\x00\xff\x00\x01\x00"),
            Code::Options
        );
        // Answering a stray DATA/ACK/ERROR could start a loop with another server.
        assert_eq!(request(b"\x00\x04\x00\x01"), Ok(None));
        assert_eq!(request(b"\x00\x05\x00\x01oops\x00"), Ok(None));
    }

    #[test]
    fn builds_packets_byte_for_byte() {
        assert_eq!(ack(0x0102), [0, 4, 1, 2]);
        assert_eq!(error(Code::NotFound, "no\0pe"), b"\x00\x05\x00\x01nope\x00");
        assert_eq!(
            oack(&[("blksize", "1468".into())]),
            b"\x00\x06blksize\x001468\x00"
        );
        let mut out = vec![9; 3];
        data(65535, b"ab", &mut out);
        assert_eq!(out, b"\x00\x03\xff\xffab");
        assert_eq!(packet(&out), Packet::Data(65535, b"ab"));
        assert_eq!(packet(b"\x00\x04\x00"), Packet::Other);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]
        #[test]
        fn arbitrary_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = request(&p);
            let _ = packet(&p);
        }
    }
}
