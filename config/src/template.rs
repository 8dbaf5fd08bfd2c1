//! Templates for header variables a route adds (`set:`), e.g. `"${remote_ip}:${listener}"`.

use std::fmt;
use std::net::SocketAddr;

/// A parsed `set:` value: literal text and placeholders, rendered per session by the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(pub Vec<TemplatePart>);

#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    Literal(String),
    /// `${remote_ip}`: Asterisk's address.
    RemoteIp,
    /// `${remote_port}`: Asterisk's port.
    RemotePort,
    /// `${remote_addr}`: Asterisk's ip:port.
    RemoteAddr,
    /// `${local_addr}`: the proxy's ip:port that Asterisk connected to.
    LocalAddr,
    /// `${route}`: the matched route's name.
    Route,
    /// `${listener}`: the listener's name.
    Listener,
    /// `${pool}`: the pool the call was sent to.
    Pool,
}

const PLACEHOLDERS: &[(&str, TemplatePart)] = &[
    ("remote_ip", TemplatePart::RemoteIp),
    ("remote_port", TemplatePart::RemotePort),
    ("remote_addr", TemplatePart::RemoteAddr),
    ("local_addr", TemplatePart::LocalAddr),
    ("route", TemplatePart::Route),
    ("listener", TemplatePart::Listener),
    ("pool", TemplatePart::Pool),
];

/// What a template is rendered with, for one session.
#[derive(Debug, Clone, Copy)]
pub struct TemplateContext<'a> {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub route: &'a str,
    pub listener: &'a str,
    pub pool: &'a str,
}

impl Template {
    /// Parses a `set:` value. `$$` is a literal `$`; any other `$` must open a known `${name}`.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.contains(['\n', '\r']) {
            return Err(format!(
                "{text:?} contains a line break, which would end the header early; use one line"
            ));
        }
        let mut parts: Vec<TemplatePart> = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            literal.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                literal.push('$');
                rest = tail;
            } else if let Some(inner) = after.strip_prefix('{') {
                let Some(end) = inner.find('}') else {
                    return Err(format!(
                        "{text:?} has an unclosed \"${{\"; write ${{name}}, or $$ for a literal $"
                    ));
                };
                let name = &inner[..end];
                let Some((_, part)) = PLACEHOLDERS.iter().find(|(n, _)| *n == name) else {
                    return Err(format!(
                        "{text:?} uses unknown placeholder ${{{name}}}; known placeholders: {}",
                        known_placeholders()
                    ));
                };
                if !literal.is_empty() {
                    parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part.clone());
                rest = &inner[end + 1..];
            } else {
                return Err(format!(
                    "{text:?} has a lone $; write $$ for a literal $, or ${{name}} for a placeholder"
                ));
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(literal));
        }
        Ok(Template(parts))
    }

    /// The value for one session. IPv4 peers on a dual-stack listener show as plain IPv4.
    pub fn render(&self, ctx: &TemplateContext<'_>) -> String {
        let remote = SocketAddr::new(ctx.remote.ip().to_canonical(), ctx.remote.port());
        let local = SocketAddr::new(ctx.local.ip().to_canonical(), ctx.local.port());
        let mut out = String::new();
        for part in &self.0 {
            match part {
                TemplatePart::Literal(s) => out.push_str(s),
                TemplatePart::RemoteIp => out.push_str(&remote.ip().to_string()),
                TemplatePart::RemotePort => out.push_str(&remote.port().to_string()),
                TemplatePart::RemoteAddr => out.push_str(&remote.to_string()),
                TemplatePart::LocalAddr => out.push_str(&local.to_string()),
                TemplatePart::Route => out.push_str(ctx.route),
                TemplatePart::Listener => out.push_str(ctx.listener),
                TemplatePart::Pool => out.push_str(ctx.pool),
            }
        }
        out
    }
}

fn known_placeholders() -> String {
    PLACEHOLDERS
        .iter()
        .map(|(n, _)| format!("${{{n}}}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes the template back in config syntax (literal `$` as `$$`).
impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.0 {
            let name = match part {
                TemplatePart::Literal(s) => {
                    f.write_str(&s.replace('$', "$$"))?;
                    continue;
                }
                other => PLACEHOLDERS
                    .iter()
                    .find(|(_, p)| p == other)
                    .map_or("?", |(n, _)| n),
            };
            write!(f, "${{{name}}}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TemplatePart::*;

    #[test]
    fn parses_placeholders_and_escapes() {
        let t =
            Template::parse("from ${remote_ip}:${remote_port} via $${listener}${pool}").unwrap();
        assert_eq!(
            t.0,
            vec![
                Literal("from ".into()),
                RemoteIp,
                Literal(":".into()),
                RemotePort,
                Literal(" via ${listener}".into()),
                Pool,
            ]
        );
        assert_eq!(
            t.to_string(),
            "from ${remote_ip}:${remote_port} via $${listener}${pool}"
        );
        assert_eq!(Template::parse("").unwrap().0, vec![]);
        assert_eq!(Template::parse("$$").unwrap().0, vec![Literal("$".into())]);
    }

    #[test]
    fn refuses_unknown_unclosed_lone_dollar_and_newlines() {
        let e = Template::parse("${remote_host}").unwrap_err();
        assert!(e.contains("unknown placeholder ${remote_host}"), "{e}");
        assert!(e.contains("${remote_ip}") && e.contains("${pool}"), "{e}");
        assert!(Template::parse("${route").unwrap_err().contains("unclosed"));
        assert!(Template::parse("cost $5").unwrap_err().contains("lone $"));
        assert!(Template::parse("a$").unwrap_err().contains("lone $"));
        assert!(Template::parse("a\nb").unwrap_err().contains("line break"));
        assert!(Template::parse("a\rb").unwrap_err().contains("line break"));
    }

    #[test]
    fn renders_with_session_values() {
        let t = Template::parse(
            "${remote_addr} ${remote_ip} ${local_addr} ${route}/${listener}/${pool}",
        )
        .unwrap();
        let ctx = TemplateContext {
            remote: "[::ffff:10.0.0.7]:40000".parse().unwrap(),
            local: "[::1]:4573".parse().unwrap(),
            route: "ivr",
            listener: "asterisk",
            pool: "blue",
        };
        assert_eq!(
            t.render(&ctx),
            "10.0.0.7:40000 10.0.0.7 [::1]:4573 ivr/asterisk/blue"
        );
    }
}
