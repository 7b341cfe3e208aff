//! The borrowing serde model of request bodies, flattened into a [`RequestJson`].

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{Close, ParseError, Piece, Prompt, PromptFields, RequestJson, Span};
use crate::operation::Operation;
use crate::tokens::{
    REPLY_PRIMING_TOKENS, TOKENS_PER_IMAGE, TOKENS_PER_MESSAGE, TOKENS_PER_NAME,
    TOKENS_PER_TOOL_CALL,
};

pub(super) fn parse(body: &[u8]) -> Result<RequestJson, ParseError> {
    if body.is_empty() {
        return Err(ParseError(
            "a JSON object is required and the body is empty".into(),
        ));
    }
    let close = close_of(body)?;
    // One pass: the routing fields are read, the prompt fields are only delimited (their bytes are
    // skipped, not parsed); the estimator parses the one its operation uses, when a limit needs it.
    let head = serde_json::from_slice::<Head<'_>>(body).map_err(|e| ParseError(e.to_string()))?;
    let model = match head.model {
        Some(raw) if raw.get() != "null" => Some(
            serde_json::from_str::<String>(raw.get())
                .map_err(|e| ParseError(format!("'model': {e}")))?,
        ),
        _ => None,
    };
    let span = |raw: Option<&RawValue>| raw.and_then(|raw| Span::of(body, raw.get().as_bytes()));
    let stream_options = match head.stream_options {
        Some(raw) => {
            let options = serde_json::from_str::<Map<String, Value>>(raw.get()).ok();
            span(Some(raw)).map(|at| (at, options))
        }
        None => None,
    };
    let include_usage = stream_options
        .as_ref()
        .and_then(|(_, o)| o.as_ref()?.get("include_usage")?.as_bool())
        .unwrap_or(false);
    Ok(RequestJson {
        model,
        stream: head.stream.unwrap_or(false),
        include_usage,
        max_tokens: head.max_tokens,
        max_completion_tokens: head.max_completion_tokens,
        max_output_tokens: head.max_output_tokens,
        n: head.n,
        model_at: span(head.model),
        stream_options,
        // A value of another type is Azure's to refuse: it is read as no tier, never an error.
        service_tier: head.service_tier.and_then(|raw| {
            let tier = serde_json::from_str::<String>(raw.get()).ok();
            span(Some(raw)).map(|at| (at, tier))
        }),
        prompt_fields: PromptFields {
            messages: span(head.messages),
            prompt: span(head.prompt),
            input: span(head.input),
            instructions: span(head.instructions),
            tools: span(head.tools),
            functions: span(head.functions),
            best_of: span(head.best_of),
        },
        close,
    })
}

/// The prompt of a request to `operation`, from the fields [`parse`] delimited in `body`. `None` when
/// a field the operation counts has an unexpected shape.
pub(super) fn prompt(operation: Operation, fields: &PromptFields, body: &[u8]) -> Option<Prompt> {
    let field = |at: Option<Span>| at.and_then(|at| body.get(at.range()));
    let mut b = Builder {
        body,
        prompt: Prompt::default(),
    };
    match operation {
        Operation::ChatCompletions => {
            let messages: Vec<Message<'_>> = match field(fields.messages) {
                Some(raw) => serde_json::from_slice(raw).ok()?,
                None => Vec::new(),
            };
            b.fixed(REPLY_PRIMING_TOKENS);
            for message in &messages {
                b.message(message);
            }
            b.definitions(field(fields.tools))?;
            b.definitions(field(fields.functions))?;
        }
        Operation::Completions => {
            best_of(fields, body).ok()?;
            b.input_texts(field(fields.prompt))?;
        }
        Operation::Embeddings => b.input_texts(field(fields.input))?,
        Operation::Responses => {
            let input: Input<'_> = match field(fields.input) {
                Some(raw) => serde_json::from_slice(raw).ok()?,
                None => Input::None,
            };
            match &input {
                Input::None => {}
                Input::Text(text) => b.text(text),
                Input::Array { texts, items, .. } => {
                    // Items are objects; a bare string or token id is not a Responses item.
                    if !texts.is_empty() {
                        return None;
                    }
                    b.fixed(REPLY_PRIMING_TOKENS);
                    for item in items {
                        b.message(item);
                    }
                }
            }
            let instructions: Content<'_> = match field(fields.instructions) {
                Some(raw) => serde_json::from_slice(raw).ok()?,
                None => Content::None,
            };
            b.content(&instructions);
            b.definitions(field(fields.tools))?;
        }
        Operation::Other => {}
    }
    Some(b.prompt)
}

/// `best_of`: `Ok(None)` when absent or `null`, `Err` when it is not a count.
pub(super) fn best_of(fields: &PromptFields, body: &[u8]) -> Result<Option<u64>, ()> {
    let Some(at) = fields.best_of else {
        return Ok(None);
    };
    let raw = body.get(at.range()).ok_or(())?;
    serde_json::from_slice::<Option<u64>>(raw).map_err(|_| ())
}

/// The closing brace of the top-level object, and whether the object is empty. The body must be an
/// object: edits are spliced before that brace.
fn close_of(body: &[u8]) -> Result<Close, ParseError> {
    let not_object = || ParseError("a JSON object is required".into());
    let first = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or_else(not_object)?;
    let last = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .ok_or_else(not_object)?;
    if body[first] != b'{' || body[last] != b'}' || last <= first {
        // Let the JSON parser say what is wrong when it can; this is the fallback message.
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Err(e) => Err(ParseError(e.to_string())),
            Ok(_) => Err(not_object()),
        };
    }
    let empty = body[first + 1..last].iter().all(u8::is_ascii_whitespace);
    Ok(Close { at: last, empty })
}

// === the body model ===

/// What one pass reads: the routing fields, and where each prompt field is. A raw field keeps its
/// place even when it is `null`, so that an edit replaces it rather than adding a second key.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "raw")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(borrow, default, deserialize_with = "raw")]
    best_of: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    input: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    functions: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    service_tier: Option<&'a RawValue>,
}

/// A field's raw JSON, `null` included (serde would make a `null` `None` and lose its place).
fn raw<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// A chat message, or a Responses input item (messages, function calls and their outputs).
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Content<'a>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    /// The legacy single function call of an assistant message.
    #[serde(borrow)]
    function_call: Option<FunctionCall<'a>>,
    /// A Responses `function_call` item's arguments.
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
    /// A Responses `function_call_output` item's output (a string or content parts).
    #[serde(borrow, default)]
    output: Content<'a>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow)]
    function: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct PartObject<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
}

/// A JSON string, borrowed from the body when it has no escapes.
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

/// A message's `content`: absent or null, a string, or an array of parts.
#[derive(Default)]
enum Content<'a> {
    #[default]
    None,
    Text(Text<'a>),
    Parts(Vec<Part<'a>>),
}

/// One content part: a bare string, or an object (`{"type": "text", "text": ...}`, an image...).
enum Part<'a> {
    Text(Text<'a>),
    Object(PartObject<'a>),
}

/// A completions `prompt`, an embeddings `input` or a Responses `input`: absent or null, a string, or
/// an array of strings, token ids, arrays of token ids and (Responses) input items.
#[derive(Default)]
enum Input<'a> {
    #[default]
    None,
    Text(Text<'a>),
    Array {
        texts: Vec<Text<'a>>,
        token_ids: u64,
        items: Vec<Message<'a>>,
    },
}

// === flattening into a Prompt ===

/// Builds a [`Prompt`] from borrowed parts of `body`.
struct Builder<'b> {
    body: &'b [u8],
    prompt: Prompt,
}

impl Builder<'_> {
    fn fixed(&mut self, tokens: u64) {
        self.prompt.fixed = self.prompt.fixed.saturating_add(tokens);
    }

    fn text(&mut self, text: &Text<'_>) {
        if text.0.is_empty() {
            return;
        }
        let piece = match &text.0 {
            Cow::Borrowed(s) => match Span::of(self.body, s.as_bytes()) {
                Some(span) => Piece::At(span),
                None => Piece::Decoded(Box::from(*s)),
            },
            Cow::Owned(s) => Piece::Decoded(Box::from(s.as_str())),
        };
        self.prompt.texts.push(piece);
    }

    fn opt_text(&mut self, text: Option<&Text<'_>>) {
        if let Some(text) = text {
            self.text(text);
        }
    }

    fn content(&mut self, content: &Content<'_>) {
        match content {
            Content::None => {}
            Content::Text(text) => self.text(text),
            Content::Parts(parts) => {
                for part in parts {
                    match part {
                        Part::Text(text) => self.text(text),
                        Part::Object(part) => {
                            let kind = part.kind.as_ref().map(|kind| kind.0.as_ref());
                            if matches!(kind, Some("image_url" | "input_image" | "image")) {
                                self.fixed(TOKENS_PER_IMAGE);
                            }
                            self.opt_text(part.text.as_ref());
                            self.opt_text(part.refusal.as_ref());
                        }
                    }
                }
            }
        }
    }

    /// One chat message or Responses input item, by the chat formula.
    fn message(&mut self, message: &Message<'_>) {
        self.fixed(TOKENS_PER_MESSAGE);
        self.opt_text(message.role.as_ref());
        self.content(&message.content);
        if let Some(name) = &message.name {
            self.text(name);
            self.fixed(TOKENS_PER_NAME);
        }
        let calls = message
            .tool_calls
            .iter()
            .flatten()
            .filter_map(|c| c.function.as_ref());
        for call in calls.chain(message.function_call.as_ref()) {
            self.fixed(TOKENS_PER_TOOL_CALL);
            self.opt_text(call.name.as_ref());
            self.opt_text(call.arguments.as_ref());
        }
        self.opt_text(message.arguments.as_ref());
        self.content(&message.output);
    }

    /// A completions prompt or an embeddings input: its texts and token ids. `null`, an object, or an
    /// array holding an object is not one.
    fn input_texts(&mut self, raw: Option<&[u8]>) -> Option<()> {
        let Some(raw) = raw else { return Some(()) };
        match serde_json::from_slice::<Input<'_>>(raw).ok()? {
            Input::None => return None,
            Input::Text(text) => self.text(&text),
            Input::Array {
                texts,
                token_ids,
                items,
            } => {
                if !items.is_empty() {
                    return None;
                }
                for text in &texts {
                    self.text(text);
                }
                self.fixed(token_ids);
            }
        }
        Some(())
    }

    /// Tool or function definitions, counted later by their compact JSON; `null` and `[]` count
    /// nothing. Anything that is not valid JSON is not a definition list.
    fn definitions(&mut self, raw: Option<&[u8]>) -> Option<()> {
        let Some(raw) = raw else { return Some(()) };
        let json = std::str::from_utf8(raw).ok()?.trim();
        if json == "null" || (json.starts_with('[') && json[1..].trim() == "]") {
            return Some(());
        }
        self.prompt.definitions.push(Span::of(self.body, raw)?);
        Some(())
    }
}

// === lenient, borrowing field types ===

/// Implements the string cases of a visitor whose value wraps a [`Text`].
macro_rules! visit_strings {
    ($wrap:expr) => {
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Borrowed(v))))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Owned(v.to_owned()))))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Owned(v))))
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            visit_strings!(|text| text);
        }

        deserializer.deserialize_str(TextVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ContentVisitor<'a> {
            type Value = Content<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }

            visit_strings!(Content::Text);

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Part<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PartVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for PartVisitor<'a> {
            type Value = Part<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part (an object or a string)")
            }

            visit_strings!(Part::Text);

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                PartObject::deserialize(MapAccessDeserializer::new(map)).map(Part::Object)
            }
        }

        deserializer.deserialize_any(PartVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Input<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// One element of an input array.
        enum Item<'a> {
            Text(Text<'a>),
            TokenIds(u64),
            Message(Message<'a>),
        }

        struct ItemVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ItemVisitor<'a> {
            type Value = Item<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id, an array of token ids or an input item")
            }

            visit_strings!(Item::Text);

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds(1))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds(1))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut ids = 0u64;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    ids += 1;
                }
                Ok(Item::TokenIds(ids))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Message::deserialize(MapAccessDeserializer::new(map)).map(Item::Message)
            }
        }

        impl<'de: 'a, 'a> Deserialize<'de> for Item<'a> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(ItemVisitor(PhantomData))
            }
        }

        struct InputVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
            type Value = Input<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings, token ids or input items")
            }

            visit_strings!(Input::Text);

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Input::None)
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Input::None)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut texts = Vec::new();
                let mut token_ids = 0u64;
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    match item {
                        Item::Text(text) => texts.push(text),
                        Item::TokenIds(ids) => token_ids = token_ids.saturating_add(ids),
                        Item::Message(message) => items.push(message),
                    }
                }
                Ok(Input::Array {
                    texts,
                    token_ids,
                    items,
                })
            }
        }

        deserializer.deserialize_any(InputVisitor(PhantomData))
    }
}
