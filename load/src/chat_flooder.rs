//! chat-load's flooders: clients that send lines as fast as the server reads them (and read
//! what they are sent, so they are never dropped as slow), to show what a flood costs the
//! other clients: lines lost or late, readers disconnected.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::chat_client::Shared;

/// Lines per write.
const BATCH: usize = 64;

/// A running flooder.
pub struct Flooder {
    stream: TcpStream,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
}

impl Flooder {
    /// Connects flooder `k` (named `fK`), ready to send lines of `size` bytes of padding once
    /// `shared.sending` is set, counting whole lines written in `shared.flood_sent[k]`.
    pub fn start(addr: SocketAddr, k: usize, size: usize, shared: Arc<Shared>) -> Result<Flooder> {
        let stream = TcpStream::connect(addr).context("connecting a flooder")?;
        let _ = stream.set_nodelay(true);
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut lines = BufReader::new(stream.try_clone()?);
        (&stream).write_all(format!("/nick f{k}\n").as_bytes())?;
        let named = format!(" is now f{k}\n");
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line)? == 0 {
                bail!("flooder {k} was closed before it had its name");
            }
            if line.ends_with(&named) {
                break;
            }
        }
        stream.set_read_timeout(None)?;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut inner = lines.into_inner();
            while let Ok(1..) = inner.read(&mut buf) {}
        });
        let mut out = stream.try_clone()?;
        out.set_write_timeout(Some(Duration::from_millis(50)))?;
        let writer = std::thread::spawn(move || flood(&mut out, k, size, &shared));
        Ok(Flooder {
            stream,
            writer,
            reader,
        })
    }

    /// Ends the flooder's connection and its threads.
    pub fn stop(self) {
        let _ = self.writer.join();
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.reader.join();
    }
}

fn flood(out: &mut TcpStream, k: usize, size: usize, shared: &Shared) {
    while !shared.sending.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let pad = "y".repeat(size);
    let (mut buf, mut at, mut seq, mut whole) = (Vec::new(), 0usize, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(3600);
    while shared.sending.load(Ordering::Acquire) && Instant::now() < deadline {
        if at == buf.len() {
            buf.clear();
            at = 0;
            for _ in 0..BATCH {
                let _ = writeln!(&mut buf, "{seq} {pad}");
                seq += 1;
            }
        }
        match out.write(&buf[at..]) {
            Ok(n) => {
                whole += buf[at..at + n].iter().filter(|&&b| b == b'\n').count() as u64;
                at += n;
                shared.flood_sent[k].store(whole, Ordering::Release);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// `fK: SEQ PAD` → (flooder, seq).
pub fn parse(line: &[u8], flooders: usize) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let (name, rest) = text.split_once(": ")?;
    let k: usize = name.strip_prefix('f')?.parse().ok()?;
    let (seq, pad) = rest.split_once(' ')?;
    (k < flooders && pad.bytes().all(|b| b == b'y')).then_some((k, seq.parse().ok()?))
}
