//! Socket options the data plane sets: TCP congestion control, and the public port's listening
//! sockets (one per worker in an `SO_REUSEPORT` group, with the options their connections
//! inherit).

use std::io;
use std::net::SocketAddr;

/// Set a TCP socket's congestion control to `cc` (`TCP_CONGESTION`), e.g. `cubic`; the error
/// names the algorithm and where the host lists the ones it has and allows.
pub fn set_tcp_congestion<S: std::os::fd::AsFd>(socket: &S, cc: &str) -> io::Result<()> {
    socket2::SockRef::from(socket)
        .set_tcp_congestion(cc.as_bytes())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "TCP congestion control {cc:?}: {e} (available: \
                     /proc/sys/net/ipv4/tcp_available_congestion_control; without privilege, \
                     only net.ipv4.tcp_allowed_congestion_control)"
                ),
            )
        })
}

/// A TCP socket's congestion control (`TCP_CONGESTION`), e.g. `bbr`.
pub fn tcp_congestion<S: std::os::fd::AsFd>(socket: &S) -> io::Result<String> {
    let name = socket2::SockRef::from(socket).tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_owned())
}

/// Whether `cc` can be set on this host's TCP sockets (a throwaway socket tries it), for
/// refusing a bad configuration at start rather than on every connection.
pub fn check_tcp_congestion(cc: &str) -> io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    set_tcp_congestion(&probe, cc)
}

/// A listening socket in the public port's `SO_REUSEPORT` group, with `congestion` control (which
/// the connections it accepts inherit) when one is asked for.
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    congestion: Option<&str>,
) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if let Some(cc) = congestion {
        set_tcp_congestion(&socket, cc)?;
    }
    // Accepted connections inherit both (Linux copies the listener's TCP options into each
    // one): no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy sets congestion control and TCP_NODELAY on its listening sockets only: what it
    /// relies on is that every connection they accept comes out with them (whatever the host's
    /// default is).
    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        // reno is built into every kernel and always allowed without privilege.
        let listener = match bind_reuseport("127.0.0.1:0".parse().unwrap(), Some("reno")) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return, // not Linux
            Err(e) => panic!("bind with reno: {e}"),
        };
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(tcp_congestion(&accepted).unwrap(), "reno");
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY inherited");

        let err = bind_reuseport("127.0.0.1:0".parse().unwrap(), Some("no-such-cc"))
            .expect_err("an unknown algorithm fails the bind");
        assert!(err.to_string().contains("no-such-cc"), "{err}");
    }
}
