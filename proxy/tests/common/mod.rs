//! Helpers shared by the tests that run the `agiproxy` binary.

/// A port free at the time of asking, on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
