//! Checks shared by the sections: names, header variables, addresses, networks, regexes, numbers.
//! Each returns the message for the field's path, with the fix in it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

use crate::model::{BackendTarget, DEFAULT_PORT};
use crate::pattern::{Pattern, PatternError};

/// Names of routes, pools and listeners end up in logs, metrics labels and `${route}`-style
/// header values, so they are kept to a safe alphabet.
pub(crate) fn name(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("is empty; use letters, digits, _, . or -".to_string());
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{text:?} contains {c:?}; names may contain only letters, digits, _, . and -"
        ));
    }
    Ok(())
}

/// A header variable name as Asterisk writes them: `agi_` then `[a-z0-9_]`.
pub(crate) fn var_name(text: &str) -> Result<(), String> {
    let well_formed = text.len() > 4
        && text.starts_with("agi_")
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if well_formed {
        return Ok(());
    }
    let hint = if text.to_ascii_lowercase().starts_with("agi_") && text.len() > 4 {
        "header variable names are lowercase: agi_ then a-z, 0-9 and _"
    } else {
        "header variable names start with agi_ and use only a-z, 0-9 and _ (e.g. agi_context)"
    };
    Err(format!("{text:?} is not a header variable name; {hint}"))
}

/// Variables Asterisk itself sends (fastagi-protocol.md). `set:` must not add a second copy:
/// backends would see two different values and frameworks disagree on which one wins.
pub(crate) fn is_asterisk_var(name: &str) -> bool {
    const SENT: &[&str] = &[
        "agi_network",
        "agi_network_script",
        "agi_request",
        "agi_channel",
        "agi_language",
        "agi_type",
        "agi_uniqueid",
        "agi_version",
        "agi_callerid",
        "agi_calleridname",
        "agi_callingpres",
        "agi_callingani2",
        "agi_callington",
        "agi_callingtns",
        "agi_dnid",
        "agi_rdnis",
        "agi_context",
        "agi_extension",
        "agi_priority",
        "agi_enhanced",
        "agi_accountcode",
        "agi_threadid",
    ];
    SENT.contains(&name)
        || name
            .strip_prefix("agi_arg_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a regex, to be compiled on first use (see [`Pattern`]); the error keeps regex's own
/// explanation but on one line.
pub(crate) fn pattern(text: &str) -> Result<Pattern, String> {
    Pattern::new(text).map_err(|e| match e {
        PatternError::Regex(e) => regex_error(text, &e),
        over => format!("{text:?} {over}"),
    })
}

fn regex_error(text: &str, e: &regex::Error) -> String {
    let detail = e.to_string();
    // Syntax errors are several lines (pattern, caret, "error: ..."); keep the last.
    let reason = detail
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(|| detail.replace('\n', " "), str::to_string);
    format!("{text:?} is not a valid regex: {reason}")
}

/// A network for `source:`; a bare address means just that address.
pub(crate) fn network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(unmapped(net.trunc()));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(unmapped(IpNet::from(ip)));
    }
    Err(format!(
        "{text:?} is not an IP network; write e.g. 10.0.0.0/8, or 127.0.0.1 for one address"
    ))
}

/// An IPv4-mapped network (`::ffff:10.0.0.0/104`) as the IPv4 network it
/// maps (`10.0.0.0/8`): peers are matched in their IPv4 form (a dual-stack
/// listener's IPv4 caller, a PROXY header's mapped address), so the IPv6
/// form was accepted and never matched.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// `::1:5353`: an IPv6 address and a port written without brackets (or an
/// IPv6 address alone whose last group is all digits: the text cannot say
/// which). The message to give: both readings, bracketed.
fn ipv6_and_port(text: &str) -> Option<String> {
    if text.starts_with('[') || text.matches(':').count() < 2 {
        return None;
    }
    let (ip, port) = text.rsplit_once(':')?;
    let ip = ip.parse::<std::net::Ipv6Addr>().ok()?;
    let port = port.parse::<u16>().ok()?;
    Some(format!(
        "{text:?} is ambiguous: an IPv6 address takes brackets before a port; write \
         {} for {ip} on port {port}, or [{text}] for the address {text}",
        SocketAddr::new(IpAddr::V6(ip), port)
    ))
}

fn zone_refused(text: &str) -> String {
    format!(
        "{text:?} has an IPv6 zone id (%...), which is not supported; give an address \
         without one (a global or unique local address, fd00::/8)"
    )
}

/// Why an address did not parse as ip:port.
enum AddrProblem {
    /// See [`ipv6_and_port`]: the message.
    Unbracketed(String),
    /// `[fe80::1%eth0]:4573`: logs, the API, reloads and health checks'
    /// URLs would each show or compare it differently.
    Zone,
    Empty,
    NoPort(IpAddr),
    NoHost,
    BadPort(String),
    DnsName,
    Garbage,
}

fn socket_addr(text: &str) -> Result<SocketAddr, AddrProblem> {
    let text = text.trim();
    if text.is_empty() {
        return Err(AddrProblem::Empty);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return match addr {
            SocketAddr::V6(a) if a.scope_id() != 0 => Err(AddrProblem::Zone),
            _ => Ok(addr),
        };
    }
    if text.starts_with('[') && text.contains('%') {
        return Err(AddrProblem::Zone);
    }
    if let Some(hint) = ipv6_and_port(text) {
        return Err(AddrProblem::Unbracketed(hint));
    }
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Err(AddrProblem::NoPort(ip));
    }
    if text.starts_with(':') {
        return Err(AddrProblem::NoHost);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    };
    let host_ok = host.parse::<IpAddr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<IpAddr>().is_ok());
    let looks_like_dns = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && host.chars().any(|c| c.is_ascii_alphabetic());
    match port {
        Some(p) if (host_ok || looks_like_dns) && p.parse::<u16>().is_err() => {
            Err(AddrProblem::BadPort(p.to_string()))
        }
        _ if looks_like_dns => Err(AddrProblem::DnsName),
        _ => Err(AddrProblem::Garbage),
    }
}

fn with_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, DEFAULT_PORT)
}

/// Where a backend is: ip:port (port not 0, a concrete address), or name:port for a DNS name
/// whose A/AAAA records are the backends.
pub(crate) fn backend_address(text: &str) -> Result<BackendTarget, String> {
    let addr = match socket_addr(text) {
        Err(AddrProblem::DnsName) => return host_and_port(text.trim()),
        other => other,
    };
    let addr = addr.map_err(|p| match p {
        AddrProblem::Unbracketed(m) => m,
        AddrProblem::Zone => zone_refused(text),
        AddrProblem::Empty => "is empty; write ip:port, e.g. 10.0.0.1:4573".to_string(),
        AddrProblem::NoPort(ip) => format!(
            "{text:?} has no port; write host:port, e.g. {}",
            with_port(ip)
        ),
        AddrProblem::NoHost => format!("{text:?} has no host; write ip:port, e.g. 10.0.0.1:4573"),
        AddrProblem::BadPort(port) => {
            format!("{text:?} has an invalid port {port:?}; ports run from 1 to 65535")
        }
        AddrProblem::DnsName => unreachable!("handled above"),
        AddrProblem::Garbage => format!(
            "{text:?} is not an address; write ip:port, e.g. 10.0.0.1:4573, or name:port, \
             e.g. ivr.backends.svc.cluster.local:4573"
        ),
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0, which cannot be connected to; give the backend's port, e.g. {}",
            with_port(addr.ip())
        ));
    }
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{text:?} is not a backend's address (it means \"any address\"); \
             write the backend's own IP, e.g. 127.0.0.1:{}",
            addr.port()
        ));
    }
    // `[::ffff:10.0.0.5]:4573` is 10.0.0.5:4573: one backend, listed (and
    // deduplicated, counted, logged) in one form.
    Ok(BackendTarget::Static(SocketAddr::new(
        addr.ip().to_canonical(),
        addr.port(),
    )))
}

/// `name:port` of a DNS backend.
fn host_and_port(text: &str) -> Result<BackendTarget, String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} has no port; write name:port, e.g. {text}:{DEFAULT_PORT}"
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(0) => {
            return Err(format!(
                "{text:?} has port 0, which cannot be connected to; give the backend's port, \
                 e.g. {host}:{DEFAULT_PORT}"
            ))
        }
        Ok(p) => p,
        Err(_) => {
            return Err(format!(
                "{text:?} has an invalid port {port:?}; ports run from 1 to 65535"
            ))
        }
    };
    let name = dns_name(host)?;
    Ok(BackendTarget::Host { name, port })
}

/// A DNS name as written (a final `.` allowed): labels of letters, digits, `-` and `_`
/// (`_agi._tcp` SRV labels), at most 63 bytes each and 253 in all.
pub(crate) fn dns_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("is empty; write a DNS name, e.g. ivr.backends.svc.cluster.local".to_string());
    }
    if bare.len() > 253 {
        return Err(format!(
            "{name:?} is longer than the 253 characters a DNS name may have"
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(format!(
                "{name:?} has an empty label (two dots in a row, or a leading dot)"
            ));
        }
        if label.len() > 63 {
            return Err(format!(
                "{name:?} has a label longer than 63 characters: {label:?}"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "{name:?} contains {c:?}; DNS names use letters, digits, -, _ and ."
            ));
        }
    }
    if bare.parse::<IpAddr>().is_ok() || !bare.chars().any(|c| c.is_ascii_alphabetic()) {
        return Err(format!("{name:?} is not a DNS name"));
    }
    Ok(name.to_string())
}

/// A nameserver: ip or ip:port (port 53 when absent); never a name.
pub(crate) fn nameserver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    // Read as an address alone (port 53), `::1:5353` sent every query to a
    // host that is not there.
    if let Some(hint) = ipv6_and_port(text) {
        return Err(hint);
    }
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    match text.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok(a),
        Ok(_) => Err(format!(
            "{text:?} is not a nameserver's address; write its IP, e.g. 10.96.0.10 or 127.0.0.1:5353"
        )),
        Err(_) => Err(format!(
            "{text:?} is not an IP address; nameservers are given by IP (port 53 when absent), \
             e.g. 10.96.0.10 or 127.0.0.1:5353"
        )),
    }
}

/// Where a listener binds: ip:port; port 0 asks the OS for a free port (used by tests).
pub(crate) fn listen_address(text: &str) -> Result<SocketAddr, String> {
    bind_address(text, "listeners bind", DEFAULT_PORT)
}

/// The control API's address: as a listener's, with examples on a port of
/// its own (a listener's would clash with the FastAGI port).
pub(crate) fn control_address(text: &str) -> Result<SocketAddr, String> {
    bind_address(text, "the control API binds", 4574)
}

fn bind_address(text: &str, who: &str, port: u16) -> Result<SocketAddr, String> {
    let example = format!("0.0.0.0:{port}");
    let other = format!("127.0.0.1:{port}");
    socket_addr(text).map_err(|p| match p {
        AddrProblem::Unbracketed(m) => m,
        AddrProblem::Zone => zone_refused(text),
        AddrProblem::Empty => format!("is empty; write ip:port, e.g. {example}"),
        AddrProblem::NoPort(ip) => format!(
            "{text:?} has no port; write ip:port, e.g. {}",
            SocketAddr::new(ip, port)
        ),
        AddrProblem::NoHost => format!(
            "{text:?} has no IP; write 0.0.0.0{text} for every address or 127.0.0.1{text} for loopback"
        ),
        AddrProblem::BadPort(bad) => {
            format!("{text:?} has an invalid port {bad:?}; ports run from 0 to 65535")
        }
        AddrProblem::DnsName => {
            format!("{text:?} is a name; {who} IP addresses, e.g. {example} or {other}")
        }
        AddrProblem::Garbage => format!("{text:?} is not an address; write ip:port, e.g. {example}"),
    })
}

/// A number from the file that must fit `range` (and its target type).
pub(crate) fn in_range<T>(
    value: u64,
    range: RangeInclusive<T>,
    default: Option<T>,
) -> Result<T, String>
where
    T: TryFrom<u64> + PartialOrd + std::fmt::Display + Copy,
{
    match T::try_from(value) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => {
            let default = default
                .map(|d| format!(" (default {d})"))
                .unwrap_or_default();
            Err(format!(
                "{value} is out of range; use {} to {}{default}",
                range.start(),
                range.end()
            ))
        }
    }
}

/// Remembers where each name was first seen, to point duplicates at it.
pub(crate) struct Seen<K>(HashMap<K, String>);

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Seen(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq> Seen<K> {
    /// Records `key` at `path`; if it was already there, returns where.
    pub(crate) fn first(&mut self, key: K, path: &str) -> Option<&str> {
        use std::collections::hash_map::Entry;
        match self.0.entry(key) {
            Entry::Occupied(e) => Some(e.into_mut().as_str()),
            Entry::Vacant(e) => {
                e.insert(path.to_string());
                None
            }
        }
    }
}

/// The pools' names in config order (None for a pool without one), looked up by hash: a large
/// config resolves a name per route.
pub(crate) struct PoolNames<'a> {
    all: Vec<Option<&'a str>>,
    /// The first pool of each name.
    index: HashMap<&'a str, usize>,
}

impl<'a> PoolNames<'a> {
    pub(crate) fn new(all: Vec<Option<&'a str>>) -> PoolNames<'a> {
        let mut index = HashMap::with_capacity(all.len());
        for (i, name) in all.iter().enumerate() {
            if let Some(name) = name {
                index.entry(*name).or_insert(i);
            }
        }
        PoolNames { all, index }
    }
}

/// The index of the pool named `name`, or a message listing the known pools.
pub(crate) fn resolve_pool(name: &str, pool_names: &PoolNames) -> Result<usize, String> {
    if let Some(i) = pool_names.index.get(name) {
        return Ok(*i);
    }
    let mut known: Vec<&str> = pool_names.all.iter().flatten().copied().collect();
    known.sort_unstable();
    known.dedup();
    if known.is_empty() {
        Err(format!(
            "unknown pool {name:?}; no pools are defined (add one under pools:)"
        ))
    } else {
        Err(format!(
            "unknown pool {name:?}; known pools: {}",
            known.join(", ")
        ))
    }
}

/// Runs `f` on `path` with `part` appended, then cuts it back: paths of parts without an
/// allocation each.
pub(super) fn under<T>(path: &mut String, part: &str, f: impl FnOnce(&mut String) -> T) -> T {
    let len = path.len();
    path.push_str(part);
    let out = f(path);
    path.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses() {
        assert_eq!(
            backend_address("10.0.0.1:4573"),
            Ok(BackendTarget::Static("10.0.0.1:4573".parse().unwrap()))
        );
        assert_eq!(
            backend_address("[::1]:5000"),
            Ok(BackendTarget::Static("[::1]:5000".parse().unwrap()))
        );
        let e = backend_address("10.0.0.1").unwrap_err();
        assert_eq!(
            e,
            "\"10.0.0.1\" has no port; write host:port, e.g. 10.0.0.1:4573"
        );
        assert!(backend_address("::1").unwrap_err().contains("[::1]:4573"));
        assert_eq!(
            backend_address("[::ffff:127.0.0.1]:5000"),
            Ok(BackendTarget::Static("127.0.0.1:5000".parse().unwrap()))
        );
        assert!(backend_address("[::1]").unwrap_err().contains("[::1]:4573"));
        assert_eq!(
            backend_address("ivr.svc:4573"),
            Ok(BackendTarget::Host {
                name: "ivr.svc".into(),
                port: 4573
            })
        );
        assert_eq!(
            backend_address("localhost").unwrap_err(),
            "\"localhost\" has no port; write name:port, e.g. localhost:4573"
        );
        assert!(backend_address("ivr.svc:0").unwrap_err().contains("port 0"));
        assert!(backend_address("ivr..svc:4573")
            .unwrap_err()
            .contains("empty label"));
        assert!(backend_address("10.0.0.1:99999")
            .unwrap_err()
            .contains("invalid port"));
        assert!(backend_address("10.0.0.1:0")
            .unwrap_err()
            .contains("port 0"));
        assert!(backend_address("0.0.0.0:4573")
            .unwrap_err()
            .contains("any address"));
        assert!(backend_address(":4573").unwrap_err().contains("no host"));
        assert!(backend_address("10.0.0.1:45 73")
            .unwrap_err()
            .contains("invalid port"));
        assert!(backend_address("10.0.0.1/8:4573")
            .unwrap_err()
            .contains("not an address"));
        assert!(backend_address("").unwrap_err().contains("is empty"));
    }

    #[test]
    fn dns_names_and_nameservers() {
        assert_eq!(
            dns_name("_agi._tcp.ivr.test."),
            Ok("_agi._tcp.ivr.test.".into())
        );
        assert!(dns_name("ivr test").unwrap_err().contains("' '"));
        assert!(dns_name(&"a".repeat(64)).unwrap_err().contains("63"));
        assert!(dns_name("").unwrap_err().contains("is empty"));
        assert_eq!(
            nameserver("127.0.0.1:5353"),
            Ok("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(
            nameserver("10.96.0.10"),
            Ok("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(nameserver("[::1]"), Ok("[::1]:53".parse().unwrap()));
        // Without brackets, `::1:5353` was taken for the address ::1:5353 on
        // port 53: refused, with both readings.
        let e = nameserver("::1:5353").unwrap_err();
        assert!(e.contains("[::1]:5353") && e.contains("[::1:5353]"), "{e}");
        assert_eq!(
            nameserver("[::1:5353]"),
            Ok("[::1:5353]:53".parse().unwrap())
        );
        assert_eq!(nameserver("fd00::53"), Ok("[fd00::53]:53".parse().unwrap()));
        for bad in ["::1:26001", "fe80::2:4573"] {
            for e in [
                listen_address(bad).unwrap_err(),
                control_address(bad).unwrap_err(),
                backend_address(bad).unwrap_err(),
            ] {
                assert!(e.contains("ambiguous") && e.contains("]:"), "{bad}: {e}");
            }
        }
        assert!(listen_address("::1:26001")
            .unwrap_err()
            .contains("[::1]:26001"));
        for zoned in ["[::1%1]:26031", "[fe80::1%eth0]:4573"] {
            assert!(
                listen_address(zoned).unwrap_err().contains("zone id"),
                "{zoned}"
            );
            assert!(
                backend_address(zoned).unwrap_err().contains("zone id"),
                "{zoned}"
            );
            assert!(
                control_address(zoned).unwrap_err().contains("zone id"),
                "{zoned}"
            );
        }
        assert!(nameserver("dns.local").unwrap_err().contains("by IP"));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            listen_address("127.0.0.1:0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert!(listen_address(":4573")
            .unwrap_err()
            .contains("0.0.0.0:4573"));
        assert!(listen_address("0.0.0.0")
            .unwrap_err()
            .contains("0.0.0.0:4573"));
        assert!(listen_address("pbx.local:4573")
            .unwrap_err()
            .contains("is a name"));
    }

    /// The control API's examples are on a port of its own: a listener's
    /// (4573) would clash with the FastAGI port (walkthrough).
    #[test]
    fn control_addresses_suggest_a_port_of_their_own() {
        for (text, want) in [
            ("localhost:4574", "127.0.0.1:4574"),
            ("127.0.0.1", "127.0.0.1:4574"),
            ("", "0.0.0.0:4574"),
            ("what", "0.0.0.0:4574"),
        ] {
            let e = control_address(text).unwrap_err();
            assert!(e.contains(want) && !e.contains("4573"), "{text:?}: {e}");
        }
        assert!(control_address("localhost:4574")
            .unwrap_err()
            .contains("the control API binds IP addresses"));
    }

    #[test]
    fn networks() {
        assert_eq!(network("10.1.2.3/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(network("127.0.0.1"), Ok("127.0.0.1/32".parse().unwrap()));
        assert_eq!(network("::1"), Ok("::1/128".parse().unwrap()));
        // IPv4-mapped: the IPv4 network, which is how peers are matched.
        assert_eq!(
            network("::ffff:127.0.0.0/104"),
            Ok("127.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            network("::ffff:10.1.2.3/120"),
            Ok("10.1.2.0/24".parse().unwrap())
        );
        assert_eq!(
            network("::ffff:192.0.2.7"),
            Ok("192.0.2.7/32".parse().unwrap())
        );
        assert_eq!(network("::ffff:0:0/96"), Ok("0.0.0.0/0".parse().unwrap()));
        // Wider than the mapped range, or not mapped: IPv6 as written.
        assert_eq!(network("::/0"), Ok("::/0".parse().unwrap()));
        assert_eq!(network("::7f00:1/128"), Ok("::7f00:1/128".parse().unwrap()));
        assert!(network("10.0.0.0/33")
            .unwrap_err()
            .contains("not an IP network"));
    }

    #[test]
    fn names_and_vars() {
        assert!(name("ivr-blue_2.x").is_ok());
        assert!(name("ivr blue").unwrap_err().contains("' '"));
        assert!(name("").is_err());
        assert!(var_name("agi_x_route").is_ok());
        assert!(var_name("agi_").is_err());
        assert!(var_name("context").unwrap_err().contains("start with agi_"));
        assert!(var_name("AGI_Context").unwrap_err().contains("lowercase"));
        assert!(var_name("agi_x-y").is_err());
        assert!(is_asterisk_var("agi_uniqueid") && is_asterisk_var("agi_arg_12"));
        assert!(!is_asterisk_var("agi_arg_x") && !is_asterisk_var("agi_x_route"));
    }

    #[test]
    fn regex_errors_are_one_line() {
        let e = pattern("^[0-9+$").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("unclosed character class"), "{e}");
    }

    #[test]
    fn ranges() {
        assert_eq!(in_range::<u32>(5, 1..=1000, Some(1)), Ok(5));
        assert_eq!(
            in_range::<u32>(0, 1..=1000, Some(1)),
            Err("0 is out of range; use 1 to 1000 (default 1)".to_string())
        );
        assert!(in_range::<u32>(u64::MAX, 1..=u32::MAX, None).is_err());
    }
}
