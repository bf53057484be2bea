//! UDP echo's one rule beyond echoing: never answer a datagram that could be the start of an
//! echo loop.
//!
//! UDP sources are not authenticated. A datagram forged with the source address of this very
//! server (or of another echo, chargen or daytime service) makes the server answer itself, or
//! play ping-pong with the other service, forever: the classic echo/chargen loop. inetd's
//! internal services refuse such sources; so does this server.

use std::net::SocketAddr;

/// Whether a datagram from `peer` must not be echoed by a server on `own_port`: its source
/// port is this server's own (itself, or another instance of it elsewhere), 0 (no real
/// sender), or a well-known service port below 1024 (echo 7, daytime 13, chargen 19, ...),
/// where clients never send from.
pub fn loops_back(peer: SocketAddr, own_port: u16) -> bool {
    peer.port() == own_port || peer.port() < 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_its_own_port_and_service_ports_only() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(loops_back(at("127.0.0.1:7007"), 7007));
        assert!(loops_back(at("10.1.2.3:7007"), 7007)); // another instance: ping-pong
        assert!(loops_back(at("127.0.0.1:7"), 7007)); // another echo service
        assert!(loops_back(at("127.0.0.1:19"), 7007)); // chargen
        assert!(loops_back(at("[::1]:0"), 7007));
        assert!(!loops_back(at("127.0.0.1:1024"), 7007));
        assert!(!loops_back(at("127.0.0.1:40000"), 7007));
        assert!(!loops_back(at("[::1]:51234"), 7007));
    }
}
