//! `FakeDns`: an authoritative DNS server on `127.0.0.1:<port>` (UDP and TCP
//! on the same port) serving A, AAAA and SRV records from an in-memory zone
//! that the test changes at run time: records, TTLs, and SERVFAIL on demand.
//!
//! Answers: records of the asked type when the name has some; an empty
//! NOERROR when the name exists with other types only; NXDOMAIN for an
//! unknown name; SERVFAIL for everything while [`FakeDns::set_servfail`] is
//! on. An SRV answer carries its targets' A/AAAA records in the additional
//! section, as a Kubernetes headless Service's does.
//!
//! Point a resolver at [`FakeDns::addr`] only: records name loopback
//! addresses, and nothing here ever forwards a query.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
pub use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

/// One SRV record: `priority weight port target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// A name the zone should also hold A/AAAA records for.
    pub target: String,
}

impl SrvRecord {
    pub fn new(priority: u16, weight: u16, port: u16, target: &str) -> Self {
        Self {
            priority,
            weight,
            port,
            target: target.to_owned(),
        }
    }
}

#[derive(Debug, Default)]
struct Zone {
    addrs: HashMap<String, (Vec<IpAddr>, u32)>,
    srv: HashMap<String, (Vec<SrvRecord>, u32)>,
    servfail: bool,
    /// Names whose queries get SERVFAIL (a broken zone beside good ones).
    servfail_names: std::collections::HashSet<String>,
    /// (name, type) pairs that get SERVFAIL: one family broken, the other not.
    servfail_kinds: std::collections::HashSet<(String, RecordType)>,
    /// Query types never answered (a server or middlebox that drops AAAA).
    silent_kinds: std::collections::HashSet<RecordType>,
    /// SRV answers without the targets' addresses (not every server sends
    /// them: the client must look each target up).
    no_additionals: bool,
}

/// Lowercase with a final dot: how the zone keys names.
fn fqdn(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

impl Zone {
    fn exists(&self, name: &str) -> bool {
        self.addrs.contains_key(name) || self.srv.contains_key(name)
    }

    fn addr_records(&self, name: &str, kind: RecordType) -> Vec<Record> {
        let Some((ips, ttl)) = self.addrs.get(name) else {
            return Vec::new();
        };
        let Ok(owner) = Name::from_ascii(name) else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| match (ip, kind) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A::from(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA::from(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(owner.clone(), *ttl, data))
            .collect()
    }

    /// Response code, answers, additionals.
    fn answer(&self, name: &str, kind: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        if self.servfail
            || self.servfail_names.contains(name)
            || self.servfail_kinds.contains(&(name.to_string(), kind))
        {
            return (ResponseCode::ServFail, Vec::new(), Vec::new());
        }
        if !self.exists(name) {
            return (ResponseCode::NXDomain, Vec::new(), Vec::new());
        }
        match kind {
            RecordType::A | RecordType::AAAA => (
                ResponseCode::NoError,
                self.addr_records(name, kind),
                Vec::new(),
            ),
            RecordType::SRV => {
                let Some((records, ttl)) = self.srv.get(name) else {
                    return (ResponseCode::NoError, Vec::new(), Vec::new());
                };
                let Ok(owner) = Name::from_ascii(name) else {
                    return (ResponseCode::ServFail, Vec::new(), Vec::new());
                };
                let mut answers = Vec::new();
                let mut additionals = Vec::new();
                for r in records {
                    let target = fqdn(&r.target);
                    let Ok(target_name) = Name::from_ascii(&target) else {
                        continue;
                    };
                    answers.push(Record::from_rdata(
                        owner.clone(),
                        *ttl,
                        RData::SRV(SRV::new(r.priority, r.weight, r.port, target_name)),
                    ));
                    if self.no_additionals || self.servfail_names.contains(&target) {
                        continue;
                    }
                    for kind in [RecordType::A, RecordType::AAAA] {
                        for rec in self.addr_records(&target, kind) {
                            if !additionals.contains(&rec) {
                                additionals.push(rec);
                            }
                        }
                    }
                }
                (ResponseCode::NoError, answers, additionals)
            }
            _ => (ResponseCode::NoError, Vec::new(), Vec::new()),
        }
    }
}

struct Handler {
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicU64>,
    by_kind: ByKind,
}

/// Queries so far, by record type.
type ByKind = Arc<std::sync::Mutex<std::collections::HashMap<RecordType, u64>>>;

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Relaxed);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (code, answers, additionals) = match request.request_info() {
            Ok(info) => {
                let name = fqdn(&info.query.name().to_string());
                let kind = info.query.query_type();
                *self
                    .by_kind
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(kind)
                    .or_default() += 1;
                let silent = {
                    let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
                    zone.silent_kinds.contains(&kind)
                };
                if silent {
                    // Longer than any test's lookup timeout: never answered.
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                }
                let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
                zone.answer(&name, kind)
            }
            Err(_) => (ResponseCode::FormErr, Vec::new(), Vec::new()),
        };
        metadata.response_code = code;
        let response = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: failed,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// A DNS server for tests. Dropping it stops it.
pub struct FakeDns {
    addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicU64>,
    by_kind: ByKind,
    _server: Server<Handler>,
}

impl std::fmt::Debug for FakeDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeDns {
    /// Listens on `127.0.0.1:<port>`, UDP and TCP on the same free port.
    ///
    /// # Panics
    /// If no loopback port is free for both: the test cannot run at all then.
    pub async fn start() -> FakeDns {
        let (udp, tcp) = bind_pair().await;
        let addr = udp
            .local_addr()
            .unwrap_or_else(|e| panic!("FakeDns: socket has no address: {e}"));
        let zone = Arc::new(RwLock::new(Zone::default()));
        let queries = Arc::new(AtomicU64::new(0));
        let by_kind = ByKind::default();
        let mut server = Server::new(Handler {
            zone: zone.clone(),
            queries: queries.clone(),
            by_kind: by_kind.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        FakeDns {
            addr,
            zone,
            queries,
            by_kind,
            _server: server,
        }
    }

    /// Where to send queries (UDP or TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries answered so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Relaxed)
    }

    /// Queries of `kind` (SRV, A, AAAA) so far.
    pub fn queries_of(&self, kind: RecordType) -> u64 {
        self.by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    fn zone(&self) -> std::sync::RwLockWriteGuard<'_, Zone> {
        self.zone.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `name`'s A (IPv4) and AAAA (IPv6) records become `ips`, with `ttl`
    /// seconds. An empty list keeps the name, with no addresses.
    pub fn set_addrs(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        self.zone().addrs.insert(fqdn(name), (ips.to_vec(), ttl));
    }

    /// `name`'s SRV records become `records`, with `ttl` seconds.
    pub fn set_srv(&self, name: &str, records: &[SrvRecord], ttl: u32) {
        self.zone().srv.insert(fqdn(name), (records.to_vec(), ttl));
    }

    /// Forgets `name` (NXDOMAIN from now on).
    pub fn remove(&self, name: &str) {
        let name = fqdn(name);
        let mut zone = self.zone();
        zone.addrs.remove(&name);
        zone.srv.remove(&name);
    }

    /// While on, every query gets SERVFAIL.
    pub fn set_servfail(&self, on: bool) {
        self.zone().servfail = on;
    }

    /// While on, `kind` queries for `name` (A or AAAA, say) get SERVFAIL.
    pub fn set_servfail_for_kind(&self, name: &str, kind: RecordType, on: bool) {
        let key = (fqdn(name), kind);
        let mut zone = self.zone();
        if on {
            zone.servfail_kinds.insert(key);
        } else {
            zone.servfail_kinds.remove(&key);
        }
    }

    /// While on, SRV answers carry no additional section.
    pub fn set_srv_additionals(&self, on: bool) {
        self.zone().no_additionals = !on;
    }

    /// While on, `kind` queries are never answered, for any name.
    pub fn set_silent_for_kind(&self, kind: RecordType, on: bool) {
        let mut zone = self.zone();
        if on {
            zone.silent_kinds.insert(kind);
        } else {
            zone.silent_kinds.remove(&kind);
        }
    }

    /// While on, queries for `name` get SERVFAIL, and SRV answers leave its
    /// addresses out of their additional section.
    pub fn set_servfail_for(&self, name: &str, on: bool) {
        let name = fqdn(name);
        let mut zone = self.zone();
        if on {
            zone.servfail_names.insert(name);
        } else {
            zone.servfail_names.remove(&name);
        }
    }
}

/// A UDP socket and a TCP listener on the same loopback port.
async fn bind_pair() -> (UdpSocket, TcpListener) {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("FakeDns: cannot bind UDP on 127.0.0.1: {e}"));
        let Ok(addr) = udp.local_addr() else { continue };
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last = Some(e),
        }
    }
    panic!("FakeDns: no port free for both UDP and TCP on 127.0.0.1: {last:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_answers_follow_the_records() {
        let mut zone = Zone::default();
        zone.addrs.insert(
            fqdn("a.test"),
            (
                vec!["127.0.0.2".parse().unwrap(), "::1".parse().unwrap()],
                5,
            ),
        );
        zone.srv.insert(
            fqdn("_agi._tcp.a.test"),
            (vec![SrvRecord::new(10, 5, 4573, "a.test")], 7),
        );
        let (code, a, _) = zone.answer("a.test.", RecordType::A);
        assert_eq!((code, a.len(), a[0].ttl), (ResponseCode::NoError, 1, 5));
        let (_, aaaa, _) = zone.answer("a.test.", RecordType::AAAA);
        assert_eq!(aaaa.len(), 1);
        let (code, srv, extra) = zone.answer("_agi._tcp.a.test.", RecordType::SRV);
        assert_eq!(
            (code, srv.len(), extra.len()),
            (ResponseCode::NoError, 1, 2)
        );
        let (code, none, _) = zone.answer("_agi._tcp.a.test.", RecordType::A);
        assert_eq!((code, none.len()), (ResponseCode::NoError, 0));
        assert_eq!(
            zone.answer("b.test.", RecordType::A).0,
            ResponseCode::NXDomain
        );
        zone.servfail = true;
        assert_eq!(
            zone.answer("a.test.", RecordType::A).0,
            ResponseCode::ServFail
        );
    }
}
