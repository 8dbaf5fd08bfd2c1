//! The FastAGI session header: the `agi_*` variables Asterisk sends right
//! after connecting, one `name: value\n` line each, ended by a blank line.
//!
//! The order of the variables matters to some backends and to byte-exact
//! tests, so the header is an ordered list, not a map.

/// The real headers captured from Asterisk 23.4.1 (see
/// `shared/fastagi-protocol.md`), named as their files are.
#[allow(clippy::upper_case_acronyms)] // the names of the fixture files
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fixture {
    /// A plain call: `agi://127.0.0.1:4573/some/script?x=1,arg1,arg2`.
    FX,
    /// Caller id, dnid, rdnis, accountcode, language and a query string.
    HC,
    /// The argument-splitting example: empty, quoted and escaped arguments.
    J,
    /// No script and no arguments: no `agi_network_script` line at all.
    J2,
    /// A `hagi://` (SRV) call.
    SRV1,
}

impl Fixture {
    /// Every fixture, for tests that run over all of them.
    pub const ALL: [Fixture; 5] = [
        Fixture::FX,
        Fixture::HC,
        Fixture::J,
        Fixture::J2,
        Fixture::SRV1,
    ];

    /// The header exactly as Asterisk sent it, blank line included.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Fixture::FX => include_bytes!("../fixtures/header-FX.bin"),
            Fixture::HC => include_bytes!("../fixtures/header-HC.bin"),
            Fixture::J => include_bytes!("../fixtures/header-J.bin"),
            Fixture::J2 => include_bytes!("../fixtures/header-J2.bin"),
            Fixture::SRV1 => include_bytes!("../fixtures/header-SRV1.bin"),
        }
    }
}

/// Asterisk sends at most this many `agi_arg_N` variables.
pub const MAX_ARGS: usize = 127;

/// An ordered list of `agi_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgiHeader {
    vars: Vec<(String, String)>,
}

impl Default for AgiHeader {
    /// The plain call of [`Fixture::FX`].
    fn default() -> Self {
        Self::fixture(Fixture::FX)
    }
}

impl AgiHeader {
    /// A header with no variables (serialises to just the blank line).
    pub fn empty() -> Self {
        Self { vars: Vec::new() }
    }

    /// One of the captured real headers.
    pub fn fixture(fixture: Fixture) -> Self {
        // The fixtures are compiled in; a unit test checks that each parses.
        Self::parse(fixture.bytes()).expect("header fixtures are well-formed")
    }

    /// Length of the header at the start of `bytes`, blank line included, or
    /// `None` while the blank line has not arrived.
    pub fn len_in(bytes: &[u8]) -> Option<usize> {
        if bytes.first() == Some(&b'\n') {
            return Some(1);
        }
        memchr::memmem::find(bytes, b"\n\n").map(|i| i + 2)
    }

    /// Parses the header at the start of `bytes` (anything after the blank
    /// line is ignored). `None` when the blank line is missing, a line has no
    /// `:`, or the bytes are not UTF-8. One space after the colon is part of
    /// the separator, as Asterisk writes it.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let len = Self::len_in(bytes)?;
        if len == 1 {
            return Some(Self::empty());
        }
        // Split on `\n` only: a stray `\r` stays in the value, byte-exact.
        let text = std::str::from_utf8(&bytes[..len - 2]).ok()?;
        let vars = text
            .split('\n')
            .map(|line| {
                let (name, value) = line.split_once(':')?;
                let value = value.strip_prefix(' ').unwrap_or(value);
                Some((name.to_owned(), value.to_owned()))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { vars })
    }

    /// The 22 variables a real Asterisk sends, in its order, followed by one
    /// `agi_arg_N` per argument (at most [`MAX_ARGS`], as Asterisk caps them).
    ///
    /// `script` is what follows the first `/` behind the host
    /// (`ivr/main?lang=de`); when empty there is no `agi_network_script` line
    /// and `agi_request` has no path, exactly as in [`Fixture::J2`]. The other
    /// values are those of [`Fixture::FX`], so
    /// `realistic("some/script?x=1", &["arg1", "arg2"], "1795769496.429")`
    /// is byte-for-byte that fixture.
    pub fn realistic(script: &str, args: &[&str], uniqueid: &str) -> Self {
        let mut vars: Vec<(String, String)> = Vec::with_capacity(22 + args.len());
        let mut push = |name: &str, value: &str| vars.push((name.to_owned(), value.to_owned()));
        push("agi_network", "yes");
        let request = if script.is_empty() {
            "agi://127.0.0.1:4573".to_owned()
        } else {
            push("agi_network_script", script);
            format!("agi://127.0.0.1:4573/{script}")
        };
        push("agi_request", &request);
        push("agi_channel", "Local/s@agitest-000000d6;2");
        push("agi_language", "en");
        push("agi_type", "Local");
        push("agi_uniqueid", uniqueid);
        push("agi_version", "23.4.1");
        push("agi_callerid", "unknown");
        push("agi_calleridname", "unknown");
        push("agi_callingpres", "67");
        push("agi_callingani2", "0");
        push("agi_callington", "0");
        push("agi_callingtns", "0");
        push("agi_dnid", "unknown");
        push("agi_rdnis", "unknown");
        push("agi_context", "agitest");
        push("agi_extension", "s");
        push("agi_priority", "2");
        push("agi_enhanced", "0.0");
        push("agi_accountcode", "");
        push("agi_threadid", "139628630558400");
        for (i, arg) in args.iter().take(MAX_ARGS).enumerate() {
            push(&format!("agi_arg_{}", i + 1), arg);
        }
        Self { vars }
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces `name` in place, or appends it at the end. Values are sent
    /// verbatim: a `\n` in one breaks the framing, which a test may want.
    pub fn set(&mut self, name: &str, value: &str) -> &mut Self {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => value.clone_into(v),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
        self
    }

    /// [`set`](Self::set) for builder chains.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.set(name, value);
        self
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.vars.iter().position(|(n, _)| n == name)?;
        Some(self.vars.remove(i).1)
    }

    /// The variables in order.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Writes one `name: value\n` line into `out` (cleared first); the unit
    /// FakeAsterisk sends per `write()`.
    pub(crate) fn line_into(name: &str, value: &str, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }

    /// The header as sent on the wire, blank line included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 * self.vars.len() + 1);
        let mut line = Vec::new();
        for (name, value) in &self.vars {
            Self::line_into(name, value, &mut line);
            out.extend_from_slice(&line);
        }
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_round_trips_byte_exact() {
        for fixture in Fixture::ALL {
            let header = AgiHeader::parse(fixture.bytes()).expect("parses");
            assert_eq!(header.to_bytes(), fixture.bytes(), "{fixture:?}");
            assert_eq!(
                AgiHeader::len_in(fixture.bytes()),
                Some(fixture.bytes().len())
            );
        }
    }

    #[test]
    fn empty_values_keep_their_space() {
        let header = AgiHeader::fixture(Fixture::J);
        assert_eq!(header.get("agi_accountcode"), Some(""));
        assert_eq!(header.get("agi_arg_3"), Some(""));
        assert_eq!(header.get("agi_arg_4"), Some("q,c"));
        let bytes = header.to_bytes();
        assert!(memchr::memmem::find(&bytes, b"\nagi_accountcode: \n").is_some());
    }

    #[test]
    fn realistic_matches_the_plain_fixture() {
        let header = AgiHeader::realistic("some/script?x=1", &["arg1", "arg2"], "1795769496.429");
        assert_eq!(header.to_bytes(), Fixture::FX.bytes());
        assert_eq!(header.vars().len(), 24);
    }

    #[test]
    fn realistic_without_script_matches_j2_shape() {
        let mut header = AgiHeader::realistic("", &[], "1795769011.57");
        header
            .set("agi_channel", "Local/s@agitest-0000001c;2")
            .set("agi_threadid", "139739333306048");
        assert_eq!(header.to_bytes(), Fixture::J2.bytes());
    }

    #[test]
    fn realistic_caps_arguments_like_asterisk() {
        let args: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let header = AgiHeader::realistic("s", &args, "1.1");
        assert_eq!(header.get("agi_arg_127"), Some("126"));
        assert_eq!(header.get("agi_arg_128"), None);
    }

    #[test]
    fn set_replaces_in_place_or_appends() {
        let mut header = AgiHeader::fixture(Fixture::FX);
        header.set("agi_network_script", "ivr/main");
        assert_eq!(
            header.vars()[1],
            ("agi_network_script".into(), "ivr/main".into())
        );
        header.set("agi_x_route", "ivr");
        assert_eq!(header.vars().last().unwrap().0, "agi_x_route");
        assert_eq!(header.remove("agi_x_route").as_deref(), Some("ivr"));
        assert_eq!(header.get("agi_x_route"), None);
    }

    #[test]
    fn incomplete_or_malformed_headers_are_refused() {
        assert!(AgiHeader::parse(b"agi_network: yes\n").is_none());
        assert!(AgiHeader::parse(b"agi_network yes\n\n").is_none());
        assert!(AgiHeader::parse(b"agi_x: \xff\n\n").is_none());
        assert_eq!(AgiHeader::parse(b"\n"), Some(AgiHeader::empty()));
        assert_eq!(AgiHeader::len_in(b"a: b\n\nNOOP\n"), Some(6));
    }
}
