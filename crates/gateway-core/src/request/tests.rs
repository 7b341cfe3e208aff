use std::borrow::Cow;

use super::parse::Text;
use super::*;

fn parse(body: &str) -> RequestJson {
    RequestJson::parse(body.as_bytes()).unwrap()
}

fn edited(json: &RequestJson, body: &str, edits: Edits<'_>) -> serde_json::Value {
    let out = json.edit(&Bytes::from(body.to_owned()), &edits);
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn strings_are_borrowed_unless_escaped() {
    let plain: Text<'_> = serde_json::from_str(r#""hello""#).unwrap();
    assert!(matches!(plain.0, Cow::Borrowed("hello")));
    let escaped: Text<'_> = serde_json::from_str(r#""a\nb""#).unwrap();
    assert!(matches!(escaped.0, Cow::Owned(ref s) if s == "a\nb"));
}

#[test]
fn routing_fields_are_read_whatever_the_spacing() {
    let body = "{ \"model\" : \"gpt-4o\" ,\n \"stream\": true, \"stream_options\" : { \"include_usage\" : true },\n \"max_completion_tokens\": 7, \"max_tokens\": 5, \"n\": 2, \"messages\": [] }";
    let json = parse(body);
    assert_eq!(json.model.as_deref(), Some("gpt-4o"));
    assert!(json.stream && json.include_usage);
    assert_eq!(json.output_limit(), Some(7));
    assert_eq!(json.n, Some(2));
}

#[test]
fn prompt_texts_point_into_the_body_unless_escaped() {
    let body =
        r#"{"messages":[{"role":"user","content":"Hello"},{"role":"user","content":"a\nb"}]}"#;
    let json = parse(body);
    let prompt = json
        .prompt(Operation::ChatCompletions, body.as_bytes())
        .unwrap();
    let texts: Vec<_> = prompt.texts(body.as_bytes()).collect();
    assert_eq!(texts, ["user", "Hello", "user", "a\nb"]);
    assert!(matches!(prompt.texts[1], Piece::At(_)));
    assert!(matches!(prompt.texts[3], Piece::Decoded(_)));
    assert_eq!(prompt.fixed, 3 + 3 + 3);
}

#[test]
fn an_unexpected_prompt_shape_keeps_the_routing_fields() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":42}],"stream":true}"#;
    let json = parse(body);
    assert!(
        json.prompt(Operation::ChatCompletions, body.as_bytes())
            .is_none()
    );
    assert!(json.stream);
    assert_eq!(json.model.as_deref(), Some("m"));
}

#[test]
fn bodies_that_are_not_objects_or_have_bad_routing_fields_are_errors() {
    for body in [
        "",
        "  ",
        "[1,2]",
        "null",
        "{nope",
        r#"{"stream":"yes"}"#,
        r#"{"model":3}"#,
    ] {
        assert!(RequestJson::parse(body.as_bytes()).is_err(), "{body}");
    }
    let err = RequestJson::parse(b"{nope").unwrap_err();
    assert!(err.0.contains("line 1"), "{err}");
}

#[test]
fn model_is_rewritten_in_place_keeping_everything_else() {
    let body = r#"{"input":"hi", "model" : "gpt-4o" , "dimensions":3}"#;
    let json = parse(body);
    let out = json.edit(
        &Bytes::from(body),
        &Edits {
            model: Some("emb-\"ptu\""),
            include_usage: false,
            service_tier: None,
        },
    );
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"input":"hi", "model" : "emb-\"ptu\"" , "dimensions":3}"#
    );
}

#[test]
fn nothing_to_change_returns_the_same_bytes() {
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    let json = RequestJson::parse(&body).unwrap();
    let out = json.edit(
        &body,
        &Edits {
            model: Some("gpt-4o"),
            include_usage: true,
            service_tier: None,
        },
    );
    assert_eq!(out.as_ptr(), body.as_ptr());
}

#[test]
fn include_usage_is_added_keeping_other_stream_options() {
    let body = r#"{"messages":[],"stream":true,"stream_options":{"other":1}}"#;
    let json = parse(body);
    assert!(!json.include_usage);
    let v = edited(
        &json,
        body,
        Edits {
            model: None,
            include_usage: true,
            service_tier: None,
        },
    );
    assert_eq!(v["stream_options"]["other"], 1);
    assert_eq!(v["stream_options"]["include_usage"], true);

    for body in [
        r#"{"messages":[],"stream":true}"#,
        "{\"messages\":[],\"stream\":true}\n",
        "{}",
        "{ }",
        r#"{"stream_options":null,"stream":true}"#,
        r#"{"stream_options":"junk","stream":true}"#,
        r#"{"stream_options":{"include_usage":false},"stream":true}"#,
    ] {
        let json = parse(body);
        let v = edited(
            &json,
            body,
            Edits {
                model: None,
                include_usage: true,
                service_tier: None,
            },
        );
        assert_eq!(v["stream_options"]["include_usage"], true, "{body}");
    }
}

#[test]
fn both_edits_at_once() {
    let body = r#"{"model":"gpt-4o","input":"x","stream":true}"#;
    let json = parse(body);
    let v = edited(
        &json,
        body,
        Edits {
            model: Some("gpt-4o-ptu"),
            include_usage: true,
            service_tier: None,
        },
    );
    assert_eq!(v["model"], "gpt-4o-ptu");
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["input"], "x");
}

#[test]
fn only_the_fields_of_the_operation_are_counted() {
    // A Responses prompt template is an object under `prompt`: not the legacy completions field.
    let body = r#"{"model":"gpt-4o","prompt":{"id":"pmpt_1"},"input":"hi","max_output_tokens":20}"#;
    let json = parse(body);
    let prompt = json.prompt(Operation::Responses, body.as_bytes()).unwrap();
    assert_eq!(prompt.texts(body.as_bytes()).collect::<Vec<_>>(), ["hi"]);
    assert!(
        json.prompt(Operation::Completions, body.as_bytes())
            .is_none()
    );
}

#[test]
fn a_null_stream_options_is_replaced_not_repeated() {
    let body = r#"{"stream":true,"stream_options":null,"messages":[]}"#;
    let json = parse(body);
    let out = json.edit(
        &Bytes::from(body),
        &Edits {
            model: None,
            include_usage: true,
            service_tier: None,
        },
    );
    let text = std::str::from_utf8(&out).unwrap();
    assert_eq!(text.matches("stream_options").count(), 1, "{text}");
    assert_eq!(
        text,
        r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
    );
}

#[test]
fn a_null_model_is_no_deployment() {
    assert_eq!(parse(r#"{"model":null}"#).model, None);
}

#[test]
fn duplicate_routing_fields_are_errors() {
    assert!(RequestJson::parse(br#"{"model":"a","model":"b"}"#).is_err());
}

#[test]
fn the_service_tier_is_read_and_never_refuses_a_body() {
    let tier = |body: &str| parse(body).service_tier().map(str::to_owned);
    assert_eq!(
        tier(r#"{"service_tier": "priority"}"#).as_deref(),
        Some("priority")
    );
    assert_eq!(tier(r#"{"messages":[]}"#), None);
    // Azure's to refuse: the gateway only reads it.
    assert_eq!(tier(r#"{"service_tier":null}"#), None);
    assert_eq!(tier(r#"{"service_tier":7}"#), None);
}

#[test]
fn service_tier_is_read_and_replaced_in_place() {
    let body = Bytes::from_static(br#"{"model":"gpt-4o","service_tier": "flex","messages":[]}"#);
    let json = RequestJson::parse(&body).unwrap();
    assert_eq!(json.service_tier(), Some("flex"));
    let edited = json.edit(
        &body,
        &Edits {
            model: Some("gpt-4o-ptu"),
            include_usage: false,
            service_tier: Some("default"),
        },
    );
    assert_eq!(
        &edited[..],
        br#"{"model":"gpt-4o-ptu","service_tier": "default","messages":[]}"#
    );
    // No tier in the body: nothing is added.
    let plain = Bytes::from_static(br#"{"messages":[]}"#);
    let json = RequestJson::parse(&plain).unwrap();
    assert_eq!(json.service_tier(), None);
    let same = json.edit(
        &plain,
        &Edits {
            service_tier: Some("default"),
            ..Edits::default()
        },
    );
    assert_eq!(same, plain);
}
