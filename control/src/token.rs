//! The bearer tokens the control API accepts. A token file can be replaced
//! while the proxy runs (a rotated Kubernetes Secret): the new token is
//! accepted at once, and the one before it for [`GRACE`] more, so that
//! `ctl` users and the other replicas (whose copies of the Secret the
//! kubelet updates a minute or so apart) follow without a refused request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;

use crate::files::{read_bounded, Refresh, Watched};

/// How long the token before a rotation is still accepted.
pub const GRACE: Duration = Duration::from_secs(600);

/// The largest token file read.
pub const MAX_TOKEN_BYTES: u64 = 4096;

struct Set {
    current: String,
    /// The token before the last rotation, and until when it is accepted.
    previous: Option<(String, Instant)>,
}

/// The token in use, and the one before it while its grace lasts.
pub struct Tokens(ArcSwap<Set>);

impl Tokens {
    pub fn new(token: String) -> Tokens {
        Tokens(ArcSwap::from_pointee(Set {
            current: token,
            previous: None,
        }))
    }

    /// The token to present (to the other replicas).
    pub fn current(&self) -> String {
        self.0.load().current.clone()
    }

    /// The token before the last rotation, while it is still accepted: a
    /// peer whose own copy of the token file has not changed yet knows only
    /// that one.
    pub fn previous(&self) -> Option<String> {
        let set = self.0.load();
        set.previous
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    /// Makes `token` the one in use; the one it replaces is accepted for
    /// `grace` more. False when `token` is already in use.
    pub fn rotate(&self, token: String, grace: Duration) -> bool {
        let now = self.0.load();
        if now.current == token {
            return false;
        }
        self.0.store(Arc::new(Set {
            previous: Some((now.current.clone(), Instant::now() + grace)),
            current: token,
        }));
        true
    }

    /// Whether `presented` is a token accepted now. Compared as SHA-256
    /// digests, in constant time, with every token whether or not an
    /// earlier one matched: neither the content nor the length of a token
    /// leaks through how fast a wrong one is refused.
    pub fn accepts(&self, presented: &str) -> bool {
        let set = self.0.load();
        let digest = |b: &str| ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
        let p = digest(presented);
        let current = p.as_ref().ct_eq(digest(&set.current).as_ref());
        let previous = match &set.previous {
            Some((t, until)) => {
                let eq = p.as_ref().ct_eq(digest(t).as_ref());
                eq & subtle::Choice::from(u8::from(Instant::now() < *until))
            }
            None => subtle::Choice::from(0),
        };
        bool::from(current | previous)
    }
}

/// A token file followed: read again when it changes.
pub struct FollowedToken {
    file: Watched,
    tokens: Arc<Tokens>,
}

impl FollowedToken {
    /// `tokens`, read from `path` earlier: the first refresh reads the file
    /// again (at start-up the token is read before the server is ready, and
    /// a rotation in between was never picked up, SIGHUP or not: audit).
    pub fn new(path: PathBuf, tokens: Arc<Tokens>) -> FollowedToken {
        FollowedToken {
            file: Watched::unseen(vec![path]),
            tokens,
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        self.file.paths()
    }

    /// Reads the file again if it changed; a new token is used at once,
    /// the one before accepted for [`GRACE`]. Blocking: off the runtime.
    pub fn refresh(&self) -> Refresh {
        if !self.file.changed() {
            return Refresh::Unchanged;
        }
        match read_token(&self.file.paths()[0]) {
            Ok(t) => {
                if self.tokens.rotate(t, GRACE) {
                    Refresh::Reloaded
                } else {
                    Refresh::Unchanged
                }
            }
            Err(e) => Refresh::Refused(e),
        }
    }
}

/// The token in the file at `path`: at most [`MAX_TOKEN_BYTES`], UTF-8,
/// surrounding whitespace trimmed, and [`presentable`].
pub fn read_token(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path, MAX_TOKEN_BYTES)?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    let token = text.trim();
    presentable(token).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token.to_string())
}

/// Whether `token` can be sent as `Authorization: Bearer TOKEN`: not empty,
/// visible ASCII, no space or line break. Any other token could never be
/// presented, and taking it in a rotation locked every client out once the
/// old token's grace ended (audit: `tök` and a two-line file were taken).
pub fn presentable(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("the token is empty; put a secret in it");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token must be visible ASCII without spaces or line breaks \
                    (it is sent in an HTTP header); e.g. openssl rand -hex 32",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_rotated_before_it_is_followed_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "tok-one").unwrap();
        let tokens = Arc::new(Tokens::new(read_token(&path).unwrap()));
        std::fs::write(&path, "tok-two").unwrap();
        let followed = FollowedToken::new(path.clone(), tokens.clone());
        assert_eq!(followed.refresh(), Refresh::Reloaded);
        assert_eq!(tokens.current(), "tok-two");
        assert_eq!(followed.refresh(), Refresh::Unchanged);
        // Not rotated: the first look reads the same token, and says so.
        let same = FollowedToken::new(path, Arc::new(Tokens::new("tok-two".into())));
        assert_eq!(same.refresh(), Refresh::Unchanged);
    }

    #[test]
    fn only_tokens_a_header_can_carry_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for (text, ok) in [
            ("  s3cret-Token_=+/~\n", true),
            ("tök", false),
            ("one\ntwo", false),
            ("with space", false),
            ("tab\there", false),
            ("\n", false),
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                read_token(&path).is_ok(),
                ok,
                "{text:?}: {:?}",
                read_token(&path)
            );
        }
    }

    #[test]
    fn a_rotated_token_is_accepted_at_once_and_the_old_one_for_its_grace() {
        let t = Tokens::new("old-secret".into());
        assert!(t.accepts("old-secret") && !t.accepts("new-secret") && !t.accepts(""));
        assert!(t.rotate("new-secret".into(), Duration::from_millis(200)));
        assert!(
            !t.rotate("new-secret".into(), Duration::from_millis(200)),
            "same token"
        );
        assert_eq!(t.current(), "new-secret");
        assert!(t.accepts("new-secret") && t.accepts("old-secret"));
        assert!(!t.accepts("other"));
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            t.accepts("new-secret") && !t.accepts("old-secret"),
            "grace over"
        );
    }

    #[test]
    fn a_followed_token_file_rotates_and_a_bad_one_is_refused() {
        let dir = tempfile::TempDir::with_prefix("agiproxy-token").unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let tokens = Arc::new(Tokens::new(read_token(&path).unwrap()));
        let f = FollowedToken::new(path.clone(), tokens.clone());
        assert_eq!(f.refresh(), Refresh::Unchanged);
        std::fs::write(&path, "second-token\n").unwrap();
        assert_eq!(f.refresh(), Refresh::Reloaded);
        assert!(tokens.accepts("second-token") && tokens.accepts("first"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(f.refresh(), Refresh::Refused(e) if e.contains("empty")));
        assert_eq!(
            tokens.current(),
            "second-token",
            "the last good token stays"
        );
        std::fs::write(&path, "second-token").unwrap();
        assert_eq!(f.refresh(), Refresh::Unchanged, "the same token again");
    }
}
