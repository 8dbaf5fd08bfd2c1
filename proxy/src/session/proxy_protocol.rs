//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) that a load
//! balancer in front of agiproxy sends before Asterisk's own header, so that
//! routes, templates, rollouts and the access log see the Asterisk's address
//! rather than the balancer's. Parsing is `ppp`'s; this module decides what
//! the bytes at the start of a connection are, and what address they name.

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;

/// v2's 12-byte signature; v1 begins with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 line, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;

/// What the bytes at the start of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// A PROXY header may still be arriving.
    Partial,
    /// A whole PROXY header of `len` bytes. `caller` is the address it
    /// names; `None` for v2 `LOCAL` (a balancer's own health check) and v1
    /// `UNKNOWN`, where the connection's own peer stands.
    Done {
        len: usize,
        caller: Option<SocketAddr>,
    },
    /// No PROXY header: the bytes begin with something else.
    Absent,
}

/// The bytes began as a PROXY header but are not a valid one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid PROXY protocol {0} header")]
pub struct Invalid(pub &'static str);

/// The whole length a v2 header at the start of `buf` declares, once its
/// fixed 16 bytes are in: a reader can refuse at once a header longer than
/// it will ever buffer, instead of waiting for bytes that will not come.
pub fn v2_declared_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 16 || !buf.starts_with(V2_SIGNATURE) {
        return None;
    }
    Some(16 + usize::from(u16::from_be_bytes([buf[14], buf[15]])))
}

/// Reads a PROXY header at the start of `buf`, if one is there.
pub fn parse(buf: &[u8]) -> Result<Preamble, Invalid> {
    if starts_as(buf, V2_SIGNATURE) {
        v2(buf)
    } else if starts_as(buf, V1_PREFIX) {
        v1(buf)
    } else {
        Ok(Preamble::Absent)
    }
}

fn v2(buf: &[u8]) -> Result<Preamble, Invalid> {
    if buf.len() < V2_SIGNATURE.len() {
        return Ok(Preamble::Partial);
    }
    v2_tlvs(buf)?;
    match v2::Header::try_from(buf) {
        // A balancer relaying UDP names a datagram's source: FastAGI is TCP
        // only, so that is no Asterisk calling (audit; the protocol lets a
        // receiver refuse what it does not carry).
        Ok(h) if h.command == v2::Command::Proxy && h.protocol == v2::Protocol::Datagram => {
            Err(Invalid("v2"))
        }
        Ok(h) => Ok(Preamble::Done {
            len: h.len(),
            caller: match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(caller4(a)),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(caller6(a)),
                // LOCAL, or a family without an IP (UNSPEC, UNIX).
                _ => None,
            },
        }),
        Err(v2::ParseError::Incomplete(_) | v2::ParseError::Partial(..)) => Ok(Preamble::Partial),
        Err(_) => Err(Invalid("v2")),
    }
}

/// The TLVs after a v2 header's addresses must end exactly at its declared
/// length. `ppp` reads them only when asked, so a header declaring more
/// than it holds took Asterisk's own header for TLVs, then waited for the
/// rest and ended in a silent close, SUCCESS to Asterisk (audit). Checked on
/// what has arrived, so bytes that cannot be TLVs are refused at once:
/// Asterisk's `agi_…` read as one claims 26,473 bytes.
fn v2_tlvs(buf: &[u8]) -> Result<(), Invalid> {
    let Some(end) = v2_declared_len(buf) else {
        return Ok(());
    };
    // The address block of each family (INET, INET6, UNIX; none for UNSPEC).
    let addresses = match buf[13] >> 4 {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    let mut at = 16 + addresses;
    if at > end {
        // Too short for its addresses: `ppp` says so.
        return Ok(());
    }
    let have = buf.len().min(end);
    while at + 3 <= have {
        at += 3 + usize::from(u16::from_be_bytes([buf[at + 1], buf[at + 2]]));
        if at > end {
            return Err(Invalid("v2"));
        }
    }
    if have == end && at != end {
        // One or two bytes left over: no TLV is that short.
        return Err(Invalid("v2"));
    }
    Ok(())
}

fn v1(buf: &[u8]) -> Result<Preamble, Invalid> {
    // Parsed only once its line is whole: `ppp` reads some cut lines
    // ("... 40001 ") as invalid rather than partial.
    let Some(end) = memchr::memchr2(b'\r', b'\n', &buf[..buf.len().min(V1_MAX)]) else {
        return if buf.len() < V1_MAX {
            Ok(Preamble::Partial)
        } else {
            Err(Invalid("v1"))
        };
    };
    if buf[end] == b'\n' || end + 2 > V1_MAX {
        // A bare LF (no CRLF can follow), or a CR whose LF would be past
        // the protocol's bound (found by the fuzzer: 107 bytes read as
        // partial).
        return Err(Invalid("v1"));
    }
    if end + 1 == buf.len() {
        return Ok(Preamble::Partial);
    }
    match v1::Header::try_from(&buf[..end + 2]) {
        Ok(h) => Ok(Preamble::Done {
            len: h.header.len(),
            caller: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(caller4(a)),
                v1::Addresses::Tcp6(a) => Some(caller6(a)),
                v1::Addresses::Unknown => None,
            },
        }),
        Err(_) => Err(Invalid("v1")),
    }
}

/// The caller in a header's addresses (`ppp`'s types, the same in both
/// versions).
fn caller4(a: v1::IPv4) -> SocketAddr {
    SocketAddr::from((a.source_address, a.source_port))
}

fn caller6(a: v1::IPv6) -> SocketAddr {
    SocketAddr::from((a.source_address, a.source_port))
}

/// `buf` is, so far, the start of `sig` (or `sig` is the start of `buf`).
fn starts_as(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: v2::Command, from: &str, to: &str) -> Vec<u8> {
        let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
        let version_command = match command {
            v2::Command::Local => 0x20,
            v2::Command::Proxy => 0x21,
        };
        v2::Builder::with_addresses(version_command, v2::Protocol::Stream, (from, to))
            .write_tlv(v2::Type::NoOp, b"tlv")
            .unwrap()
            .build()
            .unwrap()
    }

    const AGI: &[u8] = b"agi_network: yes\nagi_network_script: ivr\n\n";

    #[test]
    fn v1_names_the_caller_and_its_length() {
        for (line, caller) in [
            (
                &b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 4573\r\n"[..],
                Some("192.0.2.7:40001"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 4573\r\n",
                Some("[2001:db8::7]:40001"),
            ),
            (b"PROXY UNKNOWN\r\n", None),
        ] {
            let buf = [line, AGI].concat();
            let caller = caller.map(|c| c.parse().unwrap());
            assert_eq!(
                parse(&buf),
                Ok(Preamble::Done {
                    len: line.len(),
                    caller
                }),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn v2_names_the_caller_and_its_length_tlvs_included() {
        let h = v2_header(v2::Command::Proxy, "192.0.2.7:40001", "198.51.100.1:4573");
        let buf = [&h[..], AGI].concat();
        assert_eq!(
            parse(&buf),
            Ok(Preamble::Done {
                len: h.len(),
                caller: Some("192.0.2.7:40001".parse().unwrap())
            })
        );
        let h = v2_header(v2::Command::Proxy, "[2001:db8::7]:5", "[2001:db8::1]:4573");
        assert_eq!(
            parse(&h),
            Ok(Preamble::Done {
                len: h.len(),
                caller: Some("[2001:db8::7]:5".parse().unwrap())
            })
        );
        // A balancer's health check speaks for itself.
        let h = v2_header(v2::Command::Local, "192.0.2.7:1", "198.51.100.1:4573");
        assert_eq!(
            parse(&h),
            Ok(Preamble::Done {
                len: h.len(),
                caller: None
            })
        );
    }

    #[test]
    fn every_prefix_of_a_header_is_partial() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 4573\r\n".to_vec();
        let v1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 4573\r\n".to_vec();
        let unknown = b"PROXY UNKNOWN\r\n".to_vec();
        let v2 = v2_header(v2::Command::Proxy, "192.0.2.7:40001", "198.51.100.1:4573");
        for h in [v1, v1_6, unknown, v2] {
            for n in 1..h.len() {
                assert_eq!(parse(&h[..n]), Ok(Preamble::Partial), "{n} of {}", h.len());
            }
            assert!(matches!(parse(&h), Ok(Preamble::Done { .. })));
        }
    }

    #[test]
    fn asterisks_own_header_is_no_preamble() {
        assert_eq!(parse(AGI), Ok(Preamble::Absent));
        assert_eq!(parse(b"a"), Ok(Preamble::Absent));
        assert_eq!(parse(b"PROXZ"), Ok(Preamble::Absent));
    }

    #[test]
    fn broken_headers_are_invalid_not_partial() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 4573\n"[..], // no CR
            b"PROXY TCP4 300.0.2.7 198.51.100.1 40001 4573\r\n",
            b"PROXY TCP5 192.0.2.7 198.51.100.1 40001 4573\r\n",
        ] {
            let buf = [bad, AGI].concat();
            assert!(parse(&buf).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // A v1 line with no CR within its 107 bytes can never end.
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(Invalid("v1")));
        // v2 with a version other than 2, or an unknown command.
        let mut h = v2_header(v2::Command::Proxy, "192.0.2.7:1", "198.51.100.1:4573");
        h[12] = 0x31;
        assert_eq!(parse(&h), Err(Invalid("v2")));
        h[12] = 0x2F;
        assert_eq!(parse(&h), Err(Invalid("v2")));
    }

    #[test]
    fn a_udp_source_is_no_caller() {
        let from_to: (SocketAddr, SocketAddr) = (
            "192.0.2.7:40001".parse().unwrap(),
            "198.51.100.1:4573".parse().unwrap(),
        );
        let h = v2::Builder::with_addresses(0x21, v2::Protocol::Datagram, from_to)
            .build()
            .unwrap();
        assert_eq!(parse(&[&h[..], AGI].concat()), Err(Invalid("v2")));
        // A balancer's own check over UDP names nobody: still fine.
        let h = v2::Builder::with_addresses(0x20, v2::Protocol::Datagram, from_to)
            .build()
            .unwrap();
        assert_eq!(
            parse(&h),
            Ok(Preamble::Done {
                len: h.len(),
                caller: None
            })
        );
    }
}
