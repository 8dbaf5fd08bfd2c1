//! Raw config → typed [`Config`]: every check, every default, every name resolved.
//! Validation never stops at a mistake; it records it and goes on, so one run reports all.

mod checks;
mod control;
mod keepalive;
mod matcher;
mod pool;
mod rollout;
mod route;
mod timeouts;

use crate::error::{ConfigError, Errors};
use crate::model::{Config, Control, Limits, Listener, ProxyProtocol};
use crate::raw::{RawConfig, RawLimits, RawListener, RawProxyProtocol, Scalar};

pub(crate) fn compile(raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
    let mut errs = Errors::default();
    let version = version(raw.version.as_ref(), &mut errs);
    let listeners = listeners(raw.listeners, &mut errs);
    let timeouts = timeouts::global(raw.timeouts.as_ref(), &mut errs);
    let limits = limits(raw.limits.as_ref(), &mut errs);

    // Routes refer to pools by name, so the names are gathered first; a pool with other
    // mistakes still counts as known, to avoid a second, misleading "unknown pool" error.
    let raw_pools = raw.pools.unwrap_or_default();
    let pool_names = checks::PoolNames::new(raw_pools.iter().map(|p| p.name.as_deref()).collect());
    let dns = pool::global_dns(raw.dns.as_ref(), &mut errs);
    let routes = route::compile_all(
        raw.routes.unwrap_or_default(),
        &pool_names,
        &timeouts,
        &dns,
        &mut errs,
    );
    let pools = pool::compile_all(&raw_pools, &dns, &mut errs);

    let control = control::compile(raw.control.as_ref(), &limits, &mut errs);
    control::check_rollout_peers(&control, &routes, &mut errs);
    control_clashes(&control, &listeners, &mut errs);
    let tcp_keepalive = keepalive::compile(raw.tcp_keepalive.as_ref(), &mut errs);

    if !errs.is_empty() {
        return Err(errs.into_vec());
    }
    Ok(Config {
        version,
        listeners,
        timeouts,
        limits,
        routes,
        pools,
        control,
        tcp_keepalive,
    })
}

fn version(raw: Option<&Scalar>, errs: &mut Errors) -> u32 {
    match raw.map(|s| s.0.trim()) {
        None => errs.push("version", "missing; add `version: 1` at the top"),
        Some("1") => {}
        Some(other) if other.parse::<u64>().is_ok() => errs.push(
            "version",
            format!("unsupported version {other}; this agiproxy reads version 1"),
        ),
        Some(other) => errs.push(
            "version",
            format!("{other:?} is not a version; write `version: 1`"),
        ),
    }
    1
}

fn listeners(raw: Option<Vec<RawListener>>, errs: &mut Errors) -> Vec<Listener> {
    let Some(raw) = raw else {
        return vec![Listener::default_listener()];
    };
    if raw.is_empty() {
        errs.push(
            "listeners",
            "empty; list at least one listener, or remove the key for the default \
             (asterisk on 0.0.0.0:4573)",
        );
    }
    let mut names = checks::Seen::default();
    let mut bound: Vec<(std::net::SocketAddr, String)> = Vec::new();
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let name = match &l.name {
            None => {
                errs.push(
                    format!("{path}.name"),
                    "missing; give each listener a name, e.g. name: asterisk",
                );
                None
            }
            Some(name) => match checks::name(name) {
                Err(m) => {
                    errs.push(format!("{path}.name"), m);
                    None
                }
                Ok(()) => {
                    if let Some(first) = names.first(name.as_str(), &path) {
                        errs.push(
                            format!("{path}.name"),
                            format!("{name:?} is also the name of {first}; listener names must be unique"),
                        );
                    }
                    Some(name.clone())
                }
            },
        };
        let address = match &l.address {
            None => {
                errs.push(
                    format!("{path}.address"),
                    "missing; write ip:port, e.g. address: \"0.0.0.0:4573\"",
                );
                None
            }
            Some(text) => match checks::listen_address(text) {
                Err(m) => {
                    errs.push(format!("{path}.address"), m);
                    None
                }
                Ok(addr) if mapped_v4(addr).is_some() => {
                    // Listeners bind IPv6 only (IPV6_V6ONLY), and Linux refuses
                    // an IPv4-mapped address there (EINVAL): it passed `check`
                    // and failed at start (audit).
                    let v4 = std::net::SocketAddr::new(
                        mapped_v4(addr).unwrap_or(addr.ip()),
                        addr.port(),
                    );
                    errs.push(
                        format!("{path}.address"),
                        format!("{addr} is an IPv4-mapped IPv6 address, which a listener cannot bind (it listens IPv6 only); write {v4}"),
                    );
                    None
                }
                Ok(addr) => {
                    if let Some((other, at)) = bound.iter().find(|(b, _)| binds_clash(*b, addr)) {
                        errs.push(
                            format!("{path}.address"),
                            format!("{addr} clashes with {at} ({other}); two listeners cannot bind the same port"),
                        );
                    }
                    bound.push((addr, format!("{path}.address")));
                    Some(addr)
                }
            },
        };
        let proxy_protocol = l
            .proxy_protocol
            .as_ref()
            .and_then(|p| proxy_protocol(p, &path, errs));
        if let (Some(name), Some(address)) = (name, address) {
            out.push(Listener {
                name,
                address,
                proxy_protocol,
            });
        }
    }
    out
}

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands for.
fn mapped_v4(addr: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    match addr.ip() {
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().map(std::net::IpAddr::V4),
        std::net::IpAddr::V4(_) => None,
    }
}

/// `listeners[N].proxy_protocol`: the networks of the load balancers that
/// send a PROXY header. No default: "from anywhere" would let any caller
/// claim any address, so the operator lists them (`0.0.0.0/0` if need be).
fn proxy_protocol(raw: &RawProxyProtocol, path: &str, errs: &mut Errors) -> Option<ProxyProtocol> {
    let at = format!("{path}.proxy_protocol.from");
    let Some(from) = &raw.from else {
        errs.push(
            at,
            "missing; list the load balancers that send a PROXY header, e.g. from: [\"10.0.0.0/8\"]",
        );
        return None;
    };
    if from.is_empty() {
        errs.push(
            at,
            "empty; list the load balancers that send a PROXY header, or remove proxy_protocol",
        );
        return None;
    }
    let mut nets = Vec::with_capacity(from.len());
    for (j, net) in from.iter().enumerate() {
        match checks::network(&net.0) {
            Ok(net) => nets.push(net),
            Err(msg) => errs.push(format!("{at}[{j}]"), msg),
        }
    }
    (nets.len() == from.len()).then_some(ProxyProtocol { from: nets })
}

/// The control API and a listener on one port: the second to bind fails at
/// start, and the message blamed another process (audit: a chart with
/// `ports.control` equal to `ports.agi` passed `check`).
fn control_clashes(control: &Control, listeners: &[Listener], errs: &mut Errors) {
    let Some(addr) = control.address.filter(|_| control.enabled) else {
        return;
    };
    let addr = std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port());
    if let Some((i, l)) = listeners
        .iter()
        .enumerate()
        .find(|(_, l)| control_takes(addr, l.address))
    {
        errs.push(
            "control.address",
            format!(
                "{addr} clashes with listeners[{i}].address ({}); the control API needs a port \
                 of its own, e.g. {}",
                l.address,
                std::net::SocketAddr::new(addr.ip(), free_port_beside(listeners))
            ),
        );
    }
}

/// A port to suggest for the control API: 9090 (Prometheus's habit), or
/// the next one no listener takes.
fn free_port_beside(listeners: &[Listener]) -> u16 {
    (9090..u16::MAX)
        .find(|p| listeners.iter().all(|l| l.address.port() != *p))
        .unwrap_or(9090)
}

/// Whether a listener could not bind `addr` beside the control API on `control`. The control
/// API's socket takes both families: `[::]` holds the IPv4 port too (listeners bind IPv6
/// only), and `[::ffff:127.0.0.1]` is 127.0.0.1 (audit: both passed `check`, then failed at
/// start).
pub fn control_takes(control: std::net::SocketAddr, addr: std::net::SocketAddr) -> bool {
    let control = std::net::SocketAddr::new(control.ip().to_canonical(), control.port());
    binds_clash(control, addr)
        || (control.is_ipv6()
            && control.ip().is_unspecified()
            && control.port() != 0
            && control.port() == addr.port())
}

/// Whether binding both addresses would fail: same port, and the same IP or a wildcard of the
/// same family. Port 0 picks a free port each time, so it never clashes.
pub fn binds_clash(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn limits(raw: Option<&RawLimits>, errs: &mut Errors) -> Limits {
    let mut limits = Limits::default();
    let Some(raw) = raw else { return limits };
    let defaults = Limits::default();
    let fields = [
        (
            "max_sessions",
            raw.max_sessions,
            Limits::MAX_SESSIONS,
            defaults.max_sessions,
            &mut limits.max_sessions,
        ),
        (
            "max_header_bytes",
            raw.max_header_bytes,
            Limits::MAX_HEADER_BYTES,
            defaults.max_header_bytes,
            &mut limits.max_header_bytes,
        ),
        (
            "max_header_lines",
            raw.max_header_lines,
            Limits::MAX_HEADER_LINES,
            defaults.max_header_lines,
            &mut limits.max_header_lines,
        ),
        (
            "max_headers_per_peer",
            raw.max_headers_per_peer,
            Limits::MAX_HEADERS_PER_PEER,
            defaults.max_headers_per_peer,
            &mut limits.max_headers_per_peer,
        ),
        (
            "max_header_memory",
            raw.max_header_memory,
            Limits::MAX_HEADER_MEMORY,
            defaults.max_header_memory,
            &mut limits.max_header_memory,
        ),
        (
            "max_config_bytes",
            raw.max_config_bytes,
            Limits::MAX_CONFIG_BYTES,
            defaults.max_config_bytes,
            &mut limits.max_config_bytes,
        ),
    ];
    for (key, value, range, default, slot) in fields {
        let Some(value) = value else { continue };
        match checks::in_range(value, range, Some(default)) {
            Ok(v) => *slot = v,
            Err(m) => errs.push(format!("limits.{key}"), m),
        }
    }
    limits
}
