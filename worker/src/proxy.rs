//! The PROXY protocol (HAProxy's `send-proxy` v1 text and `send-proxy-v2` binary headers): a
//! load balancer in front says who the real client is, before the client's first byte. The
//! engine reads and strips the header before the service sees anything (an echo must never
//! echo it back), and only from trusted peers (`--proxy-from`): from anyone else a header would
//! let a client lie about its address.
//!
//! The header is read with `MSG_PEEK` and then consumed to its exact length, so whatever the
//! client sent after it stays in the socket for the service.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

mod refusals;

pub use refusals::{LOGGED_PER_WINDOW, Refusal, WINDOW_SECS, log_refused, share_log};

/// The v2 signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Largest v2 header accepted (addresses plus TLVs); real balancers send far less.
pub const MAX_HEADER: usize = 1024;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes, to consume before the service's data.
    pub len: usize,
    /// The real client, or `None` for a balancer's own connection (v1 `UNKNOWN`, v2 `LOCAL`,
    /// or an address family other than TCP over IPv4/IPv6).
    pub source: Option<SocketAddr>,
}

/// Why a header was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes are not a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// It starts like one but is malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// Longer than allowed.
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// Parses the start of a connection: `Ok(None)` when more bytes are needed, `Ok(Some(..))`
/// with a complete header; never panics, whatever the bytes.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    if buf.len() >= 12 && buf[..12] == V2_SIG {
        return parse_v2(buf);
    }
    if V2_SIG.starts_with(&buf[..buf.len().min(12)]) && buf.len() < 12 {
        return Ok(None); // could still become v2
    }
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        if buf.len() < 6 {
            return Ok(None);
        }
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(ProxyError::TooLong);
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("not text"))?;
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Some(Header { len, source: None })),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("source address"))?;
            let _: IpAddr = dst
                .parse()
                .map_err(|_| ProxyError::Malformed("destination"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("address family"));
            }
            let port = port(sport)?;
            port_of(dport)?;
            Ok(Some(Header {
                len,
                source: Some(SocketAddr::new(ip, port)),
            }))
        }
        _ => Err(ProxyError::Malformed("v1 fields")),
    }
}

fn port(s: &str) -> Result<u16, ProxyError> {
    // Decimal, no sign, no leading zeros (the spec's form).
    if s.is_empty()
        || s.len() > 5
        || (s.len() > 1 && s.starts_with('0'))
        || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ProxyError::Malformed("port"));
    }
    s.parse().map_err(|_| ProxyError::Malformed("port"))
}

fn port_of(s: &str) -> Result<(), ProxyError> {
    port(s).map(|_| ())
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let addrs = &buf[16..len];
    let source = match (ver_cmd & 0x0f, fam) {
        (0x0, _) => None, // LOCAL: the balancer's own health check
        (0x1, 0x11) if addrs.len() >= 12 => {
            let ip = Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([addrs[8], addrs[9]]),
            ))
        }
        (0x1, 0x21) if addrs.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addrs[..16]);
            let port = u16::from_be_bytes([addrs[32], addrs[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError::Malformed("v2 address block too short")),
        // UNSPEC, UDP or UNIX: no TCP client to report.
        (0x1, 0x00 | 0x12 | 0x22 | 0x31 | 0x32) => None,
        // The spec's receivers must reject what it does not define.
        (0x1, _) => return Err(ProxyError::Malformed("v2 address family")),
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Some(Header { len, source }))
}

/// Reads and consumes the header of a blocking `stream` within `timeout`, leaving what
/// follows it in the socket.
///
/// Between peeks it sleeps in `poll(2)` until the socket holds *more* than it has already
/// seen: `SO_RCVLOWAT` set one byte past the peeked length makes the kernel report the socket
/// readable only then (Linux's TCP honours it in poll), so a header trickled a byte at a time
/// costs one wake-up per byte, not a peek every few milliseconds. The low-water mark is put
/// back to 1 before the service gets the socket.
pub fn read_blocking(stream: &TcpStream, timeout: Duration) -> Result<Header, io::Error> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_HEADER];
    // A socket accepted by mio (fork-per-conn's master) arrives non-blocking: poll decides
    // when to peek, and the peek itself never waits.
    stream.set_nonblocking(true)?;
    let result = read_header(stream, deadline, &mut buf);
    let reset = set_low_water(stream, 1).and_then(|()| stream.set_nonblocking(false));
    let header = result?;
    reset?;
    Ok(header)
}

fn read_header(
    stream: &TcpStream,
    deadline: Instant,
    buf: &mut [u8; MAX_HEADER],
) -> io::Result<Header> {
    let mut seen = 0;
    loop {
        let n = match stream.peek(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n > 0 {
            match parse(&buf[..n]) {
                Ok(Some(h)) => {
                    consume(stream, h.len)?;
                    return Ok(h);
                }
                Ok(None) if n == buf.len() => return Err(io::Error::other(ProxyError::TooLong)),
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        if n > 0 && n == seen {
            // Readable yet nothing new: the peer has closed its side mid-header.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        seen = n;
        // Wake when more than the `n` bytes already seen are there, at the deadline, or when
        // the peer hangs up (POLLRDHUP: a half-close reports readable below the mark too).
        set_low_water(stream, n + 1)?;
        wait_readable(stream, deadline)?;
    }
}

/// Sets `SO_RCVLOWAT`: how many bytes the socket must hold before poll calls it readable.
fn set_low_water(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a descriptor `stream` owns for this call, reading one c_int from
    // a live local whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until `stream` is readable (as `SO_RCVLOWAT` defines it) or hung up; a timeout at
/// `deadline`.
fn wait_readable(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no PROXY header in time",
            ));
        }
        // Whole milliseconds, rounded up so a wait never ends just short of the deadline.
        let ms = u16::try_from(left.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            stream.as_fd(),
            PollFlags::POLLIN | PollFlags::from_bits_retain(libc::POLLRDHUP),
        )];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue, // the deadline check above decides
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads exactly `len` bytes (the header, already seen by a peek) off `stream`.
pub fn consume(mut stream: &TcpStream, len: usize) -> io::Result<()> {
    use io::Read;
    let mut sink = [0u8; MAX_HEADER];
    stream.read_exact(&mut sink[..len.min(MAX_HEADER)])
}

/// Where PROXY headers are accepted from, and how long one may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRule {
    /// Peers allowed to send a header.
    pub from: Networks,
    /// How long a connection may take to send it.
    pub timeout: Duration,
}

impl ProxyRule {
    /// For a blocking connection (thread and fork-per-conn modes): checks the peer, reads and
    /// strips the header; returns the real client (`None`: the balancer's own connection).
    /// A refusal is logged (see [`log_refused`]).
    pub fn accept_blocking(&self, stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
        let peer = stream.peer_addr()?;
        if !self.from.contains(peer.ip()) {
            log_refused(peer, &Refusal::NotAllowed);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{peer} may not send a PROXY header (--proxy-from)"),
            ));
        }
        let source = read_blocking(stream, self.timeout)
            .inspect_err(|e| log_refused(peer, &Refusal::of(e)))?
            .source;
        if let Some(client) = source {
            protocol::facade::debug!("connection from {client} (via {peer})");
        }
        Ok(source)
    }
}

/// A set of networks (`--proxy-from`): only peers inside them may send a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networks(Vec<(IpAddr, u8)>);

impl Networks {
    /// Parses `CIDR[,CIDR…]` (an address without `/N` is one host).
    pub fn parse(s: &str) -> Result<Networks, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (addr, bits) = match part.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (part, None),
            };
            let ip: IpAddr = addr.parse().map_err(|_| {
                format!("{part:?} is not an address or CIDR (e.g. 10.0.0.0/8, ::1)")
            })?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|&b| b <= max)
                    .ok_or_else(|| format!("{part:?}: prefix length must be 0 to {max}"))?,
            };
            nets.push((ip, bits));
        }
        if nets.is_empty() {
            return Err("no network given".into());
        }
        Ok(Networks(nets))
    }

    /// The empty set: no peer is trusted.
    pub fn nobody() -> Networks {
        Networks(Vec::new())
    }

    /// Whether `ip` is inside one of the networks (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|&(net, bits)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }
}

impl std::fmt::Display for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(ip, b)| format!("{ip}/{b}")).collect();
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 7007\r\nhello";
        assert_eq!(
            parse(h),
            Ok(Some(Header {
                len: h.len() - 5,
                source: Some("192.0.2.7:51234".parse().unwrap())
            }))
        );
        let h6 = b"PROXY TCP6 2001:db8::1 ::1 4000 7007\r\n";
        assert_eq!(
            parse(h6).unwrap().unwrap().source,
            Some("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().source, None);
        let zero = b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0\r\n";
        assert_eq!(
            parse(zero).unwrap().unwrap().source.map(|a| a.port()),
            Some(0)
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None), "incomplete");
        assert_eq!(parse(b"PRO"), Ok(None));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"[..],
            b"PROXY TCP4 ::1 5.6.7.8 1 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 007\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(parse(b"GET / HTTP/1.0\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(&[b'P'; 200]), Err(ProxyError::Missing));
        let mut long = b"PROXY ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
    }

    #[test]
    fn v2_headers() {
        let mut a = vec![192, 0, 2, 7, 127, 0, 0, 1];
        a.extend_from_slice(&51234u16.to_be_bytes());
        a.extend_from_slice(&7007u16.to_be_bytes());
        let h = v2(1, 0x11, &a);
        let got = parse(&h).unwrap().unwrap();
        assert_eq!(got.len, 28);
        assert_eq!(got.source, Some("192.0.2.7:51234".parse().unwrap()));
        assert_eq!(parse(&h[..20]), Ok(None));
        assert_eq!(
            parse(&v2(0, 0, &[])).unwrap().unwrap().source,
            None,
            "LOCAL"
        );
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyError::Malformed(_))
        ));
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().unwrap().source, None);
        assert_eq!(
            parse(&v2(1, 0x77, &[0; 12])),
            Err(ProxyError::Malformed("v2 address family")),
            "an undefined family byte is refused"
        );
        let mut big = V2_SIG.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big), Err(ProxyError::TooLong));
    }

    #[test]
    fn networks() {
        let n = Networks::parse("127.0.0.0/8, ::1, 10.1.0.0/16").unwrap();
        assert!(n.contains("127.9.9.9".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(n.contains("::1".parse().unwrap()));
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::2".parse().unwrap()));
        assert!(
            Networks::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["", "10.0.0.0/33", "x", "::1/129"] {
            assert!(Networks::parse(bad).is_err(), "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5000))]

            #[test]
            fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse(&bytes);
            }

            #[test]
            fn parsing_never_panics_after_a_v2_signature(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut b = V2_SIG.to_vec();
                b.extend(tail);
                if let Ok(Some(h)) = parse(&b) {
                    prop_assert!(h.len <= b.len());
                }
            }

            #[test]
            fn v1_round_trips(a in any::<[u8; 4]>(), sport in any::<u16>(), dport in any::<u16>()) {
                let ip = Ipv4Addr::from(a);
                let line = format!("PROXY TCP4 {ip} 127.0.0.1 {sport} {dport}\r\n");
                let h = parse(line.as_bytes()).unwrap().unwrap();
                prop_assert_eq!(h.len, line.len());
                prop_assert_eq!(h.source, Some(SocketAddr::new(ip.into(), sport)));
            }
        }
    }
}
