//! Which colour a call goes to: a hash of its key against the weight in
//! force when the key was created. Asterisk's `agi_uniqueid` (and
//! `${CHANNEL(linkedid)}`) is `[systemname-]<epoch seconds>.<sequence>`;
//! every AGI of the call carries the same key, so every replica computes
//! the same time, the same weight and the same hash point.

/// The creation time in a key, Unix milliseconds (whole seconds); None for
/// a key in another format (an id given through ARI or originate).
pub fn key_time_ms(key: &str) -> Option<i64> {
    // The system name may itself hold '-'; the id is after the last one.
    // A '-' with no name before it is not Asterisk's form (`-1.5`).
    let id = match key.rsplit_once('-') {
        Some(("", _)) => return None,
        Some((_, id)) => id,
        None => key,
    };
    let (secs, seq) = id.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // 12 digits reach past the year 30000: anything longer is not a time.
    if !digits(secs) || !digits(seq) || secs.len() > 12 {
        return None;
    }
    secs.parse::<i64>().ok().map(|s| s * 1000)
}

/// The key's point on the 0..10000 line: green below the weight (basis
/// points). Raising the weight only adds calls to green; lowering it never
/// applies to calls already made, because they keep their creation time.
pub fn point(key: &[u8]) -> u32 {
    (crate::pool::hash::stable_hash(key, 0x5eed) % 10_000) as u32
}

pub fn goes_green(point: u32, weight_bp: u32) -> bool {
    point < weight_bp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniqueids_and_linkedids_give_their_time() {
        assert_eq!(key_time_ms("1796505644.23"), Some(1_796_505_644_000));
        assert_eq!(
            key_time_ms("pbx-eu-1-1796505644.0"),
            Some(1_796_505_644_000)
        );
        for bad in [
            "",
            "abc",
            "1796505644",
            "1796505644.",
            ".12",
            "17965x5644.1",
            "1796505644.1a",
            "1234567890123.1",
            "0a1b2c3d-aaaa-bbbb",
            "-1.5",
        ] {
            assert_eq!(key_time_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn points_spread_evenly_and_rising_weights_only_add_green() {
        let mut green_at = [0u32; 4];
        for i in 0..20_000 {
            let p = point(format!("1796505644.{i}").as_bytes());
            for (j, w) in [1000, 2500, 5000, 10_000].into_iter().enumerate() {
                green_at[j] += u32::from(goes_green(p, w));
            }
        }
        for (got, want) in green_at.iter().zip([2000, 5000, 10_000, 20_000]) {
            assert!(got.abs_diff(want) < 400, "{got} vs {want}");
        }
    }
}
