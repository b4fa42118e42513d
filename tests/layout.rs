//! The properties of the source layout that the README's "Architecture"
//! promises: pure decisions do no I/O, the reconcile and OAuth code is in
//! functions a reader can hold in mind, the types exclude what they can,
//! and the troubleshooting table names every condition reason there is.

use std::fs;
use std::path::{Path, PathBuf};

use tokenkeeper::error::Reason;

fn rust_files(dir: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("a source folder") {
            let path = entry.expect("a readable entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(!found.is_empty(), "no Rust files under {dir}");
    found
}

/// A file's text before its `#[cfg(test)]` module: tests may use anything.
fn non_test_code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("a readable source file");
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[test]
fn pure_decisions_do_no_io_and_read_no_clock() {
    // What does I/O or reads the time: the API client, HTTP, the runtime's
    // timers and tasks, the system clock.
    let forbidden = [
        "kube::Api",
        "kube::api::",
        "Api<",
        "kube::Client",
        "reqwest",
        "tokio",
        "Timestamp::now",
        "Instant::now",
        "SystemTime",
        "crate::reconcile",
        "crate::write",
        "crate::runtime::run",
        "crate::runtime::secret_cache",
        "crate::oauth::client",
        "crate::oauth::authorize",
        "crate::metrics",
        "tracing::",
    ];
    for file in rust_files("src/decide") {
        let code = non_test_code(&file);
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{} uses {word}: decisions take what was read and `now` as parameters",
                file.display()
            );
        }
    }
}

/// The functions of `text` longer than `limit` lines, as (name, lines).
fn long_functions(text: &str, limit: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let is_fn = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
        ]
        .iter()
        .any(|prefix| trimmed.starts_with(prefix));
        if !is_fn || line.trim_end().ends_with(';') {
            continue;
        }
        // rustfmt closes a function at the indentation it opened.
        let indent = line.len() - trimmed.len();
        let closing = format!("{}}}", " ".repeat(indent));
        let Some(length) = lines[start..].iter().position(|l| *l == closing) else {
            continue;
        };
        if length + 1 > limit {
            let name = trimmed.split('(').next().unwrap_or(trimmed).to_owned();
            long.push((name, length + 1));
        }
    }
    long
}

#[test]
fn reconcile_and_oauth_functions_fit_on_a_screen() {
    const LIMIT: usize = 80;
    for dir in ["src/reconcile", "src/oauth"] {
        for file in rust_files(dir) {
            let long = long_functions(&non_test_code(&file), LIMIT);
            assert!(
                long.is_empty(),
                "{}: functions over {LIMIT} lines: {long:?}",
                file.display()
            );
        }
    }
}

#[test]
fn the_function_length_check_sees_a_long_function() {
    let body = "    let x = 1;\n".repeat(90);
    let text = format!("fn short() {{\n}}\n\npub async fn long() {{\n{body}}}\n");
    assert_eq!(
        long_functions(&text, 80),
        [("pub async fn long".to_owned(), 92)]
    );
}

#[test]
fn no_allowances_for_what_types_could_exclude() {
    for file in rust_files("src") {
        let code = non_test_code(&file);
        for word in ["too_many_arguments", "unreachable!"] {
            assert!(!code.contains(word), "{} uses {word}", file.display());
        }
    }
}

#[test]
fn the_troubleshooting_table_names_every_condition_reason() {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("## Troubleshooting by condition reason")
        .nth(1)
        .expect("a troubleshooting section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let listed: Vec<&str> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    let mut expected: Vec<&str> = Reason::CONDITIONS
        .iter()
        .map(|r| r.as_str())
        .filter(|r| *r != Reason::NotRejected.as_str())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        sorted, expected,
        "README's troubleshooting table lists {listed:?}"
    );
    for reason in Reason::EVENTS_ONLY {
        assert!(
            readme.contains(&format!("`{reason}`")),
            "README does not explain the event reason {reason}"
        );
    }
}
