//! A fork-per-conn child's chat: one client, and the bus to the parent, which passes lines
//! between its children. The child runs the process-mode room and session over a poll of its
//! own, so the two modes share every rule (bounds, slow clients, back-pressure).

use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use protocol::stats::Counters;

use super::Chat;
use super::room::ChatRoom;
use super::session::ChatSession;
use crate::service::{Drive, End, Room, Session};

const CLIENT: Token = Token(0);
const BUS: Token = Token(1);
/// Longest wait with nothing to do.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Serves `stream` until the client leaves, fails or idles out, or the bus is gone.
pub(super) fn serve(
    chat: &Chat,
    stream: std::net::TcpStream,
    bus: std::os::unix::net::UnixStream,
    idle: Option<Duration>,
    tally: &(dyn Fn(&Counters) + Sync),
) -> End {
    let mut counters = Counters::default();
    let end = run(chat, stream, bus, idle, &mut counters).unwrap_or(End::Error);
    tally(&counters);
    end
}

fn run(
    chat: &Chat,
    stream: std::net::TcpStream,
    bus: std::os::unix::net::UnixStream,
    idle: Option<Duration>,
    counters: &mut Counters,
) -> std::io::Result<End> {
    stream.set_nonblocking(true)?;
    let _ = stream.set_nodelay(true);
    let poll = Poll::new()?;
    let mut room = ChatRoom::new(chat.limits, Some(bus));
    room.watch(poll.registry(), BUS)?;
    let mut session = ChatSession::new(
        mio::net::TcpStream::from_std(stream),
        &mut room,
        0,
        chat.rules,
    );
    poll.registry().register(
        session.stream_mut(),
        CLIENT,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let (mut poll, mut events) = (poll, Events::with_capacity(8));
    let mut scratch = vec![0u8; 64 * 1024];
    let mut woken = Vec::new();
    let mut drive_now = true;
    loop {
        if drive_now {
            match session.drive(&mut scratch, counters) {
                Ok(Drive::Finished) => break,
                Ok(Drive::Yielded) => {}
                Ok(Drive::Waiting) => drive_now = false,
                Err(_) => return Ok(End::Error),
            }
        }
        room.settle(counters)?;
        let now = Instant::now();
        let idle_left = idle.map(|t| t.saturating_sub(now.duration_since(session.last_active())));
        if idle_left == Some(Duration::ZERO) && session.owed() == 0 {
            return Ok(End::Idle);
        }
        let wait = if drive_now {
            Duration::ZERO
        } else {
            let room_left = room.deadline().map(|t| t.saturating_duration_since(now));
            [idle_left, room_left]
                .into_iter()
                .flatten()
                .fold(MAX_WAIT, Duration::min)
        };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            match event.token() {
                CLIENT => {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        session.note_readable();
                    }
                    drive_now = true;
                }
                _ => room.on_bus()?,
            }
        }
        room.woken(&mut woken);
        drive_now |= !woken.is_empty();
        woken.clear();
    }
    drop(session);
    // The leave notice goes out if the bus takes it now; if not, the parent's `Gone` for
    // this child tells everyone just the same.
    let _ = room.settle(counters);
    Ok(End::Eof)
}
