//! Command words as Asterisk's `parse_args()` (res_agi.c) splits them, and
//! the commands it allows on a dead channel.

/// Splits a command line into words: spaces and tabs separate words outside
/// double quotes, quotes group (and are removed), a backslash makes the next
/// character literal. A quote right after whitespace starts a word even when
/// it stays empty (`SET VARIABLE x ""` has four words).
pub(crate) fn parse(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let (mut quoted, mut escaped) = (false, false);
    for c in line.chars() {
        match c {
            '"' if !escaped => {
                quoted = !quoted;
                if quoted && cur.is_none() {
                    cur = Some(String::new());
                }
            }
            ' ' | '\t' if !quoted && !escaped => words.extend(cur.take()),
            '\\' if !escaped => escaped = true,
            _ => {
                cur.get_or_insert_with(String::new).push(c);
                escaped = false;
            }
        }
    }
    words.extend(cur);
    words
}

/// Whether `words` begin with `prefix`, compared case-insensitively as
/// Asterisk's `find_command()` does.
pub(crate) fn starts_with(words: &[String], prefix: &[&str]) -> bool {
    words.len() >= prefix.len()
        && words
            .iter()
            .zip(prefix)
            .all(|(w, p)| w.eq_ignore_ascii_case(p))
}

/// Commands that still work after the caller hung up; the others get 511.
pub(crate) fn dead_safe(words: &[String]) -> bool {
    const DEAD_SAFE: &[&[&str]] = &[
        &["EXEC"],
        &["GET", "VARIABLE"],
        &["GET", "FULL", "VARIABLE"],
        &["SET", "VARIABLE"],
        &["VERBOSE"],
        &["NOOP"],
        &["DATABASE"],
        &["ASYNCAGI", "BREAK"],
    ];
    DEAD_SAFE.iter().any(|prefix| starts_with(words, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_parse_args() {
        assert_eq!(
            parse("VERBOSE \"hello world\" 1"),
            ["VERBOSE", "hello world", "1"]
        );
        assert_eq!(parse("SET VARIABLE x \"\""), ["SET", "VARIABLE", "x", ""]);
        assert_eq!(
            parse("SET VARIABLE  x  a\\ b"),
            ["SET", "VARIABLE", "x", "a b"]
        );
        assert_eq!(
            parse("SET VARIABLE x \"say \\\"hi\\\"\""),
            ["SET", "VARIABLE", "x", "say \"hi\""]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn dead_channel_allows_only_the_safe_commands() {
        let safe = |line: &str| dead_safe(&parse(line));
        assert!(safe("exec Dial PJSIP/1"));
        assert!(safe("GET FULL VARIABLE ${X}"));
        assert!(safe("DATABASE PUT a b c"));
        assert!(safe("ASYNCAGI BREAK"));
        assert!(!safe("STREAM FILE beep \"\""));
        assert!(!safe("GET DATA beep"));
        assert!(!safe("ANSWER"));
    }
}
