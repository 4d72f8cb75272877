//! Free loopback ports for test servers.
//!
//! Not a reservation: a port is free when handed out, but another process may
//! take it before the server binds it (the servers retry on "address in use").

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

/// Ports already handed out by this process, never handed out twice.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a TCP port on 127.0.0.1 that is free now and that this process has
/// not handed out before.
///
/// # Panics
/// If no loopback port can be bound at all.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("convoy-testkit: cannot bind a port on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("convoy-testkit: bound socket has no local address")
            .port();
        drop(listener);
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("convoy-testkit: found no loopback port that was not already handed out");
}

#[cfg(test)]
mod tests {
    use super::free_port;
    use std::collections::HashSet;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|&p| p != 0));
    }
}
