//! Chat clients for the tests: line-oriented, with bounded waits, and one bound to a source
//! port that `--balance reuseport` steers to a chosen worker slot.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};

/// How long a line may take to arrive on this loaded machine.
pub const ARRIVE: Duration = Duration::from_secs(20);

/// A connected chat client.
pub struct ChatClient {
    pub stream: TcpStream,
    /// The name the server gave it (from its welcome).
    pub guest: String,
    reader: BufReader<TcpStream>,
    /// Every line read so far.
    pub seen: Vec<String>,
    /// Lines read that no expectation has matched yet.
    unmatched: std::collections::VecDeque<String>,
}

impl ChatClient {
    /// Connects and reads the welcome line.
    pub fn connect(addr: SocketAddr) -> ChatClient {
        ChatClient::from_stream(TcpStream::connect(addr).expect("connecting to the chat"))
    }

    /// Connects from a local port the reuseport program steers to `slot` of `slots`.
    pub fn connect_to_slot(addr: SocketAddr, slot: u16, slots: u16) -> ChatClient {
        let start = 20_000 + (std::process::id() % 10_000) as u16 * 2;
        for port in (start..start + 20_000).filter(|p| (p >> 1) % slots == slot) {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            let SocketAddr::V4(v4) = addr else {
                panic!("IPv4 only")
            };
            let local = SockaddrIn::new(127, 0, 0, 1, port);
            if bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &local).is_err() {
                continue;
            }
            if connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).is_err() {
                continue;
            }
            // SAFETY: a connected socket this function just made and owns alone.
            let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
            return ChatClient::from_stream(stream);
        }
        panic!("no free local port steers to slot {slot}");
    }

    fn from_stream(stream: TcpStream) -> ChatClient {
        stream.set_read_timeout(Some(ARRIVE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = ChatClient {
            stream,
            guest: String::new(),
            reader,
            seen: Vec::new(),
            unmatched: Default::default(),
        };
        let welcome = c.line().expect("a welcome line");
        assert!(welcome.starts_with("* welcome, "), "{welcome:?}");
        c.guest = welcome["* welcome, ".len()..]
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string();
        c
    }

    /// Sends one line.
    pub fn say(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("sending a line");
    }

    /// The next line (without its newline, bytes that are not UTF-8 replaced); `None` at end
    /// of file or on a timeout.
    pub fn line(&mut self) -> Option<String> {
        let mut l = Vec::new();
        match self.reader.read_until(b'\n', &mut l) {
            Ok(0) => None,
            Ok(_) => Some(
                String::from_utf8_lossy(&l)
                    .trim_end_matches('\n')
                    .to_string(),
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("reading a line: {e}"),
        }
    }

    /// The first line, among those read but not yet matched and then those still to come,
    /// that satisfies `pred`. Every line read is kept in `seen`, in order.
    pub fn until(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(at) = self.unmatched.iter().position(|l| pred(l)) {
            return self.unmatched.remove(at).unwrap_or_default();
        }
        let deadline = Instant::now() + ARRIVE;
        while Instant::now() < deadline {
            match self.line() {
                Some(l) if pred(&l) => {
                    self.seen.push(l.clone());
                    return l;
                }
                Some(l) => {
                    self.seen.push(l.clone());
                    self.unmatched.push_back(l);
                }
                None => break,
            }
        }
        panic!("never got {what}; got {:?}", self.seen);
    }

    /// Names itself and waits for the room to confirm it.
    pub fn nick(&mut self, name: &str) {
        self.say(&format!("/nick {name}"));
        self.until("the /nick notice", |l| {
            l.ends_with(&format!(" is now {name}"))
        });
    }

    /// Asks `/who` until the answer starts with `want` (the room's news travels between
    /// workers a moment behind) and returns it; fails the test if it never does.
    pub fn wait_for_who(&mut self, want: &str) -> String {
        let deadline = Instant::now() + ARRIVE;
        loop {
            self.say("/who");
            let who = self.until("a /who answer", |l| l.contains(" connected: "));
            if who.starts_with(want) {
                return who;
            }
            assert!(
                Instant::now() < deadline,
                "/who never answered {want:?}; last answer {who:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads until end of file (or a reset), within `ARRIVE`; `true` if the server closed it.
    pub fn closed_by_server(&mut self) -> bool {
        let deadline = Instant::now() + ARRIVE;
        let mut buf = Vec::new();
        while Instant::now() < deadline {
            buf.clear();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => return true,
                Ok(_) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf).trim_end().into()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// The pids of workers holding at least one connection, from the stats.
pub fn busy_workers(stats: &serde_json::Value) -> Vec<i64> {
    stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["counters"]["active"].as_u64() > Some(0))
        .map(|w| w["pid"].as_i64().unwrap())
        .collect()
}

/// What a [`ChatClient::keep_reading`] thread saw.
#[derive(Debug)]
pub struct Heard {
    /// Lines that started with the prefix it watched for, in order.
    pub lines: Vec<String>,
    /// The other lines (notices: a disconnection would say why).
    pub others: Vec<String>,
    /// The server closed the connection before `want` lines came.
    pub closed: bool,
}

impl ChatClient {
    /// Hands this client to a thread that reads everything, `pause` between reads of at most
    /// `chunk` bytes (a slow reader; zero: as fast as it can), until `want` lines starting
    /// with `prefix` came, the server closed it, or `within` passed.
    pub fn keep_reading(
        self,
        prefix: &str,
        want: usize,
        chunk: usize,
        pause: Duration,
        within: Duration,
    ) -> std::thread::JoinHandle<Heard> {
        let prefix = prefix.to_string();
        let mut lines = self.unmatched.into_iter().collect::<Vec<_>>();
        let mut reader = self.reader;
        let _keep_open = self.stream;
        std::thread::spawn(move || {
            let _keep_open = _keep_open;
            let deadline = Instant::now() + within;
            let mut heard = Heard {
                lines: Vec::new(),
                others: Vec::new(),
                closed: false,
            };
            let mut partial = Vec::new();
            let mut buf = vec![0u8; chunk.max(1)];
            let take = |l: String, heard: &mut Heard| {
                if l.starts_with(&prefix) {
                    heard.lines.push(l);
                } else {
                    heard.others.push(l);
                }
            };
            for l in lines.drain(..) {
                take(l, &mut heard);
            }
            let _ = reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(200)));
            while heard.lines.len() < want && Instant::now() < deadline {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(0) => {
                        heard.closed = true;
                        break;
                    }
                    Ok(n) => {
                        partial.extend_from_slice(&buf[..n]);
                        while let Some(at) = partial.iter().position(|&b| b == b'\n') {
                            let l: Vec<u8> = partial.drain(..=at).collect();
                            let l = String::from_utf8_lossy(&l[..at]).into_owned();
                            take(l, &mut heard);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => {
                        heard.closed = true;
                        break;
                    }
                }
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            heard
        })
    }
}

/// Every mode the chat service runs in.
pub const MODES: [&str; 3] = ["process", "thread", "fork-per-conn"];

/// A chat server in `mode`, reporting stats every 0.2 s, with `extra` flags.
pub fn start(mode: &str, extra: &[&str]) -> super::Server {
    let mut args = vec![
        "--service",
        "chat",
        "--mode",
        mode,
        "--stats-interval",
        "0.2",
    ];
    args.extend_from_slice(extra);
    super::Server::start(&args)
}
