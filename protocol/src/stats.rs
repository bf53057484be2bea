//! A worker's traffic counters: what it reports to the master and what the master adds up.
//!
//! Every counter except `active` is cumulative since the worker started, so a report that is
//! lost or coalesced loses nothing: the next one carries the same totals and more.

/// Defines every counter once: the struct, its wire order, and the atomic tally, from one
/// list. A new counter is one line here (and a new IPC version: the frame grows).
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),+ $(,)?) => {
        /// Counters of one worker (or one acceptor thread in thread mode).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        // A counter missing from the JSON (another build's) reads as zero; one this build does
        // not know is ignored: the others are kept (a binary upgrade hands totals over).
        #[serde(default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: u64,)+
        }

        /// The same counters, shared between threads (thread mode's acceptors and connection
        /// threads bump them; the stats snapshot loads them).
        #[derive(Debug, Default)]
        pub struct AtomicCounters {
            $($(#[doc = $doc])* pub $name: std::sync::atomic::AtomicU64,)+
        }

        impl Counters {
            /// Number of `u64` fields in the wire form.
            pub const FIELDS: usize = [$(stringify!($name)),+].len();

            /// Each counter's name, in wire order.
            pub const NAMES: [&'static str; Self::FIELDS] = [$(stringify!($name)),+];

            /// Each counter's one-line description, in wire order.
            pub const DOCS: [&'static str; Self::FIELDS] = [$(concat!($($doc),+)),+];

            /// The counters in wire order.
            pub fn to_array(&self) -> [u64; Self::FIELDS] {
                [$(self.$name),+]
            }

            /// The counters from wire order.
            pub fn from_array(a: [u64; Self::FIELDS]) -> Self {
                let mut it = a.into_iter();
                Counters {
                    $($name: it.next().unwrap_or_default(),)+
                }
            }
        }

        impl AtomicCounters {
            /// Adds every counter of `c` (a thread's own tally, handed in when it ends).
            pub fn add(&self, c: &Counters) {
                use std::sync::atomic::Ordering::Relaxed;
                $(self.$name.fetch_add(c.$name, Relaxed);)+
            }

            /// A snapshot of every counter.
            pub fn load(&self) -> Counters {
                use std::sync::atomic::Ordering::Relaxed;
                Counters {
                    $($name: self.$name.load(Relaxed),)+
                }
            }
        }
    };
}

counters! {
    /// Connections accepted.
    accepted,
    /// Connections open right now (a gauge, not cumulative).
    active,
    /// Bytes read from clients.
    bytes_in,
    /// Bytes written back to clients.
    bytes_out,
    /// `accept` failures other than "nothing to accept" (EMFILE, ECONNABORTED, ...), and in
    /// thread mode connections closed because no thread could be started for them.
    accept_errors,
    /// Connections ended by a reset, broken pipe or other I/O error.
    io_errors,
    /// Connections the server closed because a limit was reached (drain timeout, ...).
    closed_by_limit,
    /// UDP datagrams received.
    datagrams_in,
    /// UDP datagrams echoed back.
    datagrams_out,
    /// UDP datagrams not answered because their source could start an echo loop, or had
    /// drawn its share of answers (see `loops_back` and `SourceLimit` in the worker's echo
    /// service).
    datagrams_refused,
    /// Connections closed because their PROXY protocol header was missing, malformed, too
    /// long, too slow, or came from a peer not allowed to send one (`--proxy-protocol`).
    proxy_errors,
    /// Transfers started by a datagram service (TFTP read and write requests accepted).
    transfers,
    /// Transfers that ended with every block acknowledged.
    transfers_done,
    /// Transfers that ended otherwise: timed out, aborted by the peer, refused mid-way, or cut
    /// by a stop.
    transfers_failed,
    /// File bytes a transfer moved (sent or received), counted once however often resent.
    transfer_bytes,
    /// Packets sent again because no acknowledgement came in time.
    retransmits,
    /// Chat lines received from clients (messages and commands).
    chat_lines,
    /// Chat lines queued to a client (each recipient of a message counts once).
    chat_deliveries,
    /// Chat clients disconnected because they fell `--max-unsent` bytes behind.
    slow_consumers,
    /// Frames this worker sent on the bus to its siblings.
    bus_out,
    /// Frames this worker received from the bus.
    bus_in,
}

impl Counters {
    /// Adds `other` field by field (the gauge `active` too: callers add only live workers').
    pub fn add(&mut self, other: &Counters) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(other.to_array()) {
            *x = x.wrapping_add(y);
        }
        *self = Counters::from_array(a);
    }
}

impl AtomicCounters {
    /// Adds `n` to one counter.
    pub fn bump(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_round_trips_and_the_tally_loads_what_was_bumped() {
        let a: [u64; Counters::FIELDS] = std::array::from_fn(|i| i as u64 * 7 + 1);
        assert_eq!(Counters::from_array(a).to_array(), a);
        assert_eq!(Counters::FIELDS, 21);
        assert_eq!(Counters::NAMES[2], "bytes_in");
        assert_eq!(Counters::DOCS[2].trim(), "Bytes read from clients.");
        let t = AtomicCounters::default();
        AtomicCounters::bump(&t.bytes_in, 5);
        AtomicCounters::bump(&t.datagrams_refused, 2);
        let c = t.load();
        assert_eq!((c.bytes_in, c.datagrams_refused, c.accepted), (5, 2, 0));
    }
}
