//! Free loopback ports for test servers, below Linux's ephemeral range.
//!
//! The kernel hands ports in its ephemeral range (32768-60999 by default) to outgoing
//! connections: a port picked there is free when handed out, yet any connection the tests
//! open (a replica's walreceiver, a pool's next connection) may take it before the server
//! binds it. Ports here come from [`RANGE`], which no outgoing connection takes, starting
//! at a random point so that test processes running side by side seldom meet. Still not a
//! reservation: another process may bind a port between the check and the server's bind
//! (the servers retry on "address in use").

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::{Mutex, PoisonError};

use rand::Rng;

/// Where test servers' ports come from: below the ephemeral range, and clear of the local
/// fleet's defaults (`infra/local/up.sh`: 20051-25999) and the test command's smoke fleet
/// (26000-26999), so tests run beside either.
pub const RANGE: RangeInclusive<u16> = 10_000..=19_999;

/// Ports already handed out by this process, never handed out twice.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a TCP port in [`RANGE`] that is free on 127.0.0.1 now and that this process has
/// not handed out before.
///
/// # Panics
/// If every port of [`RANGE`] is taken or handed out already.
pub fn free_port() -> u16 {
    let (low, high) = (*RANGE.start(), *RANGE.end());
    let span = u32::from(high - low) + 1;
    let start = rand::rng().random_range(0..span);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for step in 0..span {
        let port = low + u16::try_from((start + step) % span).expect("within the range");
        if handed_out.contains(&port) || !bindable(port) {
            continue;
        }
        handed_out.insert(port);
        return port;
    }
    panic!("convoy-testkit: every loopback port in {RANGE:?} is taken or handed out");
}

/// Whether a listener could bind 127.0.0.1:`port` now (the server sets SO_REUSEADDR, as
/// std does on Unix, so a connection in TIME-WAIT there does not count).
fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::{RANGE, bindable, free_port};
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, TcpListener};

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn ports_lie_below_the_ephemeral_range() {
        for _ in 0..50 {
            let port = free_port();
            assert!(RANGE.contains(&port), "{port}");
            assert!(port < 32_768, "{port}");
        }
    }

    #[test]
    fn a_listening_port_is_not_bindable() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, free_port())).expect("bind");
        let port = listener.local_addr().expect("bound").port();
        assert!(!bindable(port));
        drop(listener);
        assert!(bindable(port));
    }
}
