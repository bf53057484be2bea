//! What one client's bytes may do to another's terminal: nothing but print. Control bytes
//! are shown in caret notation (`^[` for ESC, `^M` for a CR, `^?` for DEL), so nobody can
//! move another's cursor, overwrite a line with a forged `* notice`, set a clipboard (OSC 52)
//! or make a terminal answer a query into the chat. TAB passes, as do bytes from 0x80 up
//! (UTF-8 text), unchanged.

/// Appends `line` to `out`, control bytes escaped.
pub fn neutralise(line: &[u8], out: &mut Vec<u8>) {
    for &b in line {
        match b {
            b'\t' => out.push(b),
            0x00..=0x1f => out.extend_from_slice(&[b'^', b + 0x40]),
            0x7f => out.extend_from_slice(b"^?"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        neutralise(b, &mut out);
        out
    }

    #[test]
    fn control_bytes_are_shown_and_text_passes() {
        assert_eq!(
            shown(b"hi\r* admin is now root"),
            b"hi^M* admin is now root"
        );
        assert_eq!(shown(b"\x1b]52;c;aGk=\x07"), b"^[]52;c;aGk=^G");
        assert_eq!(shown(b"\x1b[6n\x00\x7f"), b"^[[6n^@^?");
        assert_eq!(
            shown("a\tb caf\u{e9} \u{1f600}".as_bytes()),
            "a\tb caf\u{e9} \u{1f600}".as_bytes()
        );
        assert_eq!(shown(b"\xff\x80"), b"\xff\x80");
    }
}
