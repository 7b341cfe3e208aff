//! The secret grep: no secret value may appear in anything the gateway shows (logs at any level,
//! the access log, exported traces, `/metrics`, `/admin/status`, error bodies, `gateway check`).
//! Tests collect the values they handed the gateway (keys, tokens, certificates) and the outputs
//! they captured, and call [`assert_no_secrets`].

/// Fails the test naming each secret (by its label, never its value) found in an output, with the
/// output's name. Refuses vacuous checks: every secret must be at least 8 bytes (a short one would
/// match by chance), and every output non-empty (an output that was never captured proves
/// nothing).
pub fn assert_no_secrets(secrets: &[(&str, &str)], outputs: &[(&str, &str)]) {
    let mut found = Vec::new();
    for (label, value) in secrets {
        assert!(
            value.len() >= 8,
            "secret `{label}` is too short to grep for"
        );
        for (place, text) in outputs {
            if text.contains(value) {
                found.push(format!("`{label}` in {place}"));
            }
        }
    }
    for (place, text) in outputs {
        assert!(!text.trim().is_empty(), "nothing was captured from {place}");
    }
    assert!(found.is_empty(), "secrets leaked: {}", found.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "secrets leaked: `backend key` in the log")]
    fn finds_a_secret() {
        assert_no_secrets(
            &[("backend key", "k-12345678")],
            &[("the log", "sent api-key k-12345678 upstream")],
        );
    }

    #[test]
    #[should_panic(expected = "nothing was captured from stderr")]
    fn refuses_an_empty_output() {
        assert_no_secrets(&[("backend key", "k-12345678")], &[("stderr", "")]);
    }

    #[test]
    fn passes_clean_outputs() {
        assert_no_secrets(
            &[("backend key", "k-12345678")],
            &[("the log", "api-key from env:KEY")],
        );
    }
}
