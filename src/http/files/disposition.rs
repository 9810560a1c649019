//! `Content-Disposition`: formatting the download header (as Go's `mime.FormatMediaType`
//! does) and reading an upload part's `filename` (plain or RFC 2231 `filename*`).

use percent_encoding::percent_decode_str;

fn is_token_char(c: char) -> bool {
    c.is_ascii() && !c.is_ascii_control() && c != ' ' && !"()<>@,;:\\\"/[]?=".contains(c)
}

/// `inline; filename=...` for a download named `name`: bare when it is a token, quoted
/// (with `\"` and `\\`) when it is other ASCII, RFC 2231 `filename*=utf-8''...` otherwise.
pub fn inline(name: &str) -> String {
    if !name.is_empty() && name.chars().all(is_token_char) {
        return format!("inline; filename={name}");
    }
    if name.is_ascii() {
        let mut quoted = String::with_capacity(name.len() + 2);
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        return format!("inline; filename=\"{quoted}\"");
    }
    let mut encoded = String::new();
    for byte in name.bytes() {
        let c = byte as char;
        if byte.is_ascii() && is_token_char(c) && !"*'%".contains(c) {
            encoded.push(c);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("inline; filename*=utf-8''{encoded}")
}

/// The `filename` of a part's `Content-Disposition`, exactly as given (a full path is kept
/// whole). `filename*` (RFC 2231/5987) wins over `filename`.
pub fn filename(header: &str) -> Option<String> {
    let mut plain = None;
    for (name, value) in params(header) {
        if name.eq_ignore_ascii_case("filename*") {
            if let Some(decoded) = decode_ext_value(&value) {
                return Some(decoded);
            }
        } else if name.eq_ignore_ascii_case("filename") && plain.is_none() {
            plain = Some(value);
        }
    }
    plain
}

/// The form name (`name`) of a part's `Content-Disposition`.
pub fn name(header: &str) -> Option<String> {
    params(header)
        .into_iter()
        .find(|(param, _)| param.eq_ignore_ascii_case("name"))
        .map(|(_, value)| value)
}

/// The `name=value` parameters after the disposition (or media) type, quoted strings
/// unescaped.
pub(crate) fn params(header: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = match header.find(';') {
        Some(i) => &header[i + 1..],
        None => return out,
    };
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        let Some(eq) = rest.find('=') else { break };
        let name = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            v.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    other => v.push(other),
                }
            }
            value = v;
            rest = &quoted[end.min(quoted.len())..];
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        out.push((name, value));
    }
    out
}

/// Decodes `charset'lang'percent-encoded` (UTF-8 or US-ASCII only).
fn decode_ext_value(value: &str) -> Option<String> {
    let mut parts = value.splitn(3, '\'');
    let charset = parts.next()?;
    let _language = parts.next()?;
    let encoded = parts.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") && !charset.eq_ignore_ascii_case("us-ascii") {
        return None;
    }
    percent_decode_str(encoded)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go() {
        for (name, want) in [
            ("a.txt", "inline; filename=a.txt"),
            (".env", "inline; filename=.env"),
            ("my document.pdf", "inline; filename=\"my document.pdf\""),
            ("say \"hi\".txt", "inline; filename=\"say \\\"hi\\\".txt\""),
            ("back\\slash", "inline; filename=\"back\\\\slash\""),
            (
                "文档.pdf",
                "inline; filename*=utf-8''%E6%96%87%E6%A1%A3.pdf",
            ),
        ] {
            assert_eq!(inline(name), want, "{name}");
        }
    }

    #[test]
    fn parses_filenames_whole() {
        for (header, want) in [
            (
                r#"form-data; name="file"; filename="m1.txt""#,
                Some("m1.txt"),
            ),
            (
                r#"form-data; name="file"; filename="/abs/dir/m2.bin""#,
                Some("/abs/dir/m2.bin"),
            ),
            (
                r#"form-data; name="file"; filename="a \"q\" b""#,
                Some("a \"q\" b"),
            ),
            (
                r#"form-data; name="file"; filename=plain.txt"#,
                Some("plain.txt"),
            ),
            (
                r#"form-data; name="file"; filename="fallback"; filename*=UTF-8''%E6%96%87.txt"#,
                Some("文.txt"),
            ),
            (r#"form-data; name="file""#, None),
        ] {
            assert_eq!(filename(header).as_deref(), want, "{header}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any `Content-Disposition` a client sends is read without a panic.
            #[test]
            fn any_header_is_read(header in ".{0,120}") {
                let _ = filename(&header);
            }

            /// Structured headers with quotes, escapes and RFC 2231 values, too.
            #[test]
            fn structured_headers_are_read(
                parts in prop::collection::vec(
                    prop_oneof![
                        Just(";".to_owned()),
                        Just("=".to_owned()),
                        Just("\"".to_owned()),
                        Just("\\".to_owned()),
                        Just("filename".to_owned()),
                        Just("filename*".to_owned()),
                        Just("utf-8''".to_owned()),
                        "%[0-9A-Fa-f]{0,2}",
                        ".{0,4}",
                    ],
                    0..16,
                ),
            ) {
                let _ = filename(&format!("form-data{}", parts.concat()));
            }

            /// A download's header names the file so that the upload parser reads back the
            /// same name, for any name without control characters.
            #[test]
            fn what_downloads_say_uploads_read(name in "[^\\p{Cc}]{1,30}") {
                prop_assert_eq!(filename(&inline(&name)), Some(name));
            }
        }
    }
}
