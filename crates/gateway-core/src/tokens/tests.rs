//! Estimates of parsed bodies, against the counting formula.

use serde_json::Value;

use super::*;

fn o200k(text: &str) -> u64 {
    count(Encoding::O200k, text)
}

fn chat_estimate(body: &str) -> Estimate {
    estimate(Operation::ChatCompletions, "gpt-4o", body.as_bytes(), 16)
}

#[test]
fn chat_formula_with_name_and_parts() {
    let e = chat_estimate(
        r#"{"messages":[
            {"role":"system","content":"You are helpful."},
            {"role":"user","name":"ann","content":[{"type":"text","text":"Hi"},"there",
                {"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}}]}
        ]}"#,
    );
    let expected = REPLY_PRIMING_TOKENS
        + (3 + o200k("system") + o200k("You are helpful."))
        + (3 + o200k("user") + o200k("Hi") + o200k("there") + TOKENS_PER_IMAGE)
        + o200k("ann")
        + TOKENS_PER_NAME;
    assert_eq!(e.prompt, expected);
    assert_eq!(e.completion, 16);
}

#[test]
fn escaped_text_counts_the_decoded_string() {
    let e = chat_estimate(r#"{"messages":[{"role":"user","content":"line\none \u00e9"}]}"#);
    assert_eq!(e.prompt, 3 + 3 + o200k("user") + o200k("line\none é"));
}

#[test]
fn null_content_and_tool_calls() {
    let e = chat_estimate(
        r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[
            {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"18C"}]}"#,
    );
    let expected = 3
        + (3 + o200k("assistant"))
        + (TOKENS_PER_TOOL_CALL + o200k("get_weather") + o200k(r#"{"city":"Paris"}"#))
        + (3 + o200k("tool") + o200k("18C"));
    assert_eq!(e.prompt, expected);
}

#[test]
fn tools_count_their_json() {
    let tools = r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
    let body = format!(r#"{{"messages":[],"tools":{tools}}}"#);
    let value: Value = serde_json::from_str(tools).unwrap();
    assert_eq!(chat_estimate(&body).prompt, 3 + o200k(&value.to_string()));
    assert_eq!(chat_estimate(r#"{"messages":[],"tools":[]}"#).prompt, 3);
}

#[test]
fn unexpected_shapes_fall_back_to_length() {
    for body in [
        "not json",
        r#"{"messages":[{"role":"user","content":42}]}"#,
        r#"{"messages":"hi"}"#,
        r#"{"messages":[],"max_tokens":-1}"#,
        "[1,2,3]",
        "",
    ] {
        let e = chat_estimate(body);
        assert_eq!(e.prompt, (body.len() as u64).div_ceil(4), "{body}");
        assert_eq!(e.completion, 16, "{body}");
    }
    let e = estimate(
        Operation::Embeddings,
        "text-embedding-3-small",
        b"{\"input\":{}}",
        16,
    );
    assert_eq!(
        e,
        Estimate {
            prompt: 3,
            completion: 0
        }
    );
    let e = estimate(Operation::Other, "whisper", b"\x00\x01binary", 16);
    assert_eq!(e, Estimate::default());
}
