//! Builds the header a backend receives: Asterisk's bytes as sent, plus only
//! the route's path rewrite (in `agi_network_script` and `agi_request`) and
//! its injected variables, written before the blank line.

use std::borrow::Cow;

pub use agiproxy_config::TemplateContext;
use agiproxy_config::{Rewrite, Template};

use super::header::Header;

/// Rewrites the path in `agi_request` (`agi://host:port/path?query`), as
/// bytes (see [`Rewrite::apply`]); `None` when it is left as it is.
fn rewrite_request(rewrite: &Rewrite, request: &[u8]) -> Option<Vec<u8>> {
    let after_scheme = memchr::memmem::find(request, b"://").map_or(0, |i| i + 3);
    let path_start = after_scheme + memchr::memchr(b'/', &request[after_scheme..])?;
    match rewrite.apply(&request[path_start + 1..]) {
        Cow::Owned(script) => Some([&request[..=path_start], &script[..]].concat()),
        Cow::Borrowed(_) => None,
    }
}

/// The header to replay to a backend. Borrowed (no copy) when the route
/// neither rewrites nor injects. Values are copied as bytes: a header from
/// Asterisk need not be UTF-8.
pub fn backend_header<'h>(
    header: &'h Header,
    rewrite: Option<&Rewrite>,
    set: &[(String, Template)],
    ctx: &TemplateContext<'_>,
) -> Cow<'h, [u8]> {
    if rewrite.is_none() && set.is_empty() {
        return Cow::Borrowed(header.raw());
    }
    let mut out: Vec<u8> = Vec::with_capacity(header.raw().len() + 64 * set.len() + 32);
    let mut line = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.push(b'\n');
    };
    for (name, v) in header.raw_vars() {
        // An injected variable replaces one a client sent under the same
        // name, so a caller cannot spoof e.g. agi_x_forwarded_for.
        if let Some((_, t)) = set.iter().find(|(n, _)| n == name) {
            line(name, t.render(ctx).as_bytes());
            continue;
        }
        // On bytes: a value that is not UTF-8 is rewritten as routing saw it.
        let rewritten = rewrite.and_then(|rw| match name {
            "agi_network_script" => match rw.apply(v) {
                Cow::Owned(script) => Some(script),
                Cow::Borrowed(_) => None,
            },
            "agi_request" => rewrite_request(rw, v),
            _ => None,
        });
        line(name, rewritten.as_deref().unwrap_or(v));
    }
    for (name, t) in set {
        if header.get(name).is_none() {
            line(name, t.render(ctx).as_bytes());
        }
    }
    out.push(b'\n');
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agiproxy_config::TemplatePart;

    const HC: &[u8] = include_bytes!("../../../chaos-tests/fixtures/header-HC.bin");

    fn ctx() -> TemplateContext<'static> {
        TemplateContext {
            remote: "10.0.0.7:40000".parse().unwrap(),
            local: "127.0.0.1:4573".parse().unwrap(),
            route: "ivr",
            listener: "asterisk",
            pool: "ivr-blue",
        }
    }

    #[test]
    fn untouched_header_is_borrowed() {
        let h = Header::parse(HC.to_vec(), 512).unwrap();
        let out = backend_header(&h, None, &[], &ctx());
        assert!(matches!(out, Cow::Borrowed(_)));
        assert_eq!(&*out, HC);
    }

    #[test]
    fn strip_and_replace_prefix_in_script_and_request() {
        let h = Header::parse(HC.to_vec(), 512).unwrap();
        let rw = Rewrite::StripPrefix("ivr/".into());
        let out = backend_header(&h, Some(&rw), &[], &ctx());
        let expected = String::from_utf8(HC.to_vec())
            .unwrap()
            .replace("agi_network_script: ivr/main", "agi_network_script: main")
            .replace("4573/ivr/main", "4573/main");
        assert_eq!(String::from_utf8(out.into_owned()).unwrap(), expected);

        let rw = Rewrite::ReplacePrefix {
            from: "ivr/".into(),
            to: "menu/v2/".into(),
        };
        let out =
            String::from_utf8(backend_header(&h, Some(&rw), &[], &ctx()).into_owned()).unwrap();
        assert!(out.contains("agi_network_script: menu/v2/main?lang=de&x=1\n"));
        assert!(out.contains("agi_request: agi://127.0.0.1:4573/menu/v2/main?lang=de&x=1\n"));
    }

    #[test]
    fn injected_variables_go_before_the_blank_line_and_replace_spoofed_ones() {
        let mut raw = HC[..HC.len() - 1].to_vec();
        raw.extend_from_slice(b"agi_x_forwarded_for: 6.6.6.6\n\n");
        let h = Header::parse(raw, 512).unwrap();
        let set = vec![
            (
                "agi_x_forwarded_for".to_string(),
                Template(vec![TemplatePart::RemoteIp]),
            ),
            (
                "agi_x_route".to_string(),
                Template(vec![
                    TemplatePart::Literal("r=".into()),
                    TemplatePart::Route,
                ]),
            ),
        ];
        let out = String::from_utf8(backend_header(&h, None, &set, &ctx()).into_owned()).unwrap();
        assert!(
            out.ends_with("agi_x_forwarded_for: 10.0.0.7\nagi_x_route: r=ivr\n\n"),
            "{out}"
        );
        assert!(!out.contains("6.6.6.6"));
    }

    #[test]
    fn a_script_that_is_not_utf8_is_rewritten_byte_for_byte() {
        // A Latin-1 caller name in the query: routing sees `ivr/noop?name=M`
        // and takes the route; the backend gets the prefix stripped and the
        // name's bytes as they were.
        let raw = b"agi_network: yes\nagi_network_script: ivr/noop?name=M\xfcller\n\
                    agi_request: agi://127.0.0.1:4573/ivr/noop?name=M\xfcller\n\n"
            .to_vec();
        let h = Header::parse(raw, 16).unwrap();
        assert_eq!(h.script_path(), "ivr/noop");
        let rw = Rewrite::StripPrefix("ivr/".into());
        let out = backend_header(&h, Some(&rw), &[], &ctx());
        assert_eq!(
            &*out,
            &b"agi_network: yes\nagi_network_script: noop?name=M\xfcller\n\
               agi_request: agi://127.0.0.1:4573/noop?name=M\xfcller\n\n"[..]
        );
    }

    #[test]
    fn non_matching_rewrite_leaves_header_bytes_equal() {
        let h = Header::parse(HC.to_vec(), 512).unwrap();
        let rw = Rewrite::StripPrefix("billing/".into());
        assert_eq!(&*backend_header(&h, Some(&rw), &[], &ctx()), HC);
    }
}
