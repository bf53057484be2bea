//! The chat service: a line-based group chat, the seeds' `ChatServer` made a group chat. Every
//! line a client sends goes to every other connected client, whichever worker (or thread, or
//! process) holds it, prefixed with the sender's name; `/nick NAME`, `/who`, `/quit` (or a
//! bare `quit`), and join and leave notices.
//!
//! What a line means is decided once, here ([`said`]), against a [`Floor`]: the room as one
//! member sees it. Each concurrency model supplies its floor:
//! - process mode: [`room::LocalRoom`], the clients one worker holds, joined to the other
//!   workers' by the bus through the master ([`protocol::bus`]);
//! - thread mode: `shared::SharedRoom`, one table every connection thread shares (the
//!   tutorial's design: a reader and a writer thread per client, no lock held while writing);
//! - fork-per-conn: a `LocalRoom` of one client per child, on the bus through the parent.
//!
//! Guarantees (README "Chat"): a line reaches each recipient at most once, whole, in the
//! order its sender sent it; a recipient more than `--max-unsent` bytes behind is
//! disconnected (counted in `slow_consumers`) rather than slowing anyone else.

mod lines;
mod outbox;
pub mod room;
mod session;
mod shared;
mod single;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::stats::Counters;

pub use lines::{Line, LineReader};
pub use outbox::{Full, Outbox};
pub use session::ChatSession;

use crate::service::{DatagramAnswer, End, NoExchange, Service};

/// Longest name `/nick` takes.
pub const MAX_NAME: usize = 32;
/// Names listed by `/who` before "and N more".
const WHO_LISTED: usize = 50;
/// Default `--max-line`.
pub const DEFAULT_MAX_LINE: usize = 4096;

/// The chat service.
#[derive(Debug, Clone)]
pub struct Chat {
    /// Longest line a client may send, in bytes (`--max-line`).
    pub max_line: usize,
    /// Bytes a client may fall behind before it is disconnected (`--max-unsent`).
    pub max_unsent: usize,
    /// Thread mode's room, shared by every connection thread (unused by the other modes).
    shared: Arc<shared::SharedRoom>,
}

impl Chat {
    /// A chat with these bounds.
    pub fn new(max_line: usize, max_unsent: usize) -> Chat {
        Chat {
            max_line,
            max_unsent,
            shared: Arc::new(shared::SharedRoom::new(max_unsent)),
        }
    }
}

impl Service for Chat {
    type Session = ChatSession;
    type Exchange = NoExchange;
    type Room = room::ChatRoom;

    fn name(&self) -> &'static str {
        "chat"
    }

    fn needs_bus(&self) -> bool {
        true
    }

    fn room(&self, bus: Option<std::os::unix::net::UnixStream>) -> room::ChatRoom {
        room::ChatRoom::new(self.max_unsent, bus)
    }

    fn session(
        &self,
        stream: mio::net::TcpStream,
        room: &mut room::ChatRoom,
        key: usize,
    ) -> ChatSession {
        ChatSession::new(stream, room, key, self.max_line)
    }

    fn serve_blocking(
        &self,
        stream: std::net::TcpStream,
        idle: Option<Duration>,
        bus: Option<std::os::unix::net::UnixStream>,
        tally: &(dyn Fn(&Counters) + Sync),
    ) -> End {
        match bus {
            Some(bus) => single::serve(self, stream, bus, idle, tally),
            None => self.shared.serve(stream, idle, self.max_line, tally),
        }
    }

    fn answer_datagram<'a>(
        &self,
        _: &'a [u8],
        _: SocketAddr,
        _: SocketAddr,
    ) -> DatagramAnswer<'a, NoExchange> {
        DatagramAnswer::Ignore
    }
}

/// The room as one member sees it: what [`said`] needs, in every concurrency model.
pub trait Floor {
    /// The member's name.
    fn name(&self, me: u64) -> String;
    /// Queues `line` for every member but `except`.
    fn broadcast(&mut self, except: Option<u64>, line: Arc<[u8]>);
    /// Queues `line` for `me` alone.
    fn tell(&mut self, me: u64, line: Arc<[u8]>);
    /// Gives `me` a new name (and tells the other processes).
    fn rename(&mut self, me: u64, name: &str);
    /// How many are connected, and up to `listed` of their names.
    fn roster(&self, listed: usize) -> (usize, Vec<String>);
}

/// After a line: go on, or the client said goodbye.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep reading.
    More,
    /// `/quit`: the client is told and its connection ends once that is written.
    Quit,
}

/// A line of text as shared bytes.
pub fn text(s: String) -> Arc<[u8]> {
    s.into_bytes().into()
}

/// What the server says to a client that has just connected as `name`. (No head count: a
/// fresh worker may not yet have heard from the others; `/who` asks the room.)
pub fn welcome(name: &str) -> Arc<[u8]> {
    text(format!("* welcome, {name}. /nick NAME, /who, /quit\n"))
}

/// The notice everyone else gets when `name` joins.
pub fn joined(name: &str) -> Arc<[u8]> {
    text(format!("* {name} joined\n"))
}

/// The notice everyone else gets when `name` leaves.
pub fn left(name: &str) -> Arc<[u8]> {
    text(format!("* {name} left\n"))
}

/// What a client more than `max` bytes behind is told before it is disconnected.
pub fn too_slow(max: usize) -> Arc<[u8]> {
    text(format!(
        "* disconnected: more than {max} bytes unread (--max-unsent)\n"
    ))
}

/// Acts on one line `me` said.
pub fn said(floor: &mut impl Floor, me: u64, line: Line<'_>, max_line: usize) -> After {
    let line = match line {
        Line::TooLong => {
            let msg = format!("* line too long (over {max_line} bytes); not sent\n");
            floor.tell(me, text(msg));
            return After::More;
        }
        Line::Whole(l) => l,
    };
    let command = line.trim_ascii();
    if command.is_empty() {
        return After::More;
    }
    if command == b"quit" || command == b"/quit" {
        floor.tell(me, text("* bye\n".into()));
        return After::Quit;
    }
    if command == b"/who" {
        let (n, names) = floor.roster(WHO_LISTED);
        let more = n.saturating_sub(names.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        floor.tell(
            me,
            text(format!("* {n} connected: {}{tail}\n", names.join(", "))),
        );
        return After::More;
    }
    if let Some(rest) = command.strip_prefix(b"/nick") {
        match valid_name(rest.trim_ascii()) {
            Some(new) if rest.first().is_some_and(u8::is_ascii_whitespace) => {
                let old = floor.name(me);
                floor.rename(me, new);
                floor.broadcast(None, text(format!("* {old} is now {new}\n")));
            }
            _ => floor.tell(
                me,
                text(format!(
                    "* /nick NAME: 1 to {MAX_NAME} letters, digits, '-', '_' or '.'\n"
                )),
            ),
        }
        return After::More;
    }
    if command.starts_with(b"/") {
        floor.tell(
            me,
            text("* unknown command; try /nick NAME, /who, /quit\n".into()),
        );
        return After::More;
    }
    let mut out = floor.name(me).into_bytes();
    out.extend_from_slice(b": ");
    out.extend_from_slice(line);
    out.push(b'\n');
    floor.broadcast(Some(me), out.into());
    After::More
}

/// `name` if it is a name `/nick` accepts.
fn valid_name(name: &[u8]) -> Option<&str> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
    ok.then(|| std::str::from_utf8(name).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A floor that records what happened.
    #[derive(Default)]
    struct Recorder {
        name: String,
        told: Vec<String>,
        broadcast: Vec<(Option<u64>, String)>,
    }

    impl Floor for Recorder {
        fn name(&self, _: u64) -> String {
            self.name.clone()
        }
        fn broadcast(&mut self, except: Option<u64>, line: Arc<[u8]>) {
            self.broadcast
                .push((except, String::from_utf8_lossy(&line).into_owned()));
        }
        fn tell(&mut self, _: u64, line: Arc<[u8]>) {
            self.told.push(String::from_utf8_lossy(&line).into_owned());
        }
        fn rename(&mut self, _: u64, name: &str) {
            self.name = name.into();
        }
        fn roster(&self, listed: usize) -> (usize, Vec<String>) {
            let all: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
            (all.len(), all.into_iter().take(listed).collect())
        }
    }

    fn say(r: &mut Recorder, line: &[u8]) -> After {
        said(r, 7, Line::Whole(line), 100)
    }

    #[test]
    fn a_message_goes_to_everyone_else_with_the_senders_name() {
        let mut r = Recorder {
            name: "ann".into(),
            ..Default::default()
        };
        assert_eq!(say(&mut r, b"hello there"), After::More);
        assert_eq!(r.broadcast, [(Some(7), "ann: hello there\n".into())]);
        assert!(r.told.is_empty());
    }

    #[test]
    fn commands_answer_the_sender_and_nick_tells_everyone() {
        let mut r = Recorder {
            name: "ann".into(),
            ..Default::default()
        };
        say(&mut r, b"/nick  bob_2");
        assert_eq!(r.name, "bob_2");
        assert_eq!(r.broadcast, [(None, "* ann is now bob_2\n".into())]);
        for bad in [
            &b"/nick"[..],
            b"/nick ",
            b"/nick a b",
            b"/nickx",
            b"/nick \xff",
        ] {
            say(&mut r, bad);
        }
        assert_eq!(r.told.len(), 5, "{:?}", r.told);
        assert!(r.told.iter().all(|t| t.starts_with("* /nick NAME")));
        r.told.clear();
        say(&mut r, b"/who");
        assert!(
            r.told[0].starts_with("* 60 connected: u0, u1,"),
            "{}",
            r.told[0]
        );
        assert!(r.told[0].ends_with("u49 and 10 more\n"), "{}", r.told[0]);
        say(&mut r, b"/dance");
        assert!(r.told[1].starts_with("* unknown command"));
        assert_eq!(say(&mut r, b"  quit \r"), After::Quit);
        assert_eq!(say(&mut r, b"/quit"), After::Quit);
        assert_eq!(r.broadcast.len(), 1);
    }

    #[test]
    fn blank_lines_are_ignored_and_long_ones_refused() {
        let mut r = Recorder::default();
        say(&mut r, b"   ");
        assert!(r.told.is_empty() && r.broadcast.is_empty());
        said(&mut r, 7, Line::TooLong, 100);
        assert_eq!(r.told, ["* line too long (over 100 bytes); not sent\n"]);
    }
}
