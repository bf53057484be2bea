//! The TFTP service (RFC 1350; options RFC 2347/2348/2349/7440): files from `--root`, read
//! only unless `--tftp-write`, over UDP only.
//!
//! A request arrives on the shared socket (port 69 or `--listen`); the worker that receives
//! it answers from a new socket of its own (the transfer ID), and the transfer is an
//! [`Exchange`] the engine drives: in the event loop (process mode), in a thread (thread
//! mode) or in a process (fork-per-conn, tftpd's classic model).

mod link;
mod netascii;
mod options;
pub mod packet;
mod receive;
mod root;
mod send;

use std::borrow::Cow;
use std::io::{BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::stats::Counters;

use crate::echo::loops_back;
use crate::service::{Abort, DatagramAnswer, Drive, End, Exchange, Service, Session, Step};
use link::Link;
use packet::{Code, Mode, Refusal, Request};
pub use receive::Receiving;
pub use root::Root;
pub use send::Sending;

/// Largest upload `--tftp-max-file` allows unless told otherwise.
pub const DEFAULT_MAX_FILE: u64 = 32 << 20;
/// Free space uploads must leave on the root's file system unless `--tftp-min-free` says
/// otherwise.
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

/// The root a worker was handed by its master (`--root-fd`): the directory the master opened
/// once at start, never the path again.
pub fn inherited_root(fd: std::os::fd::RawFd) -> std::io::Result<Root> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if fd < 0 {
        return Err(std::io::Error::other(
            "no --root-fd: the master opens --root once and hands its workers the descriptor",
        ));
    }
    // SAFETY: the master left this descriptor open across fork or exec for this worker alone
    // (`spawn_worker` keeps it); it is wrapped exactly once, here, at boot, before anything
    // else could take the number.
    Root::adopt(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The TFTP service.
#[derive(Debug, Clone)]
pub struct Tftp {
    root: Arc<Root>,
    write: bool,
    max_file: u64,
    min_free: u64,
}

impl Tftp {
    /// Serves the files beneath `root` (the directory opened at start); `write` allows
    /// uploads of new files up to `max_file` bytes that leave `min_free` bytes free.
    pub fn new(root: Arc<Root>, write: bool, (max_file, min_free): (u64, u64)) -> Tftp {
        Tftp {
            root,
            write,
            max_file,
            min_free,
        }
    }

    /// Starts the transfer a request asks for, or says why not.
    fn begin(
        &self,
        req: &Request<'_>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Transfer, Refusal> {
        let (file, size) = if req.write {
            if !self.write {
                return Err(Refusal::new(
                    Code::Access,
                    "writes are disabled (--tftp-write)",
                ));
            }
            (None, None)
        } else {
            let (f, size) = self.root.open_read(req.filename)?;
            (Some(f), Some(size))
        };
        let settings = options::negotiate(&req.options, req.mode, size, self.max_file)?;
        // The transfer's own port, on the address the request came to (a wildcard listen
        // address lets the kernel choose the route back).
        // Connected to the peer: the kernel drops everyone else's datagrams (see `link`).
        let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))
            .and_then(|s| s.connect(peer).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| {
                Refusal::new(Code::Undefined, format!("no socket for the transfer: {e}"))
            })?;
        let link = Link::new(socket, peer, settings.timeout);
        let oack = (!settings.taken.is_empty()).then(|| packet::oack(&settings.taken));
        let sizes = (settings.blksize, settings.window);
        let netascii = req.mode == Mode::Netascii;
        Ok(match file {
            Some(f) => {
                let reader = BufReader::with_capacity(64 * 1024, f);
                let source: Box<dyn Read + Send> = if netascii {
                    Box::new(netascii::Encoder::new(reader))
                } else {
                    Box::new(reader)
                };
                Transfer::Send(Box::new(Sending::new(link, source, sizes, oack)))
            }
            None => {
                let created = self.root.create(req.filename)?;
                // Refused at once when the file system is already at its floor.
                if created.1.free_bytes()? < self.min_free {
                    return Err(Refusal::new(Code::DiskFull, "not enough free space"));
                }
                Transfer::Receive(Box::new(Receiving::new(
                    link,
                    created,
                    sizes,
                    oack,
                    (netascii, self.max_file, self.min_free),
                )))
            }
        })
    }
}

/// One transfer: a download or an upload.
#[derive(Debug)]
pub enum Transfer {
    /// A read request being served.
    Send(Box<Sending>),
    /// A write request being served.
    Receive(Box<Receiving>),
}

impl Exchange for Transfer {
    fn socket(&self) -> &UdpSocket {
        match self {
            Transfer::Send(s) => &s.link().socket,
            Transfer::Receive(r) => &r.link().socket,
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            Transfer::Send(s) => s.link().deadline,
            Transfer::Receive(r) => r.link().deadline,
        }
    }

    fn on_readable(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Step {
        match self {
            Transfer::Send(s) => s.on_readable(scratch, counters),
            Transfer::Receive(r) => r.on_readable(scratch, counters),
        }
    }

    fn on_time(&mut self, now: Instant, counters: &mut Counters) -> Step {
        match self {
            Transfer::Send(s) => s.on_time(now, counters),
            Transfer::Receive(r) => r.on_time(now, counters),
        }
    }

    fn abort(&mut self, why: Abort, counters: &mut Counters) -> Step {
        let why = match why {
            Abort::Busy => Some(Refusal::new(
                Code::Undefined,
                "server busy, try again later",
            )),
            Abort::Stopping => Some(Refusal::new(Code::Undefined, "server shutting down")),
            Abort::Evicted => None,
        };
        match self {
            Transfer::Send(s) => s.abort(why, counters),
            Transfer::Receive(r) => r.abort(why, counters),
        }
    }

    fn peer(&self) -> SocketAddr {
        self.link().peer
    }

    fn verified(&self) -> bool {
        self.link().verified
    }

    fn started(&self) -> Instant {
        self.link().started
    }
}

impl Transfer {
    fn link(&self) -> &Link {
        match self {
            Transfer::Send(s) => s.link(),
            Transfer::Receive(r) => r.link(),
        }
    }
}

impl Service for Tftp {
    type Session = NoStream;
    type Exchange = Transfer;
    type Room = ();

    fn name(&self) -> &'static str {
        "tftp"
    }

    fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.root.raw_fd()]
    }

    fn room(&self, _bus: Option<std::os::unix::net::UnixStream>) {}

    fn session(&self, stream: mio::net::TcpStream, _: &mut (), _: usize) -> NoStream {
        NoStream(stream)
    }

    fn serve_blocking(
        &self,
        _stream: std::net::TcpStream,
        _idle: Option<Duration>,
        _bus: Option<std::os::unix::net::UnixStream>,
        _tally: &(dyn Fn(&Counters) + Sync),
    ) -> End {
        End::Eof
    }

    fn answer_datagram<'a>(
        &self,
        datagram: &'a [u8],
        peer: SocketAddr,
        local: SocketAddr,
    ) -> DatagramAnswer<'a, Transfer> {
        // A request "from" port 69 or another service port is forged or another server's
        // reply: answering could start a loop.
        if loops_back(peer, local.port()) {
            return DatagramAnswer::Refuse;
        }
        let refused = |r: Refusal| DatagramAnswer::Reply(Cow::Owned(r.packet()));
        match packet::request(datagram) {
            Err(r) => refused(r),
            Ok(None) => DatagramAnswer::Ignore,
            Ok(Some(req)) => match self.begin(&req, peer, local) {
                Ok(t) => DatagramAnswer::Begin(t),
                Err(r) => refused(r),
            },
        }
    }
}

/// TFTP speaks no TCP (the engine binds it no TCP socket); a stream handed to it anyway is
/// closed at once.
#[derive(Debug)]
pub struct NoStream(mio::net::TcpStream);

impl Session for NoStream {
    fn stream_mut(&mut self) -> &mut mio::net::TcpStream {
        &mut self.0
    }
    fn note_peer_closed(&mut self) {}
    fn last_active(&self) -> Instant {
        Instant::now()
    }
    fn owed(&self) -> usize {
        0
    }
    fn drive(&mut self, _: &mut [u8], _: &mut Counters) -> std::io::Result<Drive> {
        Ok(Drive::Finished)
    }
}
