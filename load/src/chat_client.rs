//! chat-load's clients: what each sends, how each checks what it receives, and the loop a
//! load thread runs over its share of them.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Poll};

/// What every thread shares: per sender, lines sent and lines everyone has; per in-flight
/// line, how many have it.
pub struct Shared {
    pub n: usize,
    pub window: usize,
    pub sent: Vec<AtomicU64>,
    pub complete: Vec<AtomicU64>,
    /// `[sender * window + seq % window]`: recipients that have that line.
    pub receipts: Vec<AtomicU32>,
    pub sending: AtomicBool,
    pub base: Instant,
    /// Per flooder: whole lines it has written.
    pub flood_sent: Vec<AtomicU64>,
}

impl Shared {
    fn received(&self, sender: usize, seq: u64) {
        let slot = &self.receipts[sender * self.window + (seq % self.window as u64) as usize];
        if slot.fetch_add(1, Ordering::AcqRel) + 1 == self.n as u32 - 1 {
            slot.store(0, Ordering::Release);
            self.complete[sender].fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// One client.
pub struct Client {
    pub id: usize,
    pub stream: TcpStream,
    pub inbuf: Vec<u8>,
    pub out: Vec<u8>,
    /// Per sender: the next sequence number expected.
    pub next: Vec<u64>,
    /// Per sender: lines skipped over (a later one came first) and not seen since.
    pub gaps: Vec<u64>,
    pub named: bool,
    pub closed: bool,
    pub next_send: Instant,
    /// Per flooder: the next sequence number expected.
    pub flood_next: Vec<u64>,
}

/// What one thread counted.
#[derive(Default)]
pub struct Tally {
    pub deliveries: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub corrupt: u64,
    pub disconnected: u64,
    pub lost: u64,
    pub expected: u64,
    /// Flooders' lines received, and missing at the end.
    pub flood_deliveries: u64,
    pub flood_lost: u64,
}

/// Sends what this client may send now: the next line, if the window (or the rate) allows.
pub fn send_due(
    c: &mut Client,
    shared: &Shared,
    now: Instant,
    period: Option<Duration>,
    pad: &str,
) {
    loop {
        let sent = shared.sent[c.id].load(Ordering::Acquire);
        match period {
            Some(p) => {
                if now < c.next_send {
                    return;
                }
                c.next_send += p;
            }
            None => {
                let done = shared.complete[c.id].load(Ordering::Acquire);
                if sent - done >= shared.window as u64 || c.out.len() > 64 * 1024 {
                    return;
                }
            }
        }
        let micros = shared.base.elapsed().as_micros() as u64;
        let _ = writeln!(&mut c.out, "{sent} {micros} {pad}");
        shared.sent[c.id].store(sent + 1, Ordering::Release);
        if period.is_none() {
            continue;
        }
    }
}

pub fn flush(c: &mut Client) {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                c.closed = true;
                return;
            }
        }
    }
}

/// One load thread's clients, its poll, and what it saw.
pub struct Fleet {
    poll: Poll,
    events: Events,
    /// The clients, indexed by their token.
    pub clients: Vec<Client>,
    buf: Vec<u8>,
    /// What its clients counted.
    pub tally: Tally,
    /// Delivery latencies, microseconds.
    pub hist: Histogram<u64>,
    /// Clients whose turn ended before their socket was empty (a flood pours in): read again
    /// next turn, without waiting for an event (epoll is edge-triggered).
    again: Vec<usize>,
}

/// Reads per client per turn: under a flood one client's socket never runs dry, and the
/// thread must get back to sending.
const READS_PER_TURN: usize = 4;

impl Fleet {
    /// A fleet of `clients`, registered with `poll` under their index.
    pub fn new(poll: Poll, clients: Vec<Client>) -> Result<Fleet> {
        Ok(Fleet {
            poll,
            events: Events::with_capacity(1024),
            clients,
            buf: vec![0u8; 256 * 1024],
            tally: Tally::default(),
            hist: Histogram::<u64>::new(3)?,
            again: Vec::new(),
        })
    }

    /// One wait (at most a millisecond) and everything it made ready.
    pub fn turn(&mut self, shared: &Shared) -> Result<()> {
        let wait = if self.again.is_empty() {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mut ready: Vec<usize> = std::mem::take(&mut self.again);
        for event in self.events.iter() {
            let k = event.token().0;
            if event.is_writable() && !self.clients[k].closed {
                flush(&mut self.clients[k]);
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                ready.push(k);
            }
        }
        ready.sort_unstable();
        ready.dedup();
        for k in ready {
            let c = &mut self.clients[k];
            if c.closed {
                continue;
            }
            let mut reads = 0;
            loop {
                if reads == READS_PER_TURN {
                    self.again.push(k);
                    break;
                }
                reads += 1;
                match c.stream.read(&mut self.buf) {
                    Ok(0) => {
                        c.closed = true;
                        self.tally.disconnected += 1;
                        break;
                    }
                    Ok(n) => c.inbuf.extend_from_slice(&self.buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.closed = true;
                        self.tally.disconnected += 1;
                        break;
                    }
                }
            }
            take_lines(c, shared, &mut self.tally, &mut self.hist);
        }
        Ok(())
    }
}

/// Checks every whole line a client received.
fn take_lines(c: &mut Client, shared: &Shared, tally: &mut Tally, hist: &mut Histogram<u64>) {
    let mut start = 0;
    let now = shared.base.elapsed().as_micros() as u64;
    while let Some(len) = c.inbuf[start..].iter().position(|&b| b == b'\n') {
        let line = &c.inbuf[start..start + len];
        start += len + 1;
        if line.starts_with(b"* ") {
            if line.ends_with(format!(" is now c{}", c.id).as_bytes()) {
                c.named = true;
            }
            continue;
        }
        if let Some((k, seq)) = crate::chat_flooder::parse(line, shared.flood_sent.len()) {
            if seq != c.flood_next[k] {
                tally.out_of_order += 1;
            }
            c.flood_next[k] = seq + 1;
            tally.flood_deliveries += 1;
            continue;
        }
        match parse(line, shared.n) {
            Some((sender, seq, micros)) if sender != c.id => {
                let expected = &mut c.next[sender];
                if seq < *expected {
                    // Late (filling a gap: already counted out of order) or a repeat.
                    if c.gaps[sender] > 0 {
                        c.gaps[sender] -= 1;
                        tally.deliveries += 1;
                        shared.received(sender, seq);
                    } else {
                        tally.duplicated += 1;
                    }
                } else {
                    if seq > *expected {
                        tally.out_of_order += 1;
                        c.gaps[sender] += seq - *expected;
                    }
                    *expected = seq + 1;
                    tally.deliveries += 1;
                    let _ = hist.record(now.saturating_sub(micros).max(1));
                    shared.received(sender, seq);
                }
            }
            _ => tally.corrupt += 1,
        }
    }
    c.inbuf.drain(..start);
}

/// `cSENDER: SEQ MICROS PAD` → (sender, seq, micros).
fn parse(line: &[u8], n: usize) -> Option<(usize, u64, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let (name, rest) = text.split_once(": ")?;
    let sender: usize = name.strip_prefix('c')?.parse().ok()?;
    let mut fields = rest.split(' ');
    let seq = fields.next()?.parse().ok()?;
    let micros = fields.next()?.parse().ok()?;
    let pad = fields.next().unwrap_or("");
    (sender < n && pad.bytes().all(|b| b == b'x')).then_some((sender, seq, micros))
}
