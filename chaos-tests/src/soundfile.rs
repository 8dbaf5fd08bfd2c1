//! The payload format of `asterisk-agi-audiotx` (`shared/fastagi-protocol.md`,
//! "Sound-file transfer"): a file as base64 lines of 76 characters (57
//! bytes), each ending in `\n`, the last one shorter.

use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Bytes per payload line (76 base64 characters).
pub const LINE_BYTES: usize = 57;

/// The known client decodes each line on its own, padded or not.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// `data` as payload lines, `\n` after each.
pub fn encode_lines(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(LINE_BYTES) * 77);
    for chunk in data.chunks(LINE_BYTES) {
        let mut line = String::with_capacity(76);
        base64::engine::general_purpose::STANDARD.encode_string(chunk, &mut line);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Decodes one payload line (without its `\n`, `\r` tolerated) onto `out`.
pub fn decode_line(line: &[u8], out: &mut Vec<u8>) -> Result<(), base64::DecodeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    LENIENT.decode_vec(line, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_76_characters_and_round_trip() {
        let data: Vec<u8> = (0..200u8).collect();
        let text = encode_lines(&data);
        let lines: Vec<&[u8]> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[..3].iter().all(|l| l.len() == 76));
        let mut back = Vec::new();
        for l in lines {
            decode_line(l, &mut back).unwrap();
        }
        assert_eq!(back, data);
        let mut unpadded = Vec::new();
        decode_line(b"QUI", &mut unpadded).unwrap();
        assert_eq!(unpadded, b"AB");
    }
}
