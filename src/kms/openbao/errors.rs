//! How an OpenBao answer maps to the trait's outcomes: [`triage`] says which HTTP answers are
//! worth another server (and so end as *unreachable*), [`classify`] sorts a refusal's text into
//! *denied*, *corrupt* or *misconfigured*, and [`error_text`] reads that text from a body.
//! Pure functions of status and body: no I/O, no state.

use crate::kms::KmsError;
use serde_json::Value;

/// What one HTTP answer means for the request that got it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Triage {
    /// The body is the answer: a 2xx, or a 400 whose batch items carry their own results.
    Answer,
    /// Ask the next server: a standby's redirect (3xx), 429, or a 5xx (sealed, a standby with
    /// no active node, overloaded). Carries the text for the *unreachable* error should every
    /// attempt end like this.
    Retry(String),
    /// Final: the server refused the request (status and error text).
    Refused(u16, String),
}

/// Sorts an HTTP answer by its status (and, for a 400, whether it holds batch results).
pub(super) fn triage(status: u16, body: &Value) -> Triage {
    match status {
        200..=299 => Triage::Answer,
        // A batch with failed items: the per-item results are the answer.
        400 if body.pointer("/data/batch_results").is_some() => Triage::Answer,
        // 3xx: a standby pointing at the active node (which may be the one that just died):
        // we do not follow it, we try the next address.
        300..=399 | 429 | 500..=599 => Triage::Retry(format!("HTTP {status} {}", error_text(body))),
        _ => Triage::Refused(status, error_text(body)),
    }
}

/// Sorts a Transit error message into the trait's outcomes.
pub(super) fn classify(status: u16, msg: &str) -> KmsError {
    let m = msg.to_owned();
    if status == 403 {
        return KmsError::Denied(format!("permission denied ({m})"));
    }
    if msg.contains("message authentication failed")
        || msg.contains("invalid ciphertext")
        || msg.contains("illegal base64")
        || msg.contains("version is too new")
    {
        return KmsError::Corrupt(m);
    }
    if msg.contains("encryption key not found")
        || msg.contains("soft-deleted")
        || msg.contains("disallowed by policy")
    {
        return KmsError::Denied(m);
    }
    KmsError::Misconfigured(format!("OpenBao refused the request: {m}"))
}

/// The `errors` of an OpenBao error body as one line ("" when it has none).
pub(super) fn error_text(v: &Value) -> String {
    v.get("errors")
        .and_then(|e| e.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
        .replace('\n', " ")
        .replace('\t', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The outcome for a whole-request refusal, as `send` and `call` reach it: the body's
    /// text, classified with the status.
    fn refusal(status: u16, body: &str) -> KmsError {
        let v: Value = serde_json::from_str(body).expect("test body is JSON");
        classify(status, &error_text(&v))
    }

    /// Every error answer measured on OpenBao 2.7.2 that reaches `classify`, with its outcome.
    #[test]
    fn transit_refusals_are_classified() {
        let cases: &[(u16, &str, &str)] = &[
            // A policy without the path, and a dead (revoked, expired, bogus) token.
            (
                403,
                r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#,
                "Denied",
            ),
            (403, r#"{"errors":["permission denied"]}"#, "Denied"),
            // The wrapped key does not open: wrong context, damaged or foreign ciphertext.
            (
                400,
                r#"{"errors":["cipher: message authentication failed"]}"#,
                "Corrupt",
            ),
            (400, r#"{"errors":["invalid ciphertext length"]}"#, "Corrupt"),
            (400, r#"{"errors":["invalid ciphertext: no prefix"]}"#, "Corrupt"),
            (
                400,
                r#"{"errors":["invalid ciphertext: version is too new"]}"#,
                "Corrupt",
            ),
            (
                400,
                r#"{"errors":["illegal base64 data at input byte 3"]}"#,
                "Corrupt",
            ),
            // The key may not be used: deleted, soft-deleted, version below the minimum.
            (400, r#"{"errors":["encryption key not found"]}"#, "Denied"),
            (
                400,
                r#"{"errors":["refusing to use soft-deleted key"]}"#,
                "Denied",
            ),
            (
                400,
                r#"{"errors":["ciphertext or signature version is disallowed by policy (too old)"]}"#,
                "Denied",
            ),
            // Anything else is ours or the setup's to fix.
            (
                400,
                r#"{"errors":["missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["failed to decode JSON input: unexpected EOF"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["missing batch input to process"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["context should be set either in all the request blocks or in none"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["refused JSON input due to high complexity: exceeded maximum number of strings"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["Invalid path, must be 'plaintext' or 'wrapped'"]}"#,
                "Misconfigured",
            ),
            (
                400,
                r#"{"errors":["something new in OpenBao 3"]}"#,
                "Misconfigured",
            ),
            (400, r#"{}"#, "Misconfigured"),
            (404, r#"{"errors":[]}"#, "Misconfigured"),
            (
                405,
                r#"{"errors":["1 error occurred:\n\t* unsupported operation\n\n"]}"#,
                "Misconfigured",
            ),
            (
                413,
                r#"{"errors":["http: request body too large"]}"#,
                "Misconfigured",
            ),
        ];
        for (status, body, want) in cases {
            let got = refusal(*status, body);
            assert_eq!(got.kind(), *want, "HTTP {status} {body} gave {got:?}");
        }
    }

    /// A failed batch item carries its own `error` string, classified as a 400.
    #[test]
    fn failed_batch_items_are_classified() {
        let cases = [
            ("cipher: message authentication failed", "Corrupt"),
            ("invalid ciphertext length", "Corrupt"),
            (
                "ciphertext or signature version is disallowed by policy (too old)",
                "Denied",
            ),
            ("encryption key not found", "Denied"),
            ("no result", "Misconfigured"),
        ];
        for (msg, want) in cases {
            let got = classify(400, msg);
            assert_eq!(got.kind(), want, "item error {msg:?} gave {got:?}");
        }
    }

    #[test]
    fn classified_errors_keep_the_servers_text() {
        assert_eq!(
            refusal(
                403,
                r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#
            ),
            KmsError::Denied("permission denied (1 error occurred: * permission denied  )".into())
        );
        assert_eq!(
            classify(400, "cipher: message authentication failed"),
            KmsError::Corrupt("cipher: message authentication failed".into())
        );
        assert_eq!(
            classify(400, "missing batch input to process"),
            KmsError::Misconfigured("OpenBao refused the request: missing batch input to process".into())
        );
    }

    #[test]
    fn error_text_flattens_the_errors_array() {
        // A policy refusal as OpenBao sends it: one multi-line string.
        let denied = json!({"errors": ["1 error occurred:\n\t* permission denied\n\n"]});
        assert_eq!(error_text(&denied), "1 error occurred: * permission denied  ");
        // Several errors join with "; "; entries that are not strings are skipped.
        let many = json!({"errors": ["encryption key not found", 7, "Vault is sealed"]});
        assert_eq!(error_text(&many), "encryption key not found; Vault is sealed");
        // No text: an empty list, a batch answer, a body that was not JSON.
        assert_eq!(error_text(&json!({"errors": []})), "");
        assert_eq!(error_text(&json!({"data": {"batch_results": []}})), "");
        assert_eq!(error_text(&Value::Null), "");
    }

    #[test]
    fn triage_retries_sealed_standby_and_overloaded_servers() {
        let sealed = json!({"errors": ["Vault is sealed"]});
        assert_eq!(
            triage(503, &sealed),
            Triage::Retry("HTTP 503 Vault is sealed".into())
        );
        let standby = json!({"errors": ["local node not active but active cluster node not found"]});
        assert_eq!(
            triage(500, &standby),
            Triage::Retry("HTTP 500 local node not active but active cluster node not found".into())
        );
        assert_eq!(triage(429, &Value::Null), Triage::Retry("HTTP 429 ".into()));
        assert_eq!(triage(307, &Value::Null), Triage::Retry("HTTP 307 ".into()));
    }

    #[test]
    fn triage_answers_and_refusals() {
        assert_eq!(
            triage(200, &json!({"data": {"ciphertext": "vault:v1:x"}})),
            Triage::Answer
        );
        // 204 (no body) is an answer too.
        assert_eq!(triage(204, &Value::Null), Triage::Answer);
        // A batch with failed items: 400, but the items are the answer.
        let partial = json!({"data": {"batch_results": [
            {"plaintext": "", "error": "cipher: message authentication failed"}
        ]}});
        assert_eq!(triage(400, &partial), Triage::Answer);
        let missing = json!({"errors": ["encryption key not found"]});
        assert_eq!(
            triage(400, &missing),
            Triage::Refused(400, "encryption key not found".into())
        );
        let revoked = json!({"errors": ["permission denied"]});
        assert_eq!(
            triage(403, &revoked),
            Triage::Refused(403, "permission denied".into())
        );
        let too_big = json!({"errors": ["http: request body too large"]});
        assert_eq!(
            triage(413, &too_big),
            Triage::Refused(413, "http: request body too large".into())
        );
    }
}
