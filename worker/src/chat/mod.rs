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
//! order its sender sent it; a sender is slowed while a reading client is behind
//! ([`flow`]), and only a client that stops reading is disconnected (counted in
//! `slow_consumers`); control bytes reach nobody's terminal raw ([`terminal`]); a name is
//! held by one client at a time, server-wide (granted by the hub, or thread mode's table).

mod flow;
mod lines;
mod options;
mod outbox;
pub mod room;
mod roster;
mod session;
mod shared;
mod single;
mod terminal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::stats::Counters;

pub use flow::Overrun;
pub use lines::{Line, LineReader};
pub use options::{ChatOptions, Limits, Rate};
pub use outbox::{Full, Outbox};
pub use session::ChatSession;

use crate::service::{DatagramAnswer, End, NoExchange, Service};

/// Longest name `/nick` takes.
pub const MAX_NAME: usize = 32;
/// Names listed by `/who` before "and N more".
const WHO_LISTED: usize = 50;
/// Default `--max-line`.
pub const DEFAULT_MAX_LINE: usize = 4096;

/// Names `/nick` refuses: the guests' (unique by construction: pid and counter).
const GUEST: &str = "guest";

/// The chat service.
#[derive(Debug, Clone)]
pub struct Chat {
    /// What a line may be and how it is passed on.
    pub rules: Rules,
    /// How far behind a client may fall.
    pub limits: Limits,
    /// Thread mode's room, shared by every connection thread (unused by the other modes).
    shared: Arc<shared::SharedRoom>,
}

/// What a line may be and how it is passed on.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Longest line a client may send, in bytes, without its line end (`--max-line`).
    pub max_line: usize,
    /// Pass bytes on unchanged (`--chat-raw`).
    pub raw: bool,
}

impl Chat {
    /// A chat with these rules and limits.
    pub fn new(rules: Rules, limits: Limits) -> Chat {
        Chat {
            rules,
            limits,
            shared: Arc::new(shared::SharedRoom::new(limits)),
        }
    }

    /// The chat a worker's settings describe.
    pub fn from_config(cfg: &crate::config::WorkerConfig) -> Chat {
        Chat::new(
            Rules {
                max_line: cfg.max_line,
                raw: cfg.chat.chat_raw,
            },
            cfg.chat.limits(cfg.max_unsent),
        )
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
        room::ChatRoom::new(self.limits, bus)
    }

    fn session(
        &self,
        stream: mio::net::TcpStream,
        room: &mut room::ChatRoom,
        key: usize,
    ) -> ChatSession {
        ChatSession::new(stream, room, key, self.rules)
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
            None => self.shared.serve(stream, idle, self.rules, tally),
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
    /// Asks that `me` be named `name`. The room answers now or when the hub has: with
    /// [`renamed`] to everyone, or [`in_use`] to `me`.
    fn claim(&mut self, me: u64, name: &str);
    /// The `/who` answer.
    fn who(&mut self) -> Arc<[u8]>;
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

/// The notice everyone gets when `old` is named `new`.
pub fn renamed(old: &str, new: &str) -> Arc<[u8]> {
    text(format!("* {old} is now {new}\n"))
}

/// What a client asking for a name someone holds is told.
pub fn in_use(name: &str) -> Arc<[u8]> {
    text(format!("* {name} is in use\n"))
}

/// What a client that fell too far behind is told before it is disconnected.
pub fn too_slow(why: Overrun, limits: &Limits) -> Arc<[u8]> {
    text(match why {
        Overrun::Hard => format!(
            "* disconnected: more than {} bytes unread (--chat-hard-limit)\n",
            limits.hard
        ),
        Overrun::Soft => format!(
            "* disconnected: more than {} bytes unread for {} s (--chat-soft-limit)\n",
            limits.soft,
            limits.soft_for.as_secs_f64()
        ),
    })
}

/// Acts on one line `me` said.
pub fn said(floor: &mut impl Floor, me: u64, line: Line<'_>, rules: &Rules) -> After {
    let max_line = rules.max_line;
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
        let who = floor.who();
        floor.tell(me, who);
        return After::More;
    }
    if let Some(rest) = command.strip_prefix(b"/nick") {
        match valid_name(rest.trim_ascii()) {
            Some(new) if rest.first().is_some_and(u8::is_ascii_whitespace) => {
                if new != floor.name(me) {
                    floor.claim(me, new);
                }
            }
            _ => floor.tell(
                me,
                text(format!(
                    "* /nick NAME: 1 to {MAX_NAME} letters, digits, '-', '_' or '.', \
                     not starting with '{GUEST}'\n"
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
    if rules.raw {
        out.extend_from_slice(line);
    } else {
        terminal::neutralise(line, &mut out);
    }
    out.push(b'\n');
    floor.broadcast(Some(me), out.into());
    After::More
}

/// `name` if it is a name `/nick` accepts.
fn valid_name(name: &[u8]) -> Option<&str> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        && !name
            .get(..GUEST.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(GUEST.as_bytes()));
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
        fn claim(&mut self, _: u64, name: &str) {
            let old = std::mem::replace(&mut self.name, name.into());
            self.broadcast(None, renamed(&old, name));
        }
        fn who(&mut self) -> Arc<[u8]> {
            text("* 60 connected: u0, u1\n".into())
        }
    }

    const RULES: Rules = Rules {
        max_line: 100,
        raw: false,
    };

    fn say(r: &mut Recorder, line: &[u8]) -> After {
        said(r, 7, Line::Whole(line), &RULES)
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
            b"/nick guest12-3",
            b"/nick GUESTx",
        ] {
            say(&mut r, bad);
        }
        assert_eq!(r.told.len(), 7, "{:?}", r.told);
        assert!(r.told.iter().all(|t| t.starts_with("* /nick NAME")));
        r.told.clear();
        // Asking for the name one has already is no news.
        say(&mut r, b"/nick bob_2");
        assert_eq!(r.broadcast.len(), 1);
        say(&mut r, b"/who");
        assert_eq!(r.told[0], "* 60 connected: u0, u1\n");
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
        said(&mut r, 7, Line::TooLong, &RULES);
        assert_eq!(r.told, ["* line too long (over 100 bytes); not sent\n"]);
    }

    #[test]
    fn control_bytes_reach_the_others_escaped_unless_raw() {
        let mut r = Recorder {
            name: "eve".into(),
            ..Default::default()
        };
        say(&mut r, b"hi\r* admin is now root\x1b]52;c;eA==\x07");
        let raw = Rules { raw: true, ..RULES };
        said(&mut r, 7, Line::Whole(b"\x1b[6n"), &raw);
        assert_eq!(
            r.broadcast,
            [
                (
                    Some(7),
                    "eve: hi^M* admin is now root^[]52;c;eA==^G\n".into()
                ),
                (Some(7), "eve: \x1b[6n\n".into())
            ]
        );
    }
}
