//! Path resolution shared by REST and RPC: `~` expansion, home-relative paths, and Go's
//! lexical `Clean`, as envd resolves them (reference §2.6).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Resolves a client path for a user whose home is `home`.
///
/// - an empty path means `workdir` when one is set (else the home directory);
/// - a leading `~` (alone, or before `/`) is the home directory; `~name` is refused;
/// - an absolute path is used exactly as given (not cleaned);
/// - anything else is joined to the home directory and cleaned.
///
/// # Errors
/// [`Error::InvalidArgument`] for `~name/...` paths.
pub fn resolve(path: &str, home: &Path, workdir: Option<&Path>) -> Result<PathBuf> {
    let path = match (path.is_empty(), workdir) {
        (true, Some(dir)) => dir.to_string_lossy().into_owned(),
        _ => path.to_owned(),
    };
    let expanded = match path.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('\\') => {
            // Only `/` separates: after `~\` the backslash is part of a file name on Linux,
            // as in envd (`~\x` becomes `<home>/\x`).
            let rest = rest.trim_start_matches('/');
            return Ok(clean(&home.join(rest)));
        }
        Some(_) => {
            return Err(Error::InvalidArgument(format!(
                "error expanding and resolving path '{path}': cannot expand user-specific home dir"
            )));
        }
        None => path,
    };
    let expanded = Path::new(&expanded);
    if expanded.is_absolute() {
        Ok(expanded.to_path_buf())
    } else {
        Ok(clean(&home.join(expanded)))
    }
}

/// Go's `filepath.Clean`: collapses repeated separators, drops `.` elements and resolves `..`
/// lexically (never above the root). An empty result is `.`.
pub fn clean(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    let rooted = text.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => PathBuf::from(format!("/{joined}")),
        (false, true) => PathBuf::from("."),
        (false, false) => PathBuf::from(joined),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_envd() {
        let home = Path::new("/home/user");
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("", None, "/home/user"),
            ("", Some("/work"), "/work"),
            ("foo", Some("/work"), "/home/user/foo"),
            ("foo/./bar//baz", None, "/home/user/foo/bar/baz"),
            ("../x", None, "/home/x"),
            ("~", None, "/home/user"),
            ("~/a/../b", None, "/home/user/b"),
            ("/a/../b", None, "/a/../b"),
            ("/abs/file name ü.txt", None, "/abs/file name ü.txt"),
            ("../../../../etc", None, "/etc"),
            ("~\\x", None, "/home/user/\\x"),
            ("~//a", None, "/home/user/a"),
            ("~/", None, "/home/user"),
            ("", Some("~/w"), "/home/user/w"),
            ("", Some("rel"), "/home/user/rel"),
            ("./a", None, "/home/user/a"),
            (".", None, "/home/user"),
            ("a\\b", None, "/home/user/a\\b"),
        ];
        for (input, workdir, want) in cases {
            let got = resolve(input, home, workdir.map(Path::new)).expect(input);
            assert_eq!(got, PathBuf::from(want), "input {input:?}");
        }
    }

    #[test]
    fn refuses_other_users_homes() {
        for input in ["~bob/x", "~bob", "~.", "~~"] {
            let err = resolve(input, Path::new("/root"), None).expect_err(input);
            assert!(matches!(err, Error::InvalidArgument(_)), "{input}");
        }
    }

    #[test]
    fn cleans_like_go() {
        for (input, want) in [
            ("", "."),
            ("/", "/"),
            ("//a//b/", "/a/b"),
            ("/../a", "/a"),
            ("a/../..", ".."),
            ("./a/./b/..", "a"),
        ] {
            assert_eq!(clean(Path::new(input)), PathBuf::from(want), "{input:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Path-like strings: separators, dots, tildes, backslashes and any other text.
        fn path_text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just("/".to_owned()),
                    Just(".".to_owned()),
                    Just("..".to_owned()),
                    Just("~".to_owned()),
                    Just("\\".to_owned()),
                    "[a-z]{1,3}",
                    any::<String>(),
                ],
                0..10,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            /// Resolution never panics; only `~name` is refused; an absolute path is taken
            /// as given; anything else ends up absolute and clean (no `.`, `..` or empty
            /// components), as Go's `Clean` leaves it.
            #[test]
            fn resolution_is_total_and_clean(input in path_text(), workdir in prop::option::of(path_text())) {
                let home = Path::new("/home/user");
                let Ok(resolved) = resolve(&input, home, workdir.as_deref().map(Path::new)) else {
                    let effective = match (&workdir, input.is_empty()) {
                        (Some(dir), true) => dir.as_str(),
                        _ => input.as_str(),
                    };
                    let rest = effective.strip_prefix('~');
                    prop_assert!(
                        rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.starts_with('\\')),
                        "only ~name is refused: {effective:?}"
                    );
                    return Ok(());
                };
                prop_assert!(resolved.is_absolute(), "{resolved:?}");
                let text = resolved.to_string_lossy().into_owned();
                let effective = match (&workdir, input.is_empty()) {
                    (Some(dir), true) => dir.clone(),
                    _ => input.clone(),
                };
                if effective.starts_with('/') {
                    prop_assert_eq!(text, effective);
                } else {
                    prop_assert!(
                        text == "/" || text.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != ".."),
                        "not clean: {text:?}"
                    );
                }
            }

            /// `clean` is idempotent and never climbs above the root.
            #[test]
            fn clean_is_idempotent(input in path_text()) {
                let once = clean(Path::new(&input));
                prop_assert_eq!(clean(&once), once.clone());
                if input.starts_with('/') {
                    prop_assert!(once.to_string_lossy().starts_with('/'));
                    prop_assert!(!once.components().any(|c| c == std::path::Component::ParentDir));
                }
            }
        }
    }
}
